"""Getting a VM's images onto this host, and knowing what they are.

An image is fetched from a path inside the storage roots, ``file://``,
``http(s)://`` or ``ftp://`` into the VM's folder under a temporary name,
fsync'd and renamed in, so a crash never leaves a partial file that passes
for an image. Its format is then probed once with ``qemu-img info`` (under
resource limits: a crafted image must not hang the worker) and passed
explicitly to QEMU from then on: QEMU never guesses (CVE-2008-2004). Images
that point at other files (backing file, external data file) are refused.
"""

from __future__ import annotations

import ftplib
import json
import os
import resource
import shutil
import subprocess
from typing import Callable
from urllib.parse import unquote, urlsplit

import requests

from . import validation
from .errors import ImageError

CHUNK = 1 << 20
Progress = Callable[[int, int | None], None]


def fetch(uri: str, dest: str, partial: str, *, roots, connect_timeout: float,
          read_timeout: float, progress: Progress | None = None) -> int:
    """Fetch ``uri`` to ``dest`` atomically; return its size in bytes."""
    progress = progress or (lambda done, total: None)
    try:
        local = validation.local_path(uri, "image")
        if local is not None:
            # Checked again at use, not only at request time: the file or a
            # symlink on its way may have changed since.
            if not validation.inside(local, roots):
                raise ImageError(f"{uri} is outside the storage roots")
            _copy_local(local, partial, progress)
        else:
            scheme = urlsplit(uri).scheme.lower()
            if scheme in ("http", "https"):
                _download_http(uri, partial, (connect_timeout, read_timeout),
                               progress)
            elif scheme == "ftp":
                _download_ftp(uri, partial, connect_timeout + read_timeout,
                              progress)
            else:
                raise ImageError(f"cannot fetch {uri}: unsupported scheme")
        size = os.path.getsize(partial)
        os.rename(partial, dest)
        return size
    except ImageError:
        _unlink(partial)
        raise
    except requests.Timeout as err:
        _unlink(partial)
        raise ImageError(f"fetching {uri} timed out ({err})") from err
    except requests.ConnectionError as err:
        _unlink(partial)
        raise ImageError(f"cannot fetch {uri}: connection failed "
                         f"({_root_cause(err)})") from err
    except requests.RequestException as err:
        _unlink(partial)
        raise ImageError(f"cannot fetch {uri}: {err}") from err
    except (ftplib.Error, EOFError) as err:
        _unlink(partial)
        raise ImageError(f"cannot fetch {uri}: FTP error: {err}") from err
    except OSError as err:
        _unlink(partial)
        raise ImageError(f"cannot fetch {uri}: {err.strerror or err}") from err


def _copy_local(path: str, partial: str, progress: Progress) -> None:
    total = os.path.getsize(path)
    progress(0, total)
    with open(path, "rb") as src, open(partial, "wb") as dst:
        shutil.copyfileobj(src, dst, CHUNK)  # uses sendfile on Linux
        dst.flush()
        os.fsync(dst.fileno())
    progress(total, total)


def _download_http(uri: str, partial: str, timeout, progress: Progress) -> None:
    with requests.get(uri, stream=True, timeout=timeout) as resp:
        if resp.status_code >= 400:
            raise ImageError(f"cannot fetch {uri}: HTTP {resp.status_code} "
                             f"{resp.reason}")
        length = resp.headers.get("Content-Length")
        total = int(length) if length and length.isdigit() else None
        done = 0
        progress(0, total)
        with open(partial, "wb") as dst:
            for chunk in resp.iter_content(CHUNK):
                dst.write(chunk)
                done += len(chunk)
                progress(done, total)
            dst.flush()
            os.fsync(dst.fileno())
        if total is not None and done != total:
            raise ImageError(f"cannot fetch {uri}: got {done} of {total} "
                             "bytes (connection cut short)")


def _download_ftp(uri: str, partial: str, timeout: float, progress: Progress) -> None:
    parts = urlsplit(uri)
    with ftplib.FTP(timeout=timeout) as ftp:
        ftp.connect(parts.hostname, parts.port or 21)
        ftp.login(unquote(parts.username or "anonymous"),
                  unquote(parts.password or "anonymous@"))
        ftp.voidcmd("TYPE I")
        path = unquote(parts.path)
        try:
            total = ftp.size(path)
        except ftplib.error_perm:
            total = None
        done = 0
        progress(0, total)
        with open(partial, "wb") as dst:
            def write(block: bytes) -> None:
                nonlocal done
                dst.write(block)
                done += len(block)
                progress(done, total)
            ftp.retrbinary(f"RETR {path}", write, CHUNK)
            dst.flush()
            os.fsync(dst.fileno())
        if total is not None and done != total:
            raise ImageError(f"cannot fetch {uri}: got {done} of {total} bytes")


def probe(path: str, qemu_img: str, *, cpu_seconds: int = 30,
          memory_bytes: int = 1 << 30) -> dict:
    """Return qemu-img's view of an image; refuse ones that name other files."""
    cmd = [qemu_img, "info", "--output=json", path]
    try:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    except OSError as err:
        raise ImageError(f"cannot run {qemu_img}: {err.strerror}") from err
    try:
        resource.prlimit(proc.pid, resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds))
        resource.prlimit(proc.pid, resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    except (ProcessLookupError, PermissionError):
        pass  # already gone; its exit status tells
    try:
        out, err = proc.communicate(timeout=cpu_seconds * 2)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise ImageError("the image could not be probed in time") from None
    if proc.returncode != 0:
        line = err.decode(errors="replace").strip().splitlines()
        raise ImageError("the image is not readable: "
                         + (line[-1] if line else f"qemu-img exit {proc.returncode}"))
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


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _root_cause(err: BaseException) -> str:
    while err.__cause__ is not None or err.__context__ is not None:
        err = err.__cause__ or err.__context__
    return str(err) or type(err).__name__
