"""A real HTTP server on 127.0.0.1 for adapter tests, answering from a script.

Each route holds a queue of replies (or a function of the request); every request is recorded
(method, path, headers, JSON body) so tests can assert what the client sent.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Reply:
    """One scripted response."""

    body: Any = None  # dict/list -> JSON; str/bytes -> raw
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0
    drip_s: float = 0.0  # > 0: the body goes out 64 bytes at a time, this far apart


@dataclass
class Recorded:
    method: str
    path: str
    headers: dict[str, str]
    body: Any
    query: str = ""


Handler = Callable[[Recorded], Reply]


class ScriptedServer:
    """``with ScriptedServer() as server: server.script("POST", "/v1/x", Reply(...))``."""

    def __init__(self) -> None:
        self.routes: dict[tuple[str, str], deque[Reply | Handler]] = {}
        self.fallback: dict[tuple[str, str], Handler] = {}
        self.patterns: list[tuple[str, re.Pattern[str], Handler]] = []
        self.requests: list[Recorded] = []
        self._lock = threading.Lock()
        outer = self

        class _Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # keep test output clean
                pass

            def _serve(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                try:
                    body = json.loads(raw) if raw else None
                except ValueError:
                    body = raw
                path, _, query = self.path.partition("?")
                request = Recorded(self.command, path, dict(self.headers), body, query)
                with outer._lock:
                    outer.requests.append(request)
                    queue = outer.routes.get((self.command, path))
                    item = queue.popleft() if queue else outer.fallback.get((self.command, path))
                    if item is None:
                        item = next(
                            (
                                h
                                for m, p, h in outer.patterns
                                if m == self.command and p.fullmatch(path)
                            ),
                            None,
                        )
                if item is None:
                    reply = Reply({"error": f"no scripted reply for {self.command} {path}"}, 599)
                else:
                    reply = item if isinstance(item, Reply) else item(request)
                if reply.delay_s:
                    time.sleep(reply.delay_s)
                if isinstance(reply.body, (dict, list)):
                    payload = json.dumps(reply.body).encode()
                    content_type = "application/json"
                elif isinstance(reply.body, str):
                    payload, content_type = reply.body.encode(), "text/plain"
                else:
                    payload, content_type = reply.body or b"", "application/octet-stream"
                try:
                    self.send_response(reply.status)
                    if not any(k.lower() == "content-type" for k in reply.headers):
                        self.send_header("Content-Type", content_type)
                    if not any(k.lower() == "content-length" for k in reply.headers):
                        self.send_header("Content-Length", str(len(payload)))
                    for key, value in reply.headers.items():
                        self.send_header(key, value)
                    self.end_headers()
                    if reply.drip_s:
                        for start in range(0, len(payload), 64):
                            self.wfile.write(payload[start : start + 64])
                            self.wfile.flush()
                            time.sleep(reply.drip_s)
                    else:
                        self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (a timeout test)

            do_GET = _serve
            do_POST = _serve
            do_PUT = _serve
            do_DELETE = _serve

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def script(self, method: str, path: str, *replies: Reply | Handler) -> None:
        with self._lock:
            self.routes.setdefault((method, path), deque()).extend(replies)

    def always(self, method: str, path: str, handler: Handler) -> None:
        self.fallback[(method, path)] = handler

    def reset(self) -> None:
        """Forget every scripted reply, handler and recorded request (reuse across tests)."""
        with self._lock:
            self.routes.clear()
            self.fallback.clear()
            self.patterns.clear()
            self.requests.clear()

    def route(self, method: str, pattern: str, handler: Handler) -> None:
        """Answer every request whose path fully matches the regex ``pattern``."""
        self.patterns.append((method, re.compile(pattern), handler))

    def __enter__(self) -> ScriptedServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._server.shutdown()
        self._server.server_close()
