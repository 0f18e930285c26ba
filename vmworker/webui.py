"""The operator's web page (``/`` and ``/webui``), rendered with Mako.

Templates live in ``views/``; every expression is HTML-escaped by default
(``default_filters=['h']``), so names, URIs and messages render as text.
"""

from __future__ import annotations

import os
import time

import cherrypy
from mako.lookup import TemplateLookup

from . import resources
from .api import describe
from .service import VMService

VIEWS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                     "views")


class WebUI:
    def __init__(self, service: VMService):
        self.service = service
        self.lookup = TemplateLookup(directories=[VIEWS],
                                     default_filters=["h"],
                                     input_encoding="utf-8",
                                     strict_undefined=True)

    @cherrypy.expose
    def index(self):
        svc = self.service
        vms = [describe(vm, svc) for vm in svc.vms()]
        used = resources.usage(svc.vms(), svc.cfg.qemu_overhead_mb)
        page = self.lookup.get_template("index.html").render(
            vms=list(reversed(vms)), host=svc.host, used=used,
            cpu_limit=int(svc.host.cpus * svc.cfg.cpu_overcommit),
            now=time.time())
        cherrypy.response.headers["Content-Type"] = "text/html; charset=utf-8"
        return page.encode()
