"""What the supervisor should do about one VM: a pure decision.

Inputs are the VM's record (the journal's view), an observation of its
process (psutil and QMP events) and whether a job is already working on it.
The output is a short list of actions, which the supervisor applies. Keeping
this pure makes every case (crash, poweroff, restart, leftover process) a
plain unit test.
"""

from __future__ import annotations

import dataclasses
import enum

from .hypervisor.base import Observation
from .state import FINAL, Status, VMRecord


class Kind(str, enum.Enum):
    RUN_START_JOB = "run start job"    # accepted but never spawned
    FAIL_START = "fail start"          # journal start_failed (reason)
    HALT = "halt"                      # journal halted (reason), quit QEMU
    KILL = "kill"                      # a process lives that must not
    MARK_SUSPENDED = "mark suspended"  # QEMU paused outside our requests
    MARK_RESUMED = "mark resumed"
    RUN_SAVE_JOB = "run save job"
    CLEAN_UP = "clean up"              # remove the folder of an ended VM


@dataclasses.dataclass(frozen=True)
class Action:
    kind: Kind
    reason: str = ""


CRASH_RUNSTATES = {"internal-error", "guest-panicked", "io-error"}


def decide(vm: VMRecord, obs: Observation, *, job_active: bool,
           settled: bool = False) -> list[Action]:
    status = vm.status
    if status in FINAL:
        if obs.alive:
            return [Action(Kind.KILL, f"VM is {status.value}")]
        return [] if settled else [Action(Kind.CLEAN_UP)]
    if job_active:
        return []  # the start or save job owns the VM until it ends
    if status is Status.STARTING:
        if vm.pid is None:
            return [Action(Kind.RUN_START_JOB)]
        # Spawned by a worker that died before QEMU was seen ready: a
        # half-started QEMU is killed rather than guessed about.
        if obs.alive:
            return [Action(Kind.KILL, "QEMU was not ready when the worker "
                                      "stopped"),
                    Action(Kind.FAIL_START, "the worker restarted while QEMU "
                                            "was starting")]
        return [Action(Kind.FAIL_START, "QEMU exited before it was ready")]
    if status is Status.SAVING:
        if obs.alive:
            return [Action(Kind.KILL, "QEMU still runs after the halt")]
        return [Action(Kind.RUN_SAVE_JOB)]
    # installing, running, suspended: a process must be alive.
    if obs.runstate == "shutdown" and obs.guest_shutdown:
        return [Action(Kind.HALT, "guest poweroff")]
    if not obs.alive:
        detail = f": {obs.exit_detail}" if obs.exit_detail else ""
        return [Action(Kind.HALT, f"QEMU exited unexpectedly{detail}")]
    if obs.runstate == "shutdown":
        detail = obs.exit_detail or "shutdown requested"
        return [Action(Kind.HALT, f"shutdown ({detail})")]
    if obs.runstate in CRASH_RUNSTATES:
        return [Action(Kind.HALT, f"guest crashed ({obs.runstate})")]
    if status is Status.RUNNING and obs.runstate == "paused":
        return [Action(Kind.MARK_SUSPENDED)]
    if status is Status.SUSPENDED and obs.runstate == "running":
        return [Action(Kind.MARK_RESUMED)]
    return []
