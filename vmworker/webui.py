"""The operator's web UI: dashboard, VM pages, console, login.

Handlers stay thin: pages render Mako templates from ``views/`` (one
layout; every expression HTML-escaped by default, ``default_filters=['h']``,
so names, URIs and messages render as text), and actions go through the
same ``/vmachines`` handlers the master calls, so the UI can never do what
the API would refuse.

Who may do what (checked by ``app.check_access`` and here):

- Handlers marked ``page`` are HTML pages (GET): they accept the session
  cookie as the API token, send a browser without one to the login form,
  and may be reached by a top-level navigation from another site.
- Handlers marked ``action`` change something: POST only, the session
  cookie is accepted, and the CSRF token must be in the form (or the
  ``X-CSRF-Token`` header); a browser's cross-site request is refused before
  that (``Sec-Fetch-Site``/``Origin``).
- ``login`` is public; ``/static`` holds no secret and is public too.

Pages are sent with a Content-Security-Policy that allows only the worker's
own scripts (no inline script) and no framing.
"""

from __future__ import annotations

import base64
import functools
import json
import logging
import os
import time
from urllib.parse import quote, urlsplit

import cherrypy
from mako.lookup import TemplateLookup

from . import validation
from .api import describe
from .console import ConsoleTokens, open_console
from .errors import BadRequest, Forbidden, UnknownVM, VMWorkerError
from .hoststats import HostStats
from .service import VMService
from .state import CONSOLE, FINAL
from .timeline import JournalIndex
from .websession import CSRF_FIELD, Sessions, load_secret

log = logging.getLogger(__name__)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VIEWS = os.path.join(ROOT, "views")
STATIC = os.path.join(ROOT, "static")
FLASH_COOKIE = "vmworker_flash"
LOG_TAIL_BYTES = 16 << 10
LOG_TAIL_LINES = 60
MAX_IMAGE_CHOICES = 200

CSP = ("default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
       "img-src 'self' data: blob:; connect-src 'self' ws: wss:; "
       "font-src 'self'; object-src 'none'; base-uri 'none'; "
       "form-action 'self'; frame-ancestors 'none'")

#: The start form: (label, input type, placeholder, hint) of each parameter
#: the UI knows. Parameters the API gains later still get a text field:
#: the form is built from ``validation.START_REQUIRED + START_OPTIONAL``.
START_FIELDS = {
    "name": ("Name", "text", "web-1", "letters, digits, _ . - (up to 64)"),
    "cpu_count": ("vCPUs", "number", "1", ""),
    "mem_size": ("Memory, MB", "number", "256", ""),
    "hda_image": ("Disk image (hda)", "text", "/srv/images/disk.img or http://…",
                  "path in a storage root, file://, http(s):// or ftp://"),
    "hda_image_sha256": ("hda sha256", "text", "64 hex digits", "optional check of the image"),
    "hda_save_to": ("Save hda to", "text", "empty: discard on halt",
                    "where the disk goes when the guest halts"),
    "hdb_image": ("Second disk (hdb)", "text", "", ""),
    "hdb_image_sha256": ("hdb sha256", "text", "", ""),
    "hdb_save_to": ("Save hdb to", "text", "empty: discard on halt", ""),
    "cd_image": ("CD-ROM image", "text", "", ""),
    "cd_image_sha256": ("CD sha256", "text", "", ""),
    "run_agent": ("Run the guest agent", "checkbox", "", "installs soft_list"),
    "soft_list": ("Software to install (soft_list)", "text", "", ""),
    "uuid": ("UUID", "text", "empty: the worker picks one",
             "give one to make retries idempotent"),
}
FIELD_ORDER = list(START_FIELDS)

#: Titles of journal events on the VM page's timeline.
EVENT_TITLES = {
    "accepted": "Start request accepted",
    "image_fetched": "Image ready",
    "spawned": "QEMU started",
    "install_started": "Guest agent installing",
    "running": "Running",
    "start_failed": "Failed to start",
    "suspended": "Suspended",
    "resumed": "Resumed",
    "modified": "Save targets changed",
    "cd_changed": "CD changed",
    "halted": "Halted",
    "save_attempt": "Save attempt",
    "saved": "Image saved",
    "save_failed": "Saving failed",
    "destroyed": "Destroyed",
    "snapshot": "Earlier history compacted",
}


# -- handler kinds (read by app.check_access) ----------------------------------

def page(fn):
    """An HTML page: session cookie accepted, login redirect, navigable."""
    fn.vmworker_page = True
    return fn


def ui_read(fn):
    """A JSON read for the UI's scripts: session cookie accepted."""
    fn.vmworker_ui = True
    return fn


def public(fn):
    fn.vmworker_public = True
    return fn


