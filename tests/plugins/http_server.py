"""pytest plugin: http_server fixtures (see tests/conftest.py).

A REAL HTTP/1.0 server on 127.0.0.1 (``http.server`` in a thread), usable from async tests, sync
tests and subprocesses alike. Every response is scripted per path:

- ``server.serve(path, body, status=200, headers=None, content_type=...) -> url``
- ``server.serve_file(path, file) -> url``
- ``server.redirect(path, location, status=302) -> url`` (``location`` may be absolute)
- ``server.redirect_chain(path, hops, final_path) -> url``: ``hops`` redirects, then ``final_path``
- ``server.sequence(path, [Reply, ...]) -> url``: one reply per request, the last one repeats
  (e.g. 503, 503, then 200: for retries)
- ``server.serve_slow(path, body, first_byte_delay_s=..., chunk_delay_s=...) -> url``
- ``server.serve_wrong_length(path, body, claimed) -> url``: a Content-Length that lies
- ``server.serve_unsized(path, body) -> url``: no Content-Length (body ends at connection close)
- ``server.serve_drop(path) -> url``: closes the connection without answering
- ``server.url(path)``, ``server.url_localhost(path)`` (host name ``localhost``),
  ``server.hits(path)`` (requests seen), ``server.targets(path)`` (raw request targets)
Unknown paths answer 404.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest


@dataclass
class Reply:
    """One scripted answer."""

    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    content_type: str = "application/octet-stream"
    claimed_length: int | None = None  # Content-Length to send (None: the true length)
    send_length: bool = True
    first_byte_delay_s: float = 0.0
    chunk_delay_s: float = 0.0
    chunk_bytes: int = 64 * 1024
    drop: bool = False


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.0"

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        self._answer(with_body=True)

    def do_HEAD(self) -> None:
        self._answer(with_body=False)

    def _answer(self, *, with_body: bool) -> None:
        path = self.path.split("?", 1)[0]
        reply = self.server.owner.next_reply(path, self.path)
        if reply.first_byte_delay_s:
            time.sleep(reply.first_byte_delay_s)
        if reply.drop:
            self.close_connection = True
            return
        self.send_response(reply.status)
        self.send_header("Content-Type", reply.content_type)
        for name, value in reply.headers.items():
            self.send_header(name, value)
        if reply.send_length:
            length = len(reply.body) if reply.claimed_length is None else reply.claimed_length
            self.send_header("Content-Length", str(length))
        self.send_header("Connection", "close")
        self.end_headers()
        if with_body:
            self._write_body(reply)

    def _write_body(self, reply: Reply) -> None:
        try:
            for start in range(0, len(reply.body), reply.chunk_bytes):
                if reply.chunk_delay_s and start:
                    time.sleep(reply.chunk_delay_s)
                self.wfile.write(reply.body[start : start + reply.chunk_bytes])
                self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    owner: HttpServer


class HttpServer:
    """The scripted server; see the module docstring for the helpers."""

    def __init__(self) -> None:
        self._routes: dict[str, list[Reply]] = {}
        self._hits: defaultdict[str, int] = defaultdict(int)
        self._targets: defaultdict[str, list[str]] = defaultdict(list)
        self._lock = threading.Lock()
        self._httpd = _Server(("127.0.0.1", 0), _Handler)
        self._httpd.owner = self
        self.port: int = self._httpd.server_address[1]
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    def start(self) -> HttpServer:
        self._thread.start()
        return self

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    # ---- addresses
    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url(self, path: str) -> str:
        return f"{self.base_url}{path}"

    def url_localhost(self, path: str) -> str:
        return f"http://localhost:{self.port}{path}"

    def hits(self, path: str) -> int:
        with self._lock:
            return self._hits[path]

    # ---- scripting
    def sequence(self, path: str, replies: list[Reply]) -> str:
        if not replies:
            raise ValueError("sequence needs at least one reply")
        with self._lock:
            self._routes[path] = list(replies)
        return self.url(path)

    def targets(self, path: str) -> list[str]:
        """The raw request targets (path and query, as sent) seen for ``path``."""
        with self._lock:
            return list(self._targets[path])

    def next_reply(self, path: str, target: str = "") -> Reply:
        with self._lock:
            self._hits[path] += 1
            self._targets[path].append(target or path)
            queue = self._routes.get(path)
            if not queue:
                return Reply(status=404, body=b"not found", content_type="text/plain")
            return queue.pop(0) if len(queue) > 1 else queue[0]

    def serve(
        self,
        path: str,
        body: bytes,
        status: int = 200,
        headers: dict[str, str] | None = None,
        content_type: str = "application/octet-stream",
    ) -> str:
        return self.sequence(path, [Reply(status, body, dict(headers or {}), content_type)])

    def serve_file(self, path: str, file: Path | str) -> str:
        return self.serve(path, Path(file).read_bytes())

    def redirect(self, path: str, location: str, status: int = 302) -> str:
        return self.sequence(path, [Reply(status=status, headers={"Location": location})])

    def redirect_chain(self, path: str, hops: int, final_path: str) -> str:
        names = [path] + [f"{path}/hop{i}" for i in range(1, hops)]
        for i, name in enumerate(names):
            self.redirect(name, names[i + 1] if i + 1 < len(names) else final_path)
        return self.url(path)

    def serve_slow(
        self,
        path: str,
        body: bytes,
        first_byte_delay_s: float = 0.0,
        chunk_delay_s: float = 0.0,
        chunk_bytes: int = 1024,
    ) -> str:
        reply = Reply(
            body=body,
            first_byte_delay_s=first_byte_delay_s,
            chunk_delay_s=chunk_delay_s,
            chunk_bytes=chunk_bytes,
        )
        return self.sequence(path, [reply])

    def serve_wrong_length(self, path: str, body: bytes, claimed: int) -> str:
        return self.sequence(path, [Reply(body=body, claimed_length=claimed)])

    def serve_unsized(self, path: str, body: bytes) -> str:
        return self.sequence(path, [Reply(body=body, send_length=False)])

    def serve_drop(self, path: str) -> str:
        return self.sequence(path, [Reply(drop=True)])


@pytest.fixture
def http_server() -> Iterator[HttpServer]:
    server = HttpServer().start()
    try:
        yield server
    finally:
        server.close()
