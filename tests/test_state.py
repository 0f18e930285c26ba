"""The status fold of vmworker.state: events in, VM records and statuses out.

Every test builds a plain list of events with ``ev`` and folds it, the way
the worker replays its journal. Nothing here does I/O.
"""

from __future__ import annotations

import dataclasses
import itertools

import pytest

from vmworker import state
from vmworker.errors import Conflict, WrongState
from vmworker.state import Status, VMRecord, apply, check, fold

UUID = "6f1c2a9e-0b7d-4c51-9a8e-2d4f3b6a7c10"
OTHER = "0b7d4c51-9a8e-4d4f-8b6a-7c106f1c2a9e"

# The statuses of DESIGN.md's "Statuses" table, in its order.
DESIGN_STATUSES = ["starting", "failed to start", "installing", "running",
                   "suspended", "saving", "failed to save", "stopped",
                   "destroyed"]

_clock = itertools.count(1000)


def params(**over) -> dict:
    """Normalised start parameters as validation.start_params returns them."""
    p = {"name": "vm1", "cpu_count": 1, "mem_size": 64,
         "hda_image": "/srv/storage/hda.img", "hda_save_to": "",
         "hdb_image": "", "hdb_save_to": "", "cd_image": "",
         "run_agent": False, "soft_list": ""}
    p.update(over)
    return p


def ev(etype: str, uuid: str = UUID, ts: float | None = None, **fields) -> dict:
    """One journal event; timestamps increase by themselves."""
    return {"type": etype, "uuid": uuid,
            "ts": float(next(_clock) if ts is None else ts), **fields}


def accepted(uuid: str = UUID, **over) -> dict:
    return ev("accepted", uuid, params=params(**over))


def fetched(slot: str = "hda", uuid: str = UUID) -> dict:
    return ev("image_fetched", uuid, slot=slot,
              path=f"/var/vms/{uuid}/disk-{slot}.img", format="qcow2",
              size=1 << 20)


def spawned(uuid: str = UUID, pid: int = 4242) -> dict:
    return ev("spawned", uuid, pid=pid, create_time=1234.5)


def booted(uuid: str = UUID, **over) -> list[dict]:
    """Events of a VM that came up to ``running``."""
    return [accepted(uuid, **over), fetched("hda", uuid), spawned(uuid),
            ev("running", uuid, vnc="127.0.0.1:5901")]


def halted(reason: str = "guest poweroff", uuid: str = UUID) -> dict:
    return ev("halted", uuid, reason=reason)


def saved(slot: str, target: str, uuid: str = UUID) -> dict:
    return ev("saved", uuid, slot=slot, target=target)


def one(events) -> VMRecord:
    vms = fold(events)
    assert list(vms) == [UUID]
    return vms[UUID]


SAVE_HDA = "/srv/storage/out/hda.img"
SAVE_HDB = "/srv/storage/out/hdb.img"

# A plain list of events that reaches each status.
REACH = {
    "starting": [accepted()],
    "failed to start": [accepted(), ev("start_failed",
                                       reason="HTTP 404 fetching hda_image")],
    "installing": [accepted(), fetched(), spawned(), ev("install_started")],
    "running": booted(),
    "suspended": booted() + [ev("suspended")],
    "saving": booted(hda_save_to=SAVE_HDA) + [halted()],
    "failed to save": booted(hda_save_to=SAVE_HDA) + [
        halted(), ev("save_failed", reason="3 tries failed; kept hda in "
                                           "/var/failed_to_save")],
    "stopped": booted() + [halted()],
    "destroyed": booted() + [ev("destroyed")],
}


def reach(status: str) -> VMRecord:
    return one([dict(e) for e in REACH[status]])


# -- statuses ---------------------------------------------------------------


def test_status_enum_is_the_design_table():
    assert [s.value for s in Status] == DESIGN_STATUSES
    assert str(Status.FAILED_TO_SAVE) == "failed to save"


@pytest.mark.parametrize("status", DESIGN_STATUSES)
def test_every_design_status_is_reached_by_a_plain_event_list(status):
    vm = reach(status)
    assert vm.status is Status(status)
    assert vm.status == status  # a str enum: compares with the API's words
    assert vm.message


