"""Connections on the socket: capped per peer uid and in total, before aiohttp sees them.

Without caps one local peer could hold every file descriptor the agent has (1,000 idle connections under the usual
1,024 limit), and the agent could then accept no one else, root included, until they timed out. Here each accepted
connection is checked against the peer's uid (``SO_PEERCRED``) first:

- no uid holds more than ``per_uid`` connections, except root and the agent's own uid;
- all uids together hold at most ``total``, and the others together at most ``total - per_uid``: the last
  ``per_uid`` connections are kept for root and the agent's own uid, so no other uid (or group of them) can take
  them all.

A connection over a cap gets a one-shot ``503 TooManyConnections`` and is closed at once; a line in the log says so,
at most once a minute per uid. Idle connections are closed by aiohttp's keep-alive timeout (``agent.header_timeout``).

When the process still runs out of descriptors, asyncio reports each failed ``accept()`` with a traceback (up to
128 per retry): ``AcceptFailureLog`` turns that into one line per interval.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import resource
import time
from collections import Counter
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from signing_agent.api.peer import peer_uid

_logger = logging.getLogger(__name__)

LOG_INTERVAL = 60.0
FD_HEADROOM = 256
"""Descriptors the agent needs besides its clients' connections: audit log, CCF connections, key stores."""
_ACCEPT_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


class LogOncePer:
    """Logs a warning at most once per ``interval`` and key, saying how many were held back since the last one."""

    def __init__(self, interval: float = LOG_INTERVAL, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = interval
        self._clock = clock
        self._last: dict[Hashable, tuple[float, int]] = {}

    def warning(self, key: Hashable, message: str, *args: object) -> None:
        now = self._clock()
        last, held = self._last.get(key, (None, 0))
        if last is not None and now - last < self.interval:
            self._last[key] = (last, held + 1)
            return
        self._last[key] = (now, 0)
        if held:
            message += f" ({held} more like it in the last {self.interval:g} s)"
        _logger.warning(message, *args)


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    total: int
    per_uid: int
    privileged: frozenset[int]
    """Root and the agent's own uid: no per-uid cap, and the last ``per_uid`` connections are theirs."""


class ConnectionLimiter:
    """Counts open connections per peer uid and decides whether one more may open."""

    def __init__(self, limits: ConnectionLimits, *, log: LogOncePer | None = None) -> None:
        self.limits = limits
        self._by_uid: Counter[int] = Counter()
        self._total = 0
        self._others = 0
        self._log = log or LogOncePer()

    @property
    def open(self) -> int:
        return self._total

    def refusal(self, uid: int) -> str | None:
        """Why a connection from ``uid`` may not open now, or None."""
        limits = self.limits
        if self._total >= limits.total:
            return f"the agent has {limits.total} connections open (agent.max_connections)"
        if uid in limits.privileged:
            return None
        if self._by_uid[uid] >= limits.per_uid:
            return f"peer uid {uid} has {limits.per_uid} connections open (agent.max_connections_per_uid)"
        if self._others >= limits.total - limits.per_uid:
            return (
                f"peers other than root and the agent's uid have {self._others} connections open; the last "
                f"{limits.per_uid} of agent.max_connections are kept for root and the agent's uid"
            )
        return None

    def admit(self, uid: int) -> str | None:
        """Count a new connection from ``uid`` and return None, or return why it is refused (and log it)."""
        why = self.refusal(uid)
        if why is not None:
            self._log.warning(uid, "refused a connection: %s", why)
            return why
        self._by_uid[uid] += 1
        self._total += 1
        if uid not in self.limits.privileged:
            self._others += 1
        return None

    def release(self, uid: int) -> None:
        self._by_uid[uid] -= 1
        if self._by_uid[uid] <= 0:
            del self._by_uid[uid]
        self._total -= 1
        if uid not in self.limits.privileged:
            self._others -= 1


def _refusal_response(why: str) -> bytes:
    body = json.dumps({"error": {"code": "TooManyConnections", "message": why, "retryable": True}}).encode()
    head = (
        "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
        f"Connection: close\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode("ascii") + body


class _Gate(asyncio.Protocol):
    """Stands in front of aiohttp's protocol for one connection: admits it (then forwards every event) or closes it."""

    def __init__(self, limiter: ConnectionLimiter, make_inner: Callable[[], asyncio.Protocol]) -> None:
        self._limiter = limiter
        self._make_inner = make_inner
        self._inner: asyncio.Protocol | None = None
        self._uid = -1

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        uid = peer_uid(transport)
        why = self._limiter.admit(uid)
        if why is not None:
            if isinstance(transport, asyncio.WriteTransport):
                transport.write(_refusal_response(why))
            transport.close()
            return
        self._uid = uid
        self._inner = self._make_inner()
        self._inner.connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._inner is not None:
            self._limiter.release(self._uid)
            inner, self._inner = self._inner, None
            inner.connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._inner is not None:
            self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received() if self._inner is not None else None

    def pause_writing(self) -> None:
        if self._inner is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._inner is not None:
            self._inner.resume_writing()


class GatedSockSite(web.SockSite):
    """aiohttp's ``SockSite`` with a ``ConnectionLimiter`` in front of every connection."""

    def __init__(self, runner: web.BaseRunner, sock: Any, limiter: ConnectionLimiter) -> None:
        super().__init__(runner, sock)
        self.limiter = limiter

    async def start(self) -> None:
        # SockSite.start, with the gate wrapped around aiohttp's protocol factory.
        await web.BaseSite.start(self)
        server = self._runner.server
        if server is None:  # pragma: no cover -- the runner is set up before its sites start
            raise RuntimeError("call runner.setup() before starting a site")
        limiter = self.limiter
        self._server = await asyncio.get_running_loop().create_server(
            lambda: _Gate(limiter, server), sock=self._sock, backlog=self._backlog
        )


class AcceptFailureLog:
    """The event loop's exception handler: a failed ``accept()`` (out of descriptors or memory) is one log line per
    interval, without the traceback asyncio would print for each attempt. Everything else goes to the default."""

    def __init__(self, log: LogOncePer | None = None) -> None:
        self._log = log or LogOncePer()

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        if isinstance(exc, OSError) and exc.errno in _ACCEPT_ERRNOS:
            self._log.warning(
                "accept",
                "cannot accept connections: %s; clients wait until connections close "
                "(raise LimitNOFILE, or lower agent.max_connections)",
                exc.strerror,
            )
            return
        loop.default_exception_handler(context)


def ensure_fd_limit(max_connections: int) -> None:
    """Raise the soft limit on open files to what ``max_connections`` needs (up to the hard limit), or warn."""
    needed = max_connections + FD_HEADROOM
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        raised = needed if hard == resource.RLIM_INFINITY else min(hard, needed)
        if raised > soft:
            resource.setrlimit(resource.RLIMIT_NOFILE, (raised, hard))
            soft = raised
    if soft != resource.RLIM_INFINITY and soft < needed:
        _logger.warning(
            "the open-file limit (%d) is below agent.max_connections (%d) plus %d for the agent's own files: "
            "connections beyond it wait until others close; raise LimitNOFILE (hard limit: %s)",
            soft,
            max_connections,
            FD_HEADROOM,
            "unlimited" if hard == resource.RLIM_INFINITY else hard,
        )
