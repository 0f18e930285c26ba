"""The worker's log files: set up once, reopened on SIGHUP.

Two files under ``VAR/log/``: ``worker.log`` (what the worker did, also
shown on stderr in the foreground) and ``access.log`` (one line per HTTP
request, in the Combined Log Format that CherryPy and Apache write). Both
rotate by size.

The access line is written by ``AccessLog``, the application's log manager,
straight to the file: CherryPy's own builds each line from twelve escaped
fields, a uuid4 and a LogRecord, and its size-rotating handler stats the
file twice and seeks it on every line. On the status path under load that
was most of what separated the worker from a bare CherryPy endpoint
(py-spy, issue 7). The line keeps CherryPy's escaping of what the client
sent, so a request cannot forge log lines.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import threading
import time

import cherrypy
from cherrypy import _cplogging

from .config import WorkerConfig

log = logging.getLogger(__name__)


class AccessFile(logging.handlers.RotatingFileHandler):
    """access.log: rotated by a byte count kept in memory, not by stat."""

    def _open(self):
        stream = super()._open()
        stream.seek(0, os.SEEK_END)
        self.size = stream.tell()
        return stream

    def shouldRollover(self, record) -> bool:
        return self.maxBytes > 0 and self.size >= self.maxBytes

    def write_line(self, line: str) -> None:
        data = line + "\n"
        with self.lock:
            if self.stream is None:
                self.stream = self._open()
            if self.maxBytes > 0 and self.size + len(data) > self.maxBytes:
                self.doRollover()
            self.stream.write(data)
            self.stream.flush()
            self.size += len(data)

    def emit(self, record: logging.LogRecord) -> None:
        self.write_line(self.format(record))


class AccessLog(_cplogging.LogManager):
    """An application's log manager whose access lines cost little."""

    def access(self) -> None:
        request = cherrypy.serving.request
        response = cherrypy.serving.response
        status = response.output_status
        status = status.split(b" ", 1)[0].decode("ascii") if status else "-"
        headers = request.headers
        line = '%s - %s %s "%s" %s %s "%s" "%s"' % (
            request.remote.name or request.remote.ip,
            _clean(getattr(request, "login", None) or "-"),
            time.strftime("[%d/%b/%Y:%H:%M:%S]"),
            _clean(request.request_line), status,
            dict.get(response.headers, "Content-Length", "") or "-",
            _clean(dict.get(headers, "Referer", "")),
            _clean(dict.get(headers, "User-Agent", "")))
        record = None
        for handler in cherrypy.log.access_log.handlers:
            if isinstance(handler, AccessFile):
                handler.write_line(line)
            elif not isinstance(handler, logging.NullHandler):
                # One an operator added (``log.access_file``, ``log.screen``).
                if record is None:
                    record = self.access_log.makeRecord(
                        self.access_log.name, logging.INFO, "", 0, line,
                        None, None)
                handler.handle(record)


def _clean(value) -> str:
    """Escape what a client sent as CherryPy does: quotes, controls, \\."""
    value = str(value)
    if value.isprintable() and value.isascii() and '"' not in value \
            and "\\" not in value:
        return value
    return repr(value.replace('"', '\\"').encode())[2:-1].replace("\\\\", "\\")


def setup(cfg: WorkerConfig, stderr: bool | str = True) -> None:
    """Log to size-rotated files (and stderr).

    ``stderr`` is True, False, or the least level shown there (``"ERROR"``
    for a daemon that is not serving yet). Called again (a daemon once it
    is ready), it replaces the handlers it installed before.
    """
    root = logging.getLogger()
    access_log = cherrypy.log.access_log
    for logger in (root, access_log):
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
            handler.close()
    root.setLevel(cfg.log_level.upper())
    os.makedirs(os.path.dirname(cfg.log_path), exist_ok=True)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    handlers: list[logging.Handler] = [logging.handlers.RotatingFileHandler(
        cfg.log_path, maxBytes=cfg.log_max_bytes, backupCount=cfg.log_backups)]
    if stderr:
        to_stderr = logging.StreamHandler()
        if isinstance(stderr, str):
            to_stderr.setLevel(stderr.upper())
        handlers.append(to_stderr)
    for handler in handlers:
        handler.setFormatter(fmt)
        root.addHandler(handler)
    # CherryPy's error log propagates to ours; its access log gets a file.
    access = AccessFile(os.path.join(os.path.dirname(cfg.log_path), "access.log"),
                        maxBytes=cfg.log_max_bytes, backupCount=cfg.log_backups)
    access.setFormatter(logging.Formatter("%(message)s"))
    access_log.addHandler(access)
    access_log.propagate = False


def file_handlers() -> set[logging.FileHandler]:
    """Every handler that writes a log file."""
    found = set()
    loggers = [logging.getLogger()]
    loggers += [lg for lg in logging.Logger.manager.loggerDict.values()
                if isinstance(lg, logging.Logger)]
    for lg in loggers:
        for handler in lg.handlers:
            if isinstance(handler, logging.FileHandler):
                found.add(handler)
    return found


def reopen(after=None) -> None:
    """Close and reopen every log file, e.g. after logrotate renamed them.

    Runs on its own thread: the SIGHUP handler runs in the main thread,
    which may be inside a logging call holding a handler's lock.
    ``after`` runs next on that thread (the daemon reopens its stderr).
    """
    def run():
        handlers = file_handlers()
        for handler in handlers:
            handler.acquire()
            try:
                if handler.stream is not None:
                    handler.stream.close()
                handler.stream = handler._open()
            except OSError as err:
                log.error("cannot reopen log file %s: %s",
                          handler.baseFilename, err)
            finally:
                handler.release()
        if after is not None:
            after()
        log.info("SIGHUP: reopened %d log files", len(handlers))

    threading.Thread(target=run, name="reopen-logs", daemon=True).start()
