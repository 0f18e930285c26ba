"""The HTTP contract: validation, conflicts, idempotency, concurrency, access.

What is tried and what must hold is said at each test. A refused request
must change nothing: no journal record, no VM folder, no QEMU process.
"""

from __future__ import annotations

import concurrent.futures
import os
import uuid as uuidlib

import pytest
import requests

pytestmark = [pytest.mark.timeout(180), pytest.mark.usefixtures("cleanup")]


def snapshot(worker):
    """What a refused request must not change."""
    journal = worker.var / "journal" / "journal.log"
    return (journal.stat().st_size if journal.exists() else 0,
            sorted(os.listdir(worker.var / "vms")),
            len(worker.qemu_processes()))


def test_every_bad_start_parameter_is_400_and_creates_nothing(worker):
    image = worker.image("idle")
    outside = "/etc/hostname"
    good = dict(name="ok", cpu_count="1", mem_size="32", hda_image=image)
    cases = [
        ({"name": None}, "name"),
        ({"name": ""}, "name"),
        ({"name": "-leading-dash"}, "name"),
        ({"name": "has space"}, "name"),
        ({"name": "x" * 65}, "name"),
        ({"name": "<script>"}, "name"),
        ({"cpu_count": None}, "cpu_count"),
        ({"cpu_count": "0"}, "cpu_count"),
        ({"cpu_count": "-1"}, "cpu_count"),
        ({"cpu_count": "two"}, "cpu_count"),
        ({"cpu_count": "1.5"}, "cpu_count"),
        ({"cpu_count": "100000"}, "cpu_count"),
        ({"mem_size": None}, "mem_size"),
        ({"mem_size": "8"}, "mem_size"),
        ({"mem_size": "lots"}, "mem_size"),
        ({"hda_image": None}, "hda_image"),
        ({"hda_image": "relative/path.img"}, "hda_image"),
        ({"hda_image": outside}, "outside the storage roots"),
        ({"hda_image": f"file://{outside}"}, "outside the storage roots"),
        ({"hda_image": image + "/../../../../etc/passwd"}, ".."),
        ({"hda_image": str(worker.storage / "missing.img")}, "no such file"),
        ({"hda_image": "gopher://127.0.0.1/x"}, "not allowed"),
        ({"hda_image": "http:///nohost.img"}, "no host"),
        ({"hdb_image": "javascript:alert(1)"}, "not allowed"),
        ({"cd_image": "ftp://127.0.0.1/"}, "must name a file"),
        ({"hda_save_to": "/etc/saved.img"}, "outside the storage roots"),
        ({"hda_save_to": str(worker.storage / "no-such-dir" / "x.img")}, "does not exist"),
        ({"hdb_save_to": str(worker.storage / "b.img")}, "hdb_image is not"),
        ({"run_agent": "true"}, "agent"),
        ({"soft_list": "nginx"}, "agent"),
        ({"run_agent": "maybe"}, "run_agent"),
        ({"uuid": "not-a-uuid"}, "UUID"),
        ({"uuid": "{%s}" % uuidlib.uuid4()}, "canonical"),
        ({"uuid": uuidlib.uuid4().hex}, "canonical"),
        ({"colour": "blue"}, "unknown parameter"),
    ]
    before = snapshot(worker)
    for change, words in cases:
        params = {**good, **change}
        params = {k: v for k, v in params.items() if v is not None}
        code, body = worker.call("start", **params)
        assert code == 400, (change, code, body)
        assert body["success"] is False
        assert words.lower() in body["message"].lower(), (change, body)
        assert snapshot(worker) == before, change
    # A repeated parameter is ambiguous, so refused too.
    resp = requests.get(worker.url + "/vmachines/start",
                        params=[("name", "a"), ("name", "b"), ("cpu_count", 1),
                                ("mem_size", 32), ("hda_image", image)], timeout=10)
    assert resp.status_code == 400 and "2 times" in resp.json()["message"]
    assert snapshot(worker) == before


def test_soft_list_without_the_agent_is_accepted_when_asked(worker):
    uuid = worker.start_vm("no-agent", worker.image("idle"), run_agent="false",
                           soft_list="nginx,redis")
    assert worker.wait_for(uuid, "running")["soft_list"] == "nginx,redis"


def test_name_of_a_live_vm_is_taken_but_reusable_after_it_ends(worker):
    image = worker.image("idle")
    first = worker.start_vm("unique", image)
    worker.wait_for(first, "running")
    before = snapshot(worker)
    code, body = worker.call("start", name="unique", cpu_count=1, mem_size=32,
                             hda_image=image)
    assert code == 409 and first in body["message"]
    assert snapshot(worker) == before
    worker.ok("destroy", uuid=first)
    second = worker.start_vm("unique", image)
    assert second != first
    worker.wait_for(second, "running")
    # By name, the live VM wins over the destroyed one.
    assert worker.ok("status", name="unique")["uuid"] == second


