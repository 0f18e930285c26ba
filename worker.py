#!/usr/bin/env python3
"""vmworker's entry point: read the configuration, start the engine.

    python worker.py [--config FILE] [--host H] [--port P] [--var-dir DIR]
                     [--daemon --pidfile FILE]

Flags override the config file; the config file overrides the defaults.
SIGTERM stops the worker and leaves every VM running.
"""

from __future__ import annotations

import argparse
import os
import sys

import cherrypy
from cherrypy.lib import reprconf
from cherrypy.process import plugins

from vmworker import app, config
from vmworker.errors import ConfigError


def parse_args(argv):
    p = argparse.ArgumentParser(description="vmworker: runs QEMU VMs for a master")
    p.add_argument("--config", help="CherryPy-style config file ([global], [worker])")
    p.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port to listen on (default 8090)")
    p.add_argument("--var-dir", help="runtime data folder (default ./var)")
    p.add_argument("--daemon", action="store_true", help="detach into the background")
    p.add_argument("--pidfile", help="write the worker's pid here")
    return p.parse_args(argv)


def load_config(args):
    """Return (server settings, WorkerConfig) from defaults, file and flags."""
    server = dict(app.SERVER_DEFAULTS)
    worker_section = {}
    if args.config:
        try:
            sections = reprconf.Config(args.config)
        except (OSError, ValueError, SyntaxError) as err:
            raise ConfigError(f"cannot read config file {args.config}: {err}") from err
        for name, values in sections.items():
            if name == "global":
                server.update(values)
            elif name == "worker":
                worker_section.update(values)
            else:
                raise ConfigError(f"unknown section [{name}] in {args.config}; "
                                  "use [global] and [worker]")
    if args.host:
        server["server.socket_host"] = args.host
    if args.port is not None:
        server["server.socket_port"] = args.port
    if args.var_dir:
        worker_section["var_dir"] = args.var_dir
    return server, config.from_mapping(worker_section)


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        server, cfg = load_config(args)
        cherrypy.config.update(server)
        engine = cherrypy.engine
        if args.daemon:
            plugins.Daemonizer(engine).subscribe()
        if args.pidfile:
            plugins.PIDFile(engine, os.path.abspath(args.pidfile)).subscribe()
        app.build(cfg)
    except ConfigError as err:
        print(f"vmworker: {err}", file=sys.stderr)
        return 2
    if hasattr(engine, "signal_handler"):
        engine.signal_handler.subscribe()
    engine.start()
    engine.block()
    return 0


if __name__ == "__main__":
    sys.exit(main())
