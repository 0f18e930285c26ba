"""Rows of issue 3: start time against image size, and save throughput.

**Image size.** Bases of real (random) data lie in the worker's
``VAR/storage``. For each size the worker starts once from it (the cold
start: the base is copied into the image cache), the VM is destroyed, and
then warm starts (cached base, qcow2 overlay) alternate with the full-copy
peer: ``cp`` of the base, then raw QEMU with the worker's argv on the copy,
timed from before ``cp`` to QMP ``query-status`` answered. The bases, the
copies and the worker's cache are deleted at the end of the row.

**Save throughput.** A guest that powers off at once, padded with random
data, started with ``hda_save_to`` a file in ``VAR/storage`` or an HTTP PUT
target (tests/servers.py ``FileServer``). The worker's figure is the gap
between its journal's ``halted`` and ``saved`` events (flatten, write,
fsync, verify). Peers: ``cp`` of a file of the same size into the same
folder, and ``curl -T`` of it to the same HTTP server.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys
import time

from .context import Context
from .procs import CHILDREN
from .results import Measure, Row, Target, median
from .workerproc import ROOT, WorkerError, WorkerProcess

MS = 1000.0
MB = 1 << 20
CHUNK = 8 * MB
#: Free space the full 4 GB case needs: base + cache copy + peer copy + slack.
NEED_FOR_4G = 12 << 30


def _random_image(boot: str, dest: str, size: int) -> str:
    """The boot sector's first 4096 bytes, then random data up to ``size``."""
    with open(boot, "rb") as f:
        head = f.read(4096).ljust(4096, b"\0")
    with open(dest, "wb") as f:
        f.write(head)
        left = size - len(head)
        while left > 0:
            n = min(CHUNK, left)
            f.write(os.urandom(n))
            left -= n
    return dest


def _label(size: int) -> str:
    return f"{size // 1024 ** 3} GB" if size >= 1 << 30 else f"{size // MB} MB"


def _start_running(w: WorkerProcess, name: str, image: str,
                   timeout: float = 300.0) -> tuple[float, int]:
    """start → `running` by the worker's timestamp; returns (s, QEMU pid)."""
    wall0 = time.time()
    uuid = w.ok("start", name=name, cpu_count=1, mem_size=32,
                hda_image=image)["uuid"]
    body = w.wait_running(uuid, timeout=timeout, poll=0.01)
    took = body["updated"] - wall0
    w.ok("destroy", uuid=uuid)
    from .procs import wait_dead
    wait_dead(body["pid"], 10)
    return took, body["pid"]


# -- image size -----------------------------------------------------------------

def image_size_row(ctx: Context) -> Row:
    sizes = ctx.pick([10 * MB, 256 * MB], [10 * MB, 1 << 30, 4 << 30])
    reps = ctx.pick(3, 5)
    free = shutil.disk_usage(ctx.base).free
    skipped = []
    if (4 << 30) in sizes and free < NEED_FOR_4G:
        sizes.remove(4 << 30)
        skipped.append(f"The 4 GB case was skipped: {free / (1 << 30):.1f} GB "
                       f"free on the scratch filesystem, it needs "
                       f"{NEED_FOR_4G >> 30} GB (base, cache copy, peer copy).")
    row = Row("images", "Image size: `start` → `running` from a cached "
                        "base, qcow2 overlay vs full copy")
    raw = ctx.raw_qemu("raw-images")
    import asyncio
    loop = asyncio.new_event_loop()
    warm: dict[int, list[float]] = {}
    cold: dict[int, list[float]] = {}
    copy: dict[int, list[float]] = {}
    cp_only: dict[int, list[float]] = {}
    var = ""
    try:
        with ctx.worker("w-images") as w:
            var = w.var
            for size in sizes:
                base = _random_image(ctx.image, os.path.join(
                    w.storage, f"base-{size // MB}m.img"), size)
                dup = os.path.join(raw.base_dir, "copy.img")
                try:
                    cold[size] = [_start_running(w, f"cold{size // MB}",
                                                 base)[0] * MS]
                    # Warm the peer (QEMU binary, page cache) once, untimed.
                    _copy_cycle(loop, raw, base, dup, "warm")
                    warm[size], copy[size], cp_only[size] = [], [], []
                    for i in range(reps):
                        steps = [
                            lambda: warm[size].append(_start_running(
                                w, f"w{size // MB}-{i}", base)[0] * MS),
                            lambda: _collect_copy(loop, raw, base, dup, i,
                                                  copy[size], cp_only[size]),
                        ]
                        for step in (steps if i % 2 == 0 else reversed(steps)):
                            step()
                            time.sleep(0.1)
                finally:
                    for path in (base, dup):
                        if os.path.exists(path):
                            os.unlink(path)
    finally:
        loop.close()
        if var:  # the cache copies of the bases: disk is limited
            shutil.rmtree(var, ignore_errors=True)
        shutil.rmtree(raw.base_dir, ignore_errors=True)
    for size in sizes:
        row.measures.append(Measure(
            f"{_label(size)} base, cached: start → `running`", "ms",
            warm[size], "`cp` base + raw QEMU on the copy → QMP answered",
            copy[size]))
    for size in sizes:
        row.measures.append(Measure(
            f"{_label(size)} base, cold (copy into the cache first)", "ms",
            cold[size], "`cp` base + raw QEMU on the copy (as above)",
            copy[size], note="one sample: only the first start copies"))
    small, large = sizes[0], sizes[-1]
    row.measures.append(Measure(
        f"cached start, {_label(large)} base", "ms", warm[large],
        f"cached start, {_label(small)} base", warm[small],
        Target("ratio", "<=", 1.25, f"flat from 10 MB to {_label(large)} "
               "(≤ 1.25×)")))
    row.measures.append(Measure(
        f"full copy peer, {_label(large)} base", "ms", copy[large],
        f"full copy peer, {_label(small)} base", copy[small],
        note="how the peer grows, for comparison with the line above"))
    cps = ", ".join(f"{_label(s)} {median(cp_only[s]):.0f} ms" for s in sizes)
    row.notes += [
        f"{reps} rounds per size after one cold start (which fills the "
        "worker's image cache) and one untimed peer warm-up, worker and peer "
        "alternating. Bases: the boot-sector guest in the first 4 KiB, then "
        "`os.urandom` data; they lie in the worker's `VAR/storage` and the "
        "copies in the same filesystem. Of the peer's time, `cp` alone "
        f"(medians): {cps}.",
        "The flatness target is our reading of \"flat start time\": the "
        "cached start at the largest base at most 1.25× the one at 10 MB.",
    ] + skipped
    return row


