"""The journal: fsync'd appends/s vs SQLite WAL, and replay time.

Appends go through ``vmworker.journal.Journal`` exactly as the worker uses
it (``replay()`` once, then ``append(dict)``, which returns only after an
fsync, sharing fsyncs between concurrent writers). The peer is SQLite in
WAL mode with ``synchronous=FULL``: one INSERT and one COMMIT per record,
each thread with its own connection. Both write to the same filesystem,
for a fixed time, 1 and 8 threads, alternating.

Replay reads a journal of N records (written directly with
``journal.frame``: a realistic mix of the five events of a VM's life).
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import time
import uuid as uuidlib

from vmworker import state
from vmworker.journal import Journal, frame, paused_gc

from . import timed
from .context import Context
from .results import Measure, Row, Target

WRITERS = (1, 8)


def journal_row(ctx: Context) -> Row:
    reps = ctx.pick(2, 3)
    seconds = ctx.pick(1.0, 3.0)
    records = ctx.pick(100_000, 1_000_000)
    row = Row("journal", "Journal: fsync'd appends and replay")
    scratch = os.path.join(ctx.base, "journal-bench")
    os.makedirs(scratch, exist_ok=True)
    for writers in WRITERS:
        ours, peer = [], []
        for i in range(reps):
            steps = [lambda: ours.append(_journal_rate(scratch, writers, seconds)),
                     lambda: peer.append(_sqlite_rate(scratch, writers, seconds))]
            for step in (steps if i % 2 == 0 else reversed(steps)):
                step()
        target = (Target("ratio", ">=", 2.0, "≥ 2× SQLite WAL")
                  if writers == 8 else None)
        row.measures.append(Measure(
            f"appends/s, {writers} writer thread{'s' if writers > 1 else ''}",
            "rec/s", ours, "SQLite WAL, synchronous=FULL, INSERT+COMMIT",
            peer, target))
    replay, fold = _replay(scratch, records, reps)
    limit = 3.0 * records / 1_000_000
    scaled = "" if records == 1_000_000 else " (3 s per 10⁶, scaled)"
    row.measures.append(Measure(
        f"replay of {records:,} records (`Journal.replay`)", "s", replay,
        target=Target("value", "<=", limit, f"< {limit:g} s{scaled}")))
    row.measures.append(Measure(
        "… then folding them into VM records (`state.fold`, GC paused as "
        "at start-up)", "s", fold,
        note="informational: the rest of the worker's start-up"))
    shutil.rmtree(scratch, ignore_errors=True)
    row.notes += [
        f"Appends: {reps} runs of {seconds:g} s per configuration, "
        "alternating journal and SQLite; records like the worker's "
        "`spawned` event (≈150 bytes of JSON). The scratch folder lies on "
        "the same filesystem as the worker's var dir (see Machine).",
        f"Replay: {reps} runs over one file of {records:,} records "
        f"({records // 5:,} VMs × accepted, image_fetched, spawned, running, "
        "destroyed); the first run reads from the page cache like the rest "
        "(the file was just written).",
    ]
    return row


def _event(uuid: str) -> dict:
    return {"type": "spawned", "uuid": uuid, "ts": time.time(),
            "pid": 123456, "create_time": time.time()}


def _run_threads(writers: int, seconds: float, body) -> float:
    """Run ``body(stop_at) -> count`` on ``writers`` threads; return rate."""
    counts = [0] * writers

    def count(k: int, stop_at: float) -> None:
        counts[k] = body(stop_at)

    elapsed = timed.run_for(writers, seconds, count)
    return sum(counts) / elapsed


def _journal_rate(scratch: str, writers: int, seconds: float) -> float:
    folder = os.path.join(scratch, f"journal-{uuidlib.uuid4().hex[:8]}")
    journal = Journal(folder)
    journal.replay()
    uuid = str(uuidlib.uuid4())

    def body(stop_at: float) -> int:
        n = 0
        while time.perf_counter() < stop_at:
            journal.append(_event(uuid))
            n += 1
        return n

    try:
        return _run_threads(writers, seconds, body)
    finally:
        journal.close()
        shutil.rmtree(folder, ignore_errors=True)


def _sqlite_rate(scratch: str, writers: int, seconds: float) -> float:
    path = os.path.join(scratch, f"sqlite-{uuidlib.uuid4().hex[:8]}.db")
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("CREATE TABLE events (id INTEGER PRIMARY KEY, body TEXT)")
    uuid = str(uuidlib.uuid4())

    def body(stop_at: float) -> int:
        db = sqlite3.connect(path, timeout=30)
        try:
            db.execute("PRAGMA synchronous=FULL")
            n = 0
            while time.perf_counter() < stop_at:
                db.execute("INSERT INTO events (body) VALUES (?)",
                           (json.dumps(_event(uuid), separators=(",", ":"),
                                       sort_keys=True),))
                db.commit()
                n += 1
            return n
        finally:
            db.close()

    try:
        return _run_threads(writers, seconds, body)
    finally:
        for suffix in ("", "-wal", "-shm"):
            try:
                os.unlink(path + suffix)
            except FileNotFoundError:
                pass


def _write_journal(folder: str, records: int) -> None:
    os.makedirs(folder, exist_ok=True)
    params = {"name": "", "cpu_count": 1, "mem_size": 32,
              "hda_image": "/var/lib/vmworker/storage/idle.img",
              "hdb_image": "", "cd_image": "", "hda_save_to": "",
              "hdb_save_to": "", "run_agent": False, "soft_list": ""}
    ts = 1.8e9
    with open(os.path.join(folder, "journal.log"), "wb") as f:
        chunk: list[bytes] = []
        for vm in range(records // 5):
            uuid = str(uuidlib.UUID(int=vm))
            params["name"] = f"vm{vm}"
            folder_vm = f"/var/lib/vmworker/vms/{uuid}"
            for event in (
                    {"type": "accepted", "params": params},
                    {"type": "image_fetched", "slot": "hda", "format": "raw",
                     "path": f"{folder_vm}/disk-hda.img", "size": 1 << 20},
                    {"type": "spawned", "pid": 100000 + vm % 100000,
                     "create_time": ts},
                    {"type": "running", "vnc": "127.0.0.1:5900"},
                    {"type": "destroyed"}):
                ts += 0.001
                chunk.append(frame({"uuid": uuid, "ts": ts, **event}))
            if len(chunk) >= 50_000:
                f.write(b"".join(chunk))
                chunk.clear()
        f.write(b"".join(chunk))


def _replay(scratch: str, records: int, reps: int) -> tuple[list[float], list[float]]:
    folder = os.path.join(scratch, "replay")
    _write_journal(folder, records)
    replay, fold = [], []
    for _ in range(reps):
        journal = Journal(folder)
        t0 = time.perf_counter()
        got = journal.replay()
        replay.append(time.perf_counter() - t0)
        journal.close()
        if len(got) != records // 5 * 5:
            raise RuntimeError(f"replay returned {len(got)} records, "
                               f"wrote {records // 5 * 5}")
        t0 = time.perf_counter()
        with paused_gc():  # as the worker's start-up (VMService.load) does
            state.fold(got)
        fold.append(time.perf_counter() - t0)
        del got
    shutil.rmtree(folder, ignore_errors=True)
    return replay, fold