def test_accepted_makes_a_starting_record():
    event = accepted(hda_save_to=SAVE_HDA, name="web-1")
    vm = one([event])
    assert vm.uuid == UUID
    assert vm.name == "web-1"
    assert vm.params == event["params"]
    assert vm.status is Status.STARTING
    assert vm.created == vm.updated == event["ts"]
    assert vm.save_to == {"hda": SAVE_HDA, "hdb": ""}
    assert vm.pid is None and vm.create_time is None
    assert vm.vnc == ""
    assert vm.images == {}
    assert vm.pending_saves == ("hda",)


def test_record_does_not_share_the_events_params():
    event = accepted()
    vm = one([event])
    event["params"]["name"] = "changed"
    assert vm.params["name"] == "vm1"


def test_updated_follows_the_last_event_and_created_stays():
    events = booted()
    vm = one(events)
    assert vm.created == events[0]["ts"]
    assert vm.updated == events[-1]["ts"]


def test_image_fetched_records_each_image_and_stays_starting():
    vm = one([accepted(hdb_image="/srv/storage/hdb.img"), fetched("hda"),
              fetched("hdb")])
    assert vm.status is Status.STARTING
    assert set(vm.images) == {"hda", "hdb"}
    assert vm.images["hdb"] == {"path": f"/var/vms/{UUID}/disk-hdb.img",
                                "format": "qcow2", "size": 1 << 20}
    assert "hdb" in vm.message


def test_spawned_records_pid_and_create_time_and_stays_starting():
    vm = one([accepted(), fetched(), spawned(pid=777)])
    assert vm.status is Status.STARTING
    assert vm.pid == 777
    assert vm.create_time == 1234.5


def test_running_sets_vnc():
    vm = one(booted())
    assert vm.status is Status.RUNNING
    assert vm.vnc == "127.0.0.1:5901"
    assert vm.message == "running"


def test_installing_has_no_vnc_and_then_runs():
    vm = one([accepted(), spawned(), ev("install_started")])
    assert vm.status is Status.INSTALLING
    assert vm.vnc == ""
    vm = apply(vm, ev("running", vnc="127.0.0.1:5902"))
    assert vm.status is Status.RUNNING
    assert vm.vnc == "127.0.0.1:5902"


@pytest.mark.parametrize("before", ["starting", "installing"])
def test_start_failed_says_why(before):
    vm = apply(reach(before), ev("start_failed",
                                 reason="qemu: could not open disk image"))
    assert vm.status is Status.FAILED_TO_START
    assert vm.message == "qemu: could not open disk image"
    assert vm.vnc == ""


def test_suspend_keeps_vnc_and_resume_runs_again():
    vm = reach("suspended")
    assert vm.status is Status.SUSPENDED
    assert vm.vnc == "127.0.0.1:5901"
    vm = apply(vm, ev("resumed"))
    assert vm.status is Status.RUNNING
    assert vm.vnc == "127.0.0.1:5901"


# -- halting and saving -------------------------------------------------------


def test_halt_without_save_to_stops():
    vm = one(booted() + [halted("guest poweroff")])
    assert vm.status is Status.STOPPED
    assert vm.halt_reason == "guest poweroff"
    assert "guest poweroff" in vm.message
    assert "no image to save" in vm.message
    assert vm.vnc == ""
    assert vm.pending_saves == ()


def test_halt_with_save_to_saves():
    vm = one(booted(hda_save_to=SAVE_HDA) + [halted("QEMU exited "
                                                    "unexpectedly")])
    assert vm.status is Status.SAVING
    assert vm.pending_saves == ("hda",)
    assert "QEMU exited unexpectedly" in vm.message
    assert vm.vnc == ""


@pytest.mark.parametrize("before", ["installing", "running", "suspended"])
def test_halt_is_allowed_while_the_guest_lives(before):
    vm = apply(reach(before), halted())
    assert vm.status is Status.STOPPED


