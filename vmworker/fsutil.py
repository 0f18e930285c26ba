"""Crash-safe file operations shared by the journal, the cache and saving.

Anything written for recovery is written atomically: temp file, fsync,
rename, fsync the folder (so the rename itself survives a power cut).
"""

from __future__ import annotations

import json
import mmap
import os


def fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def unlink(path: str) -> None:
    """Remove a file if it is there."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def write_json(path: str, obj: dict) -> None:
    """Replace ``path`` with ``obj`` as JSON, atomically and durably."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(path) or ".")


def supports_direct_io(directory: str) -> bool:
    """Whether files in ``directory`` can be written with O_DIRECT.

    tmpfs and some network filesystems refuse it (EINVAL); the only way to
    know is to try, with a block-aligned buffer (mmap gives one).
    """
    probe = os.path.join(directory, f".direct-io-probe-{os.getpid()}")
    try:
        fd = os.open(probe, os.O_CREAT | os.O_WRONLY | os.O_DIRECT, 0o600)
    except OSError:
        return False
    try:
        with mmap.mmap(-1, 4096) as block:
            os.write(fd, block)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)
        unlink(probe)
