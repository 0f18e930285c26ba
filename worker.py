#!/usr/bin/env python3
"""vmworker's entry point: read the configuration, start the engine.

    python worker.py [--config FILE] [--host H] [--port P] [--var-dir DIR]
                     [--daemon --pidfile FILE]

Flags override the config file; the config file overrides the defaults. A
wrong key or value stops the worker (exit 2) with the key's name, before
it detaches. ``--daemon`` returns once the worker answers (exit 0) or
failed to start (non-zero). SIGTERM stops the worker and leaves every VM
running; SIGHUP reopens the log files.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

import cherrypy
from cherrypy.lib import reprconf

from vmworker import app, config, daemon, logs
from vmworker.errors import ConfigError, VMWorkerError

#: Namespaces CherryPy accepts in [global]; any other key is a typo.
GLOBAL_NAMESPACES = ("server", "engine", "log", "checker", "tree", "tools",
                     "request", "response", "hooks", "error_page")
#: [global] server settings that must be whole numbers.
_SERVER_INTS = ("socket_port", "socket_queue_size", "thread_pool",
                "thread_pool_max", "accepted_queue_size",
                "max_request_header_size", "max_request_body_size")


def parse_args(argv):
    p = argparse.ArgumentParser(description="vmworker: runs QEMU VMs for a master")
    p.add_argument("--config", help="CherryPy-style config file ([global], [worker])")
    p.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port to listen on (default 8090)")
    p.add_argument("--var-dir", help="runtime data folder (default ./var)")
    p.add_argument("--daemon", action="store_true",
                   help="detach into the background once the worker answers")
    p.add_argument("--pidfile", help="write the worker's pid here, locked "
                   "while it runs (refuses to start if another worker holds it)")
    return p.parse_args(argv)


def check_global(values: dict, source: str) -> None:
    """Refuse [global] keys CherryPy would silently ignore, and bad values."""
    for key, value in values.items():
        namespace, _, name = key.partition(".")
        if namespace not in GLOBAL_NAMESPACES or not name:
            raise ConfigError(
                f"unknown key {key!r} in [global] of {source}; server "
                "settings look like server.socket_port (namespaces: "
                f"{', '.join(GLOBAL_NAMESPACES)})")
        if namespace != "server":
            continue
        if not hasattr(cherrypy._cpserver.Server, name):
            raise ConfigError(f"unknown key {key!r} in [global] of {source}")
        if name in _SERVER_INTS and (isinstance(value, bool)
                                     or not isinstance(value, int)):
            raise ConfigError(f"[global] {key} must be a whole number, "
                              f"not {value!r}")
        if name == "socket_port" and not 0 <= value <= 65535:
            raise ConfigError(f"[global] {key} must be a port (0-65535), "
                              f"not {value!r}")
        if name == "socket_host" and not isinstance(value, str):
            raise ConfigError(f"[global] {key} must be an address in quotes, "
                              f"not {value!r}")


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
                check_global(values, args.config)
                server.update(values)
            elif name == "worker":
                worker_section.update(values)
            else:
                raise ConfigError(f"unknown section [{name}] in {args.config}; "
                                  "use [global] and [worker]")
    if args.host:
        server["server.socket_host"] = args.host
    if args.port is not None:
        if not 0 <= args.port <= 65535:
            raise ConfigError(f"--port must be 0-65535, not {args.port}")
        server["server.socket_port"] = args.port
    if args.var_dir:
        worker_section["var_dir"] = args.var_dir
    cfg = config.from_mapping(worker_section)
    cfg.check_paths()
    # A daemon works from /: make every path absolute while "." is known.
    cfg = dataclasses.replace(
        cfg, var_dir=cfg.var, log_file=cfg.log_path,
        storage_roots=tuple(os.path.abspath(r) for r in cfg.storage_roots))
    return server, cfg


def serve(args, server: dict, cfg, detached: daemon.Detached | None) -> int:
    """Build and run the worker until SIGTERM; return the exit status."""
    pidfile = daemon.PidFile(args.pidfile) if args.pidfile else None
    try:
        # A daemon shows only errors on the starter's terminal until ready.
        logs.setup(cfg, stderr="ERROR" if detached else True)
        if pidfile is not None:
            pidfile.acquire()
    except (daemon.PidFileError, OSError) as err:
        print(f"vmworker: cannot start: {err}", file=sys.stderr)
        return 1
    try:
        return run_engine(server, cfg, detached)
    finally:
        if pidfile is not None:
            pidfile.release()


def run_engine(server: dict, cfg, detached: daemon.Detached | None) -> int:
    """Build the app, serve until the engine exits; a daemon says when ready."""
    try:
        cherrypy.config.update(server)
        app.build(cfg)
    except ConfigError as err:
        print(f"vmworker: {err}", file=sys.stderr)
        return 2
    except (VMWorkerError, OSError) as err:
        print(f"vmworker: cannot start: {err}", file=sys.stderr)
        return 1
    engine = cherrypy.engine
    stderr_log = os.path.join(os.path.dirname(cfg.log_path), "stderr.log")
    # SIGHUP reopens the logs (CherryPy's default would re-exec us);
    # SIGTERM is CherryPy's engine exit, which leaves the VMs running.
    engine.signal_handler.handlers["SIGHUP"] = lambda: logs.reopen(
        after=(lambda: daemon.reopen_stderr(stderr_log)) if detached else None)
    engine.signal_handler.subscribe()
    try:
        engine.start()
    except Exception as err:  # a plugin failed; the engine has stopped
        print(f"vmworker: cannot start: {err}", file=sys.stderr)
        return 1
    if detached is not None:
        logs.setup(cfg, stderr=False)
        detached.ready(stderr_log)
    engine.block()
    return 0


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        server, cfg = load_config(args)
    except ConfigError as err:
        print(f"vmworker: {err}", file=sys.stderr)
        return 2
    daemon.set_process_name()
    detached = daemon.detach() if args.daemon else None
    status = serve(args, server, cfg, detached)
    if detached is not None:
        detached.failed(status)  # does nothing once the daemon was ready
    return status


if __name__ == "__main__":
    sys.exit(main())
