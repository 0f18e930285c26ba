"""Console access: single-use tokens, one-time VNC passwords, websocket ports.

Unit tests of the token and session logic (no I/O), then the real worker
with real QEMU: what the console exchange gives a browser, what QEMU's VNC
server then demands, and where QEMU puts its websocket port. The browser
side (noVNC connecting with the password) is in test_webui.py.
"""

from __future__ import annotations

import re
import socket
import time

import pytest

from conftest import rfb_security_types
import requests

from servers import free_port
from vmworker.console import ConsoleTokens
from vmworker.errors import Forbidden
from vmworker.websession import SessionKeys

pytestmark = pytest.mark.timeout(120)

JSON = {"Accept": "application/json"}


# -- tokens and sessions (pure) ---------------------------------------------------

class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_a_console_token_is_single_use():
    tokens = ConsoleTokens(60)
    token = tokens.mint("vm-a", "sid-1")
    assert tokens.redeem(token, "sid-1") == "vm-a"
    with pytest.raises(Forbidden):
        tokens.redeem(token, "sid-1")


def test_a_console_token_is_bound_to_its_session_and_burnt_by_misuse():
    tokens = ConsoleTokens(60)
    token = tokens.mint("vm-a", "sid-1")
    with pytest.raises(Forbidden):
        tokens.redeem(token, "sid-2")
    with pytest.raises(Forbidden):  # a failed try used it up
        tokens.redeem(token, "sid-1")


def test_a_console_token_expires():
    clock = Clock()
    tokens = ConsoleTokens(30, clock=clock)
    token = tokens.mint("vm-a", "sid")
    clock.now += 31
    with pytest.raises(Forbidden):
        tokens.redeem(token, "sid")
    # Expired grants are dropped when the next one is minted.
    tokens.mint("vm-b", "sid")
    assert tokens.outstanding() == 1


@pytest.mark.parametrize("bad", ["", ".", "nope", "x.y"])
def test_forged_console_tokens_are_refused(bad):
    tokens = ConsoleTokens(60)
    real = tokens.mint("vm-a", "sid")
    with pytest.raises(Forbidden):
        tokens.redeem(bad, "sid")
    token_id = real.split(".")[0]
    with pytest.raises(Forbidden):
        tokens.redeem(f"{token_id}.{'A' * 43}", "sid")


def test_console_tokens_are_not_guessable():
    tokens = ConsoleTokens(60)
    minted = {tokens.mint("vm-a", "sid") for _ in range(200)}
    assert len(minted) == 200
    assert all(len(t.split(".")[1]) >= 43 for t in minted)  # 256 bits


def test_session_cookies_are_signed_and_expire():
    keys = SessionKeys(b"k" * 32, "token")
    session, value = keys.new(True, 60, now=1000)
    assert keys.parse(value, now=1001) == session
    assert keys.parse(value, now=1061) is None
    forged = value.replace(".1.", ".0.", 1)
    assert keys.parse(forged, now=1001) is None
    # Another API token (or secret) signs differently: old cookies die.
    assert SessionKeys(b"k" * 32, "other").parse(value, now=1001) is None
    assert SessionKeys(b"j" * 32, "token").parse(value, now=1001) is None


def test_csrf_tokens_belong_to_one_session():
    keys = SessionKeys(b"k" * 32, "")
    one, _ = keys.new(False, 60)
    two, _ = keys.new(False, 60)
    assert keys.check_csrf(one, keys.csrf_token(one))
    assert not keys.check_csrf(one, keys.csrf_token(two))
    assert not keys.check_csrf(one, "")
    assert not keys.check_csrf(None, keys.csrf_token(one))


# -- the real worker ------------------------------------------------------------------

class Browser:
    """A requests session that behaves like the UI's page scripts."""

    def __init__(self, worker):
        self.worker = worker
        self.http = requests.Session()

    def console_page(self, uuid: str) -> tuple[str, str]:
        html = self.http.get(f"{self.worker.url}/webui/vm/{uuid}/console",
                             timeout=10).text
        csrf = re.search(r'name="csrf-token" content="([^"]+)"', html)[1]
        token = re.search(r'data-token="([^"]*)"', html)[1]
        return token, csrf

    def open(self, token: str, csrf: str):
        return self.http.post(f"{self.worker.url}/webui/console_open",
                              data={"token": token},
                              headers={**JSON, "X-CSRF-Token": csrf},
                              timeout=10)