def test_saving_both_disks_stops_only_after_both_are_saved():
    events = booted(hdb_image="/srv/storage/hdb.img", hda_save_to=SAVE_HDA,
                    hdb_save_to=SAVE_HDB) + [halted("guest poweroff")]
    vm = one(events)
    assert vm.status is Status.SAVING
    assert vm.pending_saves == ("hda", "hdb")

    vm = apply(vm, ev("save_attempt", slot="hdb", **{"try": 1}))
    vm = apply(vm, saved("hdb", SAVE_HDB))
    assert vm.status is Status.SAVING
    assert vm.pending_saves == ("hda",)
    assert vm.message == f"saved hdb to {SAVE_HDB}"

    vm = apply(vm, saved("hda", SAVE_HDA))
    assert vm.status is Status.STOPPED
    assert vm.pending_saves == ()
    assert vm.saved == {"hda": SAVE_HDA, "hdb": SAVE_HDB}
    assert "guest poweroff" in vm.message
    assert f"hda saved to {SAVE_HDA}" in vm.message
    assert f"hdb saved to {SAVE_HDB}" in vm.message


def test_only_the_disk_with_a_target_is_pending():
    vm = one(booted(hdb_image="/srv/storage/hdb.img", hdb_save_to=SAVE_HDB)
             + [halted()])
    assert vm.pending_saves == ("hdb",)
    vm = apply(vm, saved("hdb", SAVE_HDB))
    assert vm.status is Status.STOPPED
    assert f"hdb saved to {SAVE_HDB}" in vm.message
    assert "hda" not in vm.message


def test_save_attempts_count_tries_and_report_errors():
    vm = reach("saving")
    vm = apply(vm, ev("save_attempt", slot="hda", **{"try": 1}))
    assert vm.status is Status.SAVING
    assert vm.save_tries == {"hda": 1}
    assert vm.message == "saving hda: try 1"
    vm = apply(vm, ev("save_attempt", slot="hda", error="HTTP 503",
                      **{"try": 2}))
    assert vm.status is Status.SAVING
    assert vm.save_tries == {"hda": 2}
    assert "try 2 failed" in vm.message and "HTTP 503" in vm.message


def test_save_failed_says_why():
    vm = reach("failed to save")
    assert vm.status is Status.FAILED_TO_SAVE
    assert "3 tries failed" in vm.message
    assert vm.pending_saves == ("hda",)  # never reached its target


def test_modify_changes_the_save_target_used():
    new = "/srv/storage/out/other.img"
    vm = one(booted(hda_save_to=SAVE_HDA)
             + [ev("modified", hda_save_to=new), halted()])
    assert vm.save_to["hda"] == new
    assert vm.status is Status.SAVING
    vm = apply(vm, saved("hda", new))
    assert vm.status is Status.STOPPED
    assert f"hda saved to {new}" in vm.message
    assert SAVE_HDA not in vm.message


def test_modify_to_empty_discards_the_image():
    vm = one(booted(hda_save_to=SAVE_HDA)
             + [ev("modified", hda_save_to=""), halted()])
    assert vm.status is Status.STOPPED
    assert "no image to save" in vm.message


def test_modify_can_add_a_target_and_leaves_other_slots_alone():
    vm = one(booted(hdb_image="/srv/storage/hdb.img", hdb_save_to=SAVE_HDB)
             + [ev("modified", hda_save_to=SAVE_HDA)])
    assert vm.save_to == {"hda": SAVE_HDA, "hdb": SAVE_HDB}
    assert vm.status is Status.RUNNING
    vm = apply(vm, halted())
    assert vm.pending_saves == ("hda", "hdb")


def test_modify_while_starting_is_used_at_halt():
    vm = one([accepted(), ev("modified", hda_save_to=SAVE_HDA), fetched(),
              spawned(), ev("running", vnc=""), halted()])
    assert vm.status is Status.SAVING
    assert vm.pending_saves == ("hda",)


def test_cd_change_inserts_and_ejects():
    vm = one(booted() + [ev("cd_changed", path="/var/vms/x/disk-cd.img",
                            format="raw", uri="http://h/boot.iso")])
    assert vm.images["cd"]["uri"] == "http://h/boot.iso"
    assert vm.images["cd"]["format"] == "raw"
    assert vm.status is Status.RUNNING
    vm = apply(vm, ev("cd_changed", path="", format="", uri=""))
    assert "cd" not in vm.images
    assert "hda" in vm.images


@pytest.mark.parametrize("status", ["running", "suspended"])
def test_cd_change_is_allowed_with_a_console(status):
    vm = apply(reach(status), ev("cd_changed", path="", format="", uri=""))
    assert vm.status is Status(status)


