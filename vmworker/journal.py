"""The on-disk event log: the single source of truth of the worker.

Every state change of every VM is one record appended to
``VAR/journal/journal.log``. A record is framed LevelDB/etcd style::

    <u32 little-endian payload length> <u32 crc32 of payload> <payload JSON>

Appends use group commit: callers ``submit`` a record (which fixes its order)
and then ``wait`` until it is durable; whoever waits first writes and fsyncs
every record queued so far, so concurrent requests share one fsync. A request
is answered only after ``wait`` returns.

Replay reads records until the end. A record cut short at the end of the file
(a crash mid-append) is a torn tail: its bytes are kept in a ``.broken`` file
beside the log and the log is truncated to the last whole record. A record
whose checksum is wrong while more data follows it is corruption, not a torn
tail: replay refuses with the file and offset, for an operator to inspect
(see README, "When the journal is damaged").

Compaction (``rewrite``) replaces the log with one ``snapshot`` record per
VM worth keeping, atomically (temp file, fsync, rename, fsync the folder).
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import json
import logging
import os
import struct
import threading
import time
import zlib
from typing import Iterator

from . import fsutil
from .errors import JournalCorrupt, JournalError

log = logging.getLogger(__name__)

HEADER = struct.Struct("<II")
MAX_RECORD = 16 << 20  # a record is a small JSON object; more is damage


def frame(record: dict) -> bytes:
    payload = json.dumps(record, separators=(",", ":"),
                         sort_keys=True).encode()
    return HEADER.pack(len(payload), zlib.crc32(payload)) + payload


def parse(data: bytes, path: str = "<bytes>") -> tuple[list[dict], int]:
    """Decode whole records from ``data``.

    Returns the records and the offset where the valid prefix ends. A bad
    record at the very end (short header, short payload, or bad checksum on
    the last record) ends the prefix; a bad record followed by more bytes
    raises JournalCorrupt.
    """
    payloads: list[memoryview] = []
    append = payloads.append
    offset = 0
    end = len(data)
    view = memoryview(data)
    unpack = HEADER.unpack_from
    crc32 = zlib.crc32
    size = HEADER.size
    # The loop runs once per record (10^6 at start-up for a big journal):
    # the common case is kept to a few operations, the rare ones below.
    with paused_gc():
        while offset <= end - size:
            length, crc = unpack(data, offset)
            body_end = offset + size + length
            if not 0 < length <= MAX_RECORD or body_end > end:
                _check_bad_frame(data, offset, length, path)
                break
            payload = view[offset + size:body_end]
            if crc32(payload) != crc:
                if body_end != end and not _only_zeros(data, body_end):
                    raise JournalCorrupt(
                        f"journal {path} is corrupt at offset {offset}: "
                        f"checksum mismatch with {end - body_end} bytes "
                        "after it")
                break  # the last record was torn mid-write
            append(payload)
            offset = body_end
        return _decode(payloads, path), offset


def _check_bad_frame(data: bytes, offset: int, length: int, path: str) -> None:
    """A header that cannot start a whole record: a torn tail, or damage."""
    if length == 0:  # frame() never writes an empty payload
        if _only_zeros(data, offset):
            return  # zero-filled tail: the file grew, its data never landed
        raise JournalCorrupt(
            f"journal {path} is corrupt at offset {offset}: empty record")
    if length > MAX_RECORD:
        raise JournalCorrupt(
            f"journal {path} is corrupt at offset {offset}: record length "
            f"{length} is impossible")
    if _record_follows(data, offset + HEADER.size):
        raise JournalCorrupt(
            f"journal {path} is corrupt at offset {offset}: record length "
            f"{length} runs past the end of the file, but whole records "
            "follow it")
    # else: the payload was torn


@contextlib.contextmanager
def paused_gc():
    """Pause Python's cyclic GC while a replay builds 10^6 objects.

    Each allocation burst would trigger a collection that walks every
    object made so far: about a third of a large replay's time, and of
    folding it into VM records. Neither makes cycles; the collector runs
    again afterwards.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _decode(payloads: list, path: str) -> list[dict]:
    """JSON-decode checksummed payloads: one parser call for all of them
    (several times faster than one call per record); record by record only
    to name the one that is not JSON."""
    try:
        records = json.loads(b"[" + b",".join(payloads) + b"]")
        if len(records) == len(payloads) and all(
                isinstance(r, dict) for r in records):
            return records
    except ValueError:
        pass
    records = []
    start = 0
    for payload in payloads:
        try:
            record = json.loads(bytes(payload))
        except ValueError as err:
            raise JournalCorrupt(
                f"journal {path} is corrupt at offset {start}: "
                f"checksummed record is not JSON ({err})") from err
        if not isinstance(record, dict):
            raise JournalCorrupt(
                f"journal {path} is corrupt at offset {start}: checksummed "
                "record is not a JSON object")
        records.append(record)
        start += HEADER.size + len(payload)
    return records


def _only_zeros(data: bytes, start: int) -> bool:
    return data.count(0, start) == len(data) - start


def _record_follows(data: bytes, start: int) -> bool:
    """Whether a whole, checksummed record starts anywhere after ``start``."""
    end = len(data)
    for pos in range(start, end - HEADER.size + 1):
        length, crc = HEADER.unpack_from(data, pos)
        body = pos + HEADER.size
        if 0 < length <= end - body and zlib.crc32(data[body:body + length]) == crc:
            return True
    return False


