"""The small interface every hypervisor driver implements.

The service and the supervisor talk to a driver only through this; the
direct-QEMU driver comes first, a libvirt driver later. Drivers never touch
HTTP or the journal: they start, signal and observe processes.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Callable

from ..paths import VMPaths


@dataclasses.dataclass(frozen=True)
class Disk:
    slot: str      # hda, hdb or cd
    path: str
    format: str    # raw or qcow2: always explicit, never probed by QEMU


@dataclasses.dataclass(frozen=True)
class VMSpec:
    """What a driver needs to start one VM."""

    uuid: str
    name: str
    cpu_count: int
    mem_size: int  # MB
    disks: tuple[Disk, ...]
    paths: VMPaths


@dataclasses.dataclass(frozen=True)
class Handle:
    """A VM process: a pid is only ever trusted with its create time."""

    pid: int
    create_time: float


@dataclasses.dataclass(frozen=True)
class Observation:
    """What the supervisor sees of one VM's process.

    ``runstate`` is QEMU's run state as the event monitor last reported it
    (``running``, ``paused``, ``shutdown``, …), or None if unknown.
    ``guest_shutdown`` is True once QEMU reported a guest-initiated shutdown.
    """

    alive: bool
    runstate: str | None = None
    guest_shutdown: bool = False
    exit_detail: str = ""


EventCallback = Callable[[str, dict], None]


class Driver(abc.ABC):
    """Start, control and observe VM processes."""

    @abc.abstractmethod
    def spawn(self, spec: VMSpec) -> Handle:
        """Launch the VM detached from the worker; return at once."""

    @abc.abstractmethod
    def wait_ready(self, spec: VMSpec, handle: Handle, timeout: float) -> str:
        """Wait until the VM answers commands; return its VNC host:port."""

    @abc.abstractmethod
    def adopt(self, uuid: str, paths: VMPaths, handle: Handle) -> bool:
        """Reattach to a VM that outlived a worker; False if it is gone."""

    @abc.abstractmethod
    def attached(self, uuid: str) -> bool:
        """Whether this driver holds the VM's monitors (started or adopted)."""

    @abc.abstractmethod
    def owns(self, uuid: str, handle: Handle) -> bool:
        """Whether ``handle`` is this VM's live process (never a recycled pid)."""

    @abc.abstractmethod
    def observe(self, uuid: str, handle: Handle | None) -> Observation:
        """What the VM's process is doing now (cheap: no blocking calls)."""

    @abc.abstractmethod
    def vnc_address(self, uuid: str, paths: VMPaths) -> str:
        """The VM's VNC host:port as QEMU reports it."""

    @abc.abstractmethod
    def pause(self, uuid: str, paths: VMPaths) -> None: ...

    @abc.abstractmethod
    def resume(self, uuid: str, paths: VMPaths) -> None: ...

    @abc.abstractmethod
    def runstate(self, uuid: str, paths: VMPaths) -> str:
        """QEMU's run state, asked now (``query-status``)."""

    @abc.abstractmethod
    def set_vnc_password(self, uuid: str, paths: VMPaths, password: str) -> None:
        """Require ``password`` on the VM's plain VNC server."""

    @abc.abstractmethod
    def open_console(self, uuid: str, paths: VMPaths, password: str,
                     lifetime: float) -> tuple[str, int] | None:
        """Let the web console in with a one-time password for ``lifetime``
        seconds; return the console's websocket (host, port), or None if
        the VM has none."""

    @abc.abstractmethod
    def change_cd(self, uuid: str, paths: VMPaths, disk: Disk | None) -> None:
        """Insert a medium in the CD drive, or eject it with None."""

    @abc.abstractmethod
    def quit(self, uuid: str, paths: VMPaths, handle: Handle, timeout: float) -> None:
        """Stop the process cleanly (disks flushed and closed), else kill it."""

    @abc.abstractmethod
    def kill(self, uuid: str, handle: Handle, timeout: float) -> None:
        """Kill the process at once (if it is this VM's) and reap it."""

    @abc.abstractmethod
    def forget(self, uuid: str, handle: Handle | None) -> None:
        """Drop the VM's monitors and what they and its exit reported (the
        VM ended and was cleaned up)."""

    def bookkeeping(self) -> dict[str, int]:
        """How many entries each per-VM table of the driver holds (for
        /worker/stats: they must shrink again as VMs end)."""
        return {}

    @abc.abstractmethod
    def close(self) -> None:
        """Release monitors; VM processes keep running."""
