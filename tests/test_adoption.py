"""A process is a VM's QEMU only by pid + create time + the uuid on its
command line: an imposter holding a journaled pid is neither adopted nor
signalled. Acknowledged requests survive a kill -9 of the worker.
"""

from __future__ import annotations

import concurrent.futures
import os
import signal
import subprocess
import sys
import time
import uuid as uuidlib

import psutil
import pytest
import requests

from vmworker.journal import frame

pytestmark = pytest.mark.timeout(180)


def forge_running_vm(var, pid: int, create_time: float) -> str:
    """Journal records of a running VM whose QEMU is ``pid``, as a worker
    that died would have left them."""
    vm = str(uuidlib.uuid4())
    (var / "journal").mkdir(parents=True, exist_ok=True)
    (var / "vms" / vm).mkdir(parents=True, exist_ok=True)
    records = [
        {"type": "accepted", "uuid": vm, "ts": time.time(), "params": {
            "name": "forged", "cpu_count": 1, "mem_size": 32,
            "hda_image": "/nowhere.img", "hda_save_to": "", "hdb_image": "",
            "hdb_save_to": "", "cd_image": "", "run_agent": False,
            "soft_list": ""}},
        {"type": "spawned", "uuid": vm, "ts": time.time(), "pid": pid,
         "create_time": create_time},
        {"type": "running", "uuid": vm, "ts": time.time(),
         "vnc": "127.0.0.1:5999"},
    ]
    with open(var / "journal" / "journal.log", "ab") as f:
        for record in records:
            f.write(frame(record))
    return vm


@pytest.fixture
def imposter():
    """A long-lived process that is not QEMU (stopped by pid afterwards)."""
    proc = subprocess.Popen([sys.executable, "-c",
                             "import time; time.sleep(120)"])
    yield proc
    proc.kill()
    proc.wait(10)


@pytest.mark.parametrize("same_create_time", [True, False])
def test_an_imposter_with_the_journaled_pid_is_not_adopted_or_killed(
        make_worker, imposter, same_create_time):
    w = make_worker()
    created = psutil.Process(imposter.pid).create_time()
    vm = forge_running_vm(w.var, imposter.pid,
                          created if same_create_time else created - 1000)
    w.start()
    status = w.wait_for(vm, "stopped", timeout=30)
    assert "QEMU exited unexpectedly" in status["halt_reason"]
    time.sleep(0.5)
    assert imposter.poll() is None, "the worker signalled a process not its own"


@pytest.mark.parametrize("kill_after", [0.2, 0.5])
def test_every_acknowledged_start_survives_a_kill_9(make_worker, http,
                                                    kill_after):
    """200 concurrent starts (their images hang on a held HTTP server, so
    no QEMU runs) while the worker is killed -9 after ``kill_after`` s:
    every start that got a 200 answer is known to the restarted worker."""
    with open(os.path.join(http.root, "x.img"), "wb") as f:
        f.write(b"\0" * 512)
    http.hold.set()
    w = make_worker("cpu_overcommit = 1000.0\nqemu_overhead_mb = 0\n"
                    "start_workers = 4\n").start()
    url = http.url("x.img")
    session = requests.Session()

    def start(i):
        try:
            r = session.get(f"{w.url}/vmachines/start", timeout=10, params={
                "name": f"m{i}", "cpu_count": 1, "mem_size": 16,
                "hda_image": url})
            return r.json()["uuid"] if r.status_code == 200 else None
        except (requests.RequestException, ValueError):
            return None  # no answer: it may or may not have landed

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        futures = [pool.submit(start, i) for i in range(200)]
        time.sleep(kill_after)
        w.stop(signal.SIGKILL)
        acked = [f.result() for f in futures]
    acked = [u for u in acked if u]
    assert acked, "the kill came before any answer; nothing was tested"
    w.start()
    _, body = w.call("list")
    known = {vm["uuid"] for vm in body["vmachines"]}
    assert set(acked) <= known
    for vm in body["vmachines"]:
        w.call("destroy", uuid=vm["uuid"])