def _copy_cycle(loop, raw, base: str, dup: str, name: str) -> tuple[float, float]:
    t0 = time.perf_counter()
    subprocess.run(["cp", base, dup], check=True)
    copied = time.perf_counter() - t0
    launched = loop.run_until_complete(raw.launch(name, image=dup))
    total = copied + launched.ready
    CHILDREN.kill(launched.pid)
    raw.remove(launched)
    os.unlink(dup)
    return total, copied


def _collect_copy(loop, raw, base, dup, i, totals, cps) -> None:
    total, copied = _copy_cycle(loop, raw, base, dup, f"c{i}")
    totals.append(total * MS)
    cps.append(copied * MS)


# -- save throughput ------------------------------------------------------------

def _poweroff_guest(ctx: Context, folder: str, size: int) -> str:
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    import guests
    work = pathlib.Path(ctx.base) / "save-guest"
    work.mkdir(exist_ok=True)
    built = guests.build_guest("poweroff", work, disk_size=size)
    with open(built, "r+b") as f:  # as tests/test_cache.py publish does
        f.seek(4096)
        left = size - 4096
        while left > 0:
            n = min(CHUNK, left)
            f.write(os.urandom(n))
            left -= n
    dest = os.path.join(folder, "poweroff.img")
    shutil.move(str(built), dest)
    shutil.rmtree(work, ignore_errors=True)
    return dest


def _worker_save(w: WorkerProcess, name: str, image: str, target: str,
                 timeout: float = 300.0) -> float:
    """Start the poweroff guest with ``target``; return halted → saved (s)."""
    uuid = w.ok("start", name=name, cpu_count=1, mem_size=32,
                hda_image=image, hda_save_to=target)["uuid"]
    deadline = time.monotonic() + timeout
    while True:
        body = w.ok("status", uuid=uuid)
        if body["status"] == "stopped":
            break
        if body["status"] in ("failed to start", "failed to save",
                              "destroyed"):
            raise WorkerError(f"save VM {name} is {body['status']}: "
                              f"{body['message']}")
        if time.monotonic() > deadline:
            raise WorkerError(f"save VM {name} still {body['status']} after "
                              f"{timeout:g} s")
        time.sleep(0.02)
    events: dict[str, float] = {}
    for r in w.journal_records():
        if r.get("uuid") == uuid and r["type"] in ("halted", "save_attempt",
                                                  "saved"):
            events.setdefault(r["type"], float(r["ts"]))  # the first of each
    if "halted" not in events or "saved" not in events:
        raise WorkerError(f"journal of {name} lacks halted/saved: {events}")
    if "save_attempt" in events:
        PICKUP.append((events["save_attempt"] - events["halted"]) * MS)
    return events["saved"] - events["halted"]


#: halted → first save_attempt (ms) of every save of the row: job pickup.
PICKUP: list[float] = []


