"""Daemon mode, the pidfile, and the logs (vmworker.daemon, worker.py).

The pidfile is tested in-process against real processes (a live fake
"worker.py", a zombie); daemon mode runs the real ``worker.py --daemon``
and stops it by pid; log rotation and SIGHUP run a real worker too.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import psutil
import pytest

from conftest import ROOT, gone
from servers import free_port
from vmworker import daemon

pytestmark = pytest.mark.timeout(60)


def stop_by_pid(pid: int | None) -> None:
    if pid is None or gone(pid, 0):
        return
    os.kill(pid, signal.SIGTERM)
    if not gone(pid, 15):
        os.kill(pid, signal.SIGKILL)
        gone(pid, 5)


def run_daemon(worker, pidfile, port=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "worker.py"), "--daemon", "--pidfile",
         str(pidfile), "--config", str(worker.config), "--var-dir",
         str(worker.var), "--port", str(port or worker.port)],
        capture_output=True, text=True, timeout=30, cwd=ROOT,
        stdin=subprocess.DEVNULL)


# -- the pidfile ------------------------------------------------------------------

def test_pidfile_is_locked_replaces_stale_pids_and_removes_itself(tmp_path):
    path = tmp_path / "run" / "w.pid"
    path.parent.mkdir()
    dead = subprocess.Popen(["true"])
    dead.wait()
    for stale in (f"{dead.pid}\n", "garbage", f"{os.getpid()}\n", ""):
        path.write_text(stale)
        pidfile = daemon.PidFile(str(path))
        pidfile.acquire()
        assert daemon.read_pid(str(path)) == os.getpid()
        assert daemon.is_locked(str(path))
        with pytest.raises(daemon.AlreadyRunning, match="already running"):
            daemon.PidFile(str(path)).acquire()
        pidfile.release()
        assert not path.exists() and not daemon.is_locked(str(path))


def test_pidfile_refuses_a_live_vmworker_and_ignores_a_zombie(tmp_path):
    path = tmp_path / "w.pid"
    # Processes whose command line is "worker.py ...", like a real worker.
    live = subprocess.Popen(["worker.py", "30"], executable="/bin/sleep")
    zombie = subprocess.Popen(["worker.py", "0"], executable="/bin/sleep")
    try:
        # Until the child has exec'd, its command line is still Python's.
        deadline = time.monotonic() + 10
        while not daemon.is_vmworker(live.pid):
            assert time.monotonic() < deadline, "sleep never became worker.py"
            time.sleep(0.01)
        path.write_text(f"{live.pid}\n")
        with pytest.raises(daemon.AlreadyRunning, match=str(live.pid)):
            daemon.PidFile(str(path)).acquire()
        while psutil.Process(zombie.pid).status() != psutil.STATUS_ZOMBIE:
            time.sleep(0.01)
        assert not daemon.is_vmworker(zombie.pid)
        path.write_text(f"{zombie.pid}\n")
        pidfile = daemon.PidFile(str(path))
        pidfile.acquire()
        pidfile.release()
    finally:
        live.kill()
        live.wait()
        zombie.wait()


def test_release_leaves_a_pidfile_that_is_no_longer_ours(tmp_path):
    path = tmp_path / "w.pid"
    pidfile = daemon.PidFile(str(path))
    pidfile.acquire()
    os.unlink(path)
    path.write_text("12345\n")  # someone else's, written meanwhile
    pidfile.release()
    assert path.read_text() == "12345\n"


# -- daemon mode ---------------------------------------------------------------------

def test_daemon_mode_holds_a_locked_pidfile_until_sigterm(make_worker):
    w = make_worker()
    pidfile = w.var.parent / "worker.pid"
    pid = None
    try:
        started = run_daemon(w, pidfile)
        assert started.returncode == 0, started.stderr
        assert started.stdout == "" and started.stderr == ""
        pid = daemon.read_pid(str(pidfile))
        # It answers as soon as --daemon returns.
        assert w.ok("list")["vmachines"] == []
        proc = psutil.Process(pid)
        assert proc.name() == "vmworker"
        assert proc.ppid() != os.getpid()
        assert os.getsid(pid) != os.getsid(0)
        assert os.readlink(f"/proc/{pid}/cwd") == "/"
        assert os.readlink(f"/proc/{pid}/fd/0") == os.devnull
        assert os.readlink(f"/proc/{pid}/fd/1") == os.devnull
        assert os.readlink(f"/proc/{pid}/fd/2") == str(w.var / "log" / "stderr.log")
        assert daemon.is_locked(str(pidfile))

        second = run_daemon(w, pidfile, port=free_port())
        assert second.returncode == 1
        assert f"already running (pid {pid}" in second.stderr
        assert daemon.read_pid(str(pidfile)) == pid

        os.kill(pid, signal.SIGTERM)
        assert gone(pid)
        assert not pidfile.exists()
        assert "Bus EXITED" in (w.var / "log" / "worker.log").read_text()
    finally:
        stop_by_pid(pid)


def test_a_daemon_that_cannot_serve_says_why_and_leaves_no_lock(make_worker):
    w = make_worker()
    pidfile = w.var.parent / "worker.pid"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", w.port))
        taken.listen()
        started = run_daemon(w, pidfile)
    assert started.returncode != 0
    assert f"Port {w.port} not free" in started.stderr
    assert not daemon.is_locked(str(pidfile))
    stop_by_pid(daemon.read_pid(str(pidfile)))


# -- logs ------------------------------------------------------------------------

def test_logs_rotate_by_size_and_sighup_reopens_them(make_worker):
    w = make_worker("log_max_bytes = 600\nlog_backups = 1\n").start()
    logs = w.var / "log"
    for _ in range(20):
        w.ok("list")
    for name in ("worker.log", "access.log"):
        assert (logs / f"{name}.1").exists(), name
        assert not (logs / f"{name}.2").exists(), name
        assert (logs / name).stat().st_size <= 600
    # logrotate's way: rename, then SIGHUP; the worker keeps running.
    (logs / "worker.log").rename(logs / "worker.log.old")
    (logs / "access.log").rename(logs / "access.log.old")
    w.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while not (logs / "worker.log").exists():
        assert time.monotonic() < deadline, "worker.log was not reopened"
        time.sleep(0.05)
    w.ok("list")
    assert w.proc.poll() is None
    assert "reopened" in (logs / "worker.log").read_text()
    assert "/vmachines/list" in (logs / "access.log").read_text()


def test_lines_about_a_vm_carry_its_name_and_uuid(make_worker):
    w = make_worker().start()
    uuid = w.start_vm("named-in-logs", w.image("idle"))
    w.wait_for(uuid, "running")
    w.ok("destroy", uuid=uuid)
    w.wait_for(uuid, "destroyed")
    lines = (w.var / "log" / "worker.log").read_text().splitlines()
    about = [line for line in lines if uuid in line or "named-in-logs" in line]
    assert len(about) >= 3
    for line in about:
        assert uuid in line and "named-in-logs" in line, line
    qemu_log = w.var / "vms" / uuid / "qemu.log"
    assert not qemu_log.exists() or qemu_log.is_file()
