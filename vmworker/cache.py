"""The shared image cache under ``VAR/images/``.

Content is stored by its sha256 (``<sha256>.img``, a "blob"), and each
source URI has a small record (``uri-<key>.json``: the blob it last gave,
its size, format, and what validates it: ETag / Last-Modified / size, or
size and mtime for local files). A blob is never rewritten: VMs' overlays
read it as their backing file, so a source whose content changed gets a new
blob while the old one stays for the VMs that use it.

A download goes to ``dl-<key>.part`` and becomes a blob only after its size
was checked, its sha256 computed (and compared with the caller's when
given) and its format probed, so the cache never holds a partial or
unchecked file under a blob's name, even after a kill. Concurrent requests
for one URI share one download. Records are revalidated against the source
on every use (a conditional GET for HTTP), and the least recently used blobs
that no live VM needs are evicted past a size limit.

Beside each blob that a VM booted from lies its overlay template
(``<sha256>.overlay``): a fresh qcow2 overlay on the blob, made once by
qemu-img. Every overlay of one blob is byte for byte the same (the blob's
path is the backing file, and qcow2 headers carry no identity), so a VM's
disk is a copy of the template: a file copy of a few hundred kilobytes
instead of a qemu-img process on every start.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import threading
import time
from typing import Callable, Iterable

from . import fsutil, images
from .errors import ImageError

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class CachedImage:
    path: str
    format: str
    size: int
    sha256: str


class _Flight:
    """One download in progress, which later callers wait for."""

    def __init__(self):
        self.done = threading.Event()
        self.result: CachedImage | None = None
        self.error: BaseException | None = None
        self.progress: tuple[int, int | None] = (0, None)


def key_of(uri: str) -> str:
    return hashlib.sha256(uri.encode()).hexdigest()[:40]


class ImageCache:
    def __init__(self, directory: str, *, roots, qemu_img: str,
                 timeout: tuple[float, float], max_bytes: int,
                 pinned: Callable[[], Iterable[str]] = lambda: ()):
        self.directory = directory
        self.roots = roots
        self.qemu_img = qemu_img
        self.timeout = timeout
        self.max_bytes = max_bytes
        self.pinned = pinned
        self._lock = threading.Lock()
        self._flights: dict[str, _Flight] = {}
        self._template_lock = threading.Lock()
        os.makedirs(directory, exist_ok=True)
        self._drop_partials()

    def blob(self, sha256: str) -> str:
        return os.path.join(self.directory, f"{sha256}.img")

    def _template(self, sha256: str) -> str:
        return os.path.join(self.directory, f"{sha256}.overlay")

    def _record_path(self, key: str) -> str:
        return os.path.join(self.directory, f"uri-{key}.json")

    def _drop_partials(self) -> None:
        """A .part left by a killed worker is never trusted; start over."""
        for name in os.listdir(self.directory):
            if name.endswith((".part", ".json.tmp")):
                fsutil.unlink(os.path.join(self.directory, name))

    # -- the one entry point --------------------------------------------------

    def get(self, uri: str, *, sha256: str = "",
            progress: images.Progress | None = None,
            cancelled: Callable[[], bool] = lambda: False) -> CachedImage:
        """A checked local copy of ``uri``: cached, revalidated or fetched."""
        key = key_of(uri)
        with self._lock:
            flight = self._flights.get(key)
            leader = flight is None
            if leader:
                flight = self._flights[key] = _Flight()
        if leader:
            try:
                flight.result = self._obtain(key, uri, flight, progress)
            except BaseException as err:
                flight.error = err
            finally:
                with self._lock:
                    del self._flights[key]
                flight.done.set()
        else:
            while not flight.done.wait(0.1):
                if progress is not None:
                    progress(*flight.progress)
                if cancelled():
                    raise ImageError("cancelled")
        if flight.error is not None:
            raise flight.error
        result = flight.result
        if sha256 and result.sha256 != sha256.lower():
            raise ImageError(f"sha256 mismatch for {uri}: expected {sha256}, "
                             f"got {result.sha256}")
        return result

    def _obtain(self, key: str, uri: str, flight: _Flight,
                progress: images.Progress | None) -> CachedImage:
        record_path = self._record_path(key)
        record = self._read_record(record_path)
        if record is not None and not os.path.exists(self.blob(record["sha256"])):
            record = None  # its blob was evicted
        known = images.Validator(**record["validator"]) if record else None
        part = os.path.join(self.directory, f"dl-{key}.part")

        def report(done: int, total: int | None) -> None:
            flight.progress = (done, total)
            if progress is not None:
                progress(done, total)

        try:
            got = images.download(uri, part, roots=self.roots,
                                  timeout=self.timeout, progress=report,
                                  known=known)
        except images.NotModified:
            self._touch(self.blob(record["sha256"]))
            return _entry(self.blob(record["sha256"]), record)
        except BaseException:
            fsutil.unlink(part)
            raise
        try:
            info = images.probe(part, self.qemu_img)
        except ImageError:
            fsutil.unlink(part)
            raise
        record = {"uri": uri, "size": got.size, "sha256": got.sha256,
                  "format": info["format"],
                  "validator": dataclasses.asdict(got.validator),
                  "fetched": time.time()}
        blob = self.blob(got.sha256)
        if os.path.exists(blob):
            fsutil.unlink(part)  # same content as a blob we hold
            self._touch(blob)
        else:
            self._evict(need=got.size, keep=got.sha256)
            os.replace(part, blob)
        fsutil.write_json(record_path, record)
        log.info("image cache: %s stored as %s (%d bytes, %s)", uri,
                 got.sha256[:12], got.size, info["format"])
        return _entry(blob, record)

    def new_overlay(self, image: CachedImage, dest: str) -> None:
        """Make ``dest`` a fresh qcow2 overlay on the cached ``image``.

        The guest writes to the overlay only, never to the shared blob.
        """
        template = self._template(image.sha256)
        if not os.path.exists(template):
            with self._template_lock:
                if not os.path.exists(template):
                    self._make_template(image, template)
        tmp = dest + ".part"
        try:
            shutil.copyfile(template, tmp)
            os.replace(tmp, dest)
        except OSError as err:
            fsutil.unlink(tmp)
            raise ImageError(f"cannot create the overlay {dest}: "
                             f"{err.strerror}") from err

    def _make_template(self, image: CachedImage, template: str) -> None:
        # Durable before it is named: a torn template would be copied into
        # every later VM of this blob.
        tmp = template + ".part"
        try:
            images.run_qemu_img(self.qemu_img, [
                "create", "-q", "-f", "qcow2", "-F", image.format,
                "-b", image.path, tmp], timeout=120)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, template)
        finally:
            fsutil.unlink(tmp)
        fsutil.fsync_dir(self.directory)

    # -- housekeeping -----------------------------------------------------------

    def _read_record(self, path: str) -> dict | None:
        try:
            with open(path) as f:
                return json.load(f)
        except (OSError, ValueError):
            return None

    def _touch(self, data: str) -> None:
        try:
            os.utime(data)  # mtime is the LRU clock
        except OSError:
            pass

    def entries(self) -> list[tuple[str, int, float]]:
        """(sha256, size, last used) of every blob."""
        out = []
        for name in os.listdir(self.directory):
            if not name.endswith(".img"):
                continue
            try:
                st = os.stat(os.path.join(self.directory, name))
            except FileNotFoundError:
                continue
            out.append((name[:-4], st.st_size, st.st_mtime))
        return out

    def _evict(self, need: int, keep: str) -> None:
        """Drop least recently used blobs no live VM needs, to fit.

        ``pinned`` gives the sha256 of every blob a VM's overlay reads.
        """
        if self.max_bytes <= 0:
            return
        entries = self.entries()
        total = sum(size for _, size, _ in entries) + need
        if total <= self.max_bytes:
            return
        pinned = set(self.pinned()) | {keep}
        with self._lock:
            pinned |= set(self._flights)
        for key, size, _ in sorted(entries, key=lambda e: e[2]):
            if total <= self.max_bytes:
                break
            if key in pinned:
                continue
            fsutil.unlink(self._template(key))
            fsutil.unlink(self.blob(key))  # records pointing here go stale
            total -= size
            log.info("image cache: evicted %s (%d bytes)", key, size)
        if total > self.max_bytes:
            log.warning("image cache: %d bytes over its limit; every entry "
                        "is in use", total - self.max_bytes)


def _entry(blob: str, record: dict) -> CachedImage:
    return CachedImage(path=blob, format=record["format"],
                       size=int(record["size"]), sha256=record["sha256"])
