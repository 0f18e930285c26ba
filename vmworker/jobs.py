"""The long steps of a VM's life, run on the service's job threads.

The start job fetches the images, spawns QEMU and waits for its monitor;
the save job uploads the disks of a halted VM. Each step is journaled as it
completes, so a job interrupted by a worker restart is resumed from its
last durable step by the supervisor (a fetched image is not fetched again,
the save tries already spent are not spent again).
"""

from __future__ import annotations

import logging
import os
import secrets

from . import saving
from .cache import ImageCache
from .errors import HypervisorError, ImageError, VMWorkerError
from .hypervisor.base import Disk, Handle, VMSpec
from .service import VMService
from .state import IMAGE_SLOTS, Status

log = logging.getLogger(__name__)


class Cancelled(Exception):
    """The VM was destroyed or the worker is stopping: drop the job."""


class Jobs:
    def __init__(self, service: VMService, cache: ImageCache):
        self.service = service
        self.cache = cache
        self.cfg = service.cfg
        service.set_job_runner(self.run)

    def run(self, kind: str, uuid: str) -> None:
        if kind == "start":
            self.start(uuid)
        elif kind == "save":
            saving.SaveJob(self.service, uuid, backoff=self.cfg.save_backoff).run()
        else:
            raise ValueError(f"unknown job kind {kind!r}")

    # -- start --------------------------------------------------------------

    def start(self, uuid: str) -> None:
        svc = self.service
        paths = svc.layout.vm(uuid)
        handle: Handle | None = None
        try:
            os.makedirs(paths.folder, exist_ok=True)
            vm = svc.get(uuid)
            disks = tuple(self._disk(uuid, slot) for slot in IMAGE_SLOTS
                          if vm.params.get(f"{slot}_image"))
            spec = VMSpec(uuid=uuid, name=vm.name,
                          cpu_count=int(vm.params["cpu_count"]),
                          mem_size=int(vm.params["mem_size"]),
                          disks=disks, paths=paths)
            with svc.vm_lock(uuid):
                self._check(uuid)
                handle = svc.driver.spawn(spec)
                svc.commit(uuid, "spawned", pid=handle.pid,
                           create_time=handle.create_time)
            vnc = svc.driver.wait_ready(spec, handle, self.cfg.qemu_start_timeout)
            password = ""
            if self.cfg.vnc_password:
                password = secrets.token_urlsafe(6)[:8]  # VNC uses 8 chars
                svc.driver.set_vnc_password(uuid, paths, password)
            with svc.vm_lock(uuid):
                # Only a destroy stops it now: a stopping worker still
                # records a VM that came up (within its grace period).
                self._check(uuid, stopping=False)
                vm = svc.commit(uuid, "running", vnc=vnc, vnc_password=password)
            log.info("VM %s: running, VNC %s", vm.label, vnc)
        except Cancelled:
            log.info("VM %s: start job stopped (VM destroyed or worker "
                     "stopping)", uuid)
        except VMWorkerError as err:
            if svc.stopping.is_set():
                # The worker is going away: leave QEMU alone; the next
                # worker finds it in the journal and decides.
                log.info("VM %s: start job interrupted by the worker "
                         "stopping: %s", uuid, err)
                return
            self._fail(uuid, handle, str(err))
        except Exception as err:  # keep the VM's status truthful
            log.exception("VM %s: start job crashed", uuid)
            self._fail(uuid, handle, f"internal error: {err}")

    def _check(self, uuid: str, stopping: bool = True) -> None:
        if stopping and self.service.cancelled(uuid):
            raise Cancelled()
        if self.service.get(uuid).status is not Status.STARTING:
            raise Cancelled()

    def _disk(self, uuid: str, slot: str) -> Disk:
        """The VM's disk for one image: from an earlier try, or made now.

        hda and hdb become qcow2 overlays on the cached base; the cd is
        attached read-only from the cache itself.
        """
        svc = self.service
        vm = svc.get(uuid)
        known = vm.images.get(slot)
        if known and os.path.isfile(str(known["path"])):
            return Disk(slot, str(known["path"]), str(known["format"]))
        self._check(uuid)
        uri = str(vm.params[f"{slot}_image"])

        def progress(done: int, total: int | None) -> None:
            svc.report_progress(uuid, f"fetching {slot}", done, total)
            if svc.cancelled(uuid):
                raise Cancelled()

        try:
            cached = self.cache.get(
                uri, sha256=str(vm.params.get(f"{slot}_image_sha256") or ""),
                progress=progress, cancelled=lambda: svc.cancelled(uuid))
            if svc.cancelled(uuid):
                raise Cancelled()
            if slot == "cd":
                path, fmt = cached.path, cached.format
            else:
                path, fmt = svc.layout.vm(uuid).overlay(slot), "qcow2"
                self.cache.new_overlay(cached, path)
        except ImageError as err:
            if svc.cancelled(uuid):
                raise Cancelled() from err
            raise ImageError(f"{slot}_image: {err}") from err
        # Not waited for: the "spawned" record that follows makes it durable,
        # and a restart before that simply makes the overlay again.
        svc.commit(uuid, "image_fetched", durable=False, slot=slot, path=path,
                   format=fmt,
                   base=cached.path, base_format=cached.format,
                   sha256=cached.sha256, size=cached.size, uri=uri)
        return Disk(slot, path, fmt)

    def _fail(self, uuid: str, handle: Handle | None, reason: str) -> None:
        svc = self.service
        with svc.vm_lock(uuid):
            vm = svc.get(uuid)
            if handle is not None:
                try:
                    svc.driver.kill(uuid, handle, self.cfg.qemu_stop_timeout)
                except HypervisorError as err:
                    log.error("VM %s: cannot kill failed QEMU: %s", vm.label, err)
            if vm.status is Status.STARTING:
                svc.commit(uuid, "start_failed", reason=reason)
                log.warning("VM %s: failed to start: %s", vm.label, reason)

    # -- CD changes (modify) ------------------------------------------------

    def fetch_cd(self, uuid: str, uri: str, sha256: str = "") -> tuple[Disk, dict]:
        """A new CD medium from the cache (for modify); and its event fields."""
        cached = self.cache.get(uri, sha256=sha256)
        return (Disk("cd", cached.path, cached.format),
                {"path": cached.path, "format": cached.format,
                 "base": cached.path, "base_format": cached.format,
                 "sha256": cached.sha256, "size": cached.size, "uri": uri})
