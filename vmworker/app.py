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
import json
import logging
import logging.handlers
import os
import sys
from urllib.parse import urlsplit

import cherrypy
from cherrypy.process import plugins

from .api import VMachines
from .config import WorkerConfig
from .errors import Forbidden, Unauthorized, VMWorkerError
from .hypervisor.qemu import QemuDriver
from .jobs import Jobs
from .journal import Journal
from .paths import VarLayout
from .service import VMService
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
        if status >= 500 and not isinstance(err, (Forbidden,)):
            log.warning("request %s failed: %s", cherrypy.request.path_info, err)
    else:
        status, message = 500, f"internal error: {type(err).__name__}: {err}"
        log.error("request %s crashed", cherrypy.request.path_info,
                  exc_info=err)
    resp = cherrypy.response
    resp.status = status
    resp.headers["Content-Type"] = "application/json"
    resp.headers["Cache-Control"] = "no-store"
    resp.body = _envelope(status, message)


def error_page(status, message, traceback, version) -> str:
    """CherryPy's own HTTP errors (unknown path, bad method) as JSON too."""
    cherrypy.response.headers["Content-Type"] = "application/json"
    return json.dumps({"success": False, "message": message})


# -- access control -------------------------------------------------------------

def check_access(token: str = "") -> None:
    """Refuse browser cross-site requests, and requests without the token.

    Every endpoint answers GET, so a page in an operator's browser could
    fire ``<img src=".../vmachines/destroy?name=db">``. Browsers say where a
    request comes from (``Sec-Fetch-Site``, ``Origin``); programs such as
    curl and the master send neither and are unaffected.
    """
    headers = cherrypy.request.headers
    site = headers.get("Sec-Fetch-Site", "").lower()
    if site in ("cross-site", "same-site"):
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
        if not hmac.compare_digest(given.encode(), token.encode()):
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


def setup_logging(layout: VarLayout, level: str) -> None:
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    root = logging.getLogger()
    root.setLevel(level.upper())
    for handler in list(root.handlers):
        root.removeHandler(handler)
    stderr = logging.StreamHandler()
    stderr.setFormatter(fmt)
    file = logging.handlers.RotatingFileHandler(
        layout.log_file, maxBytes=10 << 20, backupCount=5)
    file.setFormatter(fmt)
    for handler in (stderr, file):
        root.addHandler(handler)
    # CherryPy's error log propagates to ours; its access log gets a file.
    access = logging.handlers.RotatingFileHandler(
        os.path.join(layout.log_dir, "access.log"), maxBytes=10 << 20,
        backupCount=2)
    access.setFormatter(logging.Formatter("%(message)s"))
    cherrypy.log.access_log.addHandler(access)
    cherrypy.log.access_log.propagate = False


class ServicePlugin(plugins.SimplePlugin):
    """Stops jobs and closes the journal when the engine stops (VMs stay)."""

    def __init__(self, bus, service: VMService):
        super().__init__(bus)
        self.service = service

    def stop(self):
        self.service.shutdown()

    stop.priority = 60  # after the HTTP server and the supervisor


class Root:
    def __init__(self, service: VMService, jobs: Jobs):
        self.vmachines = VMachines(service, jobs)
        self.webui = WebUI(service)

    @cherrypy.expose
    def index(self):
        return self.webui.index()


def build(cfg: WorkerConfig) -> VMService:
    """Create everything, replay the journal, mount the app, subscribe plugins."""
    cfg.check_paths()
    layout = VarLayout(cfg.var)
    layout.create()
    for root in cfg.roots:
        os.makedirs(root, exist_ok=True)
    setup_logging(layout, cfg.log_level)
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
                        on_event=on_event)
    service = VMService(cfg, layout, journal, driver)
    service.load()
    jobs = Jobs(service)
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
    cherrypy.tree.mount(Root(service, jobs), "/", app_config)
    return service