# -- the process is remembered ------------------------------------------------


@pytest.mark.parametrize("end", [[halted()], [ev("destroyed")],
                                 [ev("suspended"), ev("destroyed")]])
def test_pid_is_kept_after_the_vm_ends(end):
    vm = one(booted() + end)
    assert vm.pid == 4242
    assert vm.create_time == 1234.5


def test_pid_is_kept_after_a_failed_start_and_a_save():
    vm = one([accepted(), spawned(pid=99), ev("start_failed", reason="x")])
    assert (vm.pid, vm.create_time) == (99, 1234.5)
    vm = one(booted(hda_save_to=SAVE_HDA) + [halted(), saved("hda",
                                                             SAVE_HDA)])
    assert vm.status is Status.STOPPED
    assert (vm.pid, vm.create_time) == (4242, 1234.5)
    vm = one(booted(hda_save_to=SAVE_HDA) + [halted(), ev("destroyed")])
    assert vm.status is Status.DESTROYED
    assert (vm.pid, vm.create_time) == (4242, 1234.5)


# -- refused transitions ------------------------------------------------------

REFUSED = [
    # (status the VM is in, event, statuses that would have allowed it)
    ("starting", "suspended", ["running"]),
    ("installing", "suspended", ["running"]),
    ("running", "resumed", ["suspended"]),
    ("starting", "resumed", ["suspended"]),
    ("destroyed", "destroyed", ["failed to save", "failed to start",
                                "installing", "running", "saving",
                                "starting", "suspended"]),
    ("stopped", "destroyed", ["failed to save", "failed to start",
                              "installing", "running", "saving", "starting",
                              "suspended"]),
    ("starting", "halted", ["installing", "running", "suspended"]),
    ("stopped", "halted", ["installing", "running", "suspended"]),
    ("running", "running", ["installing", "starting"]),
    ("running", "spawned", ["starting"]),
    ("failed to start", "image_fetched", ["starting"]),
    ("running", "saved", ["saving"]),
    ("stopped", "save_attempt", ["saving"]),
    ("saving", "modified", ["installing", "running", "starting",
                            "suspended"]),
    ("starting", "cd_changed", ["running", "suspended"]),
    ("installing", "cd_changed", ["running", "suspended"]),
    ("destroyed", "resumed", ["suspended"]),
]

EVENT_FIELDS = {
    "suspended": {}, "resumed": {}, "destroyed": {}, "install_started": {},
    "halted": {"reason": "guest poweroff"},
    "running": {"vnc": "127.0.0.1:5903"},
    "spawned": {"pid": 1, "create_time": 1.0},
    "image_fetched": {"slot": "hda", "path": "/x", "format": "raw"},
    "saved": {"slot": "hda", "target": SAVE_HDA},
    "save_attempt": {"slot": "hda", "try": 1},
    "save_failed": {"reason": "x"},
    "start_failed": {"reason": "x"},
    "modified": {"hda_save_to": SAVE_HDA},
    "cd_changed": {"path": "", "format": "", "uri": ""},
}


@pytest.mark.parametrize("status,etype,allowed", REFUSED,
                         ids=[f"{e}-while-{s}" for s, e, _ in REFUSED])
def test_refused_transition_names_current_and_allowed_statuses(status, etype,
                                                               allowed):
    vm = reach(status)
    with pytest.raises(WrongState) as info:
        apply(vm, ev(etype, **EVENT_FIELDS[etype]))
    err = info.value
    assert isinstance(err, Conflict) and err.http_status == 409
    assert err.current == status
    assert sorted(err.allowed) == sorted(allowed)
    text = str(err)
    assert f"its status is {status!r}" in text
    for s in allowed:
        assert repr(s) in text
    assert "'vm1'" in text and UUID in text  # names the VM


def test_a_refused_event_leaves_the_record_alone():
    vm = reach("running")
    before = dataclasses.asdict(vm)
    with pytest.raises(WrongState):
        apply(vm, ev("resumed"))
    assert dataclasses.asdict(vm) == before


def test_fold_stops_at_a_refused_event():
    with pytest.raises(WrongState):
        fold(booted() + [ev("destroyed"), ev("suspended")])


