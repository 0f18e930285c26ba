"""The direct QEMU driver: command lines, detached processes, QMP.

QEMU runs in its own session, outside the worker's process group, so that
stopping or restarting the worker never stops a VM. It is started with
``-no-shutdown`` so that a guest poweroff leaves an observable ``shutdown``
run state instead of a vanished process, and with two QMP monitors (one for
commands, one held open for events). A process is this VM's QEMU only if
its pid, its create time and the ``-uuid`` on its command line all match.
"""

from __future__ import annotations

import logging
import os
import select
import shutil
import signal
import threading
import time

import psutil

from ..errors import HypervisorError
from ..paths import VMPaths
from .base import Disk, Driver, EventCallback, Handle, Observation, VMSpec
from .qmp import QMPHub

log = logging.getLogger(__name__)

DRIVE_INDEX = {"hda": 0, "hdb": 1, "cd": 2}
CD_DEVICE = "cd0"
VNC_PLAIN = "vnc"
VNC_CONSOLE = "console"


def kvm_usable() -> bool:
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    os.close(fd)
    return True


def command_line(spec: VMSpec, *, binary: str, accel: str, vnc_listen: str,
                 vnc_display: int, vnc_to: int,
                 vnc_password: bool = False) -> list[str]:
    """QEMU's argv for ``spec`` (pure: easy to read and to test).

    Two VNC servers: ``vnc`` is the plain one whose address the API reports
    (for the master's and operators' VNC clients, as DESIGN.md promises),
    and ``console`` also speaks websocket for the web console's noVNC and
    requires a password. A websocket is reachable from any web page in any
    browser that can reach ``vnc_listen`` (browsers do not apply the
    same-origin policy to websockets), so it never runs without one: no
    password is set at start, and the web console sets a one-time one
    through QMP (``set_password`` with ``display=console``) after checking
    its single-use token. QEMU searches each port on its own (the websocket
    from 5700 + display: measured on QEMU 7.2), so ports are read back with
    ``query-vnc-servers``, never computed. With ``vnc_password`` the plain
    server needs one too: the worker sets a random one per VM through QMP
    once QEMU is up (never on the command line).
    """
    paths = spec.paths
    vnc = f"{_vnc_host(vnc_listen)}:{vnc_display},to={vnc_to}"
    argv = [
        binary,
        "-name", f"guest={spec.name},process=vmworker-{spec.uuid}",
        "-uuid", spec.uuid,
        "-machine", f"pc,accel={accel}",
        "-cpu", "host" if accel == "kvm" else "qemu64",
        "-smp", str(spec.cpu_count),
        "-m", str(spec.mem_size),
        "-nodefaults", "-no-user-config",
        "-vga", "std",
        "-display", "none",
        "-vnc", f"{vnc},id={VNC_PLAIN}" + (",password=on" if vnc_password else ""),
        "-vnc", f"{vnc},id={VNC_CONSOLE},websocket=on,password=on",
        "-no-shutdown",
        "-qmp", f"unix:{paths.qmp},server=on,wait=off",
        "-qmp", f"unix:{paths.qmp_events},server=on,wait=off",
        "-pidfile", paths.pidfile,
        "-boot", "order=cd,menu=off",
    ]
    by_slot = {d.slot: d for d in spec.disks}
    for slot in ("hda", "hdb"):
        disk = by_slot.get(slot)
        if disk:
            argv += ["-drive", _drive(disk.path, disk.format, slot, "disk")]
    cd = by_slot.get("cd")
    # The CD drive always exists, empty or not, so a medium can be inserted
    # later (blockdev-change-medium needs a drive).
    cd_opts = f"if=ide,index={DRIVE_INDEX['cd']},media=cdrom,id={CD_DEVICE}"
    if cd:
        cd_opts = (f"file={_escape(cd.path)},format={cd.format},"
                   f"readonly=on,{cd_opts}")
    argv += ["-drive", cd_opts]
    return argv


def _drive(path: str, fmt: str, slot: str, media: str) -> str:
    return (f"file={_escape(path)},format={fmt},if=ide,"
            f"index={DRIVE_INDEX[slot]},media={media},id={slot}")


def _escape(value: str) -> str:
    # QEMU option values escape a comma by doubling it.
    return value.replace(",", ",,")


def _vnc_host(address: str) -> str:
    return f"[{address}]" if ":" in address else address


