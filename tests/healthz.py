"""A kubelet's healthz endpoint on a real HTTP server, for the host evidence path."""

from __future__ import annotations

import threading
import typing
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest


class Kubelet(BaseHTTPRequestHandler):
    """Answers ``ok`` until a test sets ``answer``."""

    answer: typing.ClassVar[tuple[int, bytes]] = (200, b"ok")

    def do_GET(self) -> None:
        code, body = self.answer
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def healthz() -> Iterator[str]:
    """The URL of a healthy kubelet's healthz (``Kubelet.answer`` changes what it says)."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), Kubelet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/healthz"
    finally:
        server.shutdown()
        server.server_close()
        Kubelet.answer = (200, b"ok")
