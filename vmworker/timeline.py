"""A VM's history for its web page, read from the journal without a writer.

The journal is the worker's one record of what happened, so the VM page's
timeline comes from it. Reading the whole file on every refresh would cost
a full parse every two seconds per open page (the journal grows up to
``journal_compact_mb``), so ``JournalIndex`` remembers where each VM's
records lie and reads only what was appended since its last look. It holds
the file open: after a compaction (a new file renamed over the old one) the
index still matches the file it holds until it notices the new inode and
starts again. Frames are checked with the journal's own ``parse``; a torn
or half-written record at the end is simply read again next time.
"""

from __future__ import annotations

import json
import os
import threading

from .errors import JournalCorrupt
from .journal import HEADER, MAX_RECORD, parse

#: Events shown per VM at most (the newest ones).
MAX_EVENTS = 500
CHUNK = 4 << 20


class JournalIndex:
    def __init__(self, path: str):
        self.path = path
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._inode: int | None = None
        self._offset = 0
        self._where: dict[str, list[tuple[int, int]]] = {}
        self._error = ""

    def close(self) -> None:
        with self._lock:
            self._reset(None, None)

    def _reset(self, fd: int | None, inode: int | None) -> None:
        if self._fd is not None:
            os.close(self._fd)
        self._fd, self._inode = fd, inode
        self._offset = 0
        self._where = {}
        self._error = ""

    def _catch_up(self) -> None:
        for _ in range(2):
            try:
                inode = os.stat(self.path).st_ino
            except FileNotFoundError:
                self._reset(None, None)
                return
            if inode != self._inode or self._fd is None:
                try:
                    fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
                except FileNotFoundError:
                    self._reset(None, None)
                    return
                self._reset(fd, os.fstat(fd).st_ino)
            size = os.fstat(self._fd).st_size
            if size >= self._offset:
                break
            self._reset(None, None)  # truncated under us: start again
        else:
            return
        while self._offset < size and not self._error:
            data = os.pread(self._fd, min(CHUNK, size - self._offset),
                            self._offset)
            used = self._index(data, self._offset)
            if used == 0:
                if len(data) < size - self._offset:
                    # One record bigger than a chunk: read it whole.
                    length, _ = HEADER.unpack_from(data, 0)
                    if length <= MAX_RECORD:
                        data = os.pread(self._fd, HEADER.size + length,
                                        self._offset)
                        used = self._index(data, self._offset)
                if used == 0:
                    break  # a torn tail, for now
            self._offset += used

    def _index(self, data: bytes, base: int) -> int:
        """Index whole records at the start of ``data``; return bytes used."""
        pos = 0
        while pos + HEADER.size <= len(data):
            length, _ = HEADER.unpack_from(data, pos)
            end = pos + HEADER.size + length
            if length == 0 or end > len(data):
                break
            try:
                records, used = parse(data[pos:end], self.path)
            except JournalCorrupt as err:
                self._error = str(err)
                break
            if used != end - pos or not records:
                break
            uuid = str(records[0].get("uuid"))
            self._where.setdefault(uuid, []).append((base + pos, end - pos))
            pos = end
        return pos

    def events(self, uuid: str) -> tuple[list[dict], str]:
        """The VM's records, oldest first, and an error if the journal is bad."""
        with self._lock:
            try:
                self._catch_up()
            except OSError as err:
                return [], f"cannot read the journal {self.path}: {err.strerror}"
            spots = self._where.get(uuid, [])[-MAX_EVENTS:]
            events = []
            for offset, length in spots:
                frame = os.pread(self._fd, length, offset)
                events.append(json.loads(frame[HEADER.size:]))
            return events, self._error
