"""What denied and malformed requests may cost a peer: a budget per uid, and a summary of what was dropped past it.

A denial is cheap to cause and, audited one by one, costly to keep: a peer no rule admits could otherwise write
megabytes of ``denied`` records a second. Each peer uid may have ``limit`` denied or malformed requests per
``window`` seconds (a token bucket: bursts up to ``limit``). Past that, its further denied or malformed requests are
refused with 429 ``TooManyRequests`` and only counted, not audited or logged one by one; one ``throttled`` audit
record per uid and window then says how many were dropped, of which kind, and when the first and last came.

Requests the policy allows are never charged and never refused here, for any uid: root and the agent's own uid are
counted like everyone else, but a flood of denials (theirs or another uid's) never blocks an allowed request.

No I/O but one log line when a uid starts being throttled; the clocks are injected.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from signing_agent.audit import Throttled
from signing_agent.errors import TooManyRequestsError
from signing_agent.policy import RateLimiter

_logger = logging.getLogger(__name__)

Kind = Literal["denied", "malformed"]
_BUCKET = "denials"


@dataclass(slots=True)
class Dropped:
    """The requests of one uid refused with 429 since its last summary."""

    uid: int
    since: float
    """Monotonic time of the first one: the summary is due one window later."""
    first_ts: float
    last_ts: float
    denied: int = 0
    malformed: int = 0

    def audit_record(self) -> Throttled:
        """The ``throttled`` audit record (the sink adds ``ts``: when the summary was written)."""
        return Throttled.summary(
            uid=self.uid, denied=self.denied, malformed=self.malformed, first_ts=self.first_ts, last_ts=self.last_ts
        )


class DenialThrottle:
    """Per-uid budget of denied and malformed requests (see the module docstring)."""

    def __init__(
        self,
        limit: int,
        window: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.limit = limit
        self.window = window
        self._clock = clock
        self._wall_clock = wall_clock
        self._buckets = RateLimiter(clock)
        self._dropped: dict[int, Dropped] = {}

    def charge(self, uid: int, kind: Kind) -> None:
        """Count one denied or malformed request of ``uid`` against its budget.

        Returns when the budget had room: the caller then audits (or answers) it as usual. Otherwise raises
        ``TooManyRequestsError``: the request is only counted for the next summary, and must not be audited.
        """
        key = (_BUCKET, uid)
        if self._buckets.take(key, self.limit, self.window):
            return
        now = self._wall_clock()
        dropped = self._dropped.get(uid)
        if dropped is None:
            dropped = self._dropped[uid] = Dropped(uid=uid, since=self._clock(), first_ts=now, last_ts=now)
            _logger.warning(
                "peer uid %d made more than %d denied or malformed requests in %g s: refusing further ones with 429 "
                "(a 'throttled' audit record will count them)",
                uid,
                self.limit,
                self.window,
            )
        dropped.last_ts = now
        if kind == "denied":
            dropped.denied += 1
        else:
            dropped.malformed += 1
        retry_after = self._buckets.wait(key, self.limit, self.window)
        raise TooManyRequestsError(
            f"peer uid {uid} made more than {self.limit} denied or malformed requests in {self.window:g} s; "
            f"further ones are refused, and counted in one audit record per window (retry after {retry_after:.1f} s)",
            retry_after=retry_after,
            hint="fix the requests or the policy; agent.denial_rate_limit and denial_rate_window set the budget",
        )

    def due(self, *, flush: bool = False) -> list[Dropped]:
        """The summaries to write now (and forget): those whose window has passed, or all of them (``flush``)."""
        now = self._clock()
        ready = [d for d in self._dropped.values() if flush or now - d.since >= self.window]
        for dropped in ready:
            del self._dropped[dropped.uid]
        return ready
