"""The on-disk event log: vmworker.journal (tmp_path, no worker around it).

Covers the frame format, replay after reopen, torn tails cut at every byte,
corruption in the middle, group commit under concurrency (fsyncs counted)
and a failing fsync.
"""

from __future__ import annotations

import errno
import json
import os
import struct
import threading
import time
import zlib

import pytest

from vmworker import journal as jmod
from vmworker.errors import JournalCorrupt, JournalError
from vmworker.journal import Journal, frame, parse, read_records


def rec(i: int, **extra) -> dict:
    return {"type": "saved", "uuid": f"vm-{i % 7}", "ts": 1000.0 + i,
            "n": i, **extra}


def journal_file(directory) -> str:
    return os.path.join(str(directory), "journal.log")


def broken_files(directory) -> list[str]:
    return sorted(f for f in os.listdir(directory) if f.endswith(".broken"))


def write_journal(directory, records) -> tuple[bytes, list[int]]:
    """Append ``records`` through a Journal; return the bytes and offsets."""
    j = Journal(str(directory))
    assert j.replay() == []
    for r in records:
        j.append(r)
    j.close()
    with open(journal_file(directory), "rb") as f:
        data = f.read()
    offsets, pos = [], 0
    for r in records:
        offsets.append(pos)
        pos += len(frame(r))
    assert pos == len(data)
    return data, offsets


def reopen(directory) -> tuple[Journal, list[dict]]:
    j = Journal(str(directory))
    return j, j.replay()


class CountingFsync:
    """os.fsync with a counter (and an optional delay, like a real disk)."""

    def __init__(self, delay: float = 0.0):
        self.real = os.fsync
        self.calls = 0
        self.delay = delay
        self.lock = threading.Lock()

    def __call__(self, fd):
        with self.lock:
            self.calls += 1
        if self.delay:
            time.sleep(self.delay)
        return self.real(fd)


# -- frame and parse ----------------------------------------------------------


def test_frame_layout():
    record = {"uuid": "u", "type": "accepted", "ts": 1.5, "params": {"b": 2,
                                                                    "a": 1}}
    data = frame(record)
    length, crc = struct.unpack_from("<II", data)
    payload = data[8:]
    assert length == len(payload)
    assert crc == zlib.crc32(payload)
    assert json.loads(payload) == record
    # compact and sorted: the same record always frames to the same bytes
    assert payload == json.dumps(record, separators=(",", ":"),
                                 sort_keys=True).encode()
    assert frame(dict(reversed(list(record.items())))) == data


def test_parse_round_trip():
    records = [rec(i, text="é ✓ \u2028 \"quoted\"\n", nested={"l": [1, None]})
               for i in range(300)]
    data = b"".join(frame(r) for r in records)
    assert parse(data) == (records, len(data))


def test_parse_empty():
    assert parse(b"") == ([], 0)


def test_parse_stops_before_a_torn_record():
    whole = frame(rec(1)) + frame(rec(2))
    torn = frame(rec(3))
    for cut in range(len(torn)):
        records, valid = parse(whole + torn[:cut])
        assert records == [rec(1), rec(2)]
        assert valid == len(whole)


def test_parse_names_the_path_on_corruption():
    data = bytearray(frame(rec(1)) + frame(rec(2)))
    data[10] ^= 0x01
    with pytest.raises(JournalCorrupt, match=r"/some/journal.log .*offset 0"):
        parse(bytes(data), "/some/journal.log")


def test_impossible_length_is_corruption():
    data = struct.pack("<II", jmod.MAX_RECORD + 1, 0) + b"x" * 32
    with pytest.raises(JournalCorrupt, match="length"):
        parse(data, "j")


def test_checksummed_garbage_is_corruption():
    payload = b"not json"
    data = struct.pack("<II", len(payload), zlib.crc32(payload)) + payload
    with pytest.raises(JournalCorrupt, match="not JSON"):
        parse(data + frame(rec(1)), "j")


# -- appends and replay -----------------------------------------------------


def test_round_trip_of_many_records(tmp_path):
    records = [rec(i, pad="x" * (i % 50)) for i in range(500)]
    write_journal(tmp_path, records)
    j, replayed = reopen(tmp_path)
    j.close()
    assert replayed == records
    assert list(read_records(journal_file(tmp_path))) == records
    assert broken_files(tmp_path) == []