def test_start_is_idempotent_for_the_same_uuid_and_parameters(worker):
    image = worker.image("idle")
    vm_uuid = str(uuidlib.uuid4())
    params = dict(name="retry", cpu_count=1, mem_size=32, hda_image=image,
                  uuid=vm_uuid)
    answers = [worker.ok("start", **params) for _ in range(3)]
    assert {a["uuid"] for a in answers} == {vm_uuid}
    worker.wait_for(vm_uuid, "running")
    assert worker.ok("start", **params)["uuid"] == vm_uuid
    assert len(worker.qemu_processes()) == 1
    # The same uuid with other parameters is a conflict, not a new VM.
    code, body = worker.call("start", **{**params, "mem_size": 64})
    assert code == 409 and "other parameters" in body["message"]
    assert len(worker.qemu_processes()) == 1


def test_ten_concurrent_starts_all_run(worker):
    image = worker.image("idle")

    def start(i):
        return worker.call("start", name=f"many-{i}", cpu_count=1, mem_size=32,
                           hda_image=image)

    with concurrent.futures.ThreadPoolExecutor(10) as pool:
        answers = list(pool.map(start, range(10)))
    refused = [body["message"] for code, body in answers if code != 200]
    assert not refused, refused
    uuids = [body["uuid"] for _, body in answers]
    vnc = {worker.wait_for(u, "running", timeout=120)["vnc"] for u in uuids}
    assert len(vnc) == 10, "every VM has its own VNC port"
    assert len(worker.qemu_processes()) == 10


def test_admission_refuses_a_vm_bigger_than_the_host(worker):
    before = snapshot(worker)
    code, body = worker.call("start", name="huge", cpu_count=1,
                             mem_size=4 << 20, hda_image=worker.image("idle"))
    assert code == 503 and "not enough resource" in body["message"]
    assert snapshot(worker) == before


def test_cross_site_browser_requests_are_refused(worker):
    uuid = worker.start_vm("victim", worker.image("idle"))
    worker.wait_for(uuid, "running")
    # What a browser sends for <img src=".../destroy?name=victim"> on
    # another site: refused, and the VM lives on.
    for headers in ({"Sec-Fetch-Site": "cross-site"},
                    {"Sec-Fetch-Site": "same-site"},
                    {"Origin": "http://evil.example"},
                    {"Origin": "null"}):
        code, body = worker.call("destroy", name="victim", headers=headers)
        assert code == 403 and not body["success"], headers
    assert worker.status(uuid)["status"] == "running"
    # The worker's own page (same origin) and programs without headers pass.
    code, _ = worker.call("status", name="victim",
                          headers={"Sec-Fetch-Site": "same-origin",
                                   "Origin": worker.url})
    assert code == 200


def test_unknown_endpoint_answers_json(worker):
    resp = requests.get(worker.url + "/vmachines/reboot", timeout=10)
    assert resp.status_code == 404
    assert resp.json()["success"] is False


def test_web_page_lists_vms_and_escapes_what_it_shows(worker):
    uuid = worker.start_vm("page-vm", worker.image("idle"), run_agent="false",
                           soft_list="<script>alert(1)</script>")
    worker.wait_for(uuid, "running")
    for path in ("/", "/webui"):
        resp = requests.get(worker.url + path, timeout=10)
        assert resp.status_code == 200
        assert "text/html" in resp.headers["Content-Type"]
        assert "page-vm" in resp.text and uuid in resp.text
        assert "running" in resp.text
    assert "<script>alert" not in resp.text


def test_admission_refuses_a_vm_when_the_disk_is_full(make_worker):
    # A reserve larger than the disk: whatever is free is not enough.
    w = make_worker("disk_reserve_mb = 100000000\n").start()
    code, body = w.call("start", name="no-room", cpu_count=1, mem_size=32,
                        hda_image=w.image("idle"))
    assert code == 503 and "disk" in body["message"]
    assert os.listdir(w.var / "vms") == []


def test_worker_stats_report_the_supervisor_and_memory(worker):
    resp = requests.get(worker.url + "/worker/stats", timeout=10)
    stats = resp.json()
    assert resp.status_code == 200 and stats["success"]
    assert stats["pid"] == worker.proc.pid
    assert stats["rss_bytes"] > 10 << 20
    assert stats["supervisor"]["ticks"] > 0
    assert stats["supervisor"]["max_tick_ms"] >= stats["supervisor"]["last_tick_ms"] >= 0
