"""The supervisor's pure decision: vmworker.reconcile.decide.

Records are built by folding plain event lists (as a journal replay does);
observations are what psutil and QMP would report.
"""

from __future__ import annotations

import dataclasses
import itertools

import pytest

from vmworker.hypervisor.base import Observation
from vmworker.reconcile import Action, Kind, decide
from vmworker.state import Status, VMRecord, fold

UUID = "6f1c2a9e-0b7d-4c51-9a8e-2d4f3b6a7c10"
SAVE = "/srv/storage/out/hda.img"
_clock = itertools.count(1000)


def ev(etype: str, **fields) -> dict:
    return {"type": etype, "uuid": UUID, "ts": float(next(_clock)), **fields}


def accepted(**over) -> dict:
    params = {"name": "vm1", "cpu_count": 1, "mem_size": 64,
              "hda_image": "/srv/storage/hda.img", "hda_save_to": SAVE,
              "hdb_image": "", "hdb_save_to": "", "cd_image": "",
              "run_agent": False, "soft_list": ""}
    params.update(over)
    return ev("accepted", params=params)


def spawned() -> dict:
    return ev("spawned", pid=4242, create_time=1234.5)


def running() -> dict:
    return ev("running", vnc="127.0.0.1:5901")


def vm_from(*events) -> VMRecord:
    return fold(list(events))[UUID]


def vm_in(status: str) -> VMRecord:
    """A VM in ``status`` that has (or had) a QEMU process."""
    lists = {
        "starting": [accepted(), spawned()],
        "installing": [accepted(), spawned(), ev("install_started")],
        "running": [accepted(), spawned(), running()],
        "suspended": [accepted(), spawned(), running(), ev("suspended")],
        "saving": [accepted(), spawned(), running(),
                   ev("halted", reason="guest poweroff")],
        "failed to start": [accepted(), spawned(),
                            ev("start_failed", reason="boom")],
        "failed to save": [accepted(), spawned(), running(),
                           ev("halted", reason="guest poweroff"),
                           ev("save_failed", reason="3 tries failed")],
        "stopped": [accepted(), spawned(), running(),
                    ev("halted", reason="guest poweroff"),
                    ev("saved", slot="hda", target=SAVE)],
        "destroyed": [accepted(), spawned(), running(), ev("destroyed")],
    }
    vm = vm_from(*lists[status])
    assert vm.status == status
    return vm


FINAL = ["failed to start", "failed to save", "stopped", "destroyed"]
GUEST_LIVES = ["installing", "running", "suspended"]
NOT_FINAL = ["starting", "saving"] + GUEST_LIVES

ALIVE = Observation(alive=True, runstate="running")
DEAD = Observation(alive=False)


def kinds(actions: list[Action]) -> list[Kind]:
    return [a.kind for a in actions]


# -- final statuses -----------------------------------------------------------


@pytest.mark.parametrize("job_active", [False, True])
@pytest.mark.parametrize("settled", [False, True])
@pytest.mark.parametrize("status", FINAL)
def test_final_status_with_a_live_process_kills_it(status, settled,
                                                    job_active):
    actions = decide(vm_in(status), ALIVE, job_active=job_active,
                     settled=settled)
    assert kinds(actions) == [Kind.KILL]
    assert status in actions[0].reason


@pytest.mark.parametrize("status", FINAL)
def test_final_status_without_a_process_is_cleaned_up_once(status):
    vm = vm_in(status)
    assert decide(vm, DEAD, job_active=False) == [Action(Kind.CLEAN_UP)]
    assert decide(vm, DEAD, job_active=False, settled=True) == []


def test_a_vm_that_never_spawned_and_failed_is_cleaned_up():
    vm = vm_from(accepted(), ev("start_failed", reason="HTTP 404"))
    assert vm.pid is None
    assert decide(vm, DEAD, job_active=False) == [Action(Kind.CLEAN_UP)]


# -- a job owns the VM -------------------------------------------------------


OBSERVATIONS = [
    DEAD,
    ALIVE,
    Observation(alive=True, runstate="paused"),
    Observation(alive=True, runstate="shutdown", guest_shutdown=True),
    Observation(alive=True, runstate="internal-error"),
]


@pytest.mark.parametrize("obs", OBSERVATIONS)
@pytest.mark.parametrize("status", NOT_FINAL)
def test_nothing_while_a_job_is_active(status, obs):
    assert decide(vm_in(status), obs, job_active=True) == []


def test_nothing_while_the_start_job_runs_before_spawn():
    assert decide(vm_from(accepted()), DEAD, job_active=True) == []


# -- starting ---------------------------------------------------------------


