"""The fetch destination that hashes on its own thread (images._HashedFile).

What must hold: the sha256 is that of exactly the bytes in the file, also
after a restart (an HTTP server that refuses to resume sends everything
again), the file is durable when ``finish`` returns, and an error in the
middle of a fetch leaves no hashing thread behind.
"""

from __future__ import annotations

import hashlib
import os
import threading

import pytest

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
