"""End to end on real QEMU: start, status, suspend, resume, destroy, halt.

Each test drives the real worker process over HTTP and checks what QEMU
itself says (QMP, the process table, the VNC socket), not only our status.
"""

from __future__ import annotations

import os
import socket
import time

import psutil
import pytest

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("cleanup")]


def qmp_status(worker, uuid: str) -> str:
    """QEMU's own run state, asked on the VM's command monitor."""
    return worker.qmp(uuid, "query-status")["status"]


def rfb_banner(address: str) -> bytes:
    host, port = address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as s:
        return s.recv(12)


def test_start_reaches_running_with_a_vnc_server(worker):
    image = worker.image("idle")
    uuid = worker.start_vm("web-1", image)
    vm = worker.wait_for(uuid, "running")
    assert vm["name"] == "web-1" and vm["cpu_count"] == 1 and vm["mem_size"] == 32
    # The VNC address answers like a VNC server: the RFB protocol banner.
    assert rfb_banner(vm["vnc"]).startswith(b"RFB 003.")
    assert qmp_status(worker, uuid) == "running"
    proc = psutil.Process(vm["pid"])
    argv = proc.cmdline()
    assert argv[argv.index("-uuid") + 1] == uuid
    assert "-no-shutdown" in argv
    # QEMU is in its own session: stopping the worker cannot signal it.
    assert os.getsid(vm["pid"]) != os.getsid(worker.proc.pid)


def test_suspend_and_resume_change_qemus_own_run_state(worker):
    uuid = worker.start_vm("pause-me", worker.image("idle"))
    worker.wait_for(uuid, "running")
    assert worker.ok("suspend", uuid=uuid)["status"] == "suspended"
    assert qmp_status(worker, uuid) == "paused"
    assert worker.status(uuid)["status"] == "suspended"
    # Suspending twice is a state error, not a success.
    code, body = worker.call("suspend", uuid=uuid)
    assert code == 409 and "suspended" in body["message"]
    assert worker.ok("resume", name="pause-me")["status"] == "running"
    assert qmp_status(worker, uuid) == "running"
    code, body = worker.call("resume", uuid=uuid)
    assert code == 409 and not body["success"]


def test_destroy_kills_qemu_and_removes_its_folder(worker):
    uuid = worker.start_vm("doomed", worker.image("idle"))
    pid = worker.wait_for(uuid, "running")["pid"]
    assert worker.ok("destroy", uuid=uuid)["status"] == "destroyed"
    # The answer comes after the process is gone (reaped, not a zombie).
    assert not psutil.pid_exists(pid) or \
        psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    vm = worker.wait_for(uuid, "destroyed")
    assert vm["vnc"] == ""
    deadline = time.monotonic() + 10
    while (worker.var / "vms" / uuid).exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not (worker.var / "vms" / uuid).exists()
    code, body = worker.call("destroy", uuid=uuid)
    assert code == 409 and "destroyed" in body["message"]


def test_destroy_while_starting_leaves_no_process(worker):
    # Destroying right after the start answer races the start job: whatever
    # step it is at, no QEMU may survive and the status must be destroyed.
    uuid = worker.start_vm("short-lived", worker.image("idle"))
    worker.ok("destroy", uuid=uuid)
    time.sleep(1)
    assert worker.status(uuid)["status"] == "destroyed"
    assert worker.qemu_processes() == []


def test_guest_poweroff_halts_the_vm(worker):
    uuid = worker.start_vm("halter", worker.image("poweroff"))
    vm = worker.wait_for(uuid, "stopped", timeout=60)
    assert vm["halt_reason"] == "guest poweroff"
    assert "no image to save" in vm["message"]
    assert worker.qemu_processes() == []


def test_qemu_killed_while_running_is_a_halt_with_the_cause(worker):
    uuid = worker.start_vm("crasher", worker.image("idle"))
    pid = worker.wait_for(uuid, "running")["pid"]
    psutil.Process(pid).kill()
    vm = worker.wait_for(uuid, "stopped", timeout=30)
    # The worker reaped its own child and knows how it ended.
    assert vm["halt_reason"] == "QEMU exited unexpectedly: killed by SIGKILL"


def test_unknown_vm_is_404(worker):
    code, body = worker.call("status", name="nobody")
    assert code == 404 and "nobody" in body["message"]
    code, body = worker.call("destroy", uuid="6f1c2a9e-0b7d-4c51-9a8e-2d4f3b6a7c10")
    assert code == 404 and not body["success"]


def test_post_works_like_get(worker):
    image = worker.image("idle")
    code, body = worker.call("start", method="POST", name="posted",
                             cpu_count=1, mem_size=32, hda_image=image)
    assert code == 200 and body["success"]
    uuid = body["uuid"]
    worker.wait_for(uuid, "running")
    code, body = worker.call("status", method="POST", uuid=uuid)
    assert code == 200 and body["status"] == "running"
    code, body = worker.call("list", method="POST")
    assert uuid in [vm["uuid"] for vm in body["vmachines"]]
    code, body = worker.call("destroy", method="POST", name="posted")
    assert code == 200 and body["status"] == "destroyed"
