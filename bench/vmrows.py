"""Rows that start VMs: start latency, destroy, 20 starts at once.

Worker and raw QEMU are measured alternately within one row (ABAB, order
flipped every round) so that drift hits both. One warm-up round of each is
run first and not counted (page cache, first QEMU binary load).

Worker latencies are taken from the worker's own timestamps where possible:
the ``running`` event's ``ts`` (the status field ``updated`` of a running
VM) minus the client's clock just before it sent ``start``; the same host
clock, so no polling interval is added. The phases come from the gaps
between the VM's events in the worker's journal, whatever events it writes.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time

import requests
from qemu.qmp import QMPClient

from .context import Context
from .procs import CHILDREN, pid_state, reap, wait_dead, wait_reaped
from .rawqemu import Launched
from .results import Measure, Row, Target, percentile, spread
from .workerproc import WorkerProcess

PAUSE = 0.1  # between samples: let the supervisor clean up the last VM
MS = 1000.0


# -- start latency --------------------------------------------------------------

def start_row(ctx: Context) -> Row:
    row = Row("start", "Start latency: `start` request → `running` "
                       "(boot-sector guest, local raw image, cached)")
    reps = ctx.pick(5, 20)
    raw = ctx.raw_qemu("raw-start")
    loop = asyncio.new_event_loop()
    samples: list[dict] = []
    plain: list[Launched] = []
    overlaid: list[Launched] = []
    try:
        with ctx.worker("w-start") as w:
            # Warm-up: fills the worker's image cache and the page cache.
            _worker_start_sample(w, "warm")
            _raw_cycle(loop, raw, "warm", overlay=True)
            for i in range(reps):
                steps = [
                    lambda: samples.append(_worker_start_sample(w, f"s{i}")),
                    lambda: overlaid.append(_raw_cycle(loop, raw, f"o{i}",
                                                       overlay=True)),
                    lambda: plain.append(_raw_cycle(loop, raw, f"r{i}")),
                ]
                for step in (steps if i % 2 == 0 else reversed(steps)):
                    step()
                    time.sleep(PAUSE)
            journal = w.journal_records()
    finally:
        loop.close()
    ours_ts = [s["ts"] * MS for s in samples]
    with_overlay = [r.ready * MS for r in overlaid]
    row.measures += [
        Measure("start → `running` (worker's timestamp)", "ms", ours_ts,
                "raw QEMU + `qemu-img create` overlay → QMP `query-status` "
                "answered", with_overlay,
                Target("ratio", "<=", 1.15, "≤ 1.15× raw QEMU (overlay "
                                            "included)")),
        Measure("start → `running` (same)", "ms", ours_ts,
                "raw QEMU on the image itself: spawn → QMP `query-status` "
                "answered", [r.ready * MS for r in plain]),
        Measure("start → `running` seen by polling status every 5 ms", "ms",
                [s["polled"] * MS for s in samples],
                "raw QEMU + overlay (as above)", with_overlay,
                note="what a client polling at 5 ms sees"),
        Measure("`start` answered (accepted, journaled)", "ms",
                [s["answer"] * MS for s in samples]),
    ]
    _start_phases(row, samples, journal, overlaid)
    row.notes.append(
        f"{reps} rounds after one warm-up round (which also fills the "
        "worker's image cache), worker and both raw peers alternating. The "
        "raw peers run the worker's own argv "
        "(`vmworker.hypervisor.qemu.command_line`); one boots a fresh qcow2 "
        "overlay made with `qemu-img create -f qcow2 -F raw -b` inside the "
        "timing, the other the image itself. They look for the QMP socket "
        "every 0.5 ms.")
    return row


def _worker_start_sample(w: WorkerProcess, name: str) -> dict:
    wall0 = time.time()
    t0 = time.perf_counter()
    uuid = w.start_vm(name)
    answer = time.perf_counter() - t0
    body = w.wait_running(uuid, poll=0.005)
    polled = time.perf_counter() - t0
    sample = {"uuid": uuid, "wall0": wall0, "answer": answer,
              "polled": polled, "ts": body["updated"] - wall0}
    pid = body["pid"]
    w.ok("destroy", uuid=uuid)
    wait_dead(pid, 10)
    return sample


def _raw_cycle(loop, raw, name: str, overlay: bool = False) -> Launched:
    launched = loop.run_until_complete(raw.launch(name, overlay=overlay))
    CHILDREN.kill(launched.pid)
    raw.remove(launched)
    return launched


#: What the worker does between two journal events (for the phase tables).
#: Events the harness does not know yet are shown by name.
EVENT_WORK = {
    "accepted": "HTTP, validation, admission",
    "image_fetched": "fsync, job pickup, cache revalidation, overlay "
                     "copied from the blob's template",
    "spawned": "posix_spawn, psutil, journal",
    "running": "wait for the QMP sockets, event monitor, `query-status`, "
               "`query-vnc`",
}


def journal_phases(starts: list[tuple[float, str]],
                   journal: list[dict]) -> list[tuple[str, str, list[float]]]:
    """Gaps between a VM's journal events from ``accepted`` to ``running``.

    ``starts`` holds (client wall time the request left, uuid). Returns
    (event, label, values in ms) per step, in the order the events came.
    """
    events: dict[str, list[tuple[str, float]]] = {}
    for rec in journal:
        events.setdefault(str(rec.get("uuid")), []).append(
            (str(rec["type"]), float(rec["ts"])))
    order: list[str] = []
    gaps: dict[str, list[float]] = {}
    for wall0, uuid in starts:
        prev = wall0
        for etype, ts in events.get(uuid, []):
            if etype not in order:
                order.append(etype)
            gaps.setdefault(etype, []).append((ts - prev) * MS)
            prev = ts
            if etype == "running":
                break
    steps = []
    before = "request sent"
    for etype in order:
        label = f"{before} → `{etype}`"
        if etype in EVENT_WORK:
            label += f" ({EVENT_WORK[etype]})"
        steps.append((etype, label, gaps[etype]))
        before = f"`{etype}`"
    return steps


def _start_phases(row: Row, samples: list[dict], journal: list[dict],
                  raw_steps: list[Launched]) -> None:
    raw_cols = {
        "spawned": ("`qemu-img create` overlay + posix_spawn",
                    [r.spawned * MS for r in raw_steps]),
        "running": ("spawned → QMP socket exists → connected → "
                    "`query-status` answered",
                    [(r.ready - r.spawned) * MS for r in raw_steps]),
    }
    table = [["phase (from the worker's journal)", "vmworker, ms",
              "raw QEMU + overlay", "raw, ms"]]
    starts = [(s["wall0"], s["uuid"]) for s in samples]
    for etype, label, vals in journal_phases(starts, journal):
        raw_label, raw_vals = raw_cols.get(etype, ("–", []))
        table.append([label, spread(vals, ""), raw_label, spread(raw_vals, "")])
    table.append(["total (request sent → `running` ts)",
                  spread([s["ts"] * MS for s in samples], ""), "total",
                  spread([r.ready * MS for r in raw_steps], "")])
    table.append(["", "", "of which: `qemu-img create`",
                  spread([r.overlay * MS for r in raw_steps], "")])
    table.append(["", "", "of which: spawn → socket file exists",
                  spread([(r.socket - r.spawned) * MS for r in raw_steps], "")])
    table.append(["", "", "of which: socket → QMP connected (greeting)",
                  spread([(r.connected - r.socket) * MS for r in raw_steps], "")])
    row.table = table
    row.table_title = "Where the time goes (medians, min–max)"


# -- destroy ------------------------------------------------------------------

def destroy_row(ctx: Context) -> Row:
    row = Row("destroy", "Destroy → QEMU gone")
    reps = ctx.pick(5, 20)
    raw = ctx.raw_qemu("raw-destroy")
    loop = asyncio.new_event_loop()
    ours_dead, ours_reaped, at_answer = [], [], {}
    raw_kill, raw_term, term_outcomes = [], [], {}
    try:
        with ctx.worker("w-destroy") as w:
            _worker_destroy_sample(w, "warm")
            _raw_signal_sample(loop, raw, "warm", signal.SIGKILL)
            for i in range(reps):
                steps = [
                    lambda: _collect_worker(w, f"d{i}", ours_dead, ours_reaped,
                                            at_answer),
                    lambda: _collect_raw(loop, raw, f"k{i}", signal.SIGKILL,
                                         raw_kill, {}),
                    lambda: _collect_raw(loop, raw, f"t{i}", signal.SIGTERM,
                                         raw_term, term_outcomes),
                ]
                for step in (steps if i % 2 == 0 else reversed(steps)):
                    step()
                    time.sleep(PAUSE)
    finally:
        loop.close()
    row.measures += [
        Measure("`destroy` answered and QEMU dead (gone or zombie)", "ms",
                ours_dead, "raw SIGTERM → reaped", raw_term,
                Target("ratio", "<=", 2.0, "≤ 2× raw SIGTERM → reaped")),
        Measure("`destroy` answered and QEMU dead (same)", "ms", ours_dead,
                "raw SIGKILL → reaped", raw_kill),
        Measure("`destroy` sent → QEMU pid reaped (gone from /proc)", "ms",
                ours_reaped, "raw SIGKILL → reaped", raw_kill,
                note="informational: how long a zombie lingers"),
    ]
    states = ", ".join(f"{k} {v}/{reps}" for k, v in sorted(at_answer.items()))
    outcomes = ", ".join(f"{k} {v}/{reps}" for k, v in
                         sorted(term_outcomes.items()))
    if set(at_answer) == {"gone"}:
        state_note = ("the worker had killed and reaped QEMU before it "
                      "answered, so the third line equals the first")
    else:
        state_note = ("a zombie is dead but not yet reaped by the worker; "
                      "it goes at a later supervisor tick (third line)")
    if set(term_outcomes) == {"exited"}:
        term_note = ("QEMU takes SIGTERM as a host-requested quit, which "
                     "`-no-shutdown` does not hold back: the process exits "
                     "by itself, no SIGKILL was needed")
    else:
        term_note = ("where QEMU did not exit within 5 s its run state was "
                     "asked over QMP and it was SIGKILLed; those rounds are "
                     "not in the figures")
    row.notes += [
        "State of the QEMU pid when the `destroy` answer arrived: "
        f"{states}; {state_note}.",
        f"Raw SIGTERM under `-no-shutdown`: {outcomes}; {term_note}.",
        f"{reps} rounds after one warm-up round; the raw peers are children "
        "of the harness and reaped with waitpid as soon as a pidfd reports "
        "the exit.",
    ]
    return row


def _worker_destroy_sample(w: WorkerProcess, name: str) -> tuple[float, float | None, str]:
    uuid = w.start_vm(name)
    pid = w.wait_running(uuid, poll=0.005)["pid"]
    time.sleep(PAUSE)
    t0 = time.perf_counter()
    w.ok("destroy", uuid=uuid)
    answered = time.perf_counter()
    state = pid_state(pid)
    dead = answered
    if state == "alive":
        dead = wait_dead(pid, 10) or float("nan")
    reaped = answered if state == "gone" else wait_reaped(pid, 3)
    return (dead - t0, None if reaped is None else reaped - t0, state)


def _collect_worker(w, name, dead, reaped, at_answer) -> None:
    d, r, state = _worker_destroy_sample(w, name)
    dead.append(d * MS)
    if r is not None:
        reaped.append(r * MS)
    at_answer[state] = at_answer.get(state, 0) + 1


def _raw_signal_sample(loop, raw, name: str, sig: int) -> tuple[float | None, str]:
    launched = loop.run_until_complete(raw.launch(name))
    time.sleep(PAUSE)
    t0 = time.perf_counter()
    os.kill(launched.pid, sig)
    done = reap(launched.pid, 5.0)
    if done is not None:
        CHILDREN.discard(launched.pid)
        raw.remove(launched)
        return done - t0, "exited"
    # Still alive 5 s after the signal: ask QEMU what it is doing, then kill.
    try:
        state = loop.run_until_complete(_runstate(launched))
    except Exception as err:  # noqa: BLE001 - only for the report
        state = f"unknown ({err})"
    CHILDREN.kill(launched.pid)
    raw.remove(launched)
    return None, f"still running after 5 s (runstate {state}; SIGKILLed)"


async def _runstate(launched: Launched) -> str:
    client = QMPClient("bench-probe")
    await client.connect(os.path.join(launched.folder, "qmp.sock"))
    try:
        return (await client.execute("query-status"))["status"]
    finally:
        await client.disconnect()


def _collect_raw(loop, raw, name, sig, values, outcomes) -> None:
    took, outcome = _raw_signal_sample(loop, raw, name, sig)
    if took is not None:
        values.append(took * MS)
    outcomes[outcome] = outcomes.get(outcome, 0) + 1


# -- concurrency --------------------------------------------------------------

BURST = 20


def concurrency_row(ctx: Context) -> Row:
    row = Row("concurrency", f"Concurrency: {BURST} `start` requests at once")
    reps = ctx.pick(2, 5)
    raw = ctx.raw_qemu("raw-burst")
    loop = asyncio.new_event_loop()
    p50, p99, all_running, raw_all = [], [], [], []
    bursts: list[tuple[float, list[str]]] = []  # release time, uuids
    try:
        with ctx.worker("w-burst") as w:
            sessions = [requests.Session() for _ in range(BURST)]
            try:
                for i in range(reps):
                    steps = [lambda: bursts.append(_worker_burst(
                                 w, sessions, i, p50, p99, all_running)),
                             lambda: raw_all.append(_raw_burst(loop, raw, i))]
                    for step in (steps if i % 2 == 0 else reversed(steps)):
                        step()
                        time.sleep(0.3)
            finally:
                for s in sessions:
                    s.close()
            journal = w.journal_records()
    finally:
        loop.close()
    row.measures += [
        Measure("`start` answer, p50 of the burst", "ms", p50),
        Measure("`start` answer, p99 of the burst", "ms", p99),
        Measure(f"first request sent → all {BURST} `running`", "ms",
                all_running, f"raw QEMU + overlay: {BURST} launched at once "
                "→ all answer `query-status`", raw_all),
    ]
    _burst_phases(row, bursts, journal)
    row.notes.append(
        f"{reps} bursts each. {BURST} client threads with their own "
        "keep-alive sessions are released by a barrier; \"all running\" is "
        "the latest `running` timestamp minus the release time. The raw peer "
        f"launches {BURST} QEMUs at once on one asyncio loop, each on its "
        "own `qemu-img create` overlay made inside the timing (the "
        "qemu-img runs overlap). p99 of 20 samples is their maximum.")
    return row


def _worker_burst(w: WorkerProcess, sessions, i, p50, p99,
                  all_running) -> tuple[float, list[str]]:
    for s in sessions:  # open the keep-alive connections before the burst
        w.ok("list", s)
    lat: list[float] = [0.0] * BURST
    uuids: list[str | None] = [None] * BURST
    errors: list[str] = []
    release: list[float] = []
    barrier = threading.Barrier(BURST, action=lambda: release.append(time.time()))

    def one(k: int) -> None:
        try:
            barrier.wait(30)
            t0 = time.perf_counter()
            uuids[k] = w.start_vm(f"b{i}-{k}", sessions[k])
            lat[k] = (time.perf_counter() - t0) * MS
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(f"{type(err).__name__}: {err}")

    threads = [threading.Thread(target=one, args=(k,)) for k in range(BURST)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    if errors or any(t.is_alive() for t in threads):
        raise RuntimeError(f"burst start failed: {errors[:3] or 'timeout'}")
    vms = w.wait_all_running([u for u in uuids if u])
    p50.append(percentile(lat, 50))
    p99.append(percentile(lat, 99))
    all_running.append((max(vm["updated"] for vm in vms.values())
                        - release[0]) * MS)
    for vm in vms.values():
        w.ok("destroy", uuid=vm["uuid"])
    for vm in vms.values():
        wait_dead(vm["pid"], 10)
    return release[0], list(vms)


def _burst_phases(row: Row, bursts: list[tuple[float, list[str]]],
                  journal: list[dict]) -> None:
    """Per-VM phases of the bursts: where 20 starts queue up."""
    starts = [(release, uuid) for release, uuids in bursts for uuid in uuids]
    table = [["phase, per VM (from the worker's journal)",
              "median over the VMs, ms", "slowest VM, ms"]]
    for _, label, vals in journal_phases(starts, journal):
        label = label.split(" (")[0].replace("request sent", "release")
        table.append([label, spread([percentile(vals, 50)], ""),
                      spread([max(vals)] if vals else [], "")])
    row.table = table
    row.table_title = f"Where the time goes ({len(bursts)} bursts pooled)"


def _raw_burst(loop, raw, i: int) -> float:
    async def burst() -> list:
        return await asyncio.gather(
            *(raw.launch(f"rb{i}-{k}", timeout=60, overlay=True)
              for k in range(BURST)),
            return_exceptions=True)

    t0 = time.perf_counter()
    results = loop.run_until_complete(burst())
    took = (time.perf_counter() - t0) * MS
    failed = [r for r in results if isinstance(r, BaseException)]
    for r in results:
        if isinstance(r, Launched):
            CHILDREN.kill(r.pid)
            raw.remove(r)
    if failed:
        raise RuntimeError(f"raw burst: {failed[0]}")
    return took
