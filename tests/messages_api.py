"""A local server speaking just enough of the Anthropic Messages API for the real SDK.

``POST /v1/messages`` answers from a script, one entry per request: a ``Message``
body (``reply``/``tool_use``), an error status with headers (429 with retry-after,
5xx), or a reply held back until a deadline passes (``Slow``). Requests are kept
(JSON bodies and headers) so tests can read the prompt and tools the SDK sent. It
runs ``http.server`` in a thread: the SDK under test runs in the test's event loop.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass(frozen=True)
class Error:
    status: int
    message: str = "scripted error"
    headers: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Slow:
    """Answer ``then`` only after ``seconds`` (or when the server stops)."""

    seconds: float
    then: dict[str, Any]


Answer = dict[str, Any] | Error | Slow


def tool_use(name: str, input_: object, call_id: str = "") -> dict[str, Any]:
    return {"type": "tool_use", "id": call_id or f"toolu_{name}", "name": name, "input": input_}


def reply(*content: dict[str, Any], stop_reason: str = "tool_use", input_tokens: int = 900,
          output_tokens: int = 100) -> dict[str, Any]:
    """A Message body; text blocks are ``{"type": "text", "text": …}``."""
    return {"id": "msg_test", "type": "message", "role": "assistant", "model": "claude-test",
            "content": list(content), "stop_reason": stop_reason, "stop_sequence": None,
            "usage": {"input_tokens": input_tokens, "output_tokens": output_tokens}}


def text(words: str) -> dict[str, Any]:
    return {"type": "text", "text": words}


class MessagesApi:
    def __init__(self) -> None:
        self.script: list[Answer] = []
        self.requests: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self._stopping = threading.Event()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def answer(self, *answers: Answer) -> None:
        self.script.extend(answers)

    def _next(self) -> Answer:
        if not self.script:
            return Error(500, "the test scripted no answer for this request")
        return self.script.pop(0)

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        api = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass  # keep test output clean

            def _send(self, status: int, body: dict[str, Any],
                      headers: Mapping[str, str] | None = None) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self) -> None:
                length = int(self.headers.get("content-length", "0"))
                api.requests.append(json.loads(self.rfile.read(length)))
                api.headers.append({k.lower(): v for k, v in self.headers.items()})
                answer = api._next()
                if isinstance(answer, Slow):
                    api._stopping.wait(answer.seconds)
                    answer = answer.then
                try:
                    if isinstance(answer, Error):
                        kind = ("rate_limit_error" if answer.status == 429 else "api_error")
                        self._send(answer.status, {"type": "error", "error": {
                            "type": kind, "message": answer.message}}, answer.headers)
                    else:
                        self._send(200, answer)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout): that is what the test wanted

        return Handler

    def __enter__(self) -> MessagesApi:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stopping.set()
        self._server.shutdown()
        self._server.server_close()


def messages_api_server() -> Iterator[MessagesApi]:
    """Body of the ``messages_api`` fixture."""
    with MessagesApi() as api:
        yield api

