"""A hostile CCF service for tests: an HTTPS server the agent pins, whose every answer the test scripts.

The "service certificate" the agent pins is a trustme CA, and the server presents a certificate for 127.0.0.1 issued
by it, just as a CCF node presents one endorsed by the service identity: to the agent it *is* the pinned service. It
answers what the test tells it to (``answer``: redirects, endless or huge bodies, slow drips, silence) and 404 to
the rest, and records every request it receives and how many body bytes it managed to send. It runs on its own event
loop in a thread, so tests can drive the daemon with the blocking ``AgentClient`` meanwhile.

``tls=False`` makes a plain ``http://`` server (a redirect target on the wrong side of TLS); pass ``ca`` to make a
second HTTPS server the agent would trust just as much as the first.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import ssl
import threading
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trustme
from aiohttp import web

Answer = Callable[[web.Request], Awaitable[web.StreamResponse]]

CHUNK = 64 * 1024
ENDLESS_SAFETY_BYTES = 256 * 1024 * 1024
"""An "endless" body stops here, only so that an agent without a cap cannot take the test machine down with it."""


@dataclass(frozen=True)
class Seen:
    method: str
    path: str
    body: bytes
    headers: tuple[tuple[str, str], ...] = ()


class HostileCCF:
    """Create with ``hostile_ccf()``. ``url`` is its base URL, ``service_cert`` the PEM file the agent pins."""

    def __init__(self, folder: Path, ca: trustme.CA | None, *, tls: bool) -> None:
        self.ca = ca if ca is not None else trustme.CA()
        self.tls = tls
        self.service_cert = folder / f"hostile-ca-{id(self)}.pem"
        self.ca.cert_pem.write_to_path(str(self.service_cert))
        self.url = ""
        self.sent_body_bytes = 0
        """Body bytes of scripted streaming answers handed to a live connection (the agent may hang up sooner)."""
        self._seen: list[Seen] = []
        self._answers: list[tuple[str, re.Pattern[str], Answer]] = []
        self._lock = threading.Lock()
        self._runner: web.AppRunner | None = None

    # -- the test's side ---

    def answer(self, method: str, path: str, answer: Answer) -> None:
        """Answer ``method`` requests whose path matches the regex ``path`` (searched) with ``answer``."""
        with self._lock:
            self._answers.insert(0, (method, re.compile(path), answer))

    def reset(self) -> None:
        with self._lock:
            self._answers.clear()
            self._seen.clear()
            self.sent_body_bytes = 0

    def seen(self, method: str | None = None) -> list[Seen]:
        with self._lock:
            return [s for s in self._seen if method is None or s.method == method]

    # -- the server's side ---

    def _count(self, n: int) -> None:
        with self._lock:
            self.sent_body_bytes += n

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        with self._lock:
            self._seen.append(Seen(request.method, request.path, body, tuple(request.headers.items())))
            chosen = next((a for m, p, a in self._answers if m == request.method and p.search(request.path)), None)
        if chosen is None:
            return web.json_response({"error": {"code": "ResourceNotFound", "message": "not scripted"}}, status=404)
        return await chosen(request)

    async def start(self) -> None:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app[HOSTILE] = self
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
        await self._runner.setup()
        ctx: ssl.SSLContext | None = None
        if self.tls:
            ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            self.ca.issue_cert("127.0.0.1").configure_cert(ctx)
        site = web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=ctx)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"{'https' if self.tls else 'http'}://127.0.0.1:{port}"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


HOSTILE = web.AppKey("hostile", HostileCCF)


@contextlib.contextmanager
def hostile_ccf(folder: Path, *, ca: trustme.CA | None = None, tls: bool = True) -> Iterator[HostileCCF]:
    """Run a ``HostileCCF`` on its own event loop in a thread for the duration of the block."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="hostile-ccf", daemon=True)
    thread.start()
    server = HostileCCF(folder, ca, tls=tls)
    try:
        asyncio.run_coroutine_threadsafe(server.start(), loop).result(30)
        yield server
    finally:
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(server.stop(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(30)
        loop.close()


# --- scripted answers ----------------------------------------------------------------------------------------------


def _gone(request: web.Request) -> bool:
    """The agent hung up. Writes to a lost TLS connection are dropped silently instead of raising, so a streaming
    answer checks before each write (else it would count bytes that never left)."""
    transport = request.transport
    return transport is None or transport.is_closing()


def json_answer(body: Any, status: int = 200) -> Answer:
    async def answer(request: web.Request) -> web.StreamResponse:
        return web.json_response(body, status=status)

    return answer


def redirect(status: int, location: str) -> Answer:
    async def answer(request: web.Request) -> web.StreamResponse:
        return web.json_response({"moved": location}, status=status, headers={"Location": location})

    return answer


def huge(size: int | None, *, declare: bool, content_type: str = "application/json") -> Answer:
    """A body of ``size`` bytes (None: endless, up to ``ENDLESS_SAFETY_BYTES``), with a Content-Length saying so
    when ``declare``, else chunked. It stops when the agent hangs up."""
    total = size if size is not None else ENDLESS_SAFETY_BYTES

    async def answer(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": content_type})
        if declare:
            resp.content_length = total
        await resp.prepare(request)
        chunk = b"[" + b"1," * (CHUNK // 2 - 1) + b"1"
        sent = 0
        with contextlib.suppress(ConnectionError, RuntimeError):
            while sent < total and not _gone(request):
                piece = chunk[: total - sent]
                await resp.write(piece)
                sent += len(piece)
                request.app[HOSTILE]._count(len(piece))
                await asyncio.sleep(0)  # let the loop see a hang-up: writes to a lost connection never block
        return resp

    return answer


def drip(size: int, interval: float) -> Answer:
    """A declared ``size``-byte body, one byte every ``interval`` seconds (a slow loris, from the server side)."""

    async def answer(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        resp.content_length = size
        await resp.prepare(request)
        with contextlib.suppress(ConnectionError, RuntimeError):
            for _ in range(size):
                if _gone(request):
                    break
                await resp.write(b" ")
                request.app[HOSTILE]._count(1)
                await asyncio.sleep(interval)
        return resp

    return answer


def silence(seconds: float = 600.0) -> Answer:
    """Status and headers, then nothing at all (for ``seconds``, or until the agent hangs up)."""

    async def answer(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        resp.content_length = 100
        await resp.prepare(request)
        await asyncio.sleep(seconds)
        return resp

    return answer
