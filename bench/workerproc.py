"""The real worker process, started by the harness, and a small client.

Each row that needs the worker gets a fresh one (fresh var dir and journal)
so rows do not disturb each other. The var dir is short (QMP socket paths
must fit 107 bytes) and the guest image lies in ``VAR/storage``. At the end
every VM is destroyed, the worker gets SIGTERM (it leaves VMs running by
design), and any QEMU whose command line still names this var dir is killed
by pid and reported as a leak.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import psutil
import requests

from .procs import CHILDREN, pid_state

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
END = {"failed to start", "failed to save", "stopped", "destroyed"}


class WorkerError(RuntimeError):
    """The worker did not start, or answered a request with a failure."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class WorkerProcess:
    """``worker.py`` on 127.0.0.1 with its own var dir."""

    def __init__(self, base: str, name: str, accel: str, image: str,
                 config: dict | None = None):
        self.base = base
        self.var = os.path.join(base, name)
        self.storage = os.path.join(self.var, "storage")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.out = os.path.join(base, f"{name}.out")
        self.config = os.path.join(base, f"{name}.conf")
        self.settings = {"accel": accel, **(config or {})}
        os.makedirs(self.storage, exist_ok=True)
        self.image = os.path.join(self.storage, os.path.basename(image))
        shutil.copyfile(image, self.image)
        with open(self.config, "w") as f:
            f.write("[worker]\n")
            for key, value in self.settings.items():
                f.write(f"{key} = {value!r}\n")
        self.proc: subprocess.Popen | None = None
        self.session = requests.Session()

    # -- process ------------------------------------------------------------

    def start(self, timeout: float = 30.0) -> "WorkerProcess":
        with open(self.out, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, os.path.join(ROOT, "worker.py"), "--config",
                 self.config, "--var-dir", self.var, "--port", str(self.port)],
                stdout=log, stderr=log, stdin=subprocess.DEVNULL, cwd=ROOT)
        CHILDREN.add(self.proc.pid, "worker")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise WorkerError(f"worker exited with {self.proc.returncode}: "
                                  f"{self.tail()}")
            try:
                requests.get(self.url + "/vmachines/list", timeout=1)
                return self
            except requests.ConnectionError:
                time.sleep(0.05)
        raise WorkerError("worker did not answer within "
                          f"{timeout:g} s: {self.tail()}")

    def tail(self, chars: int = 1500) -> str:
        try:
            with open(self.out, errors="replace") as f:
                return f.read()[-chars:]
        except OSError:
            return ""

    def close(self) -> list[str]:
        """Destroy every VM, stop the worker, kill leftovers; return leaks."""
        if self.proc is not None and self.proc.poll() is None:
            try:
                for vm in self.call("list")[1].get("vmachines", []):
                    if vm["status"] not in END:
                        self.call("destroy", uuid=vm["uuid"])
            except (requests.RequestException, ValueError):
                pass
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self.proc is not None:
            CHILDREN.discard(self.proc.pid)
        leaks = []
        for proc in self.qemu_processes():
            leaks.append(f"QEMU pid {proc.pid} of {self.var}")
            proc.kill()
            try:
                proc.wait(10)
            except psutil.TimeoutExpired:
                pass
        self.session.close()
        return leaks

    def qemu_processes(self) -> list[psutil.Process]:
        found = []
        for proc in psutil.process_iter(["cmdline"]):
            argv = proc.info["cmdline"] or []
            if (argv and "qemu-system" in argv[0]
                    and any(self.var in a for a in argv)
                    and pid_state(proc.pid) == "alive"):
                found.append(proc)
        return found

    # -- API ----------------------------------------------------------------

    def call(self, endpoint: str, session: requests.Session | None = None,
             **params) -> tuple[int, dict]:
        url = f"{self.url}/vmachines/{endpoint}"
        try:
            resp = (session or self.session).get(url, params=params, timeout=30)
        except requests.ConnectionError:
            # A keep-alive connection the server closed while idle (cheroot
            # drops idle ones after its socket timeout): retry queries once,
            # on a new connection. State changes are never retried.
            if endpoint not in ("list", "status"):
                raise
            resp = requests.get(url, params=params, timeout=30)
        return resp.status_code, resp.json()

    def ok(self, endpoint: str, session: requests.Session | None = None,
           **params) -> dict:
        code, body = self.call(endpoint, session, **params)
        if code != 200 or not body.get("success"):
            raise WorkerError(f"{endpoint} {params} → {code}: "
                              f"{body.get('message')}")
        return body

    def start_vm(self, name: str, session: requests.Session | None = None) -> str:
        return self.ok("start", session, name=name, cpu_count=1, mem_size=32,
                       hda_image=self.image)["uuid"]

    def wait_running(self, uuid: str, timeout: float = 30.0,
                     poll: float = 0.005) -> dict:
        """Poll status every ``poll`` s until the VM leaves ``starting``."""
        deadline = time.monotonic() + timeout
        while True:
            body = self.ok("status", uuid=uuid)
            if body["status"] == "running":
                return body
            if body["status"] != "starting":
                raise WorkerError(f"VM {uuid} is {body['status']}: "
                                  f"{body['message']}")
            if time.monotonic() > deadline:
                raise WorkerError(f"VM {uuid} still starting after "
                                  f"{timeout:g} s")
            time.sleep(poll)

    def wait_all_running(self, uuids: list[str], timeout: float = 120.0,
                         poll: float = 0.02) -> dict[str, dict]:
        """Poll ``list`` until every VM in ``uuids`` is running."""
        want = set(uuids)
        deadline = time.monotonic() + timeout
        while True:
            vms = {vm["uuid"]: vm for vm in self.ok("list")["vmachines"]
                   if vm["uuid"] in want}
            bad = [vm for vm in vms.values()
                   if vm["status"] not in ("starting", "running")]
            if bad:
                raise WorkerError(f"VM {bad[0]['uuid']} is {bad[0]['status']}: "
                                  f"{bad[0]['message']}")
            if len(vms) == len(want) and all(vm["status"] == "running"
                                             for vm in vms.values()):
                return vms
            if time.monotonic() > deadline:
                starting = sum(vm["status"] == "starting" for vm in vms.values())
                raise WorkerError(f"{starting} VMs still starting after "
                                  f"{timeout:g} s")
            time.sleep(poll)

    def journal_records(self) -> list[dict]:
        """The worker's journal, read-only (for the phases of a start)."""
        from vmworker.journal import read_records
        path = os.path.join(self.var, "journal", "journal.log")
        return list(read_records(path))
