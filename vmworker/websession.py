"""Browser sessions of the web UI: the login cookie and the CSRF token.

The worker keeps no session table. A session is one signed cookie::

    vmworker_session = v1.<sid>.<expires>.<auth>.<mac>

``sid`` is 128 random bits, ``expires`` a Unix time, ``auth`` 1 once the
browser gave the API token at the login form, and ``mac`` an HMAC-SHA256
of the rest. The HMAC key is derived from a random secret kept in
``VAR/webui.key`` (so sessions survive a worker restart) and from the API
token (so changing the token logs every browser out). The cookie is
HttpOnly (page scripts never see it) and SameSite=Lax; the worker serves
plain HTTP, so it cannot be ``Secure`` (put TLS in front for that).

CSRF: every state-changing form and ``fetch`` of the UI carries
``csrf_token`` = HMAC(key, "csrf" + sid). A page of another site can make
the browser send the cookie, but it can neither read the cookie nor compute
the HMAC, so it cannot forge the token (a signed synchronizer token, OWASP's
"HMAC based token pattern"). Tokens are compared in constant time.

The pure part (``SessionKeys``) does no I/O; ``Sessions`` adds the CherryPy
cookie handling.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import hmac
import logging
import os
import secrets
import time

import cherrypy

log = logging.getLogger(__name__)

COOKIE = "vmworker_session"
CSRF_FIELD = "csrf_token"
CSRF_HEADER = "X-CSRF-Token"
#: Anonymous sessions (no API token configured) only carry the CSRF binding.
ANONYMOUS_LIFETIME = 30 * 86400
KEY_FILE = "webui.key"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@dataclasses.dataclass(frozen=True)
class Session:
    sid: str
    expires: int
    authenticated: bool


class SessionKeys:
    """Signing and checking of session cookies and CSRF tokens (pure)."""

    def __init__(self, secret: bytes, api_token: str):
        self.token = api_token
        self._key = hmac.new(secret, b"vmworker-session\0" + api_token.encode(),
                             hashlib.sha256).digest()

    @property
    def login_required(self) -> bool:
        return bool(self.token)

    def _mac(self, text: str) -> str:
        return _b64(hmac.new(self._key, text.encode(), hashlib.sha256).digest())

    def new(self, authenticated: bool, lifetime: float,
            now: float | None = None) -> tuple[Session, str]:
        """A fresh session and its cookie value."""
        now = time.time() if now is None else now
        session = Session(sid=_b64(secrets.token_bytes(16)),
                          expires=int(now + lifetime),
                          authenticated=authenticated)
        body = f"v1.{session.sid}.{session.expires}.{int(authenticated)}"
        return session, f"{body}.{self._mac(body)}"

    def parse(self, value: str, now: float | None = None) -> Session | None:
        """The session a cookie value names, or None if forged or expired."""
        parts = value.split(".")
        if len(parts) != 5 or parts[0] != "v1":
            return None
        body = ".".join(parts[:4])
        if not hmac.compare_digest(parts[4].encode(), self._mac(body).encode()):
            return None
        try:
            expires = int(parts[2])
        except ValueError:
            return None
        now = time.time() if now is None else now
        if expires <= now or parts[3] not in ("0", "1"):
            return None
        return Session(sid=parts[1], expires=expires,
                       authenticated=parts[3] == "1")

    def check_api_token(self, given: str) -> bool:
        return bool(self.token) and hmac.compare_digest(given.encode(),
                                                        self.token.encode())

    def csrf_token(self, session: Session) -> str:
        return self._mac("csrf\0" + session.sid)

    def check_csrf(self, session: Session | None, given: str) -> bool:
        if session is None or not given:
            return False
        return hmac.compare_digest(given.encode(),
                                   self.csrf_token(session).encode())


def load_secret(var_dir: str) -> bytes:
    """The UI's signing secret: ``VAR/webui.key``, created once (0600)."""
    path = os.path.join(var_dir, KEY_FILE)
    try:
        with open(path, "rb") as f:
            secret = f.read()
        if len(secret) >= 32:
            return secret
        log.warning("%s is too short; making a new one", path)
    except FileNotFoundError:
        pass
    secret = secrets.token_bytes(32)
    tmp = f"{path}.tmp-{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, secret)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    return secret


class Sessions(SessionKeys):
    """SessionKeys bound to CherryPy's request and response cookies."""

    def __init__(self, secret: bytes, api_token: str, lifetime: float):
        super().__init__(secret, api_token)
        self.lifetime = lifetime

    def current(self) -> Session | None:
        morsel = cherrypy.request.cookie.get(COOKIE)
        return self.parse(morsel.value) if morsel is not None else None

    def authenticated(self) -> bool:
        session = self.current()
        return session is not None and session.authenticated

    def ensure(self) -> Session:
        """The request's session; a new anonymous one if it has none."""
        session = self.current()
        if session is None:
            session = self._issue(False)
        return session

    def login(self) -> Session:
        """A new authenticated session (a new sid: no session fixation)."""
        return self._issue(True)

    def logout(self) -> None:
        self._set_cookie("", 0)

    def _issue(self, authenticated: bool) -> Session:
        lifetime = self.lifetime if authenticated else ANONYMOUS_LIFETIME
        session, value = self.new(authenticated, lifetime)
        self._set_cookie(value, int(lifetime))
        # Later code in this request sees the new session.
        cherrypy.request.cookie[COOKIE] = value
        return session

    @staticmethod
    def _set_cookie(value: str, max_age: int) -> None:
        cookie = cherrypy.response.cookie
        cookie[COOKIE] = value
        morsel = cookie[COOKIE]
        morsel["path"] = "/"
        morsel["max-age"] = max_age
        morsel["httponly"] = True
        morsel["samesite"] = "Lax"

    def check_request_csrf(self, form: dict) -> bool:
        """Whether this request carries the right CSRF token (form or header)."""
        given = form.get(CSRF_FIELD) or cherrypy.request.headers.get(
            CSRF_HEADER, "")
        if not isinstance(given, str):
            return False
        return self.check_csrf(self.current(), given)