def test_replay_creates_the_directory_and_file(tmp_path):
    directory = tmp_path / "var" / "journal"
    j = Journal(str(directory))
    assert j.replay() == []
    j.append(rec(1))
    j.close()
    assert os.path.isfile(journal_file(directory))
    assert oct(os.stat(journal_file(directory)).st_mode & 0o777) == "0o600"


def test_reopen_appends_after_existing_records(tmp_path):
    write_journal(tmp_path, [rec(0), rec(1)])
    j, replayed = reopen(tmp_path)
    assert replayed == [rec(0), rec(1)]
    j.append(rec(2))
    j.append(rec(3))
    j.close()
    j, replayed = reopen(tmp_path)
    j.close()
    assert replayed == [rec(0), rec(1), rec(2), rec(3)]


def test_submit_fixes_the_order_and_wait_is_idempotent(tmp_path):
    j, _ = reopen(tmp_path)
    first = j.submit(rec(1))
    second = j.submit(rec(2))
    assert second > first
    j.wait(second)   # makes both durable
    j.wait(first)    # already durable: returns at once
    j.wait(second)
    j.close()
    assert reopen(tmp_path)[1] == [rec(1), rec(2)]


def test_append_returns_only_after_fsync(tmp_path, monkeypatch):
    j, _ = reopen(tmp_path)
    sizes = []

    def fsync(fd):
        sizes.append(os.fstat(fd).st_size)
        return real(fd)

    real = os.fsync
    monkeypatch.setattr(jmod.os, "fsync", fsync)
    j.append(rec(1))
    assert sizes == [len(frame(rec(1)))]  # the record was in the file
    j.close()


def test_close_writes_what_was_submitted(tmp_path):
    j, _ = reopen(tmp_path)
    j.submit(rec(1))
    j.submit(rec(2))
    j.close()
    assert reopen(tmp_path)[1] == [rec(1), rec(2)]


# -- torn tails ---------------------------------------------------------------


def test_torn_tail_at_every_byte_of_the_last_record(tmp_path, monkeypatch):
    records = [rec(i) for i in range(4)]
    data, offsets = write_journal(tmp_path / "orig", records)
    last = offsets[-1]
    prefix = records[:-1]
    new = rec(99, type="destroyed")
    fsyncs = CountingFsync()
    monkeypatch.setattr(jmod.os, "fsync", fsyncs)
    for cut in range(last + 1, len(data)):
        d = tmp_path / f"cut{cut}"
        d.mkdir()
        with open(journal_file(d), "wb") as f:
            f.write(data[:cut])
        j, replayed = reopen(d)
        assert replayed == prefix, cut
        assert os.path.getsize(journal_file(d)) == last, cut
        broken = broken_files(d)
        assert len(broken) == 1, cut
        assert broken[0].startswith("journal.log.")
        with open(os.path.join(d, broken[0]), "rb") as f:
            assert f.read() == data[last:cut], cut
        j.append(new)
        j.close()
        j, replayed = reopen(d)
        j.close()
        assert replayed == prefix + [new], cut
        assert len(broken_files(d)) == 1, cut
    assert fsyncs.calls > 0  # the repair and the appends were made durable


def test_cut_at_a_record_boundary_is_not_torn(tmp_path):
    records = [rec(i) for i in range(4)]
    data, offsets = write_journal(tmp_path / "orig", records)
    for n, cut in enumerate(offsets + [len(data)]):
        d = tmp_path / f"cut{cut}"
        d.mkdir()
        with open(journal_file(d), "wb") as f:
            f.write(data[:cut])
        j, replayed = reopen(d)
        j.close()
        assert replayed == records[:n]
        assert broken_files(d) == []


