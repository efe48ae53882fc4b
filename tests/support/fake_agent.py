"""A scripted stand-in for the agent on a real Unix socket, for tests of the CLI's own behaviour (what it asks, what
it prints, how it waits): answers come from a table of routes, and every request is recorded."""

from __future__ import annotations

import contextlib
import json
import socketserver
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

Answer = tuple[int, Any] | Callable[["Seen"], tuple[int, Any]]
"""A status and a JSON body (bytes are sent as they are), or a function of the request that returns them."""


@dataclass
class Seen:
    method: str
    path: str
    body: Any


@dataclass
class FakeAgent:
    socket: Path
    routes: dict[str, Answer] = field(default_factory=dict)
    """``"GET /v1/health"`` to its answer; anything else is a 404 ``NotFound``."""
    delays: dict[str, float] = field(default_factory=dict)
    seen: list[Seen] = field(default_factory=list)

    def paths(self) -> list[str]:
        return [f"{s.method} {s.path}" for s in self.seen]


def _handler(agent: FakeAgent) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def _serve(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            seen = Seen(self.command, self.path, json.loads(raw) if raw else None)
            agent.seen.append(seen)
            key = f"{self.command} {self.path}"
            time.sleep(agent.delays.get(key, 0.0))
            answer = agent.routes.get(key, (404, {"error": {"code": "NotFound", "message": f"no route {key}"}}))
            status, body = answer(seen) if callable(answer) else answer
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/cose" if isinstance(body, bytes) else "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = _serve  # noqa: N815 -- http.server's names

    return Handler


@contextlib.contextmanager
def fake_agent(socket: Path, routes: Mapping[str, Answer] | None = None) -> Iterator[FakeAgent]:
    agent = FakeAgent(socket, dict(routes or {}))
    server = socketserver.ThreadingUnixStreamServer(str(socket), _handler(agent))
    server.daemon_threads = True
    # shutdown() waits for serve_forever to notice, one poll_interval at most (0.5 s by default).
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        yield agent
    finally:
        server.shutdown()
        server.server_close()
        socket.unlink(missing_ok=True)