def save_row(ctx: Context) -> Row:
    size = ctx.pick(64 * MB, 1 << 30)
    reps = ctx.pick(2, 3)
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from servers import FileServer
    row = Row("save", f"Save throughput: halt → `saved`, {_label(size)} "
                      "disk, vs `cp` and `curl -T`")
    curl = shutil.which("curl")
    PICKUP.clear()
    file_ours, file_cp, file_sync, http_ours, http_curl = [], [], [], [], []
    convert: list[float] = []
    var = ""
    try:
        with ctx.worker("w-save") as w:
            var = w.var
            image = _poweroff_guest(ctx, w.storage, size)
            served = os.path.join(ctx.base, "save-http")
            uploads = os.path.join(ctx.base, "save-uploads")
            os.makedirs(served, exist_ok=True)
            os.makedirs(uploads, exist_ok=True)
            with FileServer(served, uploads) as http:
                # What flattening alone costs: an untouched qcow2 overlay on
                # the image, converted to raw (the worker's first step).
                overlay = os.path.join(ctx.base, "save-overlay.qcow2")
                subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2",
                                "-F", "raw", "-b", image, overlay], check=True)
                # Warm-up: fills the cache, the page cache, both paths.
                _worker_save(w, "warm", image,
                             os.path.join(w.storage, "saved-warm.img"))
                _unlink(os.path.join(w.storage, "saved-warm.img"))
                for i in range(reps):
                    target = os.path.join(w.storage, f"saved-{i}.img")
                    copy = os.path.join(w.storage, f"cp-{i}.img")
                    put = f"put-{i}.img"
                    steps = [
                        lambda: file_ours.append(
                            _worker_save(w, f"f{i}", image, target) * MS),
                        lambda: file_cp.append(_timed(["cp", image, copy])),
                        lambda: file_sync.append(
                            _timed(["sh", "-c", 'cp "$1" "$2" && sync "$2"',
                                    "sh", image, copy + ".s"])),
                        lambda: http_ours.append(_worker_save(
                            w, f"h{i}", image, http.url(put)) * MS),
                    ]
                    steps.append(lambda: convert.append(_timed(
                        ["qemu-img", "convert", "-q", "-f", "qcow2", "-O",
                         "raw", overlay, copy + ".c"])))
                    if curl:
                        steps.append(lambda: http_curl.append(_timed(
                            [curl, "-sS", "-f", "-o", "/dev/null", "-T",
                             image, http.url(f"curl-{i}.img")])))
                    for step in (steps if i % 2 == 0 else reversed(steps)):
                        step()
                        time.sleep(0.1)
                    for path in (target, copy, copy + ".s", copy + ".c",
                                 os.path.join(uploads, put),
                                 os.path.join(uploads, f"curl-{i}.img")):
                        _unlink(path)
    finally:
        if var:
            shutil.rmtree(var, ignore_errors=True)
        _unlink(os.path.join(ctx.base, "save-overlay.qcow2"))
        for d in ("save-http", "save-uploads"):
            shutil.rmtree(os.path.join(ctx.base, d), ignore_errors=True)
    mb = size / MB
    thr = lambda vals: [mb / (v / MS) for v in vals]  # noqa: E731
    row.measures += [
        Measure("to a file in `VAR/storage`: throughput", "MB/s",
                thr(file_ours), "`cp` to the same folder", thr(file_cp),
                Target("ratio", ">=", 0.8, "≥ 0.8× cp")),
        Measure("to a file (same)", "MB/s", thr(file_ours),
                "`cp` + `sync FILE` (fsync'd, as the worker does)",
                thr(file_sync)),
        Measure("to a file (same)", "MB/s", thr(file_ours),
                "`qemu-img convert` overlay → raw alone (no fsync, no "
                "check)", thr(convert),
                note="the flattening step by itself, to show its share"),
        Measure("HTTP PUT to the loopback FileServer: throughput", "MB/s",
                thr(http_ours), "`curl -T` to the same server",
                thr(http_curl)),
        Measure("to a file: `halted` → `saved`", "ms", file_ours,
                "`cp`", file_cp),
    ]
    row.notes += [
        f"{reps} rounds after one warm-up save, all peers alternating. The "
        "guest powers off at once; the worker's time runs from its journal's "
        "`halted` event to `saved` and covers flattening overlay + base "
        "(`qemu-img convert`, O_DIRECT and out-of-order writes where the "
        "folder allows them) under a temporary name, fsync and the rename "
        "(file target), or the streamed PUT (HTTP target). `cp` writes to "
        "the page cache and does not fsync: a power cut just after it "
        "loses the copy, which is why the worker's fair peer is `cp` + "
        "`sync` (the worker says `saved`, and drops the VM's disk, only "
        "once the image is on disk).",
        "Of the worker's time, `halted` → first `save_attempt` event (the "
        f"save job picked up): median {median(PICKUP):.1f} ms over "
        f"{len(PICKUP)} saves; the rest is flatten + upload + checks.",
        "The HTTP server is tests/servers.py `FileServer` (Python "
        "http.server, in the harness process) for both the worker and curl."
        + ("" if curl else " curl is not installed: no `curl -T` figure."),
    ]
    return row


def _timed(argv: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(argv, check=True, stdin=subprocess.DEVNULL)
    return (time.perf_counter() - t0) * MS


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
