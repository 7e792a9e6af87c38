"""A real HTTP server on 127.0.0.1 for download tests: Range support and switchable misbehaviour.

It records every request, serves from a dict in memory, and stops itself after `lifetime` seconds
so a hung test cannot leave it running.
"""

from __future__ import annotations

import base64
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FileServer:
    """Serves `files` (URL path → bytes). Misbehaviours, off by default:

    - `ignore_range`: answer every request with 200 and the whole file;
    - `cuts`: path → how many of its next answers announce the full length, send half, hang up;
    - `pause`: seconds to wait in the middle of every body (keeps concurrent clients overlapping).

    `types` gives a path's Content-Type; `auth` ("user:password"), when set, is required as
    Basic authorization (401 otherwise); `headers` records each request's (path, headers).
    """

    def __init__(self, files: dict[str, bytes], lifetime: float = 60.0):
        self.files = dict(files)
        self.requests: list[tuple[str, str | None, int]] = []  # (path, Range header, status)
        self.ignore_range = False
        self.cuts: dict[str, int] = {}
        self.pause = 0.0
        self.types: dict[str, str] = {}
        self.auth: str | None = None
        self.headers: list[tuple[str, dict[str, str]]] = []
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._httpd.daemon_threads = True
        self._timer = threading.Timer(lifetime, self.stop)
        self._timer.daemon = True

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FileServer:
        threading.Thread(target=self._httpd.serve_forever, args=(0.05,), daemon=True).start()
        self._timer.start()
        return self

    def stop(self) -> None:
        self._timer.cancel()
        self._httpd.shutdown()
        self._httpd.server_close()

    def answers(self, path: str) -> list[tuple[str | None, int]]:
        """(Range header or None, status) of each request for `path`, in order."""
        return [(header, status) for p, header, status in self.requests if p == path]


def _handler(server: FileServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        timeout = 10  # a stuck client cannot hold a server thread forever

        def do_GET(self) -> None:
            header = self.headers.get("Range")
            data = server.files.get(self.path)
            match = None if server.ignore_range else re.fullmatch(r"bytes=(\d+)-", header or "")
            server.headers.append((self.path, dict(self.headers.items())))
            if server.auth is not None and self.headers.get("Authorization") != "Basic " + (
                base64.b64encode(server.auth.encode()).decode()
            ):
                self._send(401, b"", {"WWW-Authenticate": 'Basic realm="index"'})
            elif data is None:
                self._send(404, b"")
            elif match is None:
                self._send(200, data)
            elif int(match[1]) >= len(data):
                self._send(416, b"", {"Content-Range": f"bytes */{len(data)}"})
            else:
                start = int(match[1])
                range_ = f"bytes {start}-{len(data) - 1}/{len(data)}"
                self._send(206, data[start:], {"Content-Range": range_})

        def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
            """Answer with `body`; a cut answer still announces the full length, as a dropped
            connection would."""
            server.requests.append((self.path, self.headers.get("Range"), status))
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            if self.path in server.types:
                self.send_header("Content-Type", server.types[self.path])
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.end_headers()
            if server.cuts.get(self.path, 0) > 0:
                server.cuts[self.path] -= 1
                body = body[: len(body) // 2]
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            time.sleep(server.pause)
            self.wfile.write(body[len(body) // 2 :])

        def log_message(self, format: str, *args: object) -> None:
            """Quiet: the tests read `requests` instead."""

    return Handler
