"""Fixtures that run the real worker process against real QEMU.

``worker`` starts ``worker.py`` on a free port with a fresh, short var dir
(QMP socket paths must fit 107 bytes) and stops it afterwards. Every QEMU
whose command line names that var dir is found by pid at teardown: one
still alive there is a leak, which fails the test after being killed.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import psutil
import pytest
import requests
from qemu.qmp.legacy import QEMUMonitorProtocol

sys.path.insert(0, os.path.dirname(__file__))

import guests  # noqa: E402
from servers import FileServer, free_port  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parent.parent
ACCEL = os.environ.get("VMWORKER_TEST_ACCEL", "auto")
END = {"failed to start", "failed to save", "stopped", "destroyed"}


class Worker:
    """One worker process and a small client for its API."""

    def __init__(self, var: pathlib.Path, extra_config: str = ""):
        self.var = var
        self.storage = var / "storage"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config = var.parent / f"{var.name}.conf"
        settings = {
            "accel": repr(ACCEL),
            "supervisor_interval": "0.2",
            "qemu_start_timeout": "30.0",
            "fetch_connect_timeout": "2.0",
            "fetch_read_timeout": "2.0",
            # Tests run many 1-vCPU guests on 2 host CPUs.
            "cpu_overcommit": "16.0",
        }
        for line in extra_config.splitlines():  # a test's keys win
            if "=" in line:
                key, value = line.split("=", 1)
                settings[key.strip()] = value.strip()
        self.config.write_text("[worker]\n" + "".join(
            f"{key} = {value}\n" for key, value in settings.items()))
        self.proc: subprocess.Popen | None = None
        self.session = requests.Session()

    # -- process ------------------------------------------------------------

    def start(self, timeout: float = 30) -> "Worker":
        self.storage.mkdir(parents=True, exist_ok=True)
        log = open(self.var.parent / f"{self.var.name}.out", "ab")
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "worker.py"), "--config",
             str(self.config), "--var-dir", str(self.var), "--port",
             str(self.port)],
            stdout=log, stderr=log, stdin=subprocess.DEVNULL, cwd=ROOT)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker exited with {self.proc.returncode}: "
                                   f"{self.output()[-2000:]}")
            try:
                requests.get(self.url + "/vmachines/list", timeout=1)
                return self
            except requests.ConnectionError:
                time.sleep(0.05)
        raise RuntimeError("worker did not answer in time")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            raise

    def output(self) -> str:
        path = self.var.parent / f"{self.var.name}.out"
        return path.read_text(errors="replace") if path.exists() else ""

    # -- API ----------------------------------------------------------------

    def call(self, endpoint: str, method: str = "GET", headers=None, **params):
        url = f"{self.url}/vmachines/{endpoint}"
        if method == "GET":
            resp = self.session.get(url, params=params, headers=headers, timeout=30)
        else:
            resp = self.session.post(url, data=params, headers=headers, timeout=30)
        return resp.status_code, resp.json()

    def ok(self, endpoint: str, **params) -> dict:
        code, body = self.call(endpoint, **params)
        assert code == 200 and body["success"], (endpoint, params, code, body)
        return body

    def status(self, uuid: str) -> dict:
        return self.ok("status", uuid=uuid)

    def wait_for(self, uuid: str, *statuses: str, timeout: float = 60) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            body = self.status(uuid)
            if body["status"] in statuses:
                return body
            if time.monotonic() > deadline:
                raise AssertionError(f"VM {uuid} is {body['status']!r} "
                                     f"({body['message']}), wanted {statuses}")
            if body["status"] in END and not END.intersection(statuses):
                raise AssertionError(f"VM {uuid} ended {body['status']!r}: "
                                     f"{body['message']}")
            time.sleep(0.05)

    def start_vm(self, name: str, image: str, **params) -> str:
        body = self.ok("start", name=name, cpu_count=1, mem_size=32,
                       hda_image=image, **params)
        return body["uuid"]

    def qmp(self, uuid: str, command: str, **args):
        """Ask QEMU itself, on the VM's command monitor (not our status)."""
        mon = QEMUMonitorProtocol(str(self.var / "vms" / uuid / "qmp.sock"))
        mon.connect()
        try:
            return mon.cmd(command, **args)
        finally:
            mon.close()

    # -- what runs ------------------------------------------------------------

    def qemu_processes(self) -> list[psutil.Process]:
        """Every QEMU process started for this var dir."""
        found = []
        needle = str(self.var)
        for proc in psutil.process_iter(["cmdline", "status"]):
            try:
                argv = proc.info["cmdline"] or []
                if (proc.info["status"] != psutil.STATUS_ZOMBIE and argv
                        and "qemu-system" in argv[0]
                        and any(needle in a for a in argv)):
                    found.append(proc)
            except psutil.NoSuchProcess:
                continue
        return found

    def image(self, kind: str, marker: bytes = b"", name: str | None = None) -> str:
        """Assemble a boot-sector guest into the storage root; return its path."""
        built = guests.build_guest(kind, self.var.parent, marker=marker)
        dest = self.storage / (name or built.name)
        shutil.move(str(built), dest)
        return str(dest)


