"""Moving image bytes onto this host, and qemu-img's part in it.

``download`` copies a source (a path inside the storage roots, ``file://``,
``http(s)://``, ``ftp://``) into a local file, hashing as it goes, resuming
an HTTP transfer with ``Range`` when the connection drops. ``probe`` asks
``qemu-img info`` (under resource limits: a crafted image must not hang
the worker) what an image is and refuses images that point at other files
(backing file, external data file). ``flatten`` turns a VM's copy-on-write
disk back into a self-contained image (the cache makes the overlays). The
format is always passed explicitly: QEMU never guesses
(CVE-2008-2004).

Foreign errors (requests, ftplib, OSError, qemu-img's exit) become
``ImageError`` here, with a sentence a person can act on.
"""

from __future__ import annotations

import dataclasses
import ftplib
import hashlib
import json
import os
import queue
import resource
import subprocess
import threading
from typing import Callable
from urllib.parse import unquote, urlsplit

import requests

from . import validation
from .errors import ImageError

CHUNK = 1 << 20
# Bytes a local copy hands to the kernel at a time (between progress reports).
COPY_STEP = 64 << 20
# Bytes read from a response at a time: on a dropped connection at most
# this much is lost before resuming.
HTTP_CHUNK = 1 << 16
RESUMES = 5
Progress = Callable[[int, int | None], None]


@dataclasses.dataclass
class Validator:
    """What tells whether a cached copy is still the source's content."""

    size: int | None = None
    etag: str = ""
    last_modified: str = ""
    mtime_ns: int = 0


@dataclasses.dataclass
class Downloaded:
    size: int
    sha256: str
    validator: Validator


class NotModified(Exception):
    """The source still has the content the cache holds (HTTP 304)."""


def _no_progress(done: int, total: int | None) -> None:
    pass


def download(uri: str, dest: str, *, roots, timeout: tuple[float, float],
             progress: Progress = _no_progress,
             known: Validator | None = None) -> Downloaded:
    """Write the content of ``uri`` to ``dest`` (fsync'd); hash it.

    With ``known`` (what the cache holds), raise NotModified instead when
    the source says its content did not change.
    """
    try:
        local = validation.local_path(uri, "image")
        if local is not None:
            # Checked again at use, not only at request time: the file or a
            # symlink on its way may have changed since.
            if not validation.inside(local, roots):
                raise ImageError(f"{uri} is outside the storage roots")
            return _copy_local(local, dest, progress, known)
        scheme = urlsplit(uri).scheme.lower()
        if scheme in ("http", "https"):
            return _download_http(uri, dest, timeout, progress, known)
        if scheme == "ftp":
            return _download_ftp(uri, dest, sum(timeout), progress, known)
        raise ImageError(f"cannot fetch {uri}: unsupported scheme")
    except (ImageError, NotModified):
        raise
    except requests.Timeout as err:
        raise ImageError(f"fetching {uri} timed out ({err})") from err
    except requests.ConnectionError as err:
        raise ImageError(f"cannot fetch {uri}: connection failed "
                         f"({_root_cause(err)})") from err
    except requests.RequestException as err:
        raise ImageError(f"cannot fetch {uri}: {err}") from err
    except (ftplib.Error, EOFError) as err:
        raise ImageError(f"cannot fetch {uri}: FTP error: {err}") from err
    except OSError as err:
        raise ImageError(f"cannot fetch {uri}: {err.strerror or err}") from err


class _HashedFile:
    """A download's destination file, sha256'd on a thread of its own.

    sha256 runs at about 1 GB/s here, slower than a 10 Gb/s link: hashed
    in line, it would hold up the receive loop. On the side, receiving,
    writing and hashing overlap (the digest releases the GIL). The bytes
    hashed are exactly the bytes written.
    """

    def __init__(self, path: str):
        self.file = open(path, "wb")
        self.size = 0
        self._thread: threading.Thread | None = None
        self._begin()

    def _begin(self) -> None:
        self._digest = hashlib.sha256()
        self._chunks: queue.Queue = queue.Queue(maxsize=16)
        self._thread = threading.Thread(
            target=self._hash, args=(self._digest, self._chunks),
            name="sha256", daemon=True)
        self._thread.start()

    @staticmethod
    def _hash(digest, chunks: queue.Queue) -> None:
        while (chunk := chunks.get()) is not None:
            digest.update(chunk)

    def _end(self) -> None:
        if self._thread is not None:
            self._chunks.put(None)
            self._thread.join()
            self._thread = None

    def write(self, chunk: bytes) -> None:
        self.file.write(chunk)
        self._chunks.put(chunk)
        self.size += len(chunk)

    def restart(self) -> None:
        """Start over empty (a full answer after a refused resume)."""
        self._end()
        self.file.seek(0)
        self.file.truncate()
        self.size = 0
        self._begin()

    def finish(self) -> str:
        """Make the file durable; the sha256 of everything written."""
        self._end()
        self.file.flush()
        os.fsync(self.file.fileno())
        return self._digest.hexdigest()

    def __enter__(self) -> "_HashedFile":
        return self

    def __exit__(self, *exc) -> None:
        self._end()
        self.file.close()


