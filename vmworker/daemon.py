"""Running the worker as a system service: pidfile, detaching, stderr reopening.

The init script and systemd rely on three promises made here:

- ``PidFile``: the pidfile holds the worker's pid and an exclusive
  ``flock`` for the worker's whole life, and is removed when it exits. A
  pidfile nobody holds locked is stale (its worker died); so is one whose
  pid is dead or is not a vmworker. CherryPy's own ``PIDFile`` plugin does
  neither check, so a crashed worker's pid, reused by another process,
  would make the service look alive.
- ``detach``: the classic double fork, done *before* the worker creates
  any thread (a fork keeps only the calling thread, so CherryPy's
  ``Daemonizer``, which forks at engine start, would lose the QMP and job
  threads that ``app.build`` starts). The original process waits until the
  daemon says it is serving, then exits 0; if the daemon fails first, the
  original exits with the daemon's status, so ``worker.py --daemon``
  succeeds only when the worker answers.
- ``reopen_stderr``: on SIGHUP, after ``logs.reopen`` reopened the log
  files, a daemon's stderr file is reopened too, for log rotation by
  renaming (logrotate's default ``create``). CherryPy's default SIGHUP
  handler would re-exec the worker instead.

The worker names itself ``vmworker`` (``/proc/<pid>/comm``) so that the
init script's ``start-stop-daemon --name vmworker`` and the stale check
here recognise it.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import os
import sys

from .errors import AlreadyRunning, PidFileError

log = logging.getLogger(__name__)

PROCESS_NAME = "vmworker"
PR_SET_NAME = 15

#: What the daemon writes to the original process once it is serving.
_READY = b"ready\n"


# -- what a vmworker is ---------------------------------------------------------

def set_process_name(name: str = PROCESS_NAME) -> None:
    """Set ``/proc/self/comm`` (what ``ps`` and start-stop-daemon see)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_NAME, name.encode()[:15], 0, 0, 0)
    except (OSError, AttributeError) as err:
        log.warning("cannot set the process name to %s: %s", name, err)


def is_vmworker(pid: int) -> bool:
    """Whether ``pid`` is a live (not zombie) vmworker process."""
    if pid <= 0:
        return False
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except OSError:
        return False
    # stat is "pid (comm) state ...", and comm may itself hold parentheses.
    comm = stat[stat.index(b"(") + 1:stat.rindex(b")")]
    state = stat[stat.rindex(b")") + 2:stat.rindex(b")") + 3]
    if state == b"Z":
        return False
    return (comm == PROCESS_NAME.encode()
            or any(os.path.basename(a) == b"worker.py" for a in argv))


def read_pid(path: str) -> int | None:
    """The pid written in ``path``, or None if it is absent or garbage."""
    try:
        with open(path, "rb") as f:
            text = f.read(64).strip()
    except FileNotFoundError:
        return None
    try:
        return int(text)
    except ValueError:
        return None


# -- the pidfile --------------------------------------------------------------

class PidFile:
    """A pidfile locked for the life of the process that wrote it.

    ``acquire`` refuses (``AlreadyRunning``) when another process holds the
    lock, or when the recorded pid is a live vmworker (a pidfile on a
    filesystem without working locks); anything else in the file is stale
    and replaced. ``release`` removes the file if it is still ours.
    """

    def __init__(self, path: str):
        self.path = os.path.abspath(path)
        self._fd: int | None = None

    def acquire(self) -> None:
        try:
            self._acquire()
        except OSError as err:
            raise PidFileError(f"cannot write pidfile {self.path}: "
                               f"{err.strerror}") from err

    def _acquire(self) -> None:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                os.close(fd)
                if err.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                pid = read_pid(self.path)
                raise AlreadyRunning(
                    f"vmworker is already running (pid {pid}, pidfile "
                    f"{self.path} is locked)") from None
            # The previous holder may have unlinked the file between our
            # open and our lock: then we locked a file nobody can see.
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        try:
            old = os.pread(fd, 64, 0).strip()
            old_pid = int(old) if old.isdigit() else None
            if old_pid and old_pid != os.getpid():
                if is_vmworker(old_pid):
                    raise AlreadyRunning(
                        f"vmworker is already running (pid {old_pid} in "
                        f"{self.path})")
                log.info("pidfile %s: replacing stale pid %d (%s)", self.path,
                         old_pid, "not a vmworker" if _exists(old_pid)
                         else "no such process")
            data = f"{os.getpid()}\n".encode()
            os.ftruncate(fd, 0)
            os.pwrite(fd, data, 0)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd

    def release(self) -> None:
        """Remove the pidfile (if it is still ours) and drop the lock."""
        if self._fd is None:
            return
        try:
            if os.path.samestat(os.fstat(self._fd), os.stat(self.path)):
                os.unlink(self.path)
        except FileNotFoundError:
            pass
        finally:
            os.close(self._fd)
            self._fd = None


