"""What a request is waiting for, so that its deadline can say what was slow.

The API gives each request a ``Waits`` and runs it under ``Waits.deadline(seconds)``. The layers that wait on
something outside the agent mark the wait with ``waiting_for(what)``: the key store (``backends.keystores``), a CCF
service and the path asked (``ccf.client``), the audit log (``audit``), the request body (``api.context``). When the
deadline expires, the waits open at that instant are taken down (``Waits.expired``), before the cancellation
unwinds them, and the 504 names them. Outside a request (start-up, the recovery watcher) a mark costs one
ContextVar lookup and records nothing.

A leaf module: it imports nothing from the package. ``what`` is shown to clients and logged: never put a secret in
it (a key's config path, a service name and a CCF path are fine).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterator
from contextvars import ContextVar
from dataclasses import dataclass


@dataclass(frozen=True, slots=True, eq=False)  # removed by identity: two waits may look alike
class Wait:
    """One wait on something outside the agent, e.g. ``CCF service 'default': POST /gov/members/proposals:create``."""

    what: str
    since: float
    """``time.monotonic()`` when it began."""


class Waits:
    """The waits of one request: those open now (in the order they began), and those open when its deadline hit."""

    def __init__(self) -> None:
        self.open: list[Wait] = []
        self.expired: tuple[Wait, ...] | None = None
        """The waits open when the deadline expired, or None while it has not."""
        self.expired_at: float | None = None

    @contextlib.asynccontextmanager
    async def deadline(self, seconds: float) -> AsyncIterator[None]:
        """``asyncio.timeout(seconds)`` over the body, with this request's waits current; raises ``TimeoutError``.

        The open waits are taken down by a timer due at the same instant as the timeout's: both run in the same turn
        of the event loop, before the cancellation reaches the request's task (and closes its waits).
        """
        loop = asyncio.get_running_loop()
        when = loop.time() + seconds
        token = _CURRENT.set(self)
        expiry = loop.call_at(when, self._expire)
        try:
            async with asyncio.timeout_at(when):
                yield
        finally:
            expiry.cancel()
            _CURRENT.reset(token)

    def _expire(self) -> None:
        self.expired = tuple(self.open)
        self.expired_at = time.monotonic()

    def describe_expired(self) -> str | None:
        """What the request was waiting for when its deadline hit, and since when; None when nothing outside the
        agent was being waited for (or the deadline has not expired)."""
        if not self.expired or self.expired_at is None:
            return None
        now = self.expired_at
        # Most recent first: with nested waits the innermost one is what was slow.
        parts = [f"{w.what} (for {now - w.since:.1f} s)" for w in reversed(self.expired)]
        return "waiting for " + "; and for ".join(parts)


_CURRENT: ContextVar[Waits | None] = ContextVar("signing_agent_waits", default=None)


@contextlib.contextmanager
def waiting_for(what: str) -> Iterator[None]:
    """Mark the body as a wait on ``what`` for the current request's deadline (a no-op outside a request)."""
    waits = _CURRENT.get()
    if waits is None:
        yield
        return
    wait = Wait(what, time.monotonic())
    waits.open.append(wait)
    try:
        yield
    finally:
        waits.open.remove(wait)