class Journal:
    """Append-only, fsync'd, group-committed log of VM events."""

    def __init__(self, directory: str):
        self.directory = directory
        self.path = os.path.join(directory, "journal.log")
        self._cond = threading.Condition()
        self._queue: list[bytes] = []
        self._submitted = 0
        self._durable = 0
        self._flushing = False
        self._failed: BaseException | None = None
        self._fd: int | None = None
        self._closed = False

    # -- start-up -----------------------------------------------------------

    def replay(self) -> list[dict]:
        """Read every whole record, repair a torn tail, open for appends."""
        os.makedirs(self.directory, exist_ok=True)
        # A compaction killed before its rename: the old log is complete.
        fsutil.unlink(self.path + ".compact")
        started = time.monotonic()
        try:
            with open(self.path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            data = b""
        records, valid = parse(data, self.path)
        if valid < len(data):
            self._keep_torn_tail(data[valid:], valid)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND,
                           0o600)
        if valid < len(data):
            os.ftruncate(self._fd, valid)
            os.fsync(self._fd)
        fsutil.fsync_dir(self.directory)
        log.info("journal: replayed %d records (%d bytes) in %.1f ms",
                 len(records), valid, (time.monotonic() - started) * 1000)
        return records

    def rewrite(self, records: list[dict]) -> None:
        """Replace the whole log with ``records`` (compaction), atomically.

        The new log is written beside the old one, fsync'd, renamed over it
        and the folder fsync'd: a kill at any step leaves either the old log
        or the new one, each of which replays to the same state. Appends
        wait meanwhile; queued ones are made durable in the old log first
        (the caller's snapshot already includes them).
        """
        tmp = self.path + ".compact"
        with self._cond:
            while self._flushing:
                self._cond.wait()
            if self._queue and self._failed is None:
                self._flush_locked()
            if self._failed is not None:
                raise JournalError(f"the journal cannot be written "
                                   f"({self._failed})")
            try:
                with open(tmp, "wb") as f:
                    for record in records:
                        f.write(frame(record))
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, self.path)
                fsutil.fsync_dir(self.directory)
            except OSError as err:
                fsutil.unlink(tmp)
                raise JournalError(f"compacting the journal failed: {err}") from err
            old, self._fd = self._fd, os.open(
                self.path, os.O_WRONLY | os.O_APPEND, 0o600)
            os.close(old)

    def size(self) -> int:
        try:
            return os.path.getsize(self.path)
        except OSError:
            return 0

    def _keep_torn_tail(self, tail: bytes, offset: int) -> None:
        base = f"{self.path}.{int(time.time())}"
        for n in itertools.count():
            broken = f"{base}.broken" if n == 0 else f"{base}.{n}.broken"
            try:
                f = open(broken, "xb")
            except FileExistsError:
                continue
            break
        with f:
            f.write(tail)
            f.flush()
            os.fsync(f.fileno())
        log.warning("journal: torn tail of %d bytes at offset %d kept in %s "
                    "and truncated", len(tail), offset, broken)

    # -- appends ------------------------------------------------------------

    def submit(self, record: dict) -> int:
        """Queue a record; its place in the log is fixed now. Returns a ticket."""
        data = frame(record)
        with self._cond:
            if self._closed:
                raise JournalError("the journal is closed (the worker is "
                                   "stopping); the change was not recorded")
            if self._failed is not None:
                raise JournalError(
                    f"the journal cannot be written ({self._failed}); the "
                    "worker refuses state changes until it is restarted")
            self._queue.append(data)
            self._submitted += 1
            return self._submitted

    def wait(self, ticket: int) -> None:
        """Return once the record behind ``ticket`` is on disk (fsync'd)."""
        with self._cond:
            while self._durable < ticket:
                if self._failed is not None:
                    raise JournalError(
                        f"journal write failed ({self._failed}); the change "
                        "was not recorded")
                if self._flushing:
                    self._cond.wait()
                    continue
                self._flush_locked()

    def append(self, record: dict) -> None:
        self.wait(self.submit(record))

    def _flush_locked(self) -> None:
        """Write and fsync everything queued; called with the lock held."""
        self._flushing = True
        batch, self._queue = self._queue, []
        upto = self._submitted
        self._cond.release()
        error: Exception | None = None
        try:
            data = b"".join(batch)
            view = memoryview(data)
            while view:
                written = os.write(self._fd, view)
                view = view[written:]
            os.fsync(self._fd)
        except Exception as err:  # not only OSError: never count it durable
            error = err
        finally:
            self._cond.acquire()
            self._flushing = False
            if error is not None:
                self._failed = error
                log.error("journal: write failed, refusing further changes: %s",
                          error)
            else:
                self._durable = upto
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            while self._flushing:
                self._cond.wait()
            if self._queue and self._failed is None:
                self._flush_locked()
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None


def read_records(path: str) -> Iterator[dict]:
    """Read-only iteration over a journal file (for tools and the web UI)."""
    with open(path, "rb") as f:
        records, _ = parse(f.read(), path)
    return iter(records)
