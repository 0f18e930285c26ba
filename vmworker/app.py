"""Assembling the worker: the CherryPy tree, its config, its plugins.

``build`` wires journal → service → jobs → supervisor → HTTP handlers and
subscribes everything with a lifecycle to the CherryPy engine; ``worker.py``
only applies configuration and calls ``engine.start(); engine.block()``.
The one error handler of the worker lives here: any ``VMWorkerError``
raised by a handler or a tool becomes the JSON envelope with its status.
"""

from __future__ import annotations

import ctypes
import hmac
import ipaddress
import json
import logging
import os
import sys
import threading
from urllib.parse import quote, urlsplit

import cherrypy
import psutil
from cherrypy.process import plugins

from . import logs, openapi
from .api import VMachines
from .cache import ImageCache
from .config import WorkerConfig
from .errors import ConfigError, Forbidden, Unauthorized, VMWorkerError
from .hypervisor.qemu import QemuDriver
from .jobs import Jobs
from .journal import Journal
from .paths import VarLayout
from .service import VMService
from .state import FINAL
from .supervisor import Supervisor, SupervisorPlugin
from .webui import WebUI

log = logging.getLogger(__name__)

PR_SET_CHILD_SUBREAPER = 36

#: Server settings measured to hold 50 concurrent clients (DESIGN.md).
SERVER_DEFAULTS = {
    "server.socket_host": "127.0.0.1",
    "server.socket_port": 8090,
    "server.socket_queue_size": 128,
    "server.thread_pool": 32,
    "engine.autoreload.on": False,
    "log.screen": False,
    "checker.on": False,
}


# -- errors -------------------------------------------------------------------

def _envelope(status: int, message: str) -> bytes:
    return json.dumps({"success": False, "message": message}).encode()


def handle_error() -> None:
    """``request.error_response``: the one place errors become answers."""
    err = sys.exc_info()[1]
    if isinstance(err, VMWorkerError):
        status, message = err.http_status, str(err)
        if status >= 500:
            log.warning("request %s failed: %s", cherrypy.request.path_info, err)
    elif isinstance(err, ValueError) and _raised_in_body_parser(err):
        # CherryPy's form parser raises ValueError on a malformed body
        # (e.g. multipart without a boundary): the client's fault.
        status, message = 400, f"malformed request body: {err}"
    else:
        status, message = 500, f"internal error: {type(err).__name__}: {err}"
        log.error("request %s crashed", cherrypy.request.path_info,
                  exc_info=err)
    resp = cherrypy.response
    resp.status = status
    resp.headers["Content-Type"] = "application/json"
    resp.headers["Cache-Control"] = "no-store"
    resp.body = _envelope(status, message)


def _raised_in_body_parser(err: BaseException) -> bool:
    tb = err.__traceback__
    while tb is not None:
        if tb.tb_frame.f_globals.get("__name__") == "cherrypy._cpreqbody":
            return True
        tb = tb.tb_next
    return False


def error_page(status, message, traceback, version) -> str:
    """CherryPy's own HTTP errors (unknown path, bad method) as JSON too."""
    cherrypy.response.headers["Content-Type"] = "application/json"
    return json.dumps({"success": False, "message": message})


# -- access control -------------------------------------------------------------

def check_access(token: str = "", sessions=None, session_ok: bool = False) -> None:
    """Refuse browser cross-site requests, and requests without the token.

    Every endpoint answers GET, so a page in an operator's browser could
    fire ``<img src=".../vmachines/destroy?name=db">``. Browsers say where a
    request comes from (``Sec-Fetch-Site``, ``Origin``); programs such as
    curl and the master send neither and are unaffected.

    The web UI marks its handlers (see ``webui``): a *page* only shows
    things, so a top-level navigation from another site (a link in the
    master's UI) may open it; pages, the UI's reads and its *actions* (POST
    with a CSRF token) accept the browser's login cookie (``sessions``) in
    place of the token, as do paths configured with ``session_ok`` (the
    read-only list and status the dashboard polls); a page sends a browser
    without either to the login form. The token header works everywhere.
    """
    request = cherrypy.request
    headers = request.headers
    handler = getattr(request.handler, "callable", None)
    page = getattr(handler, "vmworker_page", False)
    site = headers.get("Sec-Fetch-Site", "").lower()
    navigation = (page and request.method in ("GET", "HEAD")
                  and headers.get("Sec-Fetch-Mode", "").lower() == "navigate")
    if site in ("cross-site", "same-site") and not navigation:
        raise Forbidden(f"refused a {site} request from a browser")
    origin = headers.get("Origin")
    if origin and origin != "null":
        host = headers.get("Host", "")
        if urlsplit(origin).netloc.lower() != host.lower():
            raise Forbidden(f"refused a request from origin {origin}")
    elif origin == "null":
        raise Forbidden("refused a request from an opaque origin")
    if token:
        given = headers.get("X-VMWorker-Token", "")
        auth = headers.get("Authorization", "")
        if auth.lower().startswith("bearer "):
            given = auth[7:].strip()
        if hmac.compare_digest(given.encode(), token.encode()):
            return
        if getattr(handler, "vmworker_public", False):
            return
        cookie_ok = (page or session_ok
                     or getattr(handler, "vmworker_ui", False))
        if cookie_ok and sessions is not None and sessions.authenticated():
            return
        if page and request.method in ("GET", "HEAD"):
            here = request.path_info + (f"?{request.query_string}"
                                        if request.query_string else "")
            raise cherrypy.HTTPRedirect(
                f"/webui/login?next={quote(here, safe='')}", 303)
        raise Unauthorized("this worker needs its API token "
                           "(Authorization: Bearer … or X-VMWorker-Token)")