def action(fn):
    """A state change: POST only, session cookie accepted, CSRF checked."""
    @functools.wraps(fn)
    def wrapper(self, *args, **form):
        if cherrypy.request.method != "POST":
            cherrypy.response.headers["Allow"] = "POST"
            raise cherrypy.HTTPError(405, "use POST (from the worker's page)")
        if not self.sessions.check_request_csrf(form):
            raise Forbidden("missing or wrong CSRF token: reload the page "
                            "and try again")
        form.pop(CSRF_FIELD, None)
        return fn(self, *args, **form)
    wrapper.vmworker_ui = True
    return wrapper


def wants_json() -> bool:
    return "application/json" in cherrypy.request.headers.get("Accept", "")


def local_target(url: str, default: str = "/webui") -> str:
    """``url`` if it is a path on this worker, else ``default`` (no open redirect)."""
    if (not url or not url.startswith("/") or url.startswith("//")
            or "\\" in url or any(ord(c) < 32 or ord(c) == 127 for c in url)):
        return default
    parts = urlsplit(url)
    if parts.scheme or parts.netloc:
        return default
    return url


# -- formatting (used by the templates) ------------------------------------------

def fmt_bytes(n) -> str:
    if n is None:
        return "?"
    n = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def fmt_age(seconds: float) -> str:
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h {s % 3600 // 60:02d}m"
    return f"{s // 86400}d {s % 86400 // 3600}h"


def fmt_time(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) + \
        f".{int(ts * 1000) % 1000:03d}"


def status_class(status: str) -> str:
    return "s-" + status.replace(" ", "-")


#: Event fields never shown on a page (the status answer gives them to API
#: callers, who hold the token).
SECRET_FIELDS = ("vnc_password",)


def event_details(event: dict) -> list[tuple[str, str]]:
    """The fields of a journal event worth showing, as (key, text)."""
    out = []
    if event.get("type") == "snapshot" and isinstance(event.get("record"), dict):
        record = event["record"]
        return [(k, str(record[k])) for k in ("status", "message", "halt_reason")
                if record.get(k)]
    for key, value in event.items():
        if key in ("type", "uuid", "ts") or key in SECRET_FIELDS:
            continue
        if key == "params" and isinstance(value, dict):
            for pkey in FIELD_ORDER + sorted(set(value) - set(FIELD_ORDER)):
                pvalue = value.get(pkey)
                if pvalue not in (None, "", False):
                    out.append((pkey, str(pvalue)))
            continue
        text = value if isinstance(value, str) else json.dumps(value)
        out.append((key, text[:500]))
    return out


def log_tail(path: str) -> str | None:
    """The last lines of QEMU's log, or None when the file is gone."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - LOG_TAIL_BYTES))
            data = f.read()
    except FileNotFoundError:
        return None
    except OSError as err:
        return f"(cannot read {path}: {err.strerror})"
    lines = data.decode(errors="replace").splitlines()
    if size > LOG_TAIL_BYTES and lines:
        lines = lines[1:]  # the first line is probably cut
    return "\n".join(lines[-LOG_TAIL_LINES:])


def image_choices(roots, limit: int = MAX_IMAGE_CHOICES) -> list[str]:
    """Files in the storage roots (two levels deep), for the start form."""
    found: list[str] = []
    stack = [(root, 0) for root in reversed(tuple(roots))]
    while stack and len(found) < limit:
        folder, level = stack.pop()
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name,
                             reverse=True)
        except OSError:
            continue
        for entry in entries:
            if entry.name.startswith("."):
                continue
            try:
                if entry.is_dir(follow_symlinks=False):
                    if level < 1:
                        stack.append((entry.path, level + 1))
                elif entry.is_file():
                    found.append(entry.path)
            except OSError:
                continue
    return sorted(found)[:limit]


# -- the UI ---------------------------------------------------------------------

class WebUI:
    """Mounted at /webui (its ``index`` also answers /)."""

    def __init__(self, service: VMService, api):
        self.service = service
        self.api = api
        cfg = service.cfg
        self.sessions = Sessions(load_secret(cfg.var), cfg.api_token,
                                 cfg.webui_session_lifetime)
        self.tokens = ConsoleTokens(cfg.console_token_lifetime)
        self.stats = HostStats(service)
        self.history = JournalIndex(service.journal.path)
        self.lookup = TemplateLookup(directories=[VIEWS],
                                     default_filters=["h"],
                                     input_encoding="utf-8",
                                     strict_undefined=True)

    def app_config(self) -> dict:
        """Path config this UI needs in the application's config."""
        novnc = os.path.realpath(self.service.cfg.novnc_dir)
        return {
            # /webui is the dashboard itself, not a redirect to /webui/.
            "/webui": {"tools.trailing_slash.on": False},
            "/static": {
                "tools.vmworker_access.on": False,
                "tools.staticdir.on": True,
                "tools.staticdir.dir": STATIC,
            },
            "/static/novnc": {
                "tools.staticdir.dir": novnc,
            },
            # The dashboard's script polls these with the session cookie;
            # the other /vmachines endpoints still need the token header.
            "/vmachines/list": {"tools.vmworker_access.session_ok": True},
            "/vmachines/status": {"tools.vmworker_access.session_ok": True},
        }

    # -- rendering ------------------------------------------------------------

    def render(self, template: str, status: int = 200, fragment: bool = False,
               **values) -> bytes:
        """A page (or, with ``fragment``, a piece a page's script swaps in:
        it leaves the one-time flash message for the next whole page)."""
        session = self.sessions.ensure()
        flash = None if fragment else self._take_flash()
        page_html = self.lookup.get_template(template).render(
            csrf=self.sessions.csrf_token(session),
            logged_in=(self.sessions.login_required
                       and self.sessions.authenticated()),
            flash=flash, fmt_bytes=fmt_bytes, fmt_age=fmt_age,
            fmt_time=fmt_time, status_class=status_class, now=time.time(),
            final=[s.value for s in FINAL], **values)
        headers = cherrypy.response.headers
        cherrypy.response.status = status
        headers["Content-Type"] = "text/html; charset=utf-8"
        headers["Cache-Control"] = "no-store"
        headers["Content-Security-Policy"] = CSP
        headers["X-Frame-Options"] = "DENY"
        headers["X-Content-Type-Options"] = "nosniff"
        headers["Referrer-Policy"] = "same-origin"
        return page_html.encode()

    def _take_flash(self) -> dict | None:
        morsel = cherrypy.request.cookie.get(FLASH_COOKIE)
        if morsel is None or not morsel.value:
            return None
        cookie = cherrypy.response.cookie
        cookie[FLASH_COOKIE] = ""
        cookie[FLASH_COOKIE]["path"] = "/"
        cookie[FLASH_COOKIE]["max-age"] = 0
        try:
            data = json.loads(base64.urlsafe_b64decode(morsel.value + "=="))
            return {"ok": bool(data["ok"]), "message": str(data["message"])}
        except (ValueError, KeyError, TypeError):
            return None

    @staticmethod
    def _flash(ok: bool, message: str) -> None:
        value = base64.urlsafe_b64encode(json.dumps(
            {"ok": ok, "message": message[:600]}).encode()).decode().rstrip("=")
        cookie = cherrypy.response.cookie
        cookie[FLASH_COOKIE] = value
        morsel = cookie[FLASH_COOKIE]
        morsel["path"] = "/"
        morsel["max-age"] = 60
        morsel["httponly"] = True
        morsel["samesite"] = "Strict"

    def _start_fields(self) -> list[tuple[str, tuple, bool]]:
        required = tuple(validation.START_REQUIRED)
        known = required + tuple(validation.START_OPTIONAL)
        keys = [k for k in FIELD_ORDER if k in known]
        keys += [k for k in known if k not in START_FIELDS]
        return [(k, START_FIELDS.get(k, (k, "text", "", "")), k in required)
                for k in keys]

    # -- pages ------------------------------------------------------------------

    @cherrypy.expose
    @page
    def index(self):
        svc = self.service
        vms = [describe(vm, svc) for vm in reversed(svc.vms())]
        return self.render(
            "index.html", vms=vms, host=self.stats.snapshot(),
            hostname=os.uname().nodename, fields=self._start_fields(),
            images=image_choices(svc.cfg.roots))

    @cherrypy.expose
    @page
    def vm(self, uuid="", part=""):
        try:
            vm = self.service.get(uuid=validation.vm_uuid(uuid))
        except (BadRequest, UnknownVM) as err:
            return self.render("notfound.html", status=404, message=str(err))
        if part == "":
            return self.render("vm.html", **self._vm_values(vm),
                               images=image_choices(self.service.cfg.roots))
        if part == "live":
            return self.render("vm_live.html", fragment=True,
                               **self._vm_values(vm))
        if part == "console":
            return self._console_page(vm)
        raise cherrypy.NotFound()

    def _vm_values(self, vm) -> dict:
        svc = self.service
        events, journal_error = self.history.events(vm.uuid)
        return {"vm": describe(vm, svc), "record": vm, "events": events,
                "journal_error": journal_error,
                "event_titles": EVENT_TITLES, "event_details": event_details,
                "qemu_log": log_tail(svc.layout.vm(vm.uuid).log),
                "ended": vm.status in FINAL,
                "console_ok": vm.status in CONSOLE,
                "modify_fields": [f for f in validation.MODIFY_FIELDS
                                  if f.endswith("_save_to")]}

    def _console_page(self, vm):
        novnc_ok = os.path.isfile(os.path.join(self.service.cfg.novnc_dir,
                                               "core", "rfb.js"))
        token = ""
        if vm.status in CONSOLE and novnc_ok:
            session = self.sessions.ensure()
            token = self.tokens.mint(vm.uuid, session.sid)
        return self.render("console.html", vm=describe(vm, self.service),
                           token=token, novnc_ok=novnc_ok,
                           console_ok=vm.status in CONSOLE)

    @cherrypy.expose
    @public
    def login(self, token=None, next="/webui", **form):
        target = local_target(next if isinstance(next, str) else "")
        if not self.sessions.login_required:
            raise cherrypy.HTTPRedirect(target, 303)
        if cherrypy.request.method != "POST":
            return self.render("login.html", next=target, error="")
        if not self.sessions.check_request_csrf(form):
            return self.render("login.html", status=403, next=target,
                               error="The form expired; try again.")
        if not isinstance(token, str) or not self.sessions.check_api_token(token):
            log.warning("web UI login with a wrong token from %s",
                        cherrypy.request.remote.ip)
            return self.render("login.html", status=401, next=target,
                               error="That is not this worker's API token.")
        self.sessions.login()
        raise cherrypy.HTTPRedirect(target, 303)

    # -- reads for the page scripts --------------------------------------------

    @cherrypy.expose
    @ui_read
    def host(self):
        cherrypy.response.headers["Content-Type"] = "application/json"
        cherrypy.response.headers["Cache-Control"] = "no-store"
        return json.dumps({"success": True, "message": "host capacity",
                           "host": self.stats.snapshot(),
                           "now": time.time()}).encode()

    @cherrypy.expose
    @ui_read
    def capacity(self):
        """The capacity cards alone, for the dashboard's script."""
        return self.render("_capacity.html", fragment=True,
                           host=self.stats.snapshot())

    # -- actions ----------------------------------------------------------------

    @cherrypy.expose
    @action
    def logout(self, **form):
        self.sessions.logout()
        raise cherrypy.HTTPRedirect("/webui/login", 303)

    @cherrypy.expose
    @action
    def console_open(self, token="", **form):
        if not isinstance(token, str) or not token:
            raise BadRequest("parameter 'token' is required")
        session = self.sessions.current()
        uuid = self.tokens.redeem(token, session.sid if session else "")
        grant = open_console(self.service, uuid,
                             self.service.cfg.console_password_lifetime)
        cherrypy.response.headers["Content-Type"] = "application/json"
        cherrypy.response.headers["Cache-Control"] = "no-store"
        return json.dumps({"success": True, "message": "console ready",
                           **grant}).encode()

    @cherrypy.expose
    @action
    def do(self, verb="", **form):
        """start, suspend, resume, destroy, modify: the API's own handlers."""
        back = local_target(form.pop("back", "") or "")
        if verb == "start":
            params = self._start_params(form)
        elif verb in ("suspend", "resume", "destroy", "modify"):
            params = {"uuid": form.pop("uuid", "")}
            if verb == "destroy":
                if form.pop("confirmed", "") != "yes":
                    return self._confirm_destroy(params["uuid"], back)
            elif verb == "modify":
                params.update({k: v for k, v in form.items()
                               if k in validation.MODIFY_FIELDS})
        else:
            raise cherrypy.NotFound()
        try:
            body = json.loads(getattr(self.api, verb)(**params))
        except VMWorkerError as err:
            if wants_json():
                raise
            self._flash(False, str(err))
            raise cherrypy.HTTPRedirect(back, 303) from None
        if wants_json():
            return json.dumps(body).encode()
        if verb == "start" and body.get("uuid"):
            back = f"/webui/vm/{quote(body['uuid'])}"
        self._flash(True, f"{verb}: {body['message']}")
        raise cherrypy.HTTPRedirect(back, 303)

    def _start_params(self, form: dict) -> dict:
        known = set(validation.START_REQUIRED) | set(validation.START_OPTIONAL)
        params = {k: v for k, v in form.items()
                  if k in known and k != "run_agent"
                  and (v != "" or k in validation.START_REQUIRED)}
        if "run_agent" in known:
            # An unticked box sends nothing; say "false" so that a soft_list
            # alone does not ask for the agent.
            params["run_agent"] = ("true" if form.get("run_agent") in
                                   ("true", "on", "1") else "false")
        return params

    def _confirm_destroy(self, uuid: str, back: str):
        try:
            vm = self.service.get(uuid=validation.vm_uuid(uuid))
        except (BadRequest, UnknownVM) as err:
            return self.render("notfound.html", status=404, message=str(err))
        return self.render("confirm.html", vm=describe(vm, self.service),
                           back=back)