def test_console_exchange_sets_a_one_time_vnc_password(worker, cleanup):
    uuid = worker.start_vm("console-1", worker.image("idle"))
    vnc = worker.wait_for(uuid, "running")["vnc"]
    host, port = vnc.rsplit(":", 1)
    # The VNC address the API reports is the plain server, for VNC clients
    # (DESIGN.md); the console's server asks for a password nobody has yet.
    assert rfb_security_types(host, int(port)) == b"\x01"
    console = next(d for d in worker.qmp(uuid, "query-vnc-servers")
                   if d["id"] == "console")
    plain_port = next(int(s["service"]) for s in console["server"]
                      if not s["websocket"])
    assert rfb_security_types(host, plain_port) == b"\x02"

    browser = Browser(worker)
    token, csrf = browser.console_page(uuid)
    assert len(token) > 40
    resp = browser.open(token, csrf)
    assert resp.status_code == 200, resp.text
    assert resp.headers["Cache-Control"] == "no-store"
    grant = resp.json()
    assert grant["uuid"] == uuid and len(grant["password"]) == 8
    console = next(d for d in worker.qmp(uuid, "query-vnc-servers")
                   if d["id"] == "console")
    ws = [s for s in console["server"] if s["websocket"]]
    assert ws and int(ws[0]["service"]) == grant["port"]
    assert all(s["auth"] == "vnc" for s in console["server"])
    # The token opened one console; a second try is refused.
    again = browser.open(token, csrf)
    assert again.status_code == 403 and "open the console again" in again.json()["message"]
    # Another browser session cannot use a token it did not get.
    other = Browser(worker)
    _, other_csrf = other.console_page(uuid)
    token, _ = browser.console_page(uuid)
    assert other.open(token, other_csrf).status_code == 403
    assert browser.open(token, csrf).status_code == 403  # burnt by the misuse
    # Without the CSRF token the exchange is refused too.
    token, _ = browser.console_page(uuid)
    resp = browser.http.post(f"{worker.url}/webui/console_open",
                             data={"token": token}, headers=JSON, timeout=10)
    assert resp.status_code == 403


def test_no_console_for_a_vm_that_is_not_running(worker, cleanup):
    uuid = worker.start_vm("console-2", worker.image("idle"))
    worker.wait_for(uuid, "running")
    browser = Browser(worker)
    token, csrf = browser.console_page(uuid)
    worker.ok("destroy", uuid=uuid)
    resp = browser.open(token, csrf)
    assert resp.status_code == 409 and "destroyed" in resp.json()["message"]
    token, _ = browser.console_page(uuid)
    assert token == ""  # the page offers none


def test_console_token_lifetime_is_configurable(make_worker):
    w = make_worker("console_token_lifetime = 0.3\n").start()
    uuid = w.start_vm("console-3", w.image("idle"))
    w.wait_for(uuid, "running")
    browser = Browser(w)
    token, csrf = browser.console_page(uuid)
    time.sleep(0.5)
    assert browser.open(token, csrf).status_code == 403
    token, csrf = browser.console_page(uuid)
    assert browser.open(token, csrf).status_code == 200


def _free_display() -> int:
    """A display d with 5900+d .. +4 and 5700+d .. +4 free (ports > 10000)."""
    for _ in range(50):
        port = free_port()
        d = port - 5700
        if d < 4300 or 5900 + d + 4 > 65535:
            continue
        ok = True
        for p in [5900 + d + i for i in range(5)] + [5700 + d + i for i in range(5)]:
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", p))
                except OSError:
                    ok = False
                    break
        if ok:
            return d
    pytest.skip("no free port range found")


def test_qemu_searches_the_websocket_port_on_its_own(make_worker):
    # QEMU looks for the websocket port from 5700 + display, separately
    # from the VNC port: with 5700 + d taken and 5900 + d free, VNC gets
    # 5900 + d but the websocket 5701 + d. The worker reads it back.
    d = _free_display()
    w = make_worker(f"vnc_display_base = {d}\nvnc_display_count = 5\n").start()
    with socket.socket() as squatter:
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        squatter.bind(("127.0.0.1", 5700 + d))
        squatter.listen(1)
        uuid = w.start_vm("console-4", w.image("idle"))
        vm = w.wait_for(uuid, "running")
        assert vm["vnc"] == f"127.0.0.1:{5900 + d}"
        browser = Browser(w)
        grant = browser.open(*browser.console_page(uuid)).json()
        assert grant["port"] == 5701 + d
        with socket.create_connection(("127.0.0.1", grant["port"]), timeout=5) as s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                      b"Connection: Upgrade\r\nSec-WebSocket-Key: "
                      b"dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
                      b"Sec-WebSocket-Protocol: binary\r\n\r\n")
            assert s.recv(200).startswith(b"HTTP/1.1 101")
