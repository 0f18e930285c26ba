"""The access log: one line per request, escaped as CherryPy escapes it,
rotated by size.

``AccessLog`` replaces CherryPy's access line with a cheaper one (issue 7's
status path). What must hold: a client cannot forge a line (quotes,
newlines and control bytes it sends are escaped exactly as CherryPy does),
the format stays the Combined Log Format, and the file rotates at its size
limit also when the worker starts on a file that is already there.
"""

from __future__ import annotations

import logging
import re
import socket

import pytest

from vmworker import logs

pytestmark = [pytest.mark.timeout(60)]


def cherrypy_escape(value: str) -> str:
    """CherryPy's own escaping (``LogManager.access``), the reference."""
    value = value.replace('"', '\\"').encode("utf8")
    return repr(value)[2:-1].replace("\\\\", "\\")


@pytest.mark.parametrize("value", [
    "GET /vmachines/list HTTP/1.1",
    'a"b', "back\\slash", "tab\there", "new\nline", "bell\x07", "it's",
    "it's \"both\"", "caf\u00e9", "\u2603 snow", "",
])
def test_escaping_matches_cherrypy(value):
    assert logs._clean(value) == cherrypy_escape(value)


def test_the_access_file_rotates_at_its_limit_counting_what_was_there(tmp_path):
    path = tmp_path / "access.log"
    path.write_text("x" * 150 + "\n")  # a previous run's lines
    handler = logs.AccessFile(str(path), maxBytes=200, backupCount=2)
    try:
        handler.write_line("y" * 40)  # 151 + 41 = 192: still fits
        assert not (tmp_path / "access.log.1").exists()
        handler.write_line("z" * 40)  # would pass 200: rotate first
        assert (tmp_path / "access.log.1").read_text().endswith("y" * 40 + "\n")
        assert path.read_text() == "z" * 40 + "\n"
        for _ in range(20):
            handler.write_line("w" * 40)
        sizes = [p.stat().st_size for p in tmp_path.iterdir()]
        assert len(sizes) == 3 and max(sizes) <= 200  # backupCount=2
        # A record through logging lands the same way.
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler.handle(logging.makeLogRecord({"msg": "via logging"}))
        assert path.read_text().endswith("via logging\n")
    finally:
        handler.close()


def test_a_client_cannot_forge_an_access_line(worker):
    """A raw request whose User-Agent carries a quote, a backslash and a
    control byte gives one line, escaped; a normal request follows it."""
    log_file = worker.var / "log" / "access.log"
    before = log_file.read_text().count("\n")
    agent = 'evil" 200 1 "x\\y\x01'
    with socket.create_connection(("127.0.0.1", worker.port), timeout=10) as s:
        s.sendall(b"GET /vmachines/list HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                  b"User-Agent: " + agent.encode() + b"\r\n"
                  b"Connection: close\r\n\r\n")
        while s.recv(65536):
            pass
    worker.ok("list")
    lines = log_file.read_text().splitlines()[before:]
    assert len(lines) == 2
    forged, normal = lines
    assert re.fullmatch(
        r'127\.0\.0\.1 - - \[\d\d/\w{3}/\d{4}:\d\d:\d\d:\d\d\] '
        r'"GET /vmachines/list HTTP/1\.1" 200 \d+ "" "(.*)"', forged)
    assert forged.endswith(f'"{cherrypy_escape(agent)}"')
    assert '"GET /vmachines/list HTTP/1.1" 200' in normal


def test_an_access_file_the_operator_configured_gets_the_lines_too(make_worker,
                                                                  tmp_path):
    """CherryPy's own ``log.access_file`` in [global] still works beside
    the worker's access.log: the same line reaches both."""
    w = make_worker()
    extra = tmp_path / "extra-access.log"
    w.config.write_text(w.config.read_text()
                        + f'[global]\nlog.access_file = "{extra}"\n')
    w.start()
    w.ok("list")
    ours = (w.var / "log" / "access.log").read_text().splitlines()
    theirs = extra.read_text().splitlines()
    assert ours and ours[-1] in theirs
    assert '"GET /vmachines/list HTTP/1.1" 200' in ours[-1]
