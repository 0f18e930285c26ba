"""The LSB init script, run for real: exit codes, pidfile, VMs that survive.

Each test drives ``init.d/vmworker`` as root against a worker on a free
port with a short temporary var dir, passed through the script's
environment (``DAEMON_ARGS``, ``PIDFILE``), with ``VMWORKER_DEFAULTS``
pointing away from the host's /etc/default/vmworker. At the end every VM
is destroyed through the API and the worker is stopped by its pid; the
``make_worker`` fixture then fails the test if any QEMU is left.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess

import psutil
import pytest
import requests

from conftest import END, ROOT, gone
from vmworker import daemon

pytestmark = pytest.mark.timeout(90)

SCRIPT = ROOT / "init.d" / "vmworker"


class Service:
    """The init script managing one worker (a ``conftest.Worker``)."""

    def __init__(self, worker, tmp):
        self.w = worker
        self.tmp = tmp
        self.pidfile = worker.var.parent / "vmworker.pid"
        self.args = (f"--config {worker.config} --var-dir {worker.var} "
                     f"--port {worker.port}")
        self.env = {**os.environ, "PIDFILE": str(self.pidfile),
                    "DAEMON_ARGS": self.args,
                    "VMWORKER_DEFAULTS": str(tmp / "no-such-defaults")}
        worker.storage.mkdir(parents=True, exist_ok=True)

    def run(self, *action: str, script=SCRIPT, **env) -> subprocess.CompletedProcess:
        environ = {**self.env, **env}
        for key in [k for k, v in environ.items() if v is None]:
            del environ[key]
        return subprocess.run([str(script), *action], env=environ,
                              capture_output=True, text=True, timeout=60,
                              stdin=subprocess.DEVNULL)

    def ok(self, action: str, script=SCRIPT, **env) -> subprocess.CompletedProcess:
        done = self.run(action, script=script, **env)
        assert done.returncode == 0, (action, done.stdout, done.stderr)
        return done

    def pid(self) -> int | None:
        return daemon.read_pid(str(self.pidfile))

    def workers(self) -> list[int]:
        """Live worker processes on this var dir."""
        found = []
        for proc in psutil.process_iter(["cmdline", "status"]):
            argv = proc.info["cmdline"] or []
            if (proc.info["status"] != psutil.STATUS_ZOMBIE
                    and any(a.endswith("worker.py") for a in argv)
                    and str(self.w.var) in argv):
                found.append(proc.pid)
        return found

    def teardown(self) -> None:
        """Destroy every VM through the API, then stop each worker by pid."""
        if self.workers():
            try:
                _, body = self.w.call("list")
                for vm in body.get("vmachines", []):
                    if vm["status"] not in END:
                        self.w.call("destroy", uuid=vm["uuid"])
            except requests.RequestException:
                pass  # not answering: make_worker kills what is left
        for pid in self.workers():
            os.kill(pid, signal.SIGTERM)
            if not gone(pid, 15):
                os.kill(pid, signal.SIGKILL)
                gone(pid, 5)


@pytest.fixture
def service(make_worker, tmp_path):
    s = Service(make_worker(), tmp_path)
    yield s
    s.teardown()


def test_the_script_manages_the_worker_and_never_stops_a_vm(service):
    s = service
    assert s.run("status").returncode == 3
    s.ok("start")
    pid = s.pid()
    assert s.w.ok("list")["vmachines"] == []
    proc = psutil.Process(pid)
    assert proc.name() == "vmworker"
    venv_python = ROOT / ".venv" / "bin" / "python"
    if venv_python.exists():
        assert proc.cmdline()[0] == str(venv_python)
    assert daemon.is_locked(str(s.pidfile))
    status = s.ok("status")
    assert f"running (pid {pid})" in status.stdout

    again = s.ok("start")
    assert "already running" in again.stdout
    assert s.pid() == pid and s.workers() == [pid]

    uuid = s.w.start_vm("kept", s.w.image("idle"))
    vm = s.w.wait_for(uuid, "running")

    s.ok("stop")
    assert gone(pid, 0)
    assert not s.pidfile.exists()
    assert psutil.Process(vm["pid"]).status() != psutil.STATUS_ZOMBIE
    assert s.run("status").returncode == 3
    assert "not running" in s.ok("stop").stdout

    for action in ("start", "restart", "force-reload", "try-restart"):
        s.ok(action)
        new = s.pid()
        assert new != pid and s.workers() == [new], action
        pid = new
        after = s.w.status(uuid)
        assert (after["status"], after["pid"], after["vnc"]) == \
            ("running", vm["pid"], vm["vnc"]), action

    s.w.ok("destroy", uuid=uuid)
    s.ok("stop")
    assert gone(pid, 0) and s.workers() == []


def test_a_stale_pidfile_does_not_block_start(service):
    s = service
    dead = subprocess.Popen(["true"])
    dead.wait()
    # A dead pid (with start-stop-daemon), then a live process that is not
    # a vmworker (ours; with the script's own signalling).
    for stale, env in ((dead.pid, {}), (os.getpid(), {"START_STOP_DAEMON": "none"})):
        s.pidfile.write_text(f"{stale}\n")
        status = s.run("status", **env)
        assert status.returncode == 1, status.stdout
        assert "pidfile" in status.stdout
        s.ok("start", **env)
        pid = s.pid()
        assert pid != stale and s.workers() == [pid]
        s.w.ok("list")
        s.ok("stop", **env)
        assert gone(pid, 0)
    # stop on a stale pidfile: nothing to stop, the pidfile is removed.
    s.pidfile.write_text(f"{dead.pid}\n")
    assert "stale" in s.ok("stop").stdout
    assert not s.pidfile.exists()


def test_unknown_actions_print_usage_and_exit_2(service):
    for argv in (("bogus",), ()):
        done = service.run(*argv)
        assert done.returncode == 2
        assert done.stderr.startswith("Usage: ")
        assert "start|stop|restart" in done.stderr
    reload = service.run("reload")
    assert reload.returncode == 3 and "force-reload" in reload.stderr
    assert service.run("reopen-logs").returncode == 7  # not running
    assert "not starting" in service.ok("try-restart").stdout
    assert service.workers() == []


def test_defaults_file_is_read_and_the_environment_overrides_it(service, tmp_path):
    s = service
    defaults = tmp_path / "default-vmworker"
    theirs = tmp_path / "from-defaults.pid"
    defaults.write_text(f'DAEMON_ARGS="--no-such-flag"\nPIDFILE={theirs}\n')
    env = {"VMWORKER_DEFAULTS": str(defaults), "PIDFILE": None}
    # DAEMON_ARGS from the environment wins; PIDFILE comes from the file.
    s.ok("start", **env)
    pid = daemon.read_pid(str(theirs))
    assert s.workers() == [pid]
    s.ok("status", VMWORKER_DEFAULTS=str(defaults), PIDFILE=None)
    # PIDFILE from the environment wins over the file's.
    assert s.run("status", VMWORKER_DEFAULTS=str(defaults)).returncode == 3
    s.ok("stop", **env)
    assert gone(pid, 0) and not theirs.exists()
    # Without DAEMON_ARGS in the environment, the file's bad flag is used.
    refused = s.run("start", VMWORKER_DEFAULTS=str(defaults), PIDFILE=None,
                    DAEMON_ARGS=None)
    assert refused.returncode != 0
    assert "--no-such-flag" in refused.stderr
    assert s.workers() == []


def test_installed_elsewhere_with_vmworker_home(service, tmp_path):
    s = service
    etc = tmp_path / "etc-init.d"
    etc.mkdir()
    copy = etc / "vmworker"
    shutil.copy(SCRIPT, copy)
    lost = s.run("start", script=copy)
    assert lost.returncode == 5 and "VMWORKER_HOME" in lost.stderr
    assert s.run("stop", script=copy).returncode == 0
    # A symlink to the repository's script finds its install by itself.
    link = etc / "vmworker-link"
    link.symlink_to(SCRIPT)
    assert s.run("status", script=link).returncode == 3
    # A copy with VMWORKER_HOME, and no start-stop-daemon.
    env = {"VMWORKER_HOME": str(ROOT), "START_STOP_DAEMON": ""}
    s.ok("start", script=copy, **env)
    pid = s.pid()
    assert s.workers() == [pid]
    s.ok("status", script=copy, **env)
    s.ok("stop", script=copy, **env)
    assert gone(pid, 0) and not s.pidfile.exists()


def test_a_wrong_config_is_not_configured(service, tmp_path):
    s = service
    bad = tmp_path / "bad.conf"
    bad.write_text("[worker]\ncpu_overcommit = 'lots'\n")
    done = s.run("start", DAEMON_ARGS=f"--config {bad} --var-dir {s.w.var} "
                                      f"--port {s.w.port}")
    assert done.returncode == 6
    assert "cpu_overcommit" in done.stderr
    assert s.workers() == [] and not s.pidfile.exists()


def test_the_systemd_unit_is_valid_and_never_kills_the_vms(tmp_path):
    text = (ROOT / "init.d" / "vmworker.service").read_text()
    settings = dict(line.split("=", 1) for line in text.splitlines()
                    if "=" in line and not line.startswith("#"))
    assert settings["KillMode"] == "process"
    assert settings["Type"] == "forking"
    assert "--daemon --pidfile " + settings["PIDFile"] in settings["ExecStart"]
    verify = shutil.which("systemd-analyze")
    if verify is None:
        pytest.skip("systemd-analyze is not installed")
    unit = tmp_path / "vmworker.service"
    unit.write_text(text.replace("/opt/vmworker", str(ROOT)))
    done = subprocess.run([verify, "verify", str(unit)], capture_output=True,
                          text=True, timeout=30)
    assert done.returncode == 0, done.stderr
