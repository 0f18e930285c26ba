"""The supervisor's tick and the worker's RSS, with 0 and with N VMs.

Both come from the worker's own ``GET /worker/stats``
(``supervisor.last_tick_ms``, ``rss_bytes``). The figures are sampled by
the status row on its worker (``sample_stats``) — once before it starts its
VMs and once with all of them running, before the load generator runs — and
reported here; when the status row did not run, this row starts its own
worker and VMs. The "peer" of each figure is the same worker with 0 VMs, so
the ratio is what the VMs add.
"""

from __future__ import annotations

import time

from .context import Context
from .results import Measure, Row, Target, median
from .workerproc import WorkerProcess

MB = 1 << 20


def sample_stats(w: WorkerProcess, seconds: float, poll: float = 0.1) -> dict:
    """Poll /worker/stats for ``seconds``: one tick figure per new tick,
    one RSS figure per poll."""
    ticks: dict[int, float] = {}
    rss: list[float] = []
    vms = 0
    first_ticks = None
    deadline = time.monotonic() + seconds
    while True:
        resp = w.session.get(f"{w.url}/worker/stats", timeout=10)
        resp.raise_for_status()
        body = resp.json()
        sup = body["supervisor"]
        if first_ticks is None:
            first_ticks = sup["ticks"]
        elif sup["ticks"] != first_ticks:  # a tick finished while we watched
            ticks[int(sup["ticks"])] = float(sup["last_tick_ms"])
        rss.append(body["rss_bytes"] / MB)
        vms = body.get("vms_not_ended", body.get("vms", 0))
        if time.monotonic() >= deadline and ticks:
            break
        if time.monotonic() >= deadline + 5:  # no tick at all: report so
            break
        time.sleep(poll)
    return {"ticks": list(ticks.values()), "rss_mb": rss, "vms": vms,
            "max_tick_ms": float(sup["max_tick_ms"])}


def supervisor_row(ctx: Context) -> Row:
    vms = ctx.pick(10, 100)
    stats = ctx.shared.get("worker_stats")
    own = stats is None
    if own:
        from .statusrow import start_many
        with ctx.worker("w-supervisor") as w:
            stats = {"idle": sample_stats(w, ctx.pick(2.5, 4))}
            start_many(w, vms)
            time.sleep(1)
            stats["loaded"] = sample_stats(w, ctx.pick(3, 6))
    idle, loaded = stats["idle"], stats["loaded"]
    n = loaded["vms"]
    row = Row("supervisor", f"Supervisor tick and worker RSS, 0 and {n} VMs "
                            "running (`GET /worker/stats`)")
    full = n >= 100
    row.measures += [
        Measure(f"supervisor tick (`last_tick_ms`), {n} VMs", "ms",
                loaded["ticks"], "same worker, 0 VMs", idle["ticks"],
                Target("value", "<=", 20.0, "< 20 ms at 100 VMs")
                if full else None),
        Measure(f"worker RSS, {n} VMs", "MB", loaded["rss_mb"],
                "same worker, 0 VMs", idle["rss_mb"],
                Target("value", "<=", 80.0, "< 80 MB at 100 VMs")
                if full else None),
    ]
    where = ("a worker of its own" if own else
             "the status row's worker, before its load generator ran")
    row.notes += [
        f"Sampled from {where}: /worker/stats polled every 0.1 s, one tick "
        f"figure per tick that finished while watching ({len(idle['ticks'])} "
        f"ticks with 0 VMs, {len(loaded['ticks'])} with {n}; the supervisor "
        "ticks once a second), RSS at each poll. Largest tick the worker had "
        f"seen so far (`max_tick_ms`, includes the ticks while the VMs were "
        f"starting): {loaded['max_tick_ms']:.1f} ms. Tick median with {n} "
        f"VMs: {median(loaded['ticks']):.2f} ms, i.e. "
        f"{median(loaded['ticks']) / 20.0:.2f}× the 20 ms target; RSS "
        f"{median(loaded['rss_mb']) / 80.0:.2f}× the 80 MB target.",
    ]
    if not full:
        row.notes.append(f"Quick mode runs {n} VMs: the targets are for "
                         "100 VMs and are not judged here.")
    return row
