"""HTTP load for the status row: wrk when installed, else Python threads.

Both run a fixed number of connections for a fixed time against one server
and return a ``LoadResult``. wrk (Debian's package) is C and leaves the CPU
to the server; the Python fallback (threads with one ``requests`` session
each) is bounded by the GIL and reported as such. Either way worker and
peer are loaded by the same tool in the same run, so their ratio holds.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
import time

import requests

from . import timed
from .procs import CHILDREN
from .results import percentile


@dataclasses.dataclass
class LoadResult:
    requests_per_s: float
    p50_ms: float
    p99_ms: float
    requests: int
    errors: int  # non-2xx answers, socket errors, timeouts


def tool() -> str:
    return "wrk" if shutil.which("wrk") else "python"


def run(url: str, paths: list[str], *, connections: int, seconds: float,
        workdir: str) -> LoadResult:
    """Load ``url`` + one of ``paths`` (round robin) for ``seconds``."""
    if tool() == "wrk":
        return _wrk(url, paths, connections, seconds, workdir)
    return _python(url, paths, connections, seconds)


# -- wrk ------------------------------------------------------------------------

def _wrk(url, paths, connections, seconds, workdir) -> LoadResult:
    script = os.path.join(workdir, "paths.lua")
    with open(script, "w") as f:
        f.write("local paths = {\n")
        f.writelines(f"  {_lua(p)},\n" for p in paths)
        f.write("}\nlocal i = 0\nrequest = function()\n  i = i + 1\n"
                "  return wrk.format('GET', paths[(i % #paths) + 1])\nend\n")
    threads = 1  # one wrk thread: with two, runs on 2 cores scatter ±30 %
    cmd = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds:g}s",
           "--timeout", "5s", "--latency", "-s", script, url]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    CHILDREN.add(proc.pid, "wrk")
    try:
        out, _ = proc.communicate(timeout=seconds + 30)
    except subprocess.TimeoutExpired:
        CHILDREN.kill(proc.pid)
        raise RuntimeError("wrk did not finish in time") from None
    CHILDREN.discard(proc.pid)
    if proc.returncode != 0:
        raise RuntimeError(f"wrk failed ({proc.returncode}): {out[-500:]}")
    return _parse_wrk(out)


def _lua(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}


def _parse_wrk(out: str) -> LoadResult:
    def latency(pct: str) -> float:
        m = re.search(rf"^\s*{pct}%\s+([\d.]+)(us|ms|s|m)\s*$", out, re.M)
        if not m:
            raise RuntimeError(f"no {pct}% latency in wrk output: {out[-500:]}")
        return float(m.group(1)) * _UNITS[m.group(2)]

    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    total = re.search(r"(\d+) requests in", out)
    if not rps or not total:
        raise RuntimeError(f"unexpected wrk output: {out[-500:]}")
    errors = 0
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), "
                     r"timeout (\d+)", out)
    if sock:
        errors += sum(int(g) for g in sock.groups())
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if non2xx:
        errors += int(non2xx.group(1))
    return LoadResult(float(rps.group(1)), latency("50"), latency("99"),
                      int(total.group(1)), errors)


# -- Python fallback ------------------------------------------------------------

def _python(url, paths, connections, seconds) -> LoadResult:
    latencies: list[list[float]] = [[] for _ in range(connections)]
    errors = [0] * connections

    def client(k: int, stop_at: float) -> None:
        with requests.Session() as s:
            i = k
            while time.perf_counter() < stop_at:
                t0 = time.perf_counter()
                try:
                    resp = s.get(url + paths[i % len(paths)], timeout=5)
                    ok = resp.status_code == 200
                except requests.RequestException:
                    ok = False
                latencies[k].append((time.perf_counter() - t0) * 1000)
                errors[k] += not ok
                i += 1

    elapsed = timed.run_for(connections, seconds, client, grace=10)
    flat = [x for per in latencies for x in per]
    return LoadResult(len(flat) / elapsed, percentile(flat, 50),
                      percentile(flat, 99), len(flat), sum(errors))
