"""Fetching images and saving them on halt, with real HTTP servers and QEMU.

Failed fetches must end in ``failed to start`` with a reason a person can
act on; a guest's writes must reach its save target, or failed_to_save.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time

import pytest

import guests
from servers import SilentServer, free_port

pytestmark = [pytest.mark.timeout(180), pytest.mark.usefixtures("cleanup")]


def publish(worker, http, kind, marker=b"", name=None) -> str:
    path = guests.build_guest(kind, worker.var.parent, marker=marker)
    dest = os.path.join(http.root, name or path.name)
    os.replace(path, dest)
    return http.url(os.path.basename(dest))


def test_image_over_http_boots(worker, http):
    uuid = worker.start_vm("from-http", publish(worker, http, "idle"))
    worker.wait_for(uuid, "running")
    assert len(http.gets) == 1


def test_404_image_fails_to_start_with_the_http_status(worker, http):
    uuid = worker.start_vm("missing", http.url("nope.img"))
    vm = worker.wait_for(uuid, "failed to start")
    assert "HTTP 404" in vm["message"] and "hda_image" in vm["message"]
    assert worker.qemu_processes() == []


def test_refused_connection_fails_to_start(worker):
    uuid = worker.start_vm("refused", f"http://127.0.0.1:{free_port()}/x.img")
    vm = worker.wait_for(uuid, "failed to start")
    assert "connection failed" in vm["message"]


def test_silent_server_times_out(worker):
    with SilentServer() as silent:
        uuid = worker.start_vm("silent", f"http://127.0.0.1:{silent.port}/x.img")
        vm = worker.wait_for(uuid, "failed to start", timeout=30)
    assert "timed out" in vm["message"]


def test_status_answers_while_a_download_hangs(worker):
    # The API stays responsive while a start job waits on a dead server.
    with SilentServer() as silent:
        uuid = worker.start_vm("waiting", f"http://127.0.0.1:{silent.port}/x.img")
        for _ in range(20):
            code, body = worker.call("status", uuid=uuid)
            assert code == 200 and body["status"] == "starting"
        worker.ok("destroy", uuid=uuid)
    assert worker.wait_for(uuid, "destroyed")["status"] == "destroyed"


def test_corrupt_image_fails_to_start_with_qemu_imgs_reason(worker):
    bad = worker.storage / "corrupt.qcow2"
    # A qcow2 magic and version, then garbage: qemu-img cannot open it.
    bad.write_bytes(b"QFI\xfb\x00\x00\x00\x03" + os.urandom(4096))
    uuid = worker.start_vm("corrupt", str(bad))
    vm = worker.wait_for(uuid, "failed to start")
    assert "not readable" in vm["message"]
    assert worker.qemu_processes() == []


def test_image_with_a_backing_file_is_refused(worker):
    base = worker.image("idle")
    overlay = worker.storage / "overlay.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw",
                    "-b", base, str(overlay)], check=True)
    uuid = worker.start_vm("backed", str(overlay))
    vm = worker.wait_for(uuid, "failed to start")
    assert "backing file" in vm["message"]


def test_qemu_error_line_is_the_failure_message(make_worker):
    # Real QEMU fails when its only allowed VNC port is taken; its own
    # error line must reach the master.
    port = free_port()
    w = make_worker(f"vnc_display_base = {port - 5900}\nvnc_display_count = 1\n")
    w.start()
    with socket.socket() as squatter:
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        squatter.bind(("127.0.0.1", port))
        squatter.listen(1)
        uuid = w.start_vm("no-vnc", w.image("idle"))
        vm = w.wait_for(uuid, "failed to start")
    assert vm["message"].startswith("QEMU exited:")
    assert "vnc" in vm["message"].lower() or "address" in vm["message"].lower()
    assert w.qemu_processes() == []


@pytest.mark.parametrize("target_kind", ["file", "http"])
def test_guest_writes_reach_the_save_target(worker, http, target_kind):
    marker = f"saved-to-{target_kind}".encode()
    image = worker.image("write-then-poweroff", marker=marker)
    if target_kind == "file":
        target = str(worker.storage / f"out-{target_kind}.img")
        saved = target
    else:
        target = http.url(f"out-{target_kind}.img")
        saved = os.path.join(http.upload_dir, f"out-{target_kind}.img")
    uuid = worker.start_vm(f"writer-{target_kind}", image, hda_save_to=target)
    vm = worker.wait_for(uuid, "stopped", timeout=60)
    assert vm["halt_reason"] == "guest poweroff"
    assert vm["saved"] == {"hda": target}
    assert target in vm["message"]
    assert guests.read_marker(saved) == marker
    # The source image in the storage root was never written.
    assert guests.read_marker(image) == b""
    # The VM's folder goes once it ended (the supervisor's next tick).
    deadline = time.monotonic() + 10
    while (worker.var / "vms" / uuid).exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not (worker.var / "vms" / uuid).exists()


def test_modify_redirects_the_save(worker):
    image = worker.image("wait-then-poweroff")
    first = str(worker.storage / "first.img")
    second = str(worker.storage / "second.img")
    uuid = worker.start_vm("redirect", image, hda_save_to=first)
    worker.wait_for(uuid, "running")
    worker.ok("modify", uuid=uuid, hda_save_to=second)
    assert worker.status(uuid)["hda_save_to"] == second
    worker.wait_for(uuid, "stopped", timeout=60)
    assert os.path.exists(second) and not os.path.exists(first)
    code, body = worker.call("modify", uuid=uuid, hda_save_to=first)
    assert code == 409


def test_three_failed_tries_keep_the_image_in_failed_to_save(worker, http):
    http.fail_puts = 3
    image = worker.image("write-then-poweroff", marker=b"keep me")
    target = http.url("lost.img")
    uuid = worker.start_vm("unlucky", image, hda_save_to=target)
    vm = worker.wait_for(uuid, "failed to save", timeout=90)
    assert len(http.put_attempts) == 3
    assert vm["save_tries"] == {"hda": 3}
    kept = worker.var / "failed_to_save" / f"unlucky-{uuid}"
    assert guests.read_marker(kept / "hda.raw") == b"keep me"
    sidecar = json.loads((kept / "failed_to_save.json").read_text())
    assert sidecar["images"]["hda"]["target"] == target
    assert len(sidecar["images"]["hda"]["errors"]) == 3
    assert "503" in sidecar["images"]["hda"]["errors"][0]
    assert str(kept) in vm["message"]


def test_two_failed_tries_then_success_is_stopped(worker, http):
    http.fail_puts = 2
    image = worker.image("write-then-poweroff", marker=b"third time")
    uuid = worker.start_vm("flaky", image, hda_save_to=http.url("ok.img"))
    vm = worker.wait_for(uuid, "stopped", timeout=90)
    assert len(http.put_attempts) == 3
    assert vm["save_tries"] == {"hda": 3}
    assert guests.read_marker(os.path.join(http.upload_dir, "ok.img")) == \
        b"third time"