def _exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def is_locked(path: str) -> bool:
    """Whether some process holds the pidfile's lock (i.e. is running)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


# -- detaching ------------------------------------------------------------------

class Detached:
    """The daemon's side of the pipe to the process that started it."""

    def __init__(self, fd: int):
        self._fd: int | None = fd

    def ready(self, stderr_path: str | None = None) -> None:
        """Serving: let the starter exit 0 and let go of its terminal."""
        if self._fd is None:
            return
        _redirect(2, stderr_path)
        try:
            os.write(self._fd, _READY)
        except OSError:
            pass  # the starter was killed; nobody is waiting
        os.close(self._fd)
        self._fd = None

    def failed(self, status: int) -> None:
        """Could not start: the starter exits with ``status``."""
        if self._fd is None:
            return
        sys.stderr.flush()
        try:
            os.write(self._fd, f"exit {status}\n".encode())
        except OSError:
            pass
        os.close(self._fd)
        self._fd = None


def detach() -> Detached:
    """Double-fork into a daemon without a terminal; only the daemon returns.

    The original process waits for the daemon's word (``Detached.ready`` or
    ``failed``) and exits with it: 0 when the daemon serves, the daemon's
    status otherwise, 1 if the daemon died without a word. Standard input
    and output go to /dev/null now; standard error stays the starter's
    until ``ready`` so that a failure to start is reported where it was
    asked for. Call before any thread exists.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    read_end, write_end = os.pipe()
    first = os.fork()
    if first:
        os.close(write_end)
        os._exit(_wait_for_daemon(read_end, first))
    os.close(read_end)
    os.setsid()
    if os.fork():
        os._exit(0)
    os.chdir("/")
    os.umask(0o022)
    _redirect(0, None)
    _redirect(1, None)
    return Detached(write_end)


def _wait_for_daemon(fd: int, first_child: int) -> int:
    os.waitpid(first_child, 0)
    chunks = []
    while True:
        chunk = os.read(fd, 256)
        if not chunk:
            break
        chunks.append(chunk)
    os.close(fd)
    word = b"".join(chunks)
    if word.startswith(_READY):
        return 0
    if word.startswith(b"exit "):
        try:
            return int(word[5:].strip()) or 1
        except ValueError:
            return 1
    print("vmworker: the daemon exited before it was ready; see its log",
          file=sys.stderr)
    sys.stderr.flush()
    return 1


def _redirect(target_fd: int, path: str | None) -> None:
    """Point ``target_fd`` at ``path`` (appended) or at /dev/null."""
    if target_fd == 0:
        fd = os.open(os.devnull, os.O_RDONLY)
    elif path is None:
        fd = os.open(os.devnull, os.O_WRONLY)
    else:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
    os.dup2(fd, target_fd)
    os.close(fd)


# -- logs ----------------------------------------------------------------------

def reopen_stderr(path: str) -> None:
    """Point a daemon's stderr at ``path`` again (after a log rotation)."""
    try:
        _redirect(2, path)
    except OSError as err:
        log.error("cannot reopen %s: %s", path, err)
