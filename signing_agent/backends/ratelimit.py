"""A priority-aware concurrency cap plus token bucket, one per remote key store (a Key Vault host).

Owns: the admission of requests to a rate-limited service. It must not import vendor SDKs or anything above
``signing_agent.backends.base``. Pure asyncio, no threads.

Why both a cap and a bucket: Key Vault throttles on *operations per 10 seconds per vault* (we budget for
2,000; the limits differ by key type and size and are lower for some HSM-backed keys: check Azure's service
limits for the vault in use), and a burst of concurrent requests also costs latency for everyone. The bucket
keeps the rate below the vault's quota so that the vault never has to say 429; the cap keeps the number of
requests in flight small. When both are short, waiters are served by ``Priority`` first and arrival order
second, so a recovery share or an ack never queues behind a batch of ballots.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

from signing_agent.backends.base import Priority
from signing_agent.config import KeyVaultConfig

_DEFAULTS = KeyVaultConfig()


@dataclass(frozen=True, slots=True, kw_only=True)
class ThrottleSettings:
    """Limits for one vault host. The defaults are ``[keyvault]``'s (``KeyVaultConfig``): well under Key Vault's
    2,000 operations per 10 s."""

    max_concurrency: int = _DEFAULTS.max_concurrency
    """Requests in flight at once."""
    rate_per_second: float = _DEFAULTS.rate_per_second
    """Sustained operations per second (150/s = 1,500 per 10 s, leaving head room for other clients of the
    vault)."""
    burst: int = _DEFAULTS.burst
    """Bucket size: operations that may go at once after a quiet period (1,500 + 150 < 2,000 per 10 s)."""

    def __post_init__(self) -> None:
        if self.max_concurrency < 1:
            raise ValueError("max_concurrency must be at least 1")
        if self.rate_per_second <= 0:
            raise ValueError("rate_per_second must be positive")
        if self.burst < 1:
            raise ValueError("burst must be at least 1")


class PriorityThrottle:
    """Admit at most ``max_concurrency`` holders at once and at most ``rate_per_second`` admissions per
    second.

    Use ``async with throttle.slot(priority): ...`` around exactly one remote operation (one HTTP request,
    retries included separately: each attempt takes its own slot, because each attempt counts against the
    vault's quota).
    """

    def __init__(
        self,
        settings: ThrottleSettings,
        *,
        clock: Callable[[], float] = time.monotonic,
        on_wait: Callable[[float], None] | None = None,
    ) -> None:
        self._settings = settings
        self._clock = clock
        self._on_wait = on_wait
        """Told how long each queued acquisition waited (metrics); not called when a slot was free at once."""
        self._tokens = float(settings.burst)
        self._refilled_at = clock()
        self._in_flight = 0
        self._waiters: list[tuple[int, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()
        self._timer: asyncio.TimerHandle | None = None
        self.max_in_flight_seen = 0
        """The most holders there ever were at once (for tests and the benchmark)."""
        self._penalty_until = float("-inf")

    @property
    def settings(self) -> ThrottleSettings:
        return self._settings

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def penalty_left(self) -> float:
        """Seconds until the vault's last "slow down" (``penalize``) lets anything through again; 0 when none holds."""
        return max(0.0, self._penalty_until - self._clock())

    @property
    def queued(self) -> int:
        return sum(1 for *_, fut in self._waiters if not fut.done())

    def _refill(self) -> None:
        now = self._clock()
        elapsed = max(0.0, now - self._refilled_at)
        self._refilled_at = now
        self._tokens = min(float(self._settings.burst), self._tokens + elapsed * self._settings.rate_per_second)

    def _admit(self) -> None:
        self._tokens -= 1.0
        self._in_flight += 1
        self.max_in_flight_seen = max(self.max_in_flight_seen, self._in_flight)

    def _pump(self) -> None:
        """Hand out slots to the most urgent waiters while both a slot and a token are free."""
        self._refill()
        while self._waiters and self._in_flight < self._settings.max_concurrency and self._tokens >= 1.0:
            _, _, fut = heapq.heappop(self._waiters)
            if fut.done():  # cancelled while queued
                continue
            self._admit()
            fut.set_result(None)
        # Drop cancelled waiters at the head so that an idle throttle does not keep a timer alive for them.
        while self._waiters and self._waiters[0][2].done():
            heapq.heappop(self._waiters)
        if self._waiters and self._in_flight < self._settings.max_concurrency and self._timer is None:
            # Short of tokens only: wake up when the next one is due. (Short of slots: release() pumps.)
            delay = max(0.0, (1.0 - self._tokens) / self._settings.rate_per_second)
            self._timer = asyncio.get_running_loop().call_later(delay, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._pump()

    def _release(self, *, refund: bool = False) -> None:
        self._in_flight -= 1
        if refund:
            self._tokens = min(float(self._settings.burst), self._tokens + 1.0)
        self._pump()

    async def acquire(self, priority: Priority) -> None:
        """Wait for a slot. Pair with ``release()``; prefer ``slot()``."""
        self._refill()
        if not self._waiters and self._in_flight < self._settings.max_concurrency and self._tokens >= 1.0:
            self._admit()
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiters, (int(priority), next(self._seq), fut))
        queued_at = time.monotonic()
        self._pump()
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                # Granted, but the caller was cancelled before it could use the slot: give it back untouched.
                self._release(refund=True)
            raise
        if self._on_wait is not None:
            self._on_wait(time.monotonic() - queued_at)

    def penalize(self, seconds: float) -> None:
        """The service said "slow down" (a 429): admit nothing new for ``seconds``, then resume at the set
        rate."""
        if seconds <= 0:
            return
        self._penalty_until = max(self._penalty_until, self._clock() + seconds)
        self._refill()
        self._tokens = min(self._tokens, 1.0 - seconds * self._settings.rate_per_second)
        if self._timer is not None:
            # Re-arm: the timer was computed for the old token count.
            self._timer.cancel()
            self._timer = None
        self._pump()

    def release(self) -> None:
        self._release()

    @asynccontextmanager
    async def slot(self, priority: Priority) -> AsyncIterator[None]:
        await self.acquire(priority)
        try:
            yield
        finally:
            self._release()

    def close(self) -> None:
        """Cancel the wake-up timer (waiters still queued are cancelled too)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for *_, fut in self._waiters:
            if not fut.done():
                fut.cancel()
        self._waiters.clear()
