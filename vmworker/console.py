"""The web console: single-use console tokens and one-time VNC passwords.

The worker does not proxy websockets (cheroot has no websocket support):
the browser's noVNC connects straight to QEMU's own websocket VNC port,
which QEMU opens beside the plain VNC port (``-vnc …,websocket=on``, see
``hypervisor.qemu.command_line``). Browsers do not apply the same-origin
policy to websockets, so such a port without a password would give any web
page in any browser that can reach ``vnc_listen`` the VM's screen and
keyboard. Hence QEMU also runs with ``password=on`` and no password: nobody
can log in until the console sets one.

Opening a console, step by step:

1. ``GET /webui/vm/<uuid>/console`` (a page; same session as the rest of
   the UI) mints a console token bound to that VM and to the browser's
   session: 256 random bits, valid ``console_token_lifetime`` seconds.
2. The page's script redeems it once, by a same-origin POST that also
   carries the CSRF token. Redeeming checks the VM may show its console
   (``running`` or ``suspended``: never while ``installing``), sets a fresh
   random VNC password through QMP (``set_password``) that expires after
   ``console_password_lifetime`` seconds (``expire_password``), and
   answers the websocket address and the password, with ``no-store``.
3. noVNC connects and authenticates with it (RFB "VNC authentication").
   A connected client stays connected after the password expires; the
   next console opening sets another password, which ends the previous
   one's use for new connections.

So the password reaches the browser only through the token exchange, is
never in a URL, and is useless half a minute later. VNC authentication is
DES with 8-character passwords: weak against an eavesdropper on the wire,
which is why ``vnc_listen`` stays on loopback or a management network.

A token is ``<id>.<secret>``; the id finds the grant, the secret is
compared in constant time; a grant is removed on its first use, right or
wrong.
"""

from __future__ import annotations

import dataclasses
import secrets
import string
import threading
import time
from typing import Callable

from .errors import Conflict, Forbidden, HypervisorError, QMPCommandError, Unavailable
from .state import CONSOLE

#: Outstanding grants kept at most; the oldest go first (GET floods).
MAX_GRANTS = 1024
PASSWORD_ALPHABET = string.ascii_letters + string.digits
#: RFB "VNC authentication" uses the first 8 characters only.
PASSWORD_LENGTH = 8
WILDCARD_HOSTS = ("", "0.0.0.0", "::", "[::]")


@dataclasses.dataclass(frozen=True)
class Grant:
    secret: str
    uuid: str
    sid: str
    expires: float


class ConsoleTokens:
    """Short-lived, single-use tokens, each bound to a VM and a session."""

    def __init__(self, lifetime: float,
                 clock: Callable[[], float] = time.monotonic):
        self.lifetime = lifetime
        self._clock = clock
        self._grants: dict[str, Grant] = {}
        self._lock = threading.Lock()

    def mint(self, uuid: str, sid: str) -> str:
        token_id = secrets.token_urlsafe(9)
        secret = secrets.token_urlsafe(32)
        now = self._clock()
        with self._lock:
            for key in [k for k, g in self._grants.items() if g.expires <= now]:
                del self._grants[key]
            while len(self._grants) >= MAX_GRANTS:
                del self._grants[next(iter(self._grants))]
            self._grants[token_id] = Grant(secret, uuid, sid,
                                           now + self.lifetime)
        return f"{token_id}.{secret}"

    def redeem(self, token: str, sid: str) -> str:
        """The uuid the token was minted for; Forbidden if it is not valid."""
        token_id, _, secret = token.partition(".")
        with self._lock:
            grant = self._grants.pop(token_id, None)
        valid = (grant is not None
                 and secrets.compare_digest(secret.encode(),
                                            grant.secret.encode())
                 and grant.expires > self._clock()
                 and secrets.compare_digest(sid.encode(), grant.sid.encode()))
        if not valid:
            raise Forbidden("this console token is unknown, used, expired or "
                            "from another browser session; open the console "
                            "again")
        return grant.uuid

    def outstanding(self) -> int:
        with self._lock:
            return len(self._grants)


def new_password() -> str:
    return "".join(secrets.choice(PASSWORD_ALPHABET)
                   for _ in range(PASSWORD_LENGTH))


def open_console(service, uuid: str, password_lifetime: float) -> dict:
    """Set a one-time VNC password; return where and how to connect."""
    paths = service.layout.vm(uuid)
    with service.vm_lock(uuid):
        vm = service.get(uuid)
        if vm.status not in CONSOLE:
            allowed = " or ".join(sorted(s.value for s in CONSOLE))
            raise Conflict(f"VM {vm.label} is {vm.status.value}: its console "
                           f"opens only while it is {allowed}")
        password = new_password()
        try:
            where = service.driver.open_console(uuid, paths, password,
                                                password_lifetime)
        except QMPCommandError as err:
            raise Conflict(f"VM {vm.label}: QEMU refused the console "
                           f"password ({err}); restart the VM to use the web "
                           "console") from err
        except HypervisorError as err:
            raise Unavailable(f"cannot open the console of VM {vm.label}: "
                              f"{err}") from err
        if where is None:
            raise Conflict(f"VM {vm.label} runs a QEMU started without a "
                           "web console (by an older worker); restart the "
                           "VM to use it")
    host, port = where
    if host in WILDCARD_HOSTS:
        host = ""
    return {"uuid": uuid, "name": vm.name, "host": host, "port": port,
            "password": password, "status": vm.status.value}
