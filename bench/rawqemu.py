"""The raw-QEMU peer: QEMU launched by hand with exactly the worker's argv.

The argv comes from the worker's own ``command_line`` (with the worker's
default VNC settings), so the peer follows any flag the worker adds. A
launch is timed from just before ``posix_spawn`` (or before ``qemu-img
create`` of an overlay, when asked) to the answer of the first QMP
``query-status`` (DESIGN.md: readiness is the first command's reply),
through qemu.qmp like the worker. The socket is looked for every 0.5 ms:
this peer is the best case QEMU itself allows.

Every QEMU started here is a child of the harness, registered in
``procs.CHILDREN`` and killed and reaped by pid.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import shutil
import time
import uuid as uuidlib

from qemu.qmp import ConnectError, QMPClient

from vmworker.config import WorkerConfig
from vmworker.hypervisor.base import Disk, VMSpec
from vmworker.hypervisor.qemu import command_line
from vmworker.paths import VMPaths

from .procs import CHILDREN, pid_state

SOCKET_POLL = 0.0005


class RawQemuError(RuntimeError):
    """A raw QEMU did not come up; the message carries QEMU's own log."""


@dataclasses.dataclass
class Launched:
    """One raw QEMU; durations in seconds from just before the spawn."""

    pid: int
    folder: str
    spawned: float   # posix_spawn returned
    socket: float    # the command monitor's socket exists
    connected: float  # QMP greeting and capabilities negotiated
    ready: float     # query-status answered
    runstate: str
    overlay: float = 0.0  # of which: qemu-img create (0 without overlay)


class RawQemu:
    def __init__(self, base_dir: str, image: str, accel: str,
                 binary: str = "qemu-system-x86_64"):
        self.base_dir = base_dir
        self.image = image
        self.accel = accel
        self.binary = shutil.which(binary) or binary
        self.qemu_img = shutil.which("qemu-img") or "qemu-img"
        defaults = WorkerConfig()
        self._vnc = dict(vnc_listen=defaults.vnc_listen,
                         vnc_display=defaults.vnc_display_base,
                         vnc_to=defaults.vnc_display_base
                         + defaults.vnc_display_count - 1)
        os.makedirs(base_dir, exist_ok=True)

    def argv(self, uuid: str, name: str, image: str | None = None,
             fmt: str = "raw") -> tuple[list[str], VMPaths]:
        paths = VMPaths(os.path.join(self.base_dir, uuid))
        spec = VMSpec(uuid=uuid, name=name, cpu_count=1, mem_size=32,
                      disks=(Disk("hda", image or self.image, fmt),),
                      paths=paths)
        return command_line(spec, binary=self.binary, accel=self.accel,
                            **self._vnc), paths

    async def launch(self, name: str, timeout: float = 30.0,
                     image: str | None = None, overlay: bool = False) -> Launched:
        """Start one QEMU; with ``overlay``, first make a qcow2 overlay on
        the image (inside the timing) and boot that, as the worker does."""
        uuid = str(uuidlib.uuid4())
        folder = os.path.join(self.base_dir, uuid)
        os.makedirs(folder, exist_ok=True)
        start = time.perf_counter()
        made = 0.0
        disk = image or self.image
        if overlay:
            disk = await self._overlay(disk, os.path.join(folder, "hda.qcow2"))
            made = time.perf_counter() - start
        argv, paths = self.argv(uuid, name, disk, "qcow2" if overlay else "raw")
        log_fd = os.open(paths.log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
        try:
            pid = os.posix_spawn(
                self.binary, argv, _env(),
                file_actions=[(os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                              (os.POSIX_SPAWN_DUP2, log_fd, 1),
                              (os.POSIX_SPAWN_DUP2, log_fd, 2)],
                setsid=True)
        finally:
            os.close(log_fd)
        spawned = time.perf_counter() - start
        CHILDREN.add(pid, f"raw QEMU {name}")
        try:
            launched = await self._ready(pid, paths, start, spawned, timeout)
        except BaseException:
            CHILDREN.kill(pid)
            raise
        launched.overlay = made
        return launched

    async def _overlay(self, base: str, path: str) -> str:
        proc = await asyncio.create_subprocess_exec(
            self.qemu_img, "create", "-q", "-f", "qcow2", "-F", "raw", "-b",
            base, path, stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
        try:
            _, err = await asyncio.wait_for(proc.communicate(), 60)
        except asyncio.TimeoutError:
            proc.kill()
            await proc.wait()
            raise RawQemuError("qemu-img create did not finish in 60 s") from None
        if proc.returncode != 0:
            raise RawQemuError(f"qemu-img create failed: {err.decode().strip()}")
        return path

    async def _ready(self, pid, paths, start, spawned, timeout) -> Launched:
        deadline = start + timeout
        while not os.path.exists(paths.qmp):
            self._check(pid, paths, deadline)
            await asyncio.sleep(SOCKET_POLL)
        socket_at = time.perf_counter() - start
        while True:
            client = QMPClient(f"raw-{pid}")
            try:
                await client.connect(paths.qmp)
                break
            except ConnectError:
                self._check(pid, paths, deadline)
                await asyncio.sleep(SOCKET_POLL)
        try:
            connected = time.perf_counter() - start
            status = await client.execute("query-status")
            ready = time.perf_counter() - start
        finally:
            await client.disconnect()
        return Launched(pid, paths.folder, spawned, socket_at, connected,
                        ready, status["status"])

    def _check(self, pid: int, paths: VMPaths, deadline: float) -> None:
        if pid_state(pid) != "alive":
            raise RawQemuError(f"raw QEMU exited early: {_tail(paths.log)}")
        if time.perf_counter() > deadline:
            raise RawQemuError("raw QEMU did not open its monitor in time")

    def remove(self, launched: Launched) -> None:
        shutil.rmtree(launched.folder, ignore_errors=True)


def _env() -> dict:
    # The worker gives QEMU only these (vmworker.hypervisor.qemu._qemu_env).
    keep = ("PATH", "LANG", "LC_ALL", "TMPDIR")
    return {k: os.environ[k] for k in keep if k in os.environ}


def _tail(path: str) -> str:
    try:
        with open(path, errors="replace") as f:
            lines = [line.strip() for line in f if line.strip()]
    except OSError:
        return "(no log)"
    return lines[-1] if lines else "(empty log)"
