"""Processes the harness starts: every one is tracked by pid and stopped.

The harness spawns raw QEMUs (its own children), the worker, the bare
CherryPy peer and the load generator. ``Children`` remembers each pid with
its create time; ``stop_all`` kills whatever is still alive and reaps it, so
a failing row never leaves a process behind. Exits are awaited through a
pidfd (the kernel says when the process ends) with a deadline, never by an
unbounded wait.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import threading
import time

import psutil


def pid_state(pid: int) -> str:
    """``"gone"`` (reaped), ``"zombie"`` (dead, not yet reaped) or ``"alive"``."""
    try:
        status = psutil.Process(pid).status()
    except psutil.NoSuchProcess:
        return "gone"
    except psutil.ZombieProcess:
        return "zombie"
    return "zombie" if status == psutil.STATUS_ZOMBIE else "alive"


def wait_dead(pid: int, timeout: float) -> float | None:
    """Wait until ``pid`` has exited (zombie or gone); return ``perf_counter``
    at that moment, or None when it still runs at the deadline.

    Works for any process, not only our children: a pidfd becomes readable
    when the process exits.
    """
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return time.perf_counter()
    try:
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        if poller.poll(max(0, int(timeout * 1000))):
            return time.perf_counter()
        return None
    finally:
        os.close(fd)


def reap(pid: int, timeout: float) -> float | None:
    """Wait for our child ``pid`` to exit and reap it; return ``perf_counter``
    after the reap, or None if it still runs at the deadline."""
    if wait_dead(pid, timeout) is None:
        return None
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)  # it has exited: this does not block
    return time.perf_counter()


def wait_reaped(pid: int, timeout: float) -> float | None:
    """Wait until someone (the worker, PID 1) has reaped ``pid``.

    There is no event for another process's reap, so this polls /proc
    every millisecond up to the deadline; it is used only for figures that
    are reported as informational.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not os.path.exists(f"/proc/{pid}"):
            return time.perf_counter()
        time.sleep(0.001)
    return None


class Children:
    """The pids this harness started, so that each one is stopped by pid."""

    def __init__(self):
        self._lock = threading.Lock()
        self._pids: dict[int, tuple[float, str]] = {}

    def add(self, pid: int, what: str) -> None:
        try:
            created = psutil.Process(pid).create_time()
        except psutil.NoSuchProcess:
            created = 0.0
        with self._lock:
            self._pids[pid] = (created, what)

    def discard(self, pid: int) -> None:
        with self._lock:
            self._pids.pop(pid, None)

    def kill(self, pid: int, sig: int = signal.SIGKILL, timeout: float = 10) -> bool:
        """Signal ``pid`` (if it is still the process we started) and reap it."""
        with self._lock:
            if pid not in self._pids:
                return True  # not ours, or already stopped: never signal it
            created, _ = self._pids[pid]
        if created and not _same_process(pid, created):
            self.discard(pid)
            return True
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        done = reap(pid, timeout) is not None
        if done:
            self.discard(pid)
        return done

    def stop_all(self) -> list[str]:
        """Kill and reap everything still tracked; return what was left."""
        with self._lock:
            left = dict(self._pids)
        names = []
        for pid, (_, what) in left.items():
            if pid_state(pid) == "alive":
                names.append(f"{what} (pid {pid})")
            self.kill(pid)
        return names


def _same_process(pid: int, created: float) -> bool:
    try:
        return abs(psutil.Process(pid).create_time() - created) < 0.05
    except psutil.NoSuchProcess:
        return False


#: The one registry of the harness process.
CHILDREN = Children()
