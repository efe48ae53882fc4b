"""One retry policy for every remote call the agent makes (a CCF service, Azure Key Vault) and for its pollers.

A ``RetryPolicy`` bounds a call: at most ``max_attempts`` attempts, all of them and every wait in between within
``total_timeout``. Between two attempts it waits what the server asked for (``Retry-After``, read by the one parser
here, ``retry_after_seconds``), or else a jittered exponential ``Backoff``. A server that asks for a wait over
``max_retry_after`` is not retried at all: waiting less than it asked is pointless, waiting longer is not allowed.

The caller drives the loop, because only it knows what failed and what to tell the user about it::

    retry = policy.start()
    while True:
        retry.next_attempt()
        try:
            async with asyncio.timeout(retry.attempt_timeout(per_attempt)):
                return await call()
        except Transient as exc:
            wait = retry.after_failure(retry_after_of(exc))
        if isinstance(wait, GiveUp):
            raise Unavailable(...)  # says which bound was reached
        await retry.sleep(wait)

The clock, the sleep and the random source are injectable, so a policy is tested with a fake clock and no waiting.
A leaf module: it imports nothing from the package.
"""

from __future__ import annotations

import asyncio
import datetime
import email.utils
import enum
import math
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

_MAX_DOUBLINGS = 64
"""Backoff steps past this add nothing (any maximum is reached long before) and 2.0**step would overflow."""
MIN_ATTEMPT_TIMEOUT = 0.01
"""The shortest time bound given to an attempt (0 would mean no bound at all to aiohttp)."""


class GiveUp(enum.Enum):
    """Why ``Retry.after_failure`` says to stop rather than wait."""

    ATTEMPTS = "attempts"
    """``max_attempts`` were made."""
    RETRY_AFTER = "retry_after"
    """The server asked for a wait over ``max_retry_after``."""
    DEADLINE = "deadline"
    """The wait and another attempt do not fit in what is left of ``total_timeout``."""


@dataclass(frozen=True, slots=True)
class Backoff:
    """Exponential backoff with jitter: step ``n`` waits ``min(maximum, initial * 2**n)`` times a random factor
    between ``jitter[0]`` and ``jitter[1]``. The default, half fixed and half random ("equal jitter"), spreads the
    retries of many callers without ever waiting less than half the step."""

    initial: float
    maximum: float
    jitter: tuple[float, float] = (0.5, 1.0)

    def delay(self, step: int, rng: float) -> float:
        """The wait before retry ``step`` (0 for the first), with ``rng`` a random number in [0, 1)."""
        low, high = self.jitter
        base = min(self.maximum, self.initial * 2.0 ** min(max(step, 0), _MAX_DOUBLINGS))
        return base * (low + (high - low) * rng)


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryPolicy:
    """How hard to try one call. See the module docstring for the loop that uses it."""

    max_attempts: int
    """Attempts, the first included (at least 1)."""
    total_timeout: float
    """Seconds for the whole call: every attempt and every wait between them."""
    backoff: Backoff
    max_retry_after: float = 30.0
    """A ``Retry-After`` longer than this ends the call at once (``GiveUp.RETRY_AFTER``)."""
    min_attempt_seconds: float = 0.0
    """No attempt is started with less than this left of ``total_timeout``: it could only time out."""

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if self.total_timeout <= 0:
            raise ValueError("total_timeout must be positive")

    def start(
        self,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        rng: Callable[[], float] = random.random,
        max_attempts: int | None = None,
    ) -> Retry:
        """The state of one call, its deadline counted from now. ``max_attempts`` may lower the policy's."""
        attempts = self.max_attempts if max_attempts is None else max(1, min(max_attempts, self.max_attempts))
        return Retry(self, attempts, clock=clock, sleep=sleep, rng=rng)


class Retry:
    """One call under a ``RetryPolicy``: which attempt this is, how long it may take, and what to do after it failed."""

    def __init__(
        self,
        policy: RetryPolicy,
        max_attempts: int,
        *,
        clock: Callable[[], float],
        sleep: Callable[[float], Awaitable[None]],
        rng: Callable[[], float],
    ) -> None:
        self.policy = policy
        self.max_attempts = max_attempts
        self.attempt = 0
        self._clock = clock
        self._sleep = sleep
        self._rng = rng
        self.deadline = clock() + policy.total_timeout

    @property
    def remaining(self) -> float:
        """Seconds left of ``total_timeout`` (negative once it is over)."""
        return self.deadline - self._clock()

    def next_attempt(self) -> int:
        """Count the attempt about to be made; returns its number (1 for the first)."""
        self.attempt += 1
        return self.attempt

    def attempt_timeout(self, limit: float) -> float:
        """The time bound of the attempt about to be made: ``limit``, or what is left of the call if that is less."""
        return max(MIN_ATTEMPT_TIMEOUT, min(limit, self.remaining))

    def after_failure(self, retry_after: float | None = None) -> float | GiveUp:
        """After a failed attempt: the seconds to wait before the next one, or why there is none.

        ``retry_after`` is what the server asked for (``retry_after_seconds``); without it, the policy's backoff.
        """
        policy = self.policy
        if self.attempt >= self.max_attempts:
            return GiveUp.ATTEMPTS
        if retry_after is not None and retry_after > policy.max_retry_after:
            return GiveUp.RETRY_AFTER
        wait = retry_after if retry_after is not None else policy.backoff.delay(self.attempt - 1, self._rng())
        if wait + policy.min_attempt_seconds >= self.remaining:
            return GiveUp.DEADLINE
        return wait

    async def sleep(self, seconds: float) -> None:
        await self._sleep(seconds)


_MS_HEADERS = ("retry-after-ms", "x-ms-retry-after-ms")


def retry_after_seconds(headers: Mapping[str, str] | None, *, now: Callable[[], float] = time.time) -> float | None:
    """The wait a server asked for, in seconds: ``retry-after-ms`` or ``x-ms-retry-after-ms`` (milliseconds, as
    Azure sends them), else ``Retry-After`` (delta-seconds or an HTTP date). None when there is none, or none that
    reads as a finite number or a date. Never negative, and not capped: ``RetryPolicy`` decides what is too long.

    Names are looked up in lower case: pass a case-insensitive mapping (aiohttp's, azure-core's) or lower-case keys.
    """
    if headers is None:
        return None
    for name in _MS_HEADERS:
        millis = _number(headers.get(name))
        if millis is not None:
            return max(0.0, millis / 1000.0)
    value = headers.get("retry-after")
    if not isinstance(value, str) or not value.strip():
        return None
    seconds = _number(value)
    if seconds is not None:
        return max(0.0, seconds)
    try:
        when = email.utils.parsedate_to_datetime(value.strip())
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:  # an HTTP date is GMT (RFC 9110 5.6.7)
        when = when.replace(tzinfo=datetime.UTC)
    return max(0.0, when.timestamp() - now())


def _number(value: object) -> float | None:
    if not isinstance(value, str) or not value.strip():
        return None
    try:
        number = float(value)
    except ValueError:
        return None
    return number if math.isfinite(number) else None
