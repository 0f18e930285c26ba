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

from . import images, saving
from .errors import HypervisorError, ImageError, VMWorkerError
from .hypervisor.base import Disk, Handle, VMSpec
from .service import VMService
from .state import IMAGE_SLOTS, Status

log = logging.getLogger(__name__)


class Cancelled(Exception):
    """The VM was destroyed or the worker is stopping: drop the job."""


class Jobs:
    def __init__(self, service: VMService):
        self.service = service
        self.cfg = service.cfg
        service.set_job_runner(self.run)

    def run(self, kind: str, uuid: str) -> None:
        if kind == "start":
            self.start(uuid)
        elif kind == "save":
            saving.SaveJob(self.service, uuid).run()
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
            with svc.vm_lock(uuid):
                self._check(uuid)
                vm = svc.commit(uuid, "running", vnc=vnc)
            log.info("VM %s: running, VNC %s", vm.label, vnc)
        except Cancelled:
            log.info("VM %s: start job stopped (VM destroyed or worker "
                     "stopping)", uuid)
        except (ImageError, HypervisorError) as err:
            self._fail(uuid, handle, str(err))
        except VMWorkerError as err:
            self._fail(uuid, handle, str(err))
        except Exception as err:  # keep the VM's status truthful
            log.exception("VM %s: start job crashed", uuid)
            self._fail(uuid, handle, f"internal error: {err}")

    def _check(self, uuid: str) -> None:
        if self.service.cancelled(uuid):
            raise Cancelled()
        if self.service.get(uuid).status is not Status.STARTING:
            raise Cancelled()

    def _disk(self, uuid: str, slot: str) -> Disk:
        """The VM's copy of one image: fetched now, or by an earlier try."""
        svc = self.service
        vm = svc.get(uuid)
        known = vm.images.get(slot)
        if known and os.path.isfile(str(known["path"])):
            return Disk(slot, str(known["path"]), str(known["format"]))
        self._check(uuid)
        paths = svc.layout.vm(uuid)
        uri = str(vm.params[f"{slot}_image"])

        def progress(done: int, total: int | None) -> None:
            svc.report_progress(uuid, f"fetching {slot}", done, total)
            if svc.cancelled(uuid):
                raise Cancelled()

        try:
            size = images.fetch(
                uri, paths.disk(slot), paths.partial(slot), roots=self.cfg.roots,
                connect_timeout=self.cfg.fetch_connect_timeout,
                read_timeout=self.cfg.fetch_read_timeout, progress=progress)
            info = images.probe(paths.disk(slot), self.cfg.qemu_img_binary)
        except ImageError as err:
            raise ImageError(f"{slot}_image: {err}") from err
        svc.commit(uuid, "image_fetched", slot=slot, path=paths.disk(slot),
                   format=info["format"], size=size)
        return Disk(slot, paths.disk(slot), info["format"])

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

    def fetch_cd(self, uuid: str, uri: str) -> Disk:
        """Fetch a new CD medium next to the VM's disks (for modify)."""
        svc = self.service
        paths = svc.layout.vm(uuid)
        name = f"cd-{os.urandom(4).hex()}"
        dest = os.path.join(paths.folder, f"{name}.img")
        images.fetch(uri, dest, os.path.join(paths.folder, f".{name}.part"),
                     roots=self.cfg.roots,
                     connect_timeout=self.cfg.fetch_connect_timeout,
                     read_timeout=self.cfg.fetch_read_timeout)
        try:
            info = images.probe(dest, self.cfg.qemu_img_binary)
        except ImageError:
            os.unlink(dest)
            raise
        return Disk("cd", dest, info["format"])