def test_accepted_twice_is_refused():
    vm = reach("running")
    with pytest.raises(WrongState) as info:
        apply(vm, accepted())
    assert info.value.current == "running"
    assert info.value.allowed == ()
    assert "its status is 'running'" in str(info.value)
    assert "none" in str(info.value)


def test_event_for_an_unknown_vm_is_an_error():
    with pytest.raises(KeyError, match=UUID):
        apply(None, ev("running", vnc=""))


def test_unknown_event_type_is_an_error():
    with pytest.raises(KeyError, match="rebooted"):
        apply(reach("running"), ev("rebooted"))


# What a request may do in each status (the contract, written out by hand
# rather than read from state.ALLOWED).
REQUEST_ALLOWED = {
    "suspended": {"running"},
    "resumed": {"suspended"},
    "modified": {"starting", "installing", "running", "suspended"},
    "cd_changed": {"running", "suspended"},
    "destroyed": set(DESIGN_STATUSES) - {"stopped", "destroyed"},
}


@pytest.mark.parametrize("status", DESIGN_STATUSES)
@pytest.mark.parametrize("etype", sorted(REQUEST_ALLOWED))
def test_request_events_in_every_status(etype, status):
    vm = reach(status)
    if status in REQUEST_ALLOWED[etype]:
        check(vm, etype)  # no error
        apply(vm, ev(etype, **EVENT_FIELDS[etype]))
    else:
        with pytest.raises(WrongState):
            check(vm, etype)
        with pytest.raises(WrongState):
            apply(vm, ev(etype, **EVENT_FIELDS[etype]))


def test_destroy_after_a_failure_is_allowed_and_saves_nothing():
    for status in ("failed to start", "failed to save", "saving"):
        vm = apply(reach(status), ev("destroyed"))
        assert vm.status is Status.DESTROYED
        assert "nothing saved" in vm.message
        assert vm.vnc == ""


# -- check() ----------------------------------------------------------------


def test_check_passes_silently_when_allowed():
    assert check(reach("running"), "suspended", "suspend") is None


def test_check_uses_the_requests_word():
    with pytest.raises(WrongState) as info:
        check(reach("starting"), "suspended", "suspend")
    text = str(info.value)
    assert text.startswith("cannot suspend VM 'vm1'")
    assert "its status is 'starting'" in text
    assert "suspend needs one of 'running'" in text


def test_check_names_every_allowed_status():
    with pytest.raises(WrongState) as info:
        check(reach("stopped"), "destroyed", "destroy")
    text = str(info.value)
    assert "its status is 'stopped'" in text
    for s in REQUEST_ALLOWED["destroyed"]:
        assert repr(s) in text


def test_action_words_map_to_events():
    for action, etype in state.ACTION_EVENT.items():
        assert etype in state.ALLOWED, action


# -- pending_saves, fold ------------------------------------------------------


def test_pending_saves():
    assert reach("running").pending_saves == ()
    vm = one(booted(hdb_image="/srv/storage/hdb.img", hda_save_to=SAVE_HDA,
                    hdb_save_to=SAVE_HDB))
    assert vm.pending_saves == ("hda", "hdb")  # known before the halt
    vm = apply(apply(vm, halted()), saved("hda", SAVE_HDA))
    assert vm.pending_saves == ("hdb",)
    vm = apply(vm, saved("hdb", SAVE_HDB))
    assert vm.pending_saves == ()


def test_fold_keeps_vms_apart():
    events = [accepted(), accepted(OTHER, name="vm2"), spawned(),
              spawned(OTHER, pid=5), ev("running", vnc="h:1"),
              ev("start_failed", OTHER, reason="boom"), halted()]
    vms = fold(events)
    assert set(vms) == {UUID, OTHER}
    assert vms[UUID].status is Status.STOPPED
    assert vms[OTHER].status is Status.FAILED_TO_START
    assert vms[OTHER].name == "vm2"
    assert vms[OTHER].pid == 5


def test_fold_of_nothing_is_empty():
    assert fold([]) == {}


def test_status_groups():
    assert state.FINAL == {Status.FAILED_TO_START, Status.FAILED_TO_SAVE,
                           Status.STOPPED, Status.DESTROYED}
    assert state.LIVE_PROCESS.isdisjoint(state.FINAL)
    assert state.CONSOLE <= state.LIVE_PROCESS
