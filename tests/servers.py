"""Real servers on loopback for the tests: an HTTP server that serves GET from
a folder and records PUT into another (optionally failing the first N PUTs),
and a TCP server that accepts and never answers (for timeouts).

Each server runs in a thread of the test process and is stopped by the test.
"""

from __future__ import annotations

import http.server
import os
import socket
import threading
import time
import warnings


class _Handler(http.server.BaseHTTPRequestHandler):
    server: "FileServer"
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # keep test output clean
        pass

    def do_GET(self):
        # While ``hold`` is set, downloads hang (bounded) as on a stuck server.
        for _ in range(600):
            if not self.server.hold.is_set():
                break
            time.sleep(0.05)
        path = self.server.resolve(self.path)
        if path is None or not os.path.isfile(path):
            self.send_error(404, "Not Found")
            return
        st = os.stat(path)
        etag = f'"{st.st_size:x}-{st.st_mtime_ns:x}"'
        if self.headers.get("If-None-Match") == etag:
            self.server.gets.append((self.path, 304))
            self.send_response(304)
            self.send_header("ETag", etag)
            self.end_headers()
            return
        start = 0
        wanted = self.headers.get("Range", "")
        if wanted.startswith("bytes=") and wanted.endswith("-"):
            start = int(wanted[6:-1])
        size = st.st_size
        self.send_response(206 if start else 200)
        self.send_header("Content-Length", str(size - start))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("ETag", etag)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{size - 1}/{size}")
        self.end_headers()
        with self.server.lock:
            drop = self.server.drop_after
            self.server.drop_after = None  # drop one connection only
        self.server.gets.append((self.path, 206 if start else 200))
        with open(path, "rb") as f:
            f.seek(start)
            sent = 0
            while chunk := f.read(1 << 16):
                if drop is not None and sent + len(chunk) > drop:
                    self.wfile.write(chunk[:drop - sent])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                self.wfile.write(chunk)
                sent += len(chunk)
                if self.server.slow:
                    time.sleep(self.server.slow)

    def do_PUT(self):
        with self.server.lock:
            self.server.puts_started += 1
        for _ in range(600):  # ``hold`` stalls uploads too (bounded)
            if not self.server.hold.is_set():
                break
            time.sleep(0.05)
        length = int(self.headers.get("Content-Length", "0"))
        remaining = length
        data = bytearray()
        while remaining:
            chunk = self.rfile.read(min(remaining, 1 << 20))
            if not chunk:
                break
            data += chunk
            remaining -= len(chunk)
        with self.server.lock:
            self.server.put_attempts.append(self.path)
            fail = self.server.fail_puts > 0
            if fail:
                self.server.fail_puts -= 1
        if fail:
            self.send_error(503, "Try later")
            return
        name = os.path.basename(self.path)
        with open(os.path.join(self.server.upload_dir, name), "wb") as f:
            f.write(data)
        self.send_response(201)
        self.send_header("Content-Length", "0")
        self.end_headers()


class FileServer(http.server.ThreadingHTTPServer):
    """GET serves ``root``; PUT stores into ``upload_dir``."""

    daemon_threads = True

    def __init__(self, root: str, upload_dir: str, fail_puts: int = 0):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.root = root
        self.upload_dir = upload_dir
        self.fail_puts = fail_puts
        self.put_attempts: list[str] = []
        self.puts_started = 0
        self.gets: list[str] = []
        self.lock = threading.Lock()
        self.hold = threading.Event()
        #: Cut the next GET's connection after this many body bytes.
        self.drop_after: int | None = None
        #: Seconds to sleep after each 64 KiB sent (a slow download).
        self.slow = 0.0
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)

    def resolve(self, url_path: str) -> str | None:
        rel = url_path.split("?", 1)[0].lstrip("/")
        if ".." in rel.split("/"):
            return None
        return os.path.join(self.root, rel)

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/{name}"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.hold.clear()
        self.shutdown()
        self.server_close()
        self.thread.join(5)


class FTPServer:
    """pyftpdlib on loopback: anonymous read and write in ``root``."""

    def __init__(self, root: str):
        from pyftpdlib.authorizers import DummyAuthorizer
        from pyftpdlib.handlers import FTPHandler
        from pyftpdlib.servers import ThreadedFTPServer

        authorizer = DummyAuthorizer()
        with warnings.catch_warnings():
            # Anonymous writes are the point of this loopback test server.
            warnings.simplefilter("ignore", RuntimeWarning)
            authorizer.add_anonymous(root, perm="elradfmw")
        handler = type("Handler", (FTPHandler,), {"authorizer": authorizer,
                                                  "passive_ports": None})
        self.root = root
        self.server = ThreadedFTPServer(("127.0.0.1", 0), handler)
        self.port = self.server.address[1]
        self.thread = threading.Thread(
            target=self.server.serve_forever,
            kwargs={"timeout": 0.2, "blocking": True, "handle_exit": False},
            daemon=True)

    def url(self, name: str) -> str:
        return f"ftp://127.0.0.1:{self.port}/{name}"

    def __enter__(self):
        import logging
        logging.getLogger("pyftpdlib").setLevel(logging.WARNING)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.close_all()
        self.thread.join(5)


class SilentServer:
    """Accepts connections and never answers: a read timeout for clients."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.conns: list[socket.socket] = []
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._accept, daemon=True)

    def _accept(self):
        self.sock.settimeout(0.2)
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except (TimeoutError, OSError):
                continue
            self.conns.append(conn)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self.thread.join(5)
        for conn in self.conns:
            conn.close()
        self.sock.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