cherrypy.tools.vmworker_access = cherrypy.Tool("before_handler", check_access,
                                               priority=10)


# -- plumbing -----------------------------------------------------------------

def become_subreaper() -> None:
    """Orphaned descendants are reparented to us, so we reap them promptly.

    On these machines PID 1 reaps only every ~2 s, so an exited QEMU would
    otherwise linger as a zombie (DESIGN.md).
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    except (OSError, AttributeError) as err:
        log.warning("cannot become a child subreaper: %s", err)


class ServicePlugin(plugins.SimplePlugin):
    """Stops jobs and closes the journal when the engine stops (VMs stay)."""

    def __init__(self, bus, service: VMService):
        super().__init__(bus)
        self.service = service

    def stop(self):
        self.service.shutdown()

    stop.priority = 60  # after the HTTP server and the supervisor


class Root:
    def __init__(self, service: VMService, jobs: Jobs, supervisor: Supervisor):
        self.vmachines = VMachines(service, jobs)
        self.worker = WorkerStats(service, supervisor)
        self.webui = WebUI(service, self.vmachines)
        # / is the dashboard: the same handler, so the same access rules.
        self.index = self.webui.index

    @cherrypy.expose
    def openapi_json(self):
        """/openapi.json: the API's OpenAPI 3.1 description."""
        cherrypy.response.headers["Content-Type"] = "application/json"
        return json.dumps(openapi.spec()).encode()


class WorkerStats:
    """/worker/stats: how the worker itself is doing (operators, benchmarks)."""

    def __init__(self, service: VMService, supervisor: Supervisor):
        self.service = service
        self.supervisor = supervisor

    @cherrypy.expose
    def stats(self):
        sup = self.supervisor
        vms = self.service.vms()
        body = {
            "success": True, "message": "worker statistics",
            "pid": os.getpid(),
            "rss_bytes": psutil.Process().memory_info().rss,
            "threads": threading.active_count(),
            "vms": len(vms),
            "vms_not_ended": sum(vm.status not in FINAL for vm in vms),
            "journal_bytes": self.service.journal.size(),
            "supervisor": {"ticks": sup.ticks,
                           "last_tick_ms": round(sup.last_tick_seconds * 1e3, 3),
                           "max_tick_ms": round(sup.max_tick_seconds * 1e3, 3)},
            # Entries of the per-VM tables: bounded by the VMs in memory.
            "bookkeeping": {"vm_locks": self.service.lock_count(),
                            "supervisor_settled": sup.settled_count(),
                            **self.service.driver.bookkeeping()},
        }
        cherrypy.response.headers["Content-Type"] = "application/json"
        return json.dumps(body).encode()


def check_listen(host: str, cfg: WorkerConfig) -> None:
    """Refuse to serve other hosts without a token, unless told to."""
    try:
        loopback = ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if not loopback and not cfg.api_token and not cfg.insecure:
        raise ConfigError(
            f"refusing to listen on {host} without an api_token: anyone who "
            "can reach it could start and destroy VMs; set api_token in "
            "[worker] (or insecure = True to accept that)")


def build(cfg: WorkerConfig) -> VMService:
    """Create everything, replay the journal, mount the app, subscribe plugins.

    Logging is set up before (``logs.setup``), so that replay and
    adoption are logged where configured.
    """
    cfg.check_paths()
    check_listen(cherrypy.config.get("server.socket_host", "127.0.0.1"), cfg)
    layout = VarLayout(cfg.var)
    layout.create()
    for root in cfg.roots:
        os.makedirs(root, exist_ok=True)
    become_subreaper()
    journal = Journal(layout.journal)
    service: VMService | None = None

    def on_event(uuid: str, event: dict) -> None:
        if service is not None:
            service.wakeup.set()

    driver = QemuDriver(binary=cfg.qemu_binary, accel=cfg.accel,
                        vnc_listen=cfg.vnc_listen,
                        vnc_display_base=cfg.vnc_display_base,
                        vnc_display_count=cfg.vnc_display_count,
                        on_event=on_event, vnc_password=cfg.vnc_password)
    service = VMService(cfg, layout, journal, driver)
    service.load()
    cache = ImageCache(layout.images, roots=cfg.roots,
                       qemu_img=cfg.qemu_img_binary,
                       timeout=(cfg.fetch_connect_timeout, cfg.fetch_read_timeout),
                       max_bytes=cfg.image_cache_max_mb << 20,
                       pinned=service.pinned_blobs)
    jobs = Jobs(service, cache)
    supervisor = Supervisor(service)
    SupervisorPlugin(cherrypy.engine, supervisor,
                     cfg.supervisor_interval).subscribe()
    ServicePlugin(cherrypy.engine, service).subscribe()
    app_config = {
        "/": {
            "request.error_response": handle_error,
            "error_page.default": error_page,
            "tools.vmworker_access.on": True,
            "tools.vmworker_access.token": cfg.api_token,
            "tools.encode.on": False,
        },
    }
    root = Root(service, jobs, supervisor)
    app_config["/"]["tools.vmworker_access.sessions"] = root.webui.sessions
    app_config.update(root.webui.app_config())
    application = cherrypy.tree.mount(root, "/", app_config)
    application.log = logs.AccessLog(id(application), cherrypy.log.logger_root)
    return service
