"""Fetches hash on a thread of their own: streams through
``images._HashedFile``, local files while the kernel copies them.

What must hold: the sha256 is that of exactly the bytes in the file, also
after a restart (an HTTP server that refuses to resume sends everything
again); a local source that changes during its copy is refused; an error
or a cancel in the middle of a fetch leaves no hashing thread behind.
"""

from __future__ import annotations

import hashlib
import os
import threading

import pytest

from vmworker import images
from vmworker.errors import ImageError
from vmworker.images import _HashedFile


def hashers() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "sha256"]


def test_the_digest_is_that_of_the_bytes_written(tmp_path):
    chunks = [os.urandom(n) for n in (1, 4096, 1 << 20, 12345, 0, 7)] * 5
    with _HashedFile(str(tmp_path / "out")) as out:
        for chunk in chunks:
            out.write(chunk)
        digest = out.finish()
        assert out.size == sum(map(len, chunks))
    data = (tmp_path / "out").read_bytes()
    assert data == b"".join(chunks)
    assert digest == hashlib.sha256(data).hexdigest()
    assert hashers() == []


def test_a_restart_forgets_what_came_before(tmp_path):
    with _HashedFile(str(tmp_path / "out")) as out:
        out.write(b"the first answer, cut short")
        out.restart()
        out.write(b"all of ")
        out.write(b"the second")
        digest = out.finish()
    assert (tmp_path / "out").read_bytes() == b"all of the second"
    assert digest == hashlib.sha256(b"all of the second").hexdigest()


def test_an_error_mid_fetch_leaves_no_thread(tmp_path):
    with pytest.raises(RuntimeError):
        with _HashedFile(str(tmp_path / "out")) as out:
            for _ in range(40):  # more than the queue holds
                out.write(b"x" * 65536)
            raise RuntimeError("connection dropped")
    assert out.file.closed
    assert hashers() == []


def test_a_local_copy_is_the_source_and_its_sha256(tmp_path):
    source = tmp_path / "source.img"
    source.write_bytes(os.urandom(3 << 20) + b"end")
    seen = []
    got = images._copy_local(str(source), str(tmp_path / "copy"),
                             lambda done, total: seen.append((done, total)),
                             None)
    data = source.read_bytes()
    assert (tmp_path / "copy").read_bytes() == data
    assert got.sha256 == hashlib.sha256(data).hexdigest()
    assert got.size == len(data) and seen[-1] == (len(data), len(data))
    # The same file again: the cache's validator says not modified.
    with pytest.raises(images.NotModified):
        images._copy_local(str(source), str(tmp_path / "again"),
                           images._no_progress, got.validator)
    assert hashers() == []


def test_a_local_source_that_changes_while_copied_is_refused(tmp_path):
    source = tmp_path / "source.img"
    source.write_bytes(os.urandom(1 << 20))

    def grow(done, total):
        if done == 0:  # the copy has begun: someone appends to the file
            with open(source, "ab") as f:
                f.write(b"more")

    with pytest.raises(ImageError, match="changed while it was copied"):
        images._copy_local(str(source), str(tmp_path / "copy"), grow, None)
    assert hashers() == []


def test_a_cancelled_local_copy_leaves_no_thread(tmp_path):
    source = tmp_path / "source.img"
    source.write_bytes(os.urandom(1 << 20))

    def cancel(done, total):
        if done:
            raise RuntimeError("cancelled")

    with pytest.raises(RuntimeError):
        images._copy_local(str(source), str(tmp_path / "copy"), cancel, None)
    assert hashers() == []
