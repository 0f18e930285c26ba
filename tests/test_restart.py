"""Restarting the worker never stops a VM, and finds what happened meanwhile.

Each test stops the real worker process (SIGTERM, or SIGKILL at a bad
moment), changes the world or not, starts a new worker on the same var
dir, and checks the VMs: same QEMU pids, same VNC, right statuses.
"""

from __future__ import annotations

import os
import signal
import time

import psutil
import pytest

import guests

pytestmark = pytest.mark.timeout(180)


def test_sigterm_leaves_vms_running_and_restart_adopts_them(make_worker):
    w = make_worker().start()
    running = w.start_vm("keeps-running", w.image("idle"))
    paused = w.start_vm("keeps-paused", w.image("idle"))
    before = {u: w.wait_for(u, "running") for u in (running, paused)}
    w.ok("suspend", uuid=paused)
    assert w.stop(signal.SIGTERM) == 0
    for vm in before.values():
        assert psutil.Process(vm["pid"]).is_running()
    w.start()
    after_running = w.status(running)
    assert after_running["status"] == "running"
    assert after_running["pid"] == before[running]["pid"]
    assert after_running["vnc"] == before[running]["vnc"]
    assert w.status(paused)["status"] == "suspended"
    # The monitors are reattached: commands and halts work after adoption.
    w.ok("resume", uuid=paused)
    w.ok("suspend", uuid=running)
    w.ok("destroy", uuid=running)
    pid = before[paused]["pid"]
    psutil.Process(pid).kill()
    assert "QEMU exited unexpectedly" in w.wait_for(paused, "stopped")["halt_reason"]


def test_kill_9_of_the_worker_loses_nothing(make_worker):
    w = make_worker().start()
    uuids = [w.start_vm(f"k{i}", w.image("idle")) for i in range(3)]
    pids = {u: w.wait_for(u, "running")["pid"] for u in uuids}
    w.ok("suspend", uuid=uuids[0])
    w.stop(signal.SIGKILL)
    w.start()
    assert w.status(uuids[0])["status"] == "suspended"
    for u in uuids:
        assert w.status(u)["pid"] == pids[u]
    assert {w.status(u)["status"] for u in uuids[1:]} == {"running"}
    assert len(w.qemu_processes()) == 3


def test_a_guest_that_halts_while_the_worker_is_down_is_saved(make_worker):
    w = make_worker().start()
    target = str(w.storage / "after-restart.img")
    uuid = w.start_vm("halts-alone", w.image("wait-then-poweroff"),
                      hda_save_to=target)
    pid = w.wait_for(uuid, "running")["pid"]
    w.stop(signal.SIGTERM)
    # The guest powers off about 2 s after boot; under -no-shutdown its
    # QEMU stays, in the "shutdown" run state, for the next worker to see.
    time.sleep(4)
    assert psutil.Process(pid).is_running()
    w.start()
    vm = w.wait_for(uuid, "stopped", timeout=60)
    assert vm["halt_reason"] == "guest poweroff"
    assert vm["saved"] == {"hda": target}
    assert guests.read_marker(target) == b""  # the guest wrote nothing
    assert not psutil.pid_exists(pid) or \
        psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_qemu_gone_while_the_worker_is_down_is_a_crash_halt(make_worker):
    w = make_worker().start()
    uuid = w.start_vm("dies-alone", w.image("idle"))
    pid = w.wait_for(uuid, "running")["pid"]
    w.stop(signal.SIGTERM)
    psutil.Process(pid).kill()
    psutil.Process(pid).wait(10) if psutil.pid_exists(pid) else None
    w.start()
    vm = w.wait_for(uuid, "stopped", timeout=30)
    assert "QEMU exited unexpectedly" in vm["halt_reason"]


def test_a_start_interrupted_before_qemu_runs_is_resumed(make_worker, http,
                                                         tmp_path):
    # The worker is killed while the image download hangs: the next worker
    # resumes the start job from the journal, and the VM runs exactly once.
    guests.build_guest("idle", tmp_path).rename(os.path.join(http.root, "idle.img"))
    http.hold.set()
    w = make_worker().start()
    uuid = w.start_vm("resumed", http.url("idle.img"))
    time.sleep(0.5)
    assert w.status(uuid)["status"] == "starting"
    w.stop(signal.SIGKILL)
    http.hold.clear()
    w.start()
    vm = w.wait_for(uuid, "running", timeout=30)
    assert len(w.qemu_processes()) == 1
    assert vm["pid"] == w.qemu_processes()[0].pid


def test_a_kill_9_while_saving_resumes_the_save_after_restart(make_worker,
                                                              http):
    # The upload hangs, the worker is killed mid-try; the next worker
    # counts that try as spent, tries again, and the guest's data arrives.
    w = make_worker("save_backoff = 0.1\n").start()
    image = w.image("write-then-poweroff", marker=b"saved after a kill")
    uuid = w.start_vm("kill-saving", image, hda_save_to=http.url("k.img"))
    http.hold.set()
    vm = w.wait_for(uuid, "saving", timeout=60)
    deadline = time.monotonic() + 20
    while not http.puts_started and time.monotonic() < deadline:
        time.sleep(0.05)
    w.stop(signal.SIGKILL)
    http.hold.clear()
    w.start()
    vm = w.wait_for(uuid, "stopped", timeout=60)
    assert vm["save_tries"] == {"hda": 2}
    assert guests.read_marker(os.path.join(http.upload_dir, "k.img")) == \
        b"saved after a kill"


def test_sigterm_during_a_hung_download_neither_hangs_nor_fails_the_vm(
        make_worker, http, tmp_path):
    guests.build_guest("idle", tmp_path).rename(os.path.join(http.root, "idle.img"))
    http.hold.set()
    w = make_worker("fetch_read_timeout = 30.0\n").start()
    uuid = w.start_vm("stopped-mid-fetch", http.url("idle.img"))
    time.sleep(0.5)
    started = time.monotonic()
    assert w.stop(signal.SIGTERM, timeout=30) == 0
    # It stopped within its grace period, not the 30 s read timeout.
    assert time.monotonic() - started < 25
    http.hold.clear()
    w.start()
    vm = w.wait_for(uuid, "running", timeout=30)
    assert vm["status"] == "running"