class _FileDigest:
    """The sha256 of an open file, read with pread on a thread of its own
    (the file offset is left alone, for sendfile)."""

    def __init__(self, fd: int, size: int):
        self._digest = hashlib.sha256()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(fd, size),
                                        name="sha256", daemon=True)
        self._error: OSError | None = None
        self._thread.start()

    def _run(self, fd: int, size: int) -> None:
        offset = 0
        try:
            while offset < size and not self._stop.is_set():
                chunk = os.pread(fd, CHUNK, offset)
                if not chunk:
                    break
                self._digest.update(chunk)
                offset += len(chunk)
        except OSError as err:
            self._error = err

    def cancel(self) -> None:
        self._stop.set()
        self._thread.join()

    def result(self) -> str:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._digest.hexdigest()


def _copy_local(path: str, dest: str, progress: Progress,
                known: Validator | None) -> Downloaded:
    """Copy a file of the storage roots into the cache, and hash it.

    The kernel copies (sendfile: no byte passes through Python) while a
    thread hashes the same open file: hashing is as slow as the copy, and
    in line it doubled a cold start (1 GB: 2.2 s, now 1.2 s, against 0.8 s
    for ``cp`` + ``sync``). The file must not change meanwhile: its size
    and mtime are compared before and after.
    """
    with open(path, "rb") as src:
        before = os.fstat(src.fileno())
        size = before.st_size
        validator = Validator(size=size, mtime_ns=before.st_mtime_ns)
        if known is not None and known == validator:
            raise NotModified()
        digest = _FileDigest(src.fileno(), size)
        done = 0
        try:
            progress(0, size)
            with open(dest, "wb") as dst:
                while done < size:
                    sent = os.sendfile(dst.fileno(), src.fileno(), done,
                                       min(COPY_STEP, size - done))
                    if sent == 0:
                        break  # the file shrank
                    done += sent
                    progress(done, size)
                os.fsync(dst.fileno())
        except BaseException:
            digest.cancel()
            raise
        sha256 = digest.result()
        after = os.fstat(src.fileno())
    if done != size or (after.st_size, after.st_mtime_ns) != (
            size, before.st_mtime_ns):
        raise ImageError(f"{path} changed while it was copied")
    return Downloaded(done, sha256, validator)


def _download_http(uri: str, dest: str, timeout, progress: Progress,
                   known: Validator | None) -> Downloaded:
    headers = {}
    if known is not None:
        if known.etag:
            headers["If-None-Match"] = known.etag
        if known.last_modified:
            headers["If-Modified-Since"] = known.last_modified
    total: int | None = None
    validator = Validator()
    resumes = 0
    with _HashedFile(dest) as out, requests.Session() as session:
        while True:
            resp = session.get(uri, stream=True, timeout=timeout,
                               headers=headers)
            try:
                if resp.status_code == 304 and known is not None:
                    raise NotModified()
                if resp.status_code >= 400:
                    raise ImageError(f"cannot fetch {uri}: HTTP "
                                     f"{resp.status_code} {resp.reason}")
                if resp.status_code == 206 and out.size:
                    pass  # the server resumes where we stopped
                else:
                    # A full answer, first or after a refused resume.
                    if out.size:
                        out.restart()
                    length = resp.headers.get("Content-Length", "")
                    total = int(length) if length.isdigit() else None
                    validator = Validator(
                        size=total, etag=resp.headers.get("ETag", ""),
                        last_modified=resp.headers.get("Last-Modified", ""))
                progress(out.size, total)
                try:
                    for chunk in resp.iter_content(HTTP_CHUNK):
                        out.write(chunk)
                        progress(out.size, total)
                except (requests.ConnectionError,
                        requests.exceptions.ChunkedEncodingError) as err:
                    resumable = (total is not None and resumes < RESUMES and
                                 resp.headers.get("Accept-Ranges") == "bytes")
                    if not resumable:
                        raise ImageError(
                            f"cannot fetch {uri}: connection dropped after "
                            f"{out.size} of {total or '?'} bytes "
                            f"({_root_cause(err)})") from err
                    resumes += 1
                    headers = {"Range": f"bytes={out.size}-"}
                    if validator.etag:
                        headers["If-Range"] = validator.etag
                    elif validator.last_modified:
                        headers["If-Range"] = validator.last_modified
                    continue
            finally:
                resp.close()
            break
        sha256 = out.finish()
        done = out.size
    if total is not None and done != total:
        raise ImageError(f"cannot fetch {uri}: got {done} of {total} bytes "
                         "(connection cut short)")
    validator.size = done
    return Downloaded(done, sha256, validator)