def rfb_security_types(host: str, port: int) -> bytes:
    """The security types a VNC server offers (1: none, 2: VNC password)."""
    with socket.create_connection((host, port), timeout=5) as s:
        assert s.recv(12).startswith(b"RFB 003.")
        s.sendall(b"RFB 003.008\n")
        count = s.recv(1)[0]
        return s.recv(count) if count else b""


def gone(pid: int, timeout: float = 20) -> bool:
    """Wait until ``pid`` (not our child) has exited; a zombie has."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)


def _teardown(worker: Worker) -> list[int]:
    """Destroy what is left, stop the worker, kill and report leaked QEMUs."""
    if worker.proc is not None and worker.proc.poll() is None:
        try:
            _, body = worker.call("list")
            for vm in body.get("vmachines", []):
                if vm["status"] not in END:
                    worker.call("destroy", uuid=vm["uuid"])
        except requests.RequestException:
            pass
        worker.stop()
    leaked = []
    for proc in worker.qemu_processes():
        leaked.append(proc.pid)
        proc.kill()
        try:
            proc.wait(10)
        except psutil.TimeoutExpired:
            pass
    return leaked


@pytest.fixture
def make_worker():
    """Factory of workers (for tests that restart them or need config)."""
    made: list[Worker] = []
    dirs: list[str] = []

    def make(extra_config: str = "", var: pathlib.Path | None = None) -> Worker:
        if var is None:
            base = tempfile.mkdtemp(prefix="vw", dir="/tmp")
            dirs.append(base)
            var = pathlib.Path(base) / "var"
        worker = Worker(var, extra_config)
        made.append(worker)
        return worker

    yield make
    leaked = []
    for worker in made:
        leaked += _teardown(worker)
    for base in dirs:
        shutil.rmtree(base, ignore_errors=True)
    assert not leaked, f"QEMU processes leaked: {leaked}"


@pytest.fixture
def http(tmp_path):
    """An HTTP server on 127.0.0.1: GET serves ``http.root``, PUT stores
    into ``http.upload_dir`` (see servers.FileServer for its knobs)."""
    www, uploads = tmp_path / "www", tmp_path / "uploads"
    www.mkdir()
    uploads.mkdir()
    with FileServer(str(www), str(uploads)) as server:
        yield server


@pytest.fixture(scope="module")
def worker():
    """A worker shared by a module's tests (each test cleans up its VMs)."""
    base = tempfile.mkdtemp(prefix="vw", dir="/tmp")
    w = Worker(pathlib.Path(base) / "var").start()
    yield w
    leaked = _teardown(w)
    shutil.rmtree(base, ignore_errors=True)
    assert not leaked, f"QEMU processes leaked: {leaked}"


@pytest.fixture
def cleanup(worker):
    """Destroys, at the end of a test, every VM the test left alive."""
    yield
    _, body = worker.call("list")
    for vm in body["vmachines"]:
        if vm["status"] not in END:
            worker.call("destroy", uuid=vm["uuid"])
    deadline = time.monotonic() + 15
    while ((worker.qemu_processes() or os.listdir(worker.var / "vms"))
           and time.monotonic() < deadline):
        time.sleep(0.05)
    assert not worker.qemu_processes(), "a destroyed VM's QEMU still runs"
    assert not os.listdir(worker.var / "vms"), "an ended VM's folder stays"
