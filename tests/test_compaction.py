"""Journal compaction: snapshots replay to the same state, a kill at any
step of it loses nothing, and the live worker compacts without losing VMs.
"""

from __future__ import annotations

import os
import signal
import time

import pytest

from vmworker import journal as journal_mod
from vmworker.journal import Journal
from vmworker.state import fold, snapshot_event

UUIDS = [f"00000000-0000-4000-8000-00000000000{i}" for i in range(4)]


def ev(etype, uuid, ts, **fields):
    return {"type": etype, "uuid": uuid, "ts": ts, **fields}


def history():
    """Four VMs: running with a save target changed, suspended, stopped after
    saving, and destroyed."""
    events = []
    for i, uuid in enumerate(UUIDS):
        events.append(ev("accepted", uuid, 1.0 + i, params={
            "name": f"vm{i}", "cpu_count": 1, "mem_size": 32,
            "hda_image": "/s/a.img", "hda_save_to": "/s/out.img",
            "hdb_image": "", "hdb_save_to": "", "cd_image": ""}))
        events.append(ev("image_fetched", uuid, 2.0, slot="hda",
                         path=f"/v/{uuid}/disk-hda.qcow2", format="qcow2",
                         base="/v/images/x.img", base_format="raw",
                         sha256="ab" * 32, size=512))
        events.append(ev("spawned", uuid, 3.0, pid=100 + i, create_time=5.5))
        events.append(ev("running", uuid, 4.0, vnc="127.0.0.1:5900"))
    events.append(ev("modified", UUIDS[0], 5.0, hda_save_to="/s/new.img"))
    events.append(ev("suspended", UUIDS[1], 5.0))
    events.append(ev("halted", UUIDS[2], 6.0, reason="guest poweroff"))
    events.append(ev("save_attempt", UUIDS[2], 6.1, slot="hda", target="/s/out.img",
                     **{"try": 1}))
    events.append(ev("saved", UUIDS[2], 6.2, slot="hda", target="/s/out.img"))
    events.append(ev("destroyed", UUIDS[3], 7.0))
    return events


def test_snapshots_fold_to_the_same_records():
    vms = fold(history())
    again = fold([snapshot_event(vm) for vm in vms.values()])
    assert again == vms
    assert {vm.status.value for vm in again.values()} == {
        "running", "suspended", "stopped", "destroyed"}


def test_a_snapshot_for_an_existing_vm_is_refused():
    vms = fold(history())
    with pytest.raises(Exception, match="snapshot"):
        fold(history() + [snapshot_event(vms[UUIDS[0]])])


def test_rewrite_replaces_the_log_and_appends_follow(tmp_path):
    j = Journal(str(tmp_path))
    j.replay()
    for record in history():
        j.append(record)
    snaps = [snapshot_event(vm) for vm in fold(history()).values()]
    j.rewrite(snaps)
    j.append(ev("resumed", UUIDS[1], 9.0))
    j.close()
    records = Journal(str(tmp_path)).replay()
    assert records == snaps + [ev("resumed", UUIDS[1], 9.0)]
    assert fold(records)[UUIDS[1]].status.value == "running"


@pytest.mark.parametrize("step", ["write", "fsync", "rename", "dir-fsync"])
def test_a_kill_at_any_step_of_compaction_replays_to_the_same_state(
        tmp_path, monkeypatch, step):
    """Each step is interrupted by an exception standing for the kill; the
    files left on disk then replay (in a fresh Journal, as after a restart)
    to exactly the state before compaction."""
    j = Journal(str(tmp_path))
    j.replay()
    for record in history():
        j.append(record)
    expected = fold(history())

    class Killed(BaseException):
        pass

    def die(*args, **kwargs):
        raise Killed()

    real_fsync = os.fsync
    if step == "write":
        monkeypatch.setattr(journal_mod, "frame", die)
    elif step == "fsync":
        monkeypatch.setattr(journal_mod.os, "fsync", die)
    elif step == "rename":
        monkeypatch.setattr(journal_mod.os, "replace", die)
    else:
        monkeypatch.setattr(journal_mod.fsutil, "fsync_dir", die)
    with pytest.raises(Killed):
        j.rewrite([snapshot_event(vm) for vm in expected.values()])
    monkeypatch.setattr(journal_mod.os, "fsync", real_fsync)
    monkeypatch.undo()
    after = Journal(str(tmp_path))
    assert fold(after.replay()) == expected
    assert not os.path.exists(after.path + ".compact")


@pytest.mark.timeout(120)
def test_the_worker_compacts_and_keeps_live_vms_across_a_restart(make_worker):
    # A tiny threshold and no retention: every tick past 2 KB compacts.
    w = make_worker("journal_compact_mb = 0.002\njournal_retention_hours = 0.0\n")
    w.start()
    image = w.image("idle")
    ended = w.start_vm("ends", image)
    w.wait_for(ended, "running")
    w.ok("destroy", uuid=ended)
    live = w.start_vm("lives", image)
    pid = w.wait_for(live, "running")["pid"]
    w.ok("suspend", uuid=live)
    for i in range(10):  # grow the journal past the threshold
        w.ok("modify", uuid=live, hda_save_to=str(w.storage / f"o{i}.img"))
    journal = w.var / "journal" / "journal.log"
    deadline = time.monotonic() + 20
    while journal.stat().st_size > 2048:
        assert time.monotonic() < deadline, "never compacted"
        time.sleep(0.1)
    code, _ = w.call("status", uuid=ended)
    assert code == 404  # ended and past retention: dropped
    # Nothing of the dropped VM stays in the worker's per-VM tables: each
    # holds at most the one VM still in memory (a daemon runs for months).
    stats = w.session.get(f"{w.url}/worker/stats", timeout=10).json()
    assert stats["vms"] == 1
    assert stats["bookkeeping"] and all(
        n <= 1 for n in stats["bookkeeping"].values()), stats["bookkeeping"]
    w.stop(signal.SIGKILL)
    w.start()
    vm = w.status(live)
    assert vm["status"] == "suspended" and vm["pid"] == pid
    assert vm["hda_save_to"] == str(w.storage / "o9.img")
    w.ok("resume", uuid=live)