def test_starting_without_pid_runs_the_start_job():
    vm = vm_from(accepted(), ev("image_fetched", slot="hda", path="/x",
                                format="raw", size=1))
    assert vm.pid is None
    assert decide(vm, DEAD, job_active=False) == [Action(Kind.RUN_START_JOB)]


def test_starting_with_a_live_pid_after_a_restart_kills_then_fails():
    actions = decide(vm_in("starting"), ALIVE, job_active=False)
    assert kinds(actions) == [Kind.KILL, Kind.FAIL_START]
    assert "restart" in actions[1].reason


def test_starting_with_a_dead_pid_fails_the_start():
    actions = decide(vm_in("starting"), DEAD, job_active=False)
    assert kinds(actions) == [Kind.FAIL_START]
    assert "exited" in actions[0].reason


# -- saving -----------------------------------------------------------------


def test_saving_with_a_live_process_kills_it_first():
    actions = decide(vm_in("saving"), ALIVE, job_active=False)
    assert kinds(actions) == [Kind.KILL]
    assert actions[0].reason


def test_saving_without_a_process_runs_the_save_job():
    assert decide(vm_in("saving"), DEAD, job_active=False) == [
        Action(Kind.RUN_SAVE_JOB)]


# -- the guest lives: running, suspended, installing ---------------------------


@pytest.mark.parametrize("status", GUEST_LIVES)
def test_process_gone_is_a_halt(status):
    actions = decide(vm_in(status), DEAD, job_active=False)
    assert actions == [Action(Kind.HALT, "QEMU exited unexpectedly")]


@pytest.mark.parametrize("status", GUEST_LIVES)
def test_process_gone_halt_carries_the_exit_detail(status):
    obs = Observation(alive=False, exit_detail="killed by signal 9")
    actions = decide(vm_in(status), obs, job_active=False)
    assert actions == [Action(Kind.HALT, "QEMU exited unexpectedly: "
                                         "killed by signal 9")]


@pytest.mark.parametrize("status", GUEST_LIVES)
def test_guest_poweroff_is_a_halt(status):
    obs = Observation(alive=True, runstate="shutdown", guest_shutdown=True)
    assert decide(vm_in(status), obs, job_active=False) == [
        Action(Kind.HALT, "guest poweroff")]


@pytest.mark.parametrize("status", GUEST_LIVES)
def test_shutdown_not_from_the_guest_is_a_halt_with_its_cause(status):
    obs = Observation(alive=True, runstate="shutdown")
    actions = decide(vm_in(status), obs, job_active=False)
    assert kinds(actions) == [Kind.HALT]
    assert actions[0].reason.startswith("shutdown (")
    assert "guest poweroff" not in actions[0].reason

    obs = Observation(alive=True, runstate="shutdown", exit_detail="host-qmp")
    assert decide(vm_in(status), obs, job_active=False) == [
        Action(Kind.HALT, "shutdown (host-qmp)")]


@pytest.mark.parametrize("runstate", ["internal-error", "guest-panicked"])
@pytest.mark.parametrize("status", GUEST_LIVES)
def test_guest_crash_is_a_halt(status, runstate):
    obs = Observation(alive=True, runstate=runstate)
    actions = decide(vm_in(status), obs, job_active=False)
    assert kinds(actions) == [Kind.HALT]
    assert "guest crashed" in actions[0].reason
    assert runstate in actions[0].reason


def test_paused_outside_our_requests_marks_suspended():
    obs = Observation(alive=True, runstate="paused")
    assert decide(vm_in("running"), obs, job_active=False) == [
        Action(Kind.MARK_SUSPENDED)]


def test_running_again_outside_our_requests_marks_resumed():
    assert decide(vm_in("suspended"), ALIVE, job_active=False) == [
        Action(Kind.MARK_RESUMED)]


@pytest.mark.parametrize("status,runstate", [
    ("running", "running"),
    ("running", None),             # the event monitor has not said yet
    ("suspended", "paused"),
    ("suspended", None),
    ("installing", "running"),
    ("installing", "paused"),      # only running/suspended are mirrored
])
def test_healthy_vm_needs_nothing(status, runstate):
    obs = Observation(alive=True, runstate=runstate)
    assert decide(vm_in(status), obs, job_active=False) == []


def test_decide_does_not_change_the_record():
    vm = vm_in("running")
    before = dataclasses.asdict(vm)
    decide(vm, DEAD, job_active=False)
    assert dataclasses.asdict(vm) == before
    assert vm.status is Status.RUNNING


def test_action_defaults_and_kinds():
    assert Action(Kind.CLEAN_UP).reason == ""
    assert len({k.value for k in Kind}) == len(Kind)
