"""The supervisor: the thread that keeps the journal and the processes in step.

Each tick observes every VM that is not settled (psutil for the process,
the cached QMP events for the run state), asks ``reconcile.decide`` what to
do, and does it. It wakes on every QMP event and every journaled change, and
otherwise once per ``supervisor_interval``. After a worker restart its first
tick adopts the VMs that kept running, fails half-started ones and resumes
interrupted jobs. One bad VM or one bad tick is logged and skipped: the
thread itself never dies of it.
"""

from __future__ import annotations

import logging
import threading
import time

from cherrypy.process import plugins

from .errors import VMWorkerError
from .hypervisor.base import Handle, Observation
from .reconcile import Action, Kind, decide
from .service import VMService
from .state import LIVE_PROCESS, Status, VMRecord

log = logging.getLogger(__name__)


class Supervisor:
    def __init__(self, service: VMService):
        self.service = service
        self.driver = service.driver
        self._settled: set[str] = set()
        self.ticks = 0
        self.last_tick_seconds = 0.0
        self.max_tick_seconds = 0.0

    def settled_count(self) -> int:
        return len(self._settled)

    def tick(self) -> None:
        started = time.perf_counter()
        for vm in self.service.vms():
            if vm.uuid in self._settled:
                continue
            try:
                self._reconcile(vm)
            except VMWorkerError as err:
                log.warning("supervisor: VM %s: %s", vm.label, err)
            except Exception:
                log.exception("supervisor: VM %s: unexpected error", vm.label)
        try:
            if self.service.compact_if_needed():
                # VMs that compaction dropped are settled for good.
                self._settled &= {vm.uuid for vm in self.service.vms()}
        except VMWorkerError as err:
            log.error("supervisor: journal compaction failed: %s", err)
        self.ticks += 1
        self.last_tick_seconds = time.perf_counter() - started
        self.max_tick_seconds = max(self.max_tick_seconds, self.last_tick_seconds)

    def _reconcile(self, vm: VMRecord) -> None:
        svc = self.service
        lock = svc.vm_lock(vm.uuid)
        # A request or job is acting on this VM; look again next tick.
        if not lock.acquire(blocking=False):
            return
        try:
            vm = svc.get(vm.uuid)
            job_active = svc.job_active(vm.uuid)
            obs = self._observe(vm, job_active)
            for action in decide(vm, obs, job_active=job_active,
                                 settled=vm.uuid in self._settled):
                self._apply(vm, action)
                vm = svc.get(vm.uuid)
        finally:
            lock.release()

    def _observe(self, vm: VMRecord, job_active: bool) -> Observation:
        handle = _handle(vm)
        if handle is None:
            return Observation(alive=False)
        if (vm.status in LIVE_PROCESS and vm.status is not Status.STARTING
                and not job_active and not self.driver.attached(vm.uuid)):
            # First sight since the worker started: adopt, or find it gone.
            self.driver.adopt(vm.uuid, self.service.layout.vm(vm.uuid), handle)
        return self.driver.observe(vm.uuid, handle)

    def _apply(self, vm: VMRecord, action: Action) -> None:
        svc = self.service
        uuid = vm.uuid
        log.info("supervisor: VM %s: %s %s", vm.label, action.kind.value,
                 action.reason)
        if action.kind is Kind.KILL:
            svc.driver.kill(uuid, _handle(vm), svc.cfg.qemu_stop_timeout)
        elif action.kind is Kind.FAIL_START:
            svc.commit(uuid, "start_failed", reason=action.reason)
        elif action.kind is Kind.RUN_START_JOB:
            svc.run_job("start", uuid)
        elif action.kind is Kind.HALT:
            handle = _handle(vm)
            if handle is not None:
                # QEMU goes first (quit lets it flush and close the disks),
                # so that no one sees "stopped" while it still runs. A
                # worker killed in between finds the process gone after its
                # restart: a halt all the same, and the disks are saved.
                svc.driver.quit(uuid, svc.layout.vm(uuid), handle,
                                svc.cfg.qemu_stop_timeout)
            vm = svc.commit(uuid, "halted", reason=action.reason)
            if vm.status is Status.SAVING:
                svc.run_job("save", uuid)
        elif action.kind is Kind.RUN_SAVE_JOB:
            svc.run_job("save", uuid)
        elif action.kind is Kind.MARK_SUSPENDED:
            svc.commit(uuid, "suspended")
        elif action.kind is Kind.MARK_RESUMED:
            svc.commit(uuid, "resumed")
        elif action.kind is Kind.CLEAN_UP:
            svc.remove_folder(uuid)
            svc.driver.forget(uuid, _handle(vm))
            self._settled.add(uuid)


def _handle(vm: VMRecord) -> Handle | None:
    if vm.pid is None:
        return None
    return Handle(vm.pid, vm.create_time or 0.0)


class SupervisorPlugin(plugins.SimplePlugin):
    """Runs ``Supervisor.tick`` on its own thread for the engine's lifetime."""

    def __init__(self, bus, supervisor: Supervisor, interval: float):
        super().__init__(bus)
        self.supervisor = supervisor
        self.interval = interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self):
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="supervisor",
                                        daemon=True)
        self._thread.start()
        self.bus.log("Supervisor started")

    start.priority = 80  # after the HTTP server: requests are answered early

    def _loop(self) -> None:
        wakeup = self.supervisor.service.wakeup
        while not self._stop.is_set():
            wakeup.clear()
            try:
                self.supervisor.tick()
            except Exception:
                log.exception("supervisor: tick failed")
            wakeup.wait(self.interval)

    def stop(self):
        self._stop.set()
        self.supervisor.service.wakeup.set()
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None
        self.bus.log("Supervisor stopped")

    stop.priority = 55  # after the HTTP server stopped taking requests