class QemuDriver(Driver):
    def __init__(self, *, binary: str, accel: str, vnc_listen: str,
                 vnc_display_base: int, vnc_display_count: int,
                 on_event: EventCallback, vnc_password: bool = False):
        self.binary = shutil.which(binary) or binary
        if accel == "auto":
            accel = "kvm" if kvm_usable() else "tcg"
        self.accel = accel
        self.vnc_listen = vnc_listen
        self.vnc_display_base = vnc_display_base
        self.vnc_display_count = vnc_display_count
        self.vnc_password = vnc_password
        self.hub = QMPHub(on_event)
        self.hub.start()
        # pid -> create time of processes we spawned and must reap.
        self._children: dict[int, float] = {}
        self._children_lock = threading.Lock()
        # pid -> how a reaped child ended, for halt reasons.
        #: pid -> (create time, how it exited) of reaped children, until
        #: the VM is forgotten.
        self._exits: dict[int, tuple[float, str]] = {}
        log.info("QEMU driver: %s, accel=%s", self.binary, self.accel)

    # -- life cycle ---------------------------------------------------------

    def spawn(self, spec: VMSpec) -> Handle:
        argv = command_line(
            spec, binary=self.binary, accel=self.accel,
            vnc_listen=self.vnc_listen, vnc_display=self.vnc_display_base,
            vnc_to=self.vnc_display_base + self.vnc_display_count - 1,
            vnc_password=self.vnc_password)
        for stale in (spec.paths.qmp, spec.paths.qmp_events, spec.paths.pidfile):
            _unlink(stale)
        log_fd = os.open(spec.paths.log, os.O_WRONLY | os.O_CREAT | os.O_APPEND,
                         0o640)
        try:
            pid = os.posix_spawn(
                self.binary, argv, _qemu_env(),
                file_actions=[
                    (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                    (os.POSIX_SPAWN_DUP2, log_fd, 1),
                    (os.POSIX_SPAWN_DUP2, log_fd, 2),
                ],
                setsid=True)
        except OSError as err:
            raise HypervisorError(f"cannot run {self.binary}: "
                                  f"{err.strerror}") from err
        finally:
            os.close(log_fd)
        try:
            create_time = psutil.Process(pid).create_time()
        except psutil.NoSuchProcess:
            create_time = 0.0  # exited at once; wait_ready reports why
        with self._children_lock:
            self._children[pid] = create_time
        log.info("VM %s (%s): spawned QEMU pid %d", spec.name, spec.uuid, pid)
        return Handle(pid, create_time)

    def wait_ready(self, spec: VMSpec, handle: Handle, timeout: float) -> str:
        """Open the event monitor; readiness is the first command's answer."""
        deadline = time.monotonic() + timeout
        paths = spec.paths
        delay = 0.0005
        while True:
            if not self._alive(handle):
                raise HypervisorError(_exit_message(paths))
            if os.path.exists(paths.qmp_events) and os.path.exists(paths.qmp):
                try:
                    # Readiness is the first command's answer; asked on the
                    # event monitor that stays open anyway (one greeting).
                    status, vnc = self.hub.watch(
                        spec.uuid, paths.qmp_events,
                        [("query-status", None), ("query-vnc-servers", None)],
                        timeout=max(0.5, deadline - time.monotonic()))
                    break
                except HypervisorError:
                    if not self._alive(handle):
                        raise HypervisorError(_exit_message(paths)) from None
            if time.monotonic() > deadline:
                raise HypervisorError(
                    f"QEMU did not open its monitor within {timeout:g} s")
            time.sleep(delay)
            delay = min(delay * 2, 0.002)
        self.hub.set_runstate(spec.uuid, status["status"])
        return self._vnc(vnc)

    def adopt(self, uuid: str, paths: VMPaths, handle: Handle) -> bool:
        if not self.owns(uuid, handle):
            return False
        try:
            self.hub.watch(uuid, paths.qmp_events)
            status = self.hub.execute(uuid, paths.qmp, "query-status")
        except HypervisorError as err:
            log.warning("VM %s: cannot reattach to QEMU pid %d: %s", uuid,
                        handle.pid, err)
            return False
        self.hub.set_runstate(uuid, status["status"])
        log.info("VM %s: adopted QEMU pid %d (%s)", uuid, handle.pid,
                 status["status"])
        return True

    def owns(self, uuid: str, handle: Handle) -> bool:
        """Whether pid + create time + ``-uuid`` all name this VM's QEMU."""
        try:
            proc = psutil.Process(handle.pid)
            if abs(proc.create_time() - handle.create_time) > 0.05:
                return False
            if proc.status() == psutil.STATUS_ZOMBIE:
                return False
            argv = proc.cmdline()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            return False
        return any(a == "-uuid" and b == uuid for a, b in zip(argv, argv[1:]))

    def attached(self, uuid: str) -> bool:
        return self.hub.state(uuid) is not None

    def forget(self, uuid: str, handle: Handle | None) -> None:
        self.hub.forget(uuid)
        if handle is not None:
            with self._children_lock:
                exited = self._exits.get(handle.pid)
                if exited is not None and exited[0] == handle.create_time:
                    del self._exits[handle.pid]

    def bookkeeping(self) -> dict[str, int]:
        with self._children_lock:
            out = {"qemu_children": len(self._children),
                   "qemu_exits": len(self._exits)}
        return {**out, **self.hub.bookkeeping()}

    def _exit_detail(self, handle: Handle) -> str:
        created, detail = self._exits.get(handle.pid, (None, ""))
        # A pid is reused: only this process's own exit counts.
        return detail if created == handle.create_time else ""

    def observe(self, uuid: str, handle: Handle | None) -> Observation:
        if handle is None:
            return Observation(alive=False)
        state = self.hub.state(uuid)
        if state is not None and state.connected:
            # The event monitor is open, so QEMU is alive: it closes when
            # the process exits. No /proc reads on the common path, which
            # keeps a supervisor tick cheap with many VMs.
            return Observation(alive=True, runstate=state.runstate,
                               guest_shutdown=state.guest_shutdown,
                               exit_detail=state.shutdown_reason)
        alive = self.owns(uuid, handle)
        monitor_closed = state is not None and not state.connected
        # An exiting QEMU has closed its monitor, or already lost its
        # command line while its pid and create time still match: give it
        # a moment to finish, so that its exit status can be told.
        if (alive and monitor_closed) or (not alive and self._alive(handle)):
            self._wait_gone(handle, 0.5, kill_after=False)
            alive = False
        if not alive:
            self._reap(handle.pid, wait=0.5)
        if state is None:
            return Observation(alive=alive,
                               exit_detail=self._exit_detail(handle))
        return Observation(alive=False, runstate=state.runstate,
                           guest_shutdown=state.guest_shutdown,
                           exit_detail=self._exit_detail(handle))

    def vnc_address(self, uuid: str, paths: VMPaths) -> str:
        return self._vnc(self.hub.execute(uuid, paths.qmp, "query-vnc-servers"))

    def set_vnc_password(self, uuid: str, paths: VMPaths, password: str) -> None:
        self.hub.execute(uuid, paths.qmp, "set_password",
                         {"protocol": "vnc", "password": password,
                          "display": VNC_PLAIN})

    def open_console(self, uuid: str, paths: VMPaths, password: str,
                     lifetime: float) -> tuple[str, int] | None:
        """Set a one-time password on the console VNC; return its websocket.

        None when the VM's QEMU has no console server (started by an older
        worker).
        """
        servers = self.hub.execute(uuid, paths.qmp, "query-vnc-servers")
        for display in servers:
            if display.get("id") != VNC_CONSOLE:
                continue
            for server in display.get("server", []):
                if server.get("websocket"):
                    self.hub.execute_many(uuid, paths.qmp, [
                        ("set_password", {"protocol": "vnc", "password": password,
                                          "display": VNC_CONSOLE}),
                        ("expire_password", {"protocol": "vnc",
                                             "time": f"+{max(1, round(lifetime))}",
                                             "display": VNC_CONSOLE})])
                    return server.get("host", ""), int(server["service"])
        return None

    def _vnc(self, servers: list) -> str:
        """host:port of the plain VNC server, from ``query-vnc-servers``."""
        for display in servers:
            if display.get("id") != VNC_PLAIN:
                continue
            for server in display.get("server", []):
                if not server.get("websocket"):
                    host = server.get("host") or self.vnc_listen
                    if host in ("0.0.0.0", "::"):
                        host = self.vnc_listen
                    return f"{_vnc_host(host)}:{server['service']}"
        return ""

    # -- commands -----------------------------------------------------------

    def pause(self, uuid: str, paths: VMPaths) -> None:
        self.hub.execute(uuid, paths.qmp, "stop")

    def resume(self, uuid: str, paths: VMPaths) -> None:
        self.hub.execute(uuid, paths.qmp, "cont")

    def runstate(self, uuid: str, paths: VMPaths) -> str:
        return self.hub.execute(uuid, paths.qmp, "query-status")["status"]

    def change_cd(self, uuid: str, paths: VMPaths, disk: Disk | None) -> None:
        if disk is None:
            self.hub.execute(uuid, paths.qmp, "eject",
                             {"device": CD_DEVICE, "force": True})
        else:
            self.hub.execute(uuid, paths.qmp, "blockdev-change-medium",
                             {"device": CD_DEVICE, "filename": disk.path,
                              "format": disk.format,
                              "read-only-mode": "read-only"})

    def kill(self, uuid: str, handle: Handle, timeout: float) -> None:
        """SIGKILL the VM's process (only if it is ours) and reap it."""
        self.hub.forget(uuid)
        if not self.owns(uuid, handle):
            self._reap(handle.pid)
            return  # gone already, or a recycled pid: never signalled
        try:
            os.kill(handle.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self._wait_gone(handle, timeout)
        self._reap(handle.pid, wait=1.0)

    def quit(self, uuid: str, paths: VMPaths, handle: Handle, timeout: float) -> None:
        """Let QEMU close its disks cleanly (QMP ``quit``), else kill it."""
        if self.owns(uuid, handle):
            try:
                self.hub.execute(uuid, paths.qmp, "quit", timeout=timeout)
            except HypervisorError as err:
                log.info("VM %s: quit failed (%s); killing", uuid, err)
            if self._wait_gone(handle, timeout, kill_after=False):
                self.hub.forget(uuid)
                return
        self.kill(uuid, handle, timeout)

    def close(self) -> None:
        self.hub.close()

    # -- processes ----------------------------------------------------------

    def _alive(self, handle: Handle) -> bool:
        self._reap(handle.pid)
        try:
            proc = psutil.Process(handle.pid)
            if handle.create_time and abs(proc.create_time() - handle.create_time) > 0.05:
                return False
            return proc.status() != psutil.STATUS_ZOMBIE
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            return False

    def _reap(self, pid: int, wait: float = 0.0) -> None:
        """Collect an exited QEMU that this worker spawned.

        Only pids we spawned are waited for: waiting on any other pid could
        steal the exit status of an unrelated child (a qemu-img run). A
        multi-threaded process shows as a zombie before it can be reaped
        (its threads are still exiting), hence the short ``wait``.
        """
        deadline = time.monotonic() + wait
        delay = 0.001
        while True:
            with self._children_lock:
                if pid not in self._children:
                    return
                try:
                    done, status = os.waitpid(pid, os.WNOHANG)
                except ChildProcessError:
                    done, status = pid, 0
                except InterruptedError:
                    done = 0
                if done == pid:
                    created = self._children.pop(pid)
                    self._exits[pid] = (created, _describe_exit(status))
                    return
            if time.monotonic() >= deadline:
                return
            time.sleep(delay)
            delay = min(delay * 2, 0.05)

    def _wait_gone(self, handle: Handle, timeout: float, kill_after=True) -> bool:
        """Wait until the process has exited (a pidfd wakes us at once)."""
        deadline = time.monotonic() + timeout
        try:
            pidfd = os.pidfd_open(handle.pid)
        except OSError:
            pidfd = None  # already gone, or no pidfd support: poll instead
        try:
            poller = select.poll()
            if pidfd is not None:
                poller.register(pidfd, select.POLLIN)
            while self._alive(handle):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    if not kill_after:
                        return False
                    raise HypervisorError(
                        f"QEMU pid {handle.pid} did not exit within "
                        f"{timeout:g} s")
                if pidfd is not None:
                    poller.poll(min(remaining, 0.05) * 1000)
                else:
                    time.sleep(min(remaining, 0.005))
        finally:
            if pidfd is not None:
                os.close(pidfd)
        return True


def _describe_exit(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
    if os.WIFEXITED(status):
        return f"exit status {os.WEXITSTATUS(status)}"
    return ""


def _exit_message(paths: VMPaths) -> str:
    """QEMU's own last error line, for ``failed to start``."""
    try:
        with open(paths.log, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 4096))
            lines = f.read().decode(errors="replace").strip().splitlines()
    except OSError:
        lines = []
    for line in reversed(lines):
        if line.strip():
            return f"QEMU exited: {line.strip()}"
    return "QEMU exited before it was ready, without a message"


def _qemu_env() -> dict:
    keep = ("PATH", "LANG", "LC_ALL", "TMPDIR")
    return {k: os.environ[k] for k in keep if k in os.environ}


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
