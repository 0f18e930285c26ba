"""The status path under load, vs a bare CherryPy endpoint.

The worker runs N tiny VMs (10 quick, 100 full); 50 connections then ask
``/vmachines/status?uuid=…`` round robin over those VMs. The peer is
``bare_cherrypy.py`` in its own process with the worker's server settings,
answering the same path with the same bytes. Runs alternate worker / peer.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import psutil
import requests

from . import loadgen
from .context import Context
from .procs import CHILDREN
from .results import Measure, Row, Target
from .workerproc import ROOT, WorkerError, WorkerProcess, free_port

CONNECTIONS = 50
BATCH = 20  # VMs started at once while preparing the row


def status_row(ctx: Context) -> Row:
    vms = ctx.pick(10, 100)
    # Many short alternating runs: this machine's noise comes in bursts.
    reps = ctx.pick(3, 8)
    seconds = ctx.pick(2, 4)  # wrk takes whole seconds
    row = Row("status", f"Status path: `/vmachines/status`, {CONNECTIONS} "
                        f"concurrent clients, {vms} VMs running")
    ours, peer = [], []
    with ctx.worker("w-status") as w:
        # The supervisor row's figures: this worker idle, then with its VMs.
        from .supervisorrow import sample_stats
        stats = {"idle": sample_stats(w, ctx.pick(2.5, 4))}
        uuids = start_many(w, vms)
        settled = settle(limit=ctx.pick(20, 150))
        stats["loaded"] = sample_stats(w, ctx.pick(3, 6))
        ctx.shared["worker_stats"] = stats
        body = w.session.get(f"{w.url}/vmachines/status",
                             params={"uuid": uuids[0]}, timeout=10).content
        paths = [f"/vmachines/status?uuid={u}" for u in uuids]
        with BareServer(ctx.base, body) as bare:
            for url in (w.url, bare.url):  # warm-up: threads, caches
                loadgen.run(url, paths, connections=CONNECTIONS, seconds=1,
                            workdir=ctx.base)
            for i in range(reps):
                steps = [(ours, w.url), (peer, bare.url)]
                for results, url in (steps if i % 2 == 0 else reversed(steps)):
                    results.append(loadgen.run(url, paths,
                                               connections=CONNECTIONS,
                                               seconds=seconds,
                                               workdir=ctx.base))
                    time.sleep(0.5)
        still = sum(vm["status"] == "running"
                    for vm in w.ok("list")["vmachines"])
    peer_label = "bare CherryPy JSON endpoint"
    row.measures += [
        Measure("requests/s", "req/s", [r.requests_per_s for r in ours],
                peer_label, [r.requests_per_s for r in peer],
                Target("ratio", ">=", 0.8, "≥ 0.8× bare CherryPy")),
        Measure("latency p50", "ms", [r.p50_ms for r in ours], peer_label,
                [r.p50_ms for r in peer]),
        Measure("latency p99", "ms", [r.p99_ms for r in ours], peer_label,
                [r.p99_ms for r in peer]),
    ]
    errs_ours = sum(r.errors for r in ours)
    errs_peer = sum(r.errors for r in peer)
    row.notes += [
        f"Load generator: {_tool_text()}; {reps} runs of {seconds:g} s each "
        f"per server, alternating, after a 1 s warm-up of each; "
        f"{CONNECTIONS} keep-alive connections "
        f"asking round robin for the {vms} VMs. Errors (non-2xx, socket "
        f"errors, timeouts): vmworker {errs_ours}, bare {errs_peer}. "
        f"{still} of {vms} VMs were still `running` after the load. "
        f"Measured once the machine had settled after the {vms} starts "
        f"({settled}).",
        "Both servers: listen queue 128, 32 threads "
        "(`vmworker.app.SERVER_DEFAULTS`), cheroot's default keep-alive "
        "limit. The bare endpoint does no access check, no lookup, no "
        "JSON encoding per request and writes no access log; the worker "
        "does all of these.",
    ]
    return row


def settle(quiet: float = 35.0, limit: float = 150.0) -> str:
    """Wait until the guests' boot is over: host CPU below ``quiet`` %.

    `running` comes before the guests' BIOS: under nested KVM, 100 guests
    keep both cores busy for about a minute after the last one is
    `running`, then idle at about 18 %. Measured in that minute, the
    figures swung by 3× and charged the burst to whichever server ran
    first.
    """
    start = time.monotonic()
    calm = 0
    busy = 100.0
    while time.monotonic() - start < limit and calm < 2:
        busy = psutil.cpu_percent(interval=0.5)
        calm = calm + 1 if busy < quiet else 0
    return (f"host CPU {busy:.0f} % after {time.monotonic() - start:.1f} s"
            + ("" if calm >= 2 else f", never below {quiet:g} % within "
               f"{limit:g} s"))


def _tool_text() -> str:
    if loadgen.tool() == "wrk":
        return "wrk (one thread, on the same machine)"
    return ("Python threads with requests sessions (wrk not installed; the "
            "GIL caps the load, so ratios are compressed toward 1)")


def start_many(w: WorkerProcess, count: int) -> list[str]:
    """Start ``count`` VMs, ``BATCH`` at a time; wait until all run."""
    uuids: list[str] = []
    for first in range(0, count, BATCH):
        names = [f"st{k}" for k in range(first, min(count, first + BATCH))]
        batch: list[str] = []
        errors: list[str] = []
        lock = threading.Lock()

        def one(name: str) -> None:
            try:
                with requests.Session() as s:
                    uuid = w.start_vm(name, s)
                with lock:
                    batch.append(uuid)
            except (WorkerError, requests.RequestException) as err:
                errors.append(str(err))

        threads = [threading.Thread(target=one, args=(n,)) for n in names]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        if errors:
            raise WorkerError(f"starting VMs for the status row: {errors[0]}")
        w.wait_all_running(batch, timeout=120)
        uuids += batch
    return uuids


class BareServer:
    """``bare_cherrypy.py`` as a child process, stopped by pid."""

    def __init__(self, base: str, body: bytes):
        self.body_file = os.path.join(base, "bare-body.json")
        with open(self.body_file, "wb") as f:
            f.write(body)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.out = os.path.join(base, "bare.out")
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "BareServer":
        with open(self.out, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, os.path.join(ROOT, "bench", "bare_cherrypy.py"),
                 "--port", str(self.port), "--body", self.body_file],
                stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        CHILDREN.add(self.proc.pid, "bare CherryPy")
        deadline = time.monotonic() + 60  # a busy machine: slow imports
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"bare CherryPy exited: {self._tail()}")
            try:
                requests.get(self.url + "/vmachines/status", timeout=1)
                return self
            except requests.ConnectionError:
                time.sleep(0.05)
        self.__exit__()
        raise RuntimeError("bare CherryPy did not answer within 60 s")

    def __exit__(self, *exc) -> None:
        if self.proc is not None:
            CHILDREN.kill(self.proc.pid, sig=signal.SIGTERM, timeout=10)
            CHILDREN.kill(self.proc.pid)  # SIGKILL if SIGTERM was not enough

    def _tail(self) -> str:
        with open(self.out, errors="replace") as f:
            return f.read()[-1000:]
