"""Crash-safe file operations shared by the journal, the cache and saving.

Anything written for recovery is written atomically: temp file, fsync,
rename, fsync the folder (so the rename itself survives a power cut).
"""

from __future__ import annotations

import json
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
