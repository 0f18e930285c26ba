"""The image cache, overlays, FTP, CD changes and formats, on real QEMU.

Servers are real (http.server with Range/ETag, pyftpdlib) on 127.0.0.1.
What must hold: one download per URI however many starts ask for it, a
dropped transfer resumes, a wrong checksum never boots, the guest never
writes the cache, a saved image keeps its source's format.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import shutil
import signal
import subprocess
import time

import pytest

import guests
from servers import FTPServer

pytestmark = [pytest.mark.timeout(180)]


def publish(where: str, kind: str, workdir, name: str, size: int = 1 << 20,
            marker: bytes = b"") -> str:
    """A boot-sector guest padded with random bytes (real data, not zeros)."""
    built = guests.build_guest(kind, workdir, marker=marker, disk_size=size)
    with open(built, "r+b") as f:
        f.seek(4096)
        f.write(os.urandom(size - 4096))
    dest = os.path.join(where, name)
    shutil.move(str(built), dest)
    return dest


def sha256(path) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()




def blobs(worker) -> set[str]:
    return {n[:-4] for n in os.listdir(worker.var / "images") if n.endswith(".img")}


def templates(worker) -> set[str]:
    return {n[:-8] for n in os.listdir(worker.var / "images")
            if n.endswith(".overlay")}


def own_data(image) -> list[dict]:
    """The extents that a qcow2 image holds itself (not its backing file)."""
    out = subprocess.run(["qemu-img", "map", "--output=json", str(image)],
                         check=True, capture_output=True, text=True).stdout
    return [e for e in json.loads(out) if e["depth"] == 0 and e["data"]]


@pytest.mark.usefixtures("cleanup")
def test_five_starts_of_one_uri_download_it_once(worker, http, tmp_path):
    path = publish(http.root, "idle", tmp_path, "shared.img", size=4 << 20)
    http.slow = 0.02  # ~1.3 s per download: the starts overlap
    with concurrent.futures.ThreadPoolExecutor(5) as pool:
        uuids = list(pool.map(
            lambda i: worker.start_vm(f"same-{i}", http.url("shared.img")),
            range(5)))
    # While it downloads, starting reports its progress.
    seen = []
    deadline = time.monotonic() + 30
    while not seen and time.monotonic() < deadline:
        states = [worker.status(u) for u in uuids]
        seen = [vm["progress"] for vm in states if vm["progress"]]
        if all(vm["status"] != "starting" for vm in states):
            break
    assert any(p["step"] == "fetching hda" and p["total"] == 4 << 20
               for p in seen), seen
    for u in uuids:
        worker.wait_for(u, "running")
    full = [g for g in http.gets if g[1] == 200]
    assert len(full) == 1, http.gets
    assert sha256(path) in blobs(worker)
    # A later start revalidates (ETag → 304) instead of downloading again.
    again = worker.start_vm("same-later", http.url("shared.img"))
    worker.wait_for(again, "running")
    assert http.gets[-1][1] == 304
    assert len([g for g in http.gets if g[1] == 200]) == 1


@pytest.mark.usefixtures("cleanup")
def test_a_changed_source_gets_a_new_blob_and_old_vms_keep_theirs(worker, http,
                                                                tmp_path):
    path = publish(http.root, "idle", tmp_path, "moving.img")
    first = worker.start_vm("old-content", http.url("moving.img"))
    worker.wait_for(first, "running")
    old = sha256(path)
    publish(http.root, "idle", tmp_path, "moving.img")  # new content, new ETag
    second = worker.start_vm("new-content", http.url("moving.img"))
    worker.wait_for(second, "running")
    assert {old, sha256(path)} <= blobs(worker)
    info = json.loads(subprocess.check_output(
        ["qemu-img", "info", "--output=json", "-U",
         str(worker.var / "vms" / first / "disk-hda.qcow2")]))
    assert info["backing-filename"].endswith(f"{old}.img")


@pytest.mark.usefixtures("cleanup")
def test_a_dropped_connection_resumes_with_range(worker, http, tmp_path):
    path = publish(http.root, "idle", tmp_path, "flaky.img", size=2 << 20)
    http.drop_after = 700_000
    uuid = worker.start_vm("resumed", http.url("flaky.img"),
                           hda_image_sha256=sha256(path))
    worker.wait_for(uuid, "running")
    assert [g[1] for g in http.gets] == [200, 206]
    assert sha256(path) in blobs(worker)


@pytest.mark.usefixtures("cleanup")
def test_a_checksum_mismatch_never_boots(worker, http, tmp_path):
    publish(http.root, "idle", tmp_path, "tampered.img")
    uuid = worker.start_vm("tampered", http.url("tampered.img"),
                           hda_image_sha256="0" * 64)
    vm = worker.wait_for(uuid, "failed to start")
    assert "sha256 mismatch" in vm["message"]
    assert worker.qemu_processes() == []


@pytest.mark.usefixtures("cleanup")
def test_the_guest_writes_its_overlay_never_the_cache(worker):
    """Overlays are copies of one template per blob: what a guest wrote
    must reach neither the blob, nor the template, nor the next VM of the
    same image."""
    image = publish(str(worker.storage), "write-then-poweroff", worker.var.parent,
                    "writer.img", marker=b"into the overlay")
    first = str(worker.storage / "first.img")
    uuid = worker.start_vm("first", image, hda_save_to=first)
    worker.wait_for(uuid, "stopped", timeout=60)
    blob = worker.var / "images" / f"{sha256(image)}.img"
    assert guests.read_marker(blob) == b""
    template = worker.var / "images" / f"{sha256(image)}.overlay"
    info = json.loads(subprocess.run(
        ["qemu-img", "info", "--output=json", str(template)], check=True,
        capture_output=True, text=True).stdout)
    assert info["full-backing-filename"] == str(blob)
    assert own_data(template) == []
    # The second VM's disk is its own copy of the template; both saved
    # images are the source plus the marker.
    second = str(worker.storage / "second.img")
    uuid = worker.start_vm("second", image, hda_save_to=second)
    worker.wait_for(uuid, "stopped", timeout=60)
    assert own_data(template) == []
    for saved in (first, second):
        assert guests.read_marker(saved) == b"into the overlay"
        with open(image, "rb") as a, open(saved, "rb") as b:
            a.seek(4096)  # past the boot sector and the marker
            b.seek(4096)
            assert a.read() == b.read()


@pytest.mark.usefixtures("cleanup")
def test_a_qcow2_source_is_saved_as_self_contained_qcow2(worker):
    raw = guests.build_guest("write-then-poweroff", worker.var.parent,
                             marker=b"qcow2 in, qcow2 out")
    source = worker.storage / "source.qcow2"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw),
                    str(source)], check=True)
    target = worker.storage / "saved.qcow2"
    uuid = worker.start_vm("q", str(source), hda_save_to=str(target))
    worker.wait_for(uuid, "stopped", timeout=60)
    info = json.loads(subprocess.check_output(
        ["qemu-img", "info", "--output=json", str(target)]))
    assert info["format"] == "qcow2" and "backing-filename" not in info
    back = worker.var.parent / "back.raw"
    subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw",
                    str(target), str(back)], check=True)
    assert guests.read_marker(back) == b"qcow2 in, qcow2 out"


@pytest.mark.usefixtures("cleanup")
def test_ftp_fetch_and_ftp_save(worker, tmp_path):
    root = tmp_path / "ftp"
    root.mkdir()
    publish(str(root), "write-then-poweroff", tmp_path, "guest.img",
            marker=b"over ftp")
    with FTPServer(str(root)) as ftp:
        uuid = worker.start_vm("ftp-vm", ftp.url("guest.img"),
                               hda_save_to=ftp.url("saved.img"))
        vm = worker.wait_for(uuid, "stopped", timeout=60)
    assert vm["saved"] == {"hda": ftp.url("saved.img")}
    assert guests.read_marker(root / "saved.img") == b"over ftp"


@pytest.mark.usefixtures("cleanup")
def test_cd_insert_and_eject_are_seen_by_qemu(worker, http, tmp_path):
    uuid = worker.start_vm("cd-vm", worker.image("idle"))
    worker.wait_for(uuid, "running")

    def cd():
        return next(d for d in worker.qmp(uuid, "query-block")
                    if d["device"] == "cd0")

    assert "inserted" not in cd()
    iso = worker.storage / "disc.iso"
    iso.write_bytes(os.urandom(1 << 20))
    worker.ok("modify", uuid=uuid, cd_image=str(iso))
    inserted = cd()["inserted"]
    assert inserted["ro"] and inserted["file"].endswith(f"{sha256(iso)}.img")
    assert worker.status(uuid)["cd_image"] == str(iso)
    worker.ok("modify", uuid=uuid, cd_image="")
    assert "inserted" not in cd()
    assert worker.status(uuid)["cd_image"] == ""
    # A CD that cannot be fetched is refused and changes nothing.
    code, body = worker.call("modify", uuid=uuid, cd_image=http.url("none.iso"))
    assert code == 400 and "404" in body["message"]
    assert "inserted" not in cd()


@pytest.mark.usefixtures("cleanup")
def test_cd_change_is_refused_while_starting(worker, http, tmp_path):
    publish(http.root, "idle", tmp_path, "held.img")
    http.hold.set()
    uuid = worker.start_vm("held", http.url("held.img"))
    code, body = worker.call("modify", uuid=uuid, cd_image="")
    assert code == 409 and "starting" in body["message"]
    http.hold.clear()
    worker.wait_for(uuid, "running")


def test_a_kill_mid_download_leaves_no_partial_image(make_worker, http, tmp_path):
    path = publish(http.root, "idle", tmp_path, "big.img", size=8 << 20)
    http.slow = 0.02  # ~2.5 s in all
    w = make_worker().start()
    uuid = w.start_vm("interrupted", http.url("big.img"))
    deadline = time.monotonic() + 20
    while not (w.status(uuid)["progress"] or {}).get("done"):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    w.stop(signal.SIGKILL)
    assert blobs(w) == set()  # only a .part, never a blob, exists now
    http.slow = 0.0
    w.start()
    assert not [n for n in os.listdir(w.var / "images") if n.endswith(".part")
                and os.path.getmtime(w.var / "images" / n) < time.time() - 60]
    w.wait_for(uuid, "running")
    assert blobs(w) == {sha256(path)}


def test_eviction_keeps_what_live_vms_use(make_worker, tmp_path):
    w = make_worker("image_cache_max_mb = 2\n").start()
    a = publish(str(w.storage), "idle", tmp_path, "a.img")
    b = publish(str(w.storage), "idle", tmp_path, "b.img")
    c = publish(str(w.storage), "idle", tmp_path, "c.img")
    va = w.start_vm("uses-a", a)
    w.wait_for(va, "running")
    vb = w.start_vm("uses-b", b)
    w.wait_for(vb, "running")
    w.ok("destroy", uuid=vb)
    vc = w.start_vm("uses-c", c)
    w.wait_for(vc, "running")
    # 3 MB do not fit in 2 MB: b (unused now) goes, a and c stay, and so
    # do their overlay templates; b's goes with its blob.
    assert blobs(w) == {sha256(a), sha256(c)}
    assert templates(w) == {sha256(a), sha256(c)}