@pytest.mark.parametrize("where", ["crc", "payload-start", "payload-end"])
def test_flipped_byte_in_the_last_record_is_a_torn_tail(tmp_path, where):
    records = [rec(i) for i in range(5)]
    data, offsets = write_journal(tmp_path, records)
    last = offsets[-1]
    pos = {"crc": last + 5, "payload-start": last + 8,
           "payload-end": len(data) - 1}[where]
    damaged = bytearray(data)
    damaged[pos] ^= 0x20
    with open(journal_file(tmp_path), "wb") as f:
        f.write(damaged)
    j, replayed = reopen(tmp_path)
    assert replayed == records[:-1]
    assert os.path.getsize(journal_file(tmp_path)) == last
    [broken] = broken_files(tmp_path)
    with open(tmp_path / broken, "rb") as f:
        assert f.read() == bytes(damaged[last:])
    j.append(rec(5))
    j.close()
    assert reopen(tmp_path)[1] == records[:-1] + [rec(5)]


# -- corruption in the middle -------------------------------------------------


def test_flipped_byte_in_a_middle_record_is_corruption(tmp_path):
    records = [rec(i) for i in range(5)]
    data, offsets = write_journal(tmp_path / "orig", records)
    start, end = offsets[2], offsets[3]
    # every byte of the checksum and the payload of record 2
    for pos in range(start + 4, end):
        d = tmp_path / f"flip{pos}"
        d.mkdir()
        damaged = bytearray(data)
        damaged[pos] ^= 0x01
        with open(journal_file(d), "wb") as f:
            f.write(damaged)
        with pytest.raises(JournalCorrupt) as info:
            Journal(str(d)).replay()
        text = str(info.value)
        assert journal_file(d) in text, pos
        assert f"offset {start}" in text, pos
        assert "corrupt" in text
        # nothing was repaired behind the operator's back
        with open(journal_file(d), "rb") as f:
            assert f.read() == bytes(damaged)
        assert broken_files(d) == []


def test_impossible_length_in_a_middle_record_is_corruption(tmp_path):
    records = [rec(i) for i in range(5)]
    data, offsets = write_journal(tmp_path, records)
    damaged = bytearray(data)
    damaged[offsets[2] + 3] ^= 0xFF  # top byte of the length
    with open(journal_file(tmp_path), "wb") as f:
        f.write(damaged)
    with pytest.raises(JournalCorrupt, match=f"offset {offsets[2]}"):
        Journal(str(tmp_path)).replay()


@pytest.mark.parametrize("byte", [1, 2])
def test_damaged_length_in_a_middle_record_is_corruption(tmp_path, byte):
    records = [rec(i) for i in range(5)]
    data, offsets = write_journal(tmp_path, records)
    damaged = bytearray(data)
    damaged[offsets[1] + byte] ^= 0x10  # length grows by 4 KiB or 1 MiB
    with open(journal_file(tmp_path), "wb") as f:
        f.write(damaged)
    try:
        with pytest.raises(JournalCorrupt, match=f"offset {offsets[1]}"):
            Journal(str(tmp_path)).replay()
    finally:
        # what happens today: records 1..4 are gone from the log
        with open(journal_file(tmp_path), "rb") as f:
            assert f.read() == bytes(damaged), "valid records were cut off"


def test_zero_filled_tail_is_a_torn_tail(tmp_path):
    records = [rec(i) for i in range(3)]
    data, _ = write_journal(tmp_path, records)
    with open(journal_file(tmp_path), "ab") as f:
        f.write(b"\0" * 4096)
    j, replayed = reopen(tmp_path)
    j.close()
    assert replayed == records
    assert os.path.getsize(journal_file(tmp_path)) == len(data)
    assert len(broken_files(tmp_path)) == 1


def test_two_torn_tails_in_one_second_are_both_kept(tmp_path, monkeypatch):
    monkeypatch.setattr(jmod.time, "time", lambda: 1_700_000_000.0)
    write_journal(tmp_path, [rec(0)])
    for n in (1, 2):
        with open(journal_file(tmp_path), "ab") as f:
            f.write(frame(rec(n))[:-3])
        j, replayed = reopen(tmp_path)
        j.close()
        assert replayed == [rec(0)]
    assert len(broken_files(tmp_path)) == 2


# -- group commit ---------------------------------------------------------


