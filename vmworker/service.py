"""The VM service: every request and every job goes through here.

It owns the in-memory records (the fold of the journal) and is the only
writer of the journal. A change is checked against the VM's status, queued
in the journal (which fixes its order) and applied in memory under one lock;
the caller then waits, outside the lock, until the record is durable, so
concurrent requests share one fsync (group commit).

Actions on one VM (a request, a job step, a supervisor decision) are
serialised by that VM's own lock, so that, for example, a destroy and the
start job that is spawning QEMU never cross.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
import uuid as uuidlib
from typing import Callable, Mapping

from . import resources, state, validation
from .config import WorkerConfig
from .errors import HypervisorError, NameTaken, UnknownVM, UuidConflict
from .hypervisor.base import Disk, Driver, Handle
from .journal import Journal, paused_gc
from .paths import VarLayout
from .state import FINAL, Status, VMRecord

log = logging.getLogger(__name__)


class VMService:
    def __init__(self, cfg: WorkerConfig, layout: VarLayout, journal: Journal,
                 driver: Driver, host: resources.Host | None = None):
        self.cfg = cfg
        self.layout = layout
        self.journal = journal
        self.driver = driver
        self.host = host or resources.Host.measure()
        self._lock = threading.RLock()
        self._vms: dict[str, VMRecord] = {}
        self._tickets: dict[str, int] = {}
        self._vm_locks: dict[str, threading.RLock] = {}
        self._jobs: set[str] = set()
        self._progress: dict[str, tuple[str, int, int | None]] = {}
        # Jobs run on daemon threads, at most start_workers at once: a
        # stopping worker does not wait for a download stuck on a dead
        # server; the journal lets the next worker resume the job.
        self._job_slots = threading.BoundedSemaphore(cfg.start_workers)
        self.stopping = threading.Event()
        #: Set whenever something happened that the supervisor should see.
        self.wakeup = threading.Event()
        self._job_runner: Callable[[str, str], None] | None = None

    # -- loading ------------------------------------------------------------

    def load(self) -> None:
        """Replay the journal into memory (the worker's start-up)."""
        vms: dict[str, VMRecord] = {}
        records = self.journal.replay()
        with paused_gc():
            for record in records:
                uuid = str(record.get("uuid"))
                try:
                    vms[uuid] = state.apply(vms.get(uuid), record)
                except (KeyError, ValueError, TypeError, state.WrongState) as err:
                    log.error("journal: skipping record %r: %s", record, err)
        with self._lock:
            self._vms = vms
        log.info("loaded %d VMs (%d not ended)", len(vms),
                 sum(vm.status not in FINAL for vm in vms.values()))

    def set_job_runner(self, runner: Callable[[str, str], None]) -> None:
        """``runner(kind, uuid)`` runs a start or save job (see jobs.py)."""
        self._job_runner = runner

    # -- queries ------------------------------------------------------------

    def get(self, uuid: str | None = None, name: str | None = None) -> VMRecord:
        with self._lock:
            if uuid:
                vm = self._vms.get(uuid)
                if vm is None:
                    raise UnknownVM(f"no VM has uuid {uuid}")
                return vm
            named = [vm for vm in self._vms.values() if vm.name == name]
        if not named:
            raise UnknownVM(f"no VM is named {name!r}")
        # A live VM wins over ended ones of the same name; then the newest.
        return max(named, key=lambda vm: (vm.status not in FINAL, vm.created))

    def vms(self) -> list[VMRecord]:
        with self._lock:
            return sorted(self._vms.values(), key=lambda vm: vm.created)

    def progress(self, uuid: str) -> tuple[str, int, int | None] | None:
        return self._progress.get(uuid)

    def job_active(self, uuid: str) -> bool:
        with self._lock:
            return uuid in self._jobs

    def pinned_blobs(self) -> set[str]:
        """The cached images (by sha256) that VMs not yet ended read."""
        with self._lock:
            return {str(image.get("sha256")) for vm in self._vms.values()
                    if vm.status not in FINAL
                    for image in vm.images.values() if image.get("sha256")}

    def lock_count(self) -> int:
        with self._lock:
            return len(self._vm_locks)

    def vm_lock(self, uuid: str) -> threading.RLock:
        with self._lock:
            return self._vm_locks.setdefault(uuid, threading.RLock())

    # -- journal ------------------------------------------------------------

    def commit(self, uuid: str, etype: str, *, durable: bool = True,
               **fields) -> VMRecord:
        """Check, journal and apply one event; return once it is durable.

        With ``durable=False`` the record is queued but not waited for: the
        next durable commit (which follows it in the log) flushes it. For
        steps that a restart can simply redo.
        """
        event = {"type": etype, "uuid": uuid, "ts": time.time(), **fields}
        with self._lock:
            vm = state.apply(self._vms.get(uuid), event)
            ticket = self.journal.submit(event)
            self._vms[uuid] = vm
            self._tickets[uuid] = ticket
        if durable:
            self.journal.wait(ticket)
        self.wakeup.set()
        return vm

    def compact_if_needed(self, now: float | None = None) -> bool:
        """Compact the journal once it outgrew ``journal_compact_mb``.

        Every VM kept becomes one snapshot record; ended VMs whose last
        change is older than the retention are dropped from the journal and
        from memory. Requests wait for the few milliseconds it takes.
        """
        if self.journal.size() < self.cfg.journal_compact_mb * (1 << 20):
            return False
        now = time.time() if now is None else now
        horizon = now - self.cfg.journal_retention_hours * 3600
        with self._lock:
            keep = {uuid: vm for uuid, vm in self._vms.items()
                    if vm.status not in FINAL or vm.updated >= horizon
                    or uuid in self._jobs}
            before = self.journal.size()
            self.journal.rewrite([state.snapshot_event(vm)
                                  for vm in sorted(keep.values(),
                                                   key=lambda v: v.created)])
            dropped = len(self._vms) - len(keep)
            self._vms = keep
            self._tickets = {}
            self._vm_locks = {uuid: lock for uuid, lock
                              in self._vm_locks.items() if uuid in keep}
        log.info("journal compacted: %d -> %d bytes, %d VMs kept, %d dropped",
                 before, self.journal.size(), len(keep), dropped)
        return True

    # -- requests -----------------------------------------------------------

    def start(self, raw: Mapping[str, object]) -> tuple[VMRecord, bool]:
        """Accept a VM; return its record and whether it is new."""
        params = validation.start_params(raw, self.cfg.roots)
        uuid = params.pop("uuid") or str(uuidlib.uuid4())
        event = {"type": "accepted", "uuid": uuid, "ts": time.time(),
                 "params": params}
        with self._lock:
            existing = self._vms.get(uuid)
            if existing is not None:
                if dict(existing.params) != params:
                    raise UuidConflict(
                        f"VM {uuid} already exists with other parameters "
                        f"(name {existing.name!r}); use a new uuid")
                ticket = self._tickets.get(uuid, 0)
            else:
                for vm in self._vms.values():
                    if vm.name == params["name"] and vm.status not in FINAL:
                        raise NameTaken(
                            f"name {params['name']!r} is taken by VM "
                            f"{vm.uuid}, which is {vm.status.value}")
                resources.admit(params, self._vms.values(), self.host,
                                reserve_mb=self.cfg.memory_reserve_mb,
                                overhead_mb=self.cfg.qemu_overhead_mb,
                                cpu_overcommit=self.cfg.cpu_overcommit,
                                disk_free_mb=shutil.disk_usage(self.layout.var).free >> 20,
                                disk_need_mb=_local_images_mb(params),
                                disk_reserve_mb=self.cfg.disk_reserve_mb)
                vm = state.apply(None, event)
                ticket = self.journal.submit(event)
                self._vms[uuid] = vm
                self._tickets[uuid] = ticket
        self.journal.wait(ticket)
        if existing is not None:
            return existing, False
        log.info("VM %s (%s): accepted: %s", vm.name, uuid, params)
        self.run_job("start", uuid)
        return vm, True

    def suspend(self, uuid: str) -> VMRecord:
        with self.vm_lock(uuid):
            vm = self.get(uuid)
            state.check(vm, "suspended", "suspend")
            self.driver.pause(uuid, self.layout.vm(uuid))
            return self.commit(uuid, "suspended")

    def resume(self, uuid: str) -> VMRecord:
        with self.vm_lock(uuid):
            vm = self.get(uuid)
            state.check(vm, "resumed", "resume")
            self.driver.resume(uuid, self.layout.vm(uuid))
            return self.commit(uuid, "resumed")

    def destroy(self, uuid: str) -> VMRecord:
        """Journal the destroy first, then kill: a crash in between is
        finished by the supervisor, which kills any process of an ended VM."""
        with self.vm_lock(uuid):
            vm = self.get(uuid)
            state.check(vm, "destroyed", "destroy")
            vm = self.commit(uuid, "destroyed")  # jobs see it and stop
            if vm.pid is not None:
                self.driver.kill(uuid, Handle(vm.pid, vm.create_time or 0.0),
                                 self.cfg.qemu_stop_timeout)
            log.info("VM %s: destroyed", vm.label)
            return vm

    def modify(self, uuid: str, changes: dict,
               fetch_cd: Callable[[str, str, str], tuple[Disk, dict]] | None = None
               ) -> VMRecord:
        """Change save targets and/or the CD medium."""
        with self.vm_lock(uuid):
            vm = self.get(uuid)
            save_changes = {k: v for k, v in changes.items()
                            if k.endswith("_save_to")}
            for key in save_changes:
                slot = key[:-len("_save_to")]
                if not vm.params.get(f"{slot}_image") and save_changes[key]:
                    raise validation.BadRequest(
                        f"{key} is set but VM {vm.label} has no {slot} image")
            state.check(vm, "modified", "modify")
            if "cd_image" in changes:
                state.check(vm, "cd_changed", "change the CD of")
            if "cd_image" in changes:
                uri = changes["cd_image"]
                if uri:
                    disk, fields = fetch_cd(uuid, uri,
                                            changes.get("cd_image_sha256", ""))
                else:
                    disk, fields = None, {"path": "", "format": "", "uri": ""}
                self.driver.change_cd(uuid, self.layout.vm(uuid), disk)
                vm = self.commit(uuid, "cd_changed", **fields)
            if save_changes:
                vm = self.commit(uuid, "modified", **save_changes)
            return vm

    # -- jobs ---------------------------------------------------------------

    def run_job(self, kind: str, uuid: str) -> bool:
        """Run a start or save job for the VM unless one already runs."""
        with self._lock:
            if uuid in self._jobs or self.stopping.is_set():
                return False
            self._jobs.add(uuid)
        threading.Thread(target=self._run_job, args=(kind, uuid), daemon=True,
                         name=f"{kind}-{uuid[:8]}").start()
        return True

    def _run_job(self, kind: str, uuid: str) -> None:
        try:
            with self._job_slots:
                if not self.stopping.is_set():
                    self._job_runner(kind, uuid)
        except Exception:
            log.exception("%s job of VM %s failed unexpectedly", kind, uuid)
        finally:
            with self._lock:
                self._jobs.discard(uuid)
                self._progress.pop(uuid, None)
            self.wakeup.set()

    def report_progress(self, uuid: str, what: str, done: int,
                        total: int | None) -> None:
        self._progress[uuid] = (what, done, total)

    def cancelled(self, uuid: str) -> bool:
        """Whether a job for this VM should stop now."""
        if self.stopping.is_set():
            return True
        with self._lock:
            vm = self._vms.get(uuid)
            return vm is None or vm.status is Status.DESTROYED

    def remove_folder(self, uuid: str) -> None:
        shutil.rmtree(self.layout.vm(uuid).folder, ignore_errors=True)

    def shutdown(self, grace: float = 10.0) -> None:
        """Stop jobs (they resume after a restart); VMs keep running.

        Jobs see ``stopping`` between steps; those still busy after
        ``grace`` seconds (a download stuck on a dead server) are left
        behind: they cannot journal any more and stop without touching the
        VM, which the next worker sorts out from the journal.
        """
        self.stopping.set()
        deadline = time.monotonic() + grace
        while self._jobs and time.monotonic() < deadline:
            time.sleep(0.02)
        if self._jobs:
            log.warning("stopping with %d jobs still busy: %s", len(self._jobs),
                        ", ".join(sorted(self._jobs)))
        try:
            self.driver.close()
        except HypervisorError as err:
            log.warning("closing the hypervisor driver: %s", err)
        self.journal.close()


def _local_images_mb(params: dict) -> int:
    """Size of the VM's images that are local files (known before fetching)."""
    total = 0
    for slot in ("hda", "hdb", "cd"):
        path = validation.local_path(str(params.get(f"{slot}_image") or ""), slot)
        if path:
            try:
                total += os.path.getsize(path)
            except OSError:
                pass  # validation found it; the fetch will say what changed
    return total >> 20