def _download_ftp(uri: str, dest: str, timeout: float, progress: Progress,
                  known: Validator | None) -> Downloaded:
    parts = urlsplit(uri)
    path = unquote(parts.path)
    with ftplib.FTP(timeout=timeout) as ftp:
        ftp.connect(parts.hostname, parts.port or 21)
        ftp.login(unquote(parts.username or "anonymous"),
                  unquote(parts.password or "anonymous@"))
        ftp.voidcmd("TYPE I")
        try:
            total = ftp.size(path)
        except ftplib.error_perm:
            total = None
        try:
            modified = ftp.voidcmd(f"MDTM {path}").split()[-1]
        except ftplib.error_perm:
            modified = ""
        validator = Validator(size=total, last_modified=modified)
        if (known is not None and modified and known.size == total
                and known.last_modified == modified):
            raise NotModified()
        progress(0, total)
        with _HashedFile(dest) as out:
            def write(block: bytes) -> None:
                out.write(block)
                progress(out.size, total)
            ftp.retrbinary(f"RETR {path}", write, CHUNK)
            sha256 = out.finish()
            done = out.size
    if total is not None and done != total:
        raise ImageError(f"cannot fetch {uri}: got {done} of {total} bytes")
    validator.size = done
    return Downloaded(done, sha256, validator)


# -- qemu-img -------------------------------------------------------------------

def run_qemu_img(qemu_img: str, args: list[str], *, cpu_seconds: int = 600,
                 memory_bytes: int = 2 << 30, timeout: float = 3600) -> str:
    """Run qemu-img under CPU and address-space limits; return stdout."""
    try:
        proc = subprocess.Popen([qemu_img, *args], stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    except OSError as err:
        raise ImageError(f"cannot run {qemu_img}: {err.strerror}") from err
    try:
        resource.prlimit(proc.pid, resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds))
        resource.prlimit(proc.pid, resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    except (ProcessLookupError, PermissionError):
        pass  # already gone; its exit status tells
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise ImageError(f"qemu-img {args[0]} did not finish in "
                         f"{timeout:g} s") from None
    if proc.returncode != 0:
        lines = err.decode(errors="replace").strip().splitlines()
        raise ImageError(lines[-1] if lines else
                         f"qemu-img {args[0]} exited with {proc.returncode}")
    return out.decode(errors="replace")


def probe(path: str, qemu_img: str) -> dict:
    """qemu-img's view of an image; refuse ones that name other files."""
    try:
        out = run_qemu_img(qemu_img, ["info", "--output=json", path],
                           cpu_seconds=30, memory_bytes=1 << 30, timeout=60)
    except ImageError as err:
        raise ImageError(f"the image is not readable: {err}") from err
    info = json.loads(out)
    if info.get("backing-filename") or info.get("full-backing-filename"):
        raise ImageError(
            f"the image has a backing file ({info.get('backing-filename')!r}); "
            "only self-contained images are accepted")
    data_file = (info.get("format-specific") or {}).get("data", {}).get("data-file")
    if data_file:
        raise ImageError(f"the image has an external data file ({data_file!r}); "
                         "only self-contained images are accepted")
    if info.get("format") not in ("raw", "qcow2"):
        raise ImageError(f"image format {info.get('format')!r} is not "
                         "supported; use raw or qcow2")
    return info


def flatten(qemu_img: str, overlay: str, out_format: str, dest: str, *,
            direct: bool = False) -> None:
    """Write overlay + base as one self-contained image in ``out_format``,
    durably (fsync'd before it takes its name).

    ``direct`` writes with O_DIRECT (``-t none``), out of order (``-W``):
    the data goes to the disk while qemu-img still reads, the fsync that
    follows has almost nothing left to do, and the host's page cache is not
    flooded with an image nobody reads back (Nova converts the same way).
    Only for folders that accept O_DIRECT (``fsutil.supports_direct_io``).
    """
    tmp = dest + ".part"
    cache = ["-t", "none", "-W"] if direct else []
    try:
        run_qemu_img(qemu_img, ["convert", "-q", *cache, "-f", "qcow2",
                                "-O", out_format, overlay, tmp])
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def sha256_of(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _root_cause(err: BaseException) -> str:
    while err.__cause__ is not None or err.__context__ is not None:
        err = err.__cause__ or err.__context__
    return str(err) or type(err).__name__
