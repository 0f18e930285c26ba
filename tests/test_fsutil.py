"""The crash-safe file helpers: atomic JSON, and the O_DIRECT probe that
decides how a save writes its file.

What must hold: the probe says yes where O_DIRECT works (the test's own
ext4 or tmpfs folder: a real O_DIRECT write is tried after it), no where
the folder cannot take the probe, and it leaves nothing behind either way.
"""

from __future__ import annotations

import json
import mmap
import os

from vmworker import fsutil


def test_direct_io_probe_agrees_with_a_real_o_direct_write(tmp_path):
    said = fsutil.supports_direct_io(str(tmp_path))
    try:
        fd = os.open(tmp_path / "real", os.O_CREAT | os.O_WRONLY | os.O_DIRECT)
        try:
            with mmap.mmap(-1, 4096) as block:
                os.write(fd, block)
            works = True
        finally:
            os.close(fd)
    except OSError:
        works = False
    assert said == works
    os.unlink(tmp_path / "real")
    assert os.listdir(tmp_path) == []  # the probe cleaned up after itself


def test_direct_io_probe_says_no_for_a_folder_it_cannot_write(tmp_path):
    assert fsutil.supports_direct_io(str(tmp_path / "missing")) is False
    assert os.listdir(tmp_path) == []


def test_write_json_replaces_atomically(tmp_path):
    path = tmp_path / "record.json"
    fsutil.write_json(str(path), {"a": 1})
    fsutil.write_json(str(path), {"a": 2})
    assert json.loads(path.read_text()) == {"a": 2}
    assert sorted(os.listdir(tmp_path)) == ["record.json"]  # no .tmp left