def test_group_commit_of_concurrent_appends(tmp_path, monkeypatch):
    threads_n, per_thread = 8, 200
    j, _ = reopen(tmp_path)
    # a little fsync latency, as on a real disk, lets appends pile up
    fsyncs = CountingFsync(delay=0.0005)
    monkeypatch.setattr(jmod.os, "fsync", fsyncs)
    barrier = threading.Barrier(threads_n)
    errors = []

    def worker(t):
        try:
            barrier.wait()
            for i in range(per_thread):
                j.append({"t": t, "i": i})
        except BaseException as err:  # pragma: no cover - reported below
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(t,))
               for t in range(threads_n)]
    started = time.monotonic()
    for th in threads:
        th.start()
    for th in threads:
        th.join(30)
    elapsed = time.monotonic() - started
    assert not errors
    assert not any(th.is_alive() for th in threads)
    calls = fsyncs.calls
    j.close()
    monkeypatch.undo()

    j, replayed = reopen(tmp_path)
    j.close()
    total = threads_n * per_thread
    assert len(replayed) == total
    for t in range(threads_n):
        assert [r["i"] for r in replayed if r["t"] == t] == list(
            range(per_thread))
    # group commit: many records share one fsync
    assert 1 <= calls < total / 2, (calls, elapsed)


# -- failing disk ---------------------------------------------------------


def failing_fsync(fd):
    raise OSError(errno.EIO, "Input/output error")


def test_fsync_failure_fails_this_and_every_later_change(tmp_path,
                                                         monkeypatch):
    j, _ = reopen(tmp_path)
    j.append(rec(0))
    monkeypatch.setattr(jmod.os, "fsync", failing_fsync)
    with pytest.raises(JournalError) as info:
        j.append(rec(1))
    assert info.value.http_status == 503
    assert "Input/output error" in str(info.value)
    monkeypatch.undo()  # the disk "works" again: the journal stays refused
    with pytest.raises(JournalError) as info:
        j.submit(rec(2))
    assert info.value.http_status == 503
    assert "restart" in str(info.value)
    with pytest.raises(JournalError):
        j.append(rec(3))
    j.close()
    assert reopen(tmp_path)[1][0] == rec(0)


def test_fsync_failure_fails_every_record_of_the_batch(tmp_path, monkeypatch):
    j, _ = reopen(tmp_path)
    tickets = [j.submit(rec(i)) for i in range(3)]
    monkeypatch.setattr(jmod.os, "fsync", failing_fsync)
    for ticket in tickets:
        with pytest.raises(JournalError):
            j.wait(ticket)
    monkeypatch.undo()
    j.close()


def test_a_failed_flush_is_never_counted_as_durable(tmp_path, monkeypatch):
    j, _ = reopen(tmp_path)
    j.append(rec(0))
    ticket = j.submit(rec(1))

    def broken_write(fd, data):
        raise ValueError("not an OSError")

    monkeypatch.setattr(jmod.os, "write", broken_write)
    with pytest.raises(Exception):
        j.wait(ticket)
    monkeypatch.undo()
    with pytest.raises(JournalError):
        j.wait(ticket)  # today: returns, as if rec(1) were on disk
    j.close()


def test_append_after_close_is_refused(tmp_path):
    j, _ = reopen(tmp_path)
    j.append(rec(0))
    j.close()  # e.g. the engine stops while a request is still handled
    with pytest.raises(JournalError):
        j.append(rec(1))
    j, replayed = reopen(tmp_path)
    j.close()
    assert replayed == [rec(0)]


@pytest.mark.timeout(10)
def test_close_waits_for_a_flush_in_progress(tmp_path, monkeypatch):
    j, _ = reopen(tmp_path)
    real = os.fsync
    in_fsync, release = threading.Event(), threading.Event()

    def slow_fsync(fd):
        in_fsync.set()
        release.wait(5)
        return real(fd)

    monkeypatch.setattr(jmod.os, "fsync", slow_fsync)
    outcome = []

    def appender():
        try:
            j.append(rec(1))
            outcome.append("ok")
        except Exception as err:
            outcome.append(err)

    writer = threading.Thread(target=appender)
    writer.start()
    try:
        assert in_fsync.wait(5)
        closer = threading.Thread(target=j.close)
        closer.start()
        closer.join(0.2)
        closed_early = not closer.is_alive()
    finally:
        release.set()
        writer.join(5)
    closer.join(5)
    monkeypatch.undo()
    assert not closed_early, "close() returned while a flush was running"
    assert outcome == ["ok"]
