#!/usr/bin/env python3
"""The bare CherryPy peer of the status row, run as its own process.

    python bench/bare_cherrypy.py --port P --body FILE

Serves ``/vmachines/status`` with a fixed JSON body (a real status answer of
the worker, so the bytes on the wire are the same) on 127.0.0.1, with the
worker's own server settings (``vmworker.app.SERVER_DEFAULTS``: listen queue
128, 32 threads, no autoreload, no screen log) and the worker's app setting
``tools.encode.on = False``. What it lacks on purpose is everything the
worker does per request: the access check, the VM lookup, building the
answer, and the access log.
"""

from __future__ import annotations

import argparse
import os
import sys

import cherrypy

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vmworker.app import SERVER_DEFAULTS  # noqa: E402


class VMachines:
    def __init__(self, body: bytes):
        self.body = body

    @cherrypy.expose
    def status(self, **params):
        cherrypy.response.headers["Content-Type"] = "application/json"
        cherrypy.response.headers["Cache-Control"] = "no-store"
        return self.body


class Root:
    def __init__(self, body: bytes):
        self.vmachines = VMachines(body)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--body", required=True, help="file with the JSON answer")
    args = p.parse_args()
    with open(args.body, "rb") as f:
        body = f.read()
    cherrypy.config.update({**SERVER_DEFAULTS,
                            "server.socket_host": "127.0.0.1",
                            "server.socket_port": args.port})
    cherrypy.tree.mount(Root(body), "/", {"/": {"tools.encode.on": False}})
    cherrypy.engine.signal_handler.subscribe()
    cherrypy.engine.start()
    cherrypy.engine.block()
    return 0


if __name__ == "__main__":
    sys.exit(main())
