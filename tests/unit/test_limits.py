"""The bookkeeping behind the peer limits, with injected clocks: denial budgets and connection counts."""

from __future__ import annotations

import pytest

from signing_agent.api.connections import ConnectionLimiter, ConnectionLimits, LogOncePer
from signing_agent.audit import encode
from signing_agent.denials import DenialThrottle
from signing_agent.errors import TooManyRequestsError


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_uid_past_its_budget_gets_429s_that_are_counted_per_window() -> None:
    clock = Clock()
    throttle = DenialThrottle(2, 10.0, clock=clock, wall_clock=clock)
    throttle.charge(7, "denied")
    throttle.charge(7, "malformed")
    with pytest.raises(TooManyRequestsError) as info:
        throttle.charge(7, "denied")
    assert info.value.http_status == 429
    assert info.value.retry_after == pytest.approx(5.0)  # 2 per 10 s: one back in 5 s
    throttle.charge(8, "denied")  # another uid has its own budget
    clock.now += 1
    with pytest.raises(TooManyRequestsError):
        throttle.charge(7, "malformed")
    assert throttle.due() == []  # the window is not over yet
    clock.now += 9
    [dropped] = throttle.due()
    assert encode(dropped.audit_record()) == (
        "throttled",
        {
            "peer": {"uid": 7},
            "dropped": 2,
            "denied": 1,
            "malformed": 1,
            "first_ts": "1000.000000",
            "last_ts": "1001.000000",
        },
    )
    assert throttle.due(flush=True) == []  # each dropped request is summarised once


def test_connection_caps_keep_a_share_for_root_and_count_releases() -> None:
    limiter = ConnectionLimiter(ConnectionLimits(total=6, per_uid=2, privileged=frozenset({0})), log=LogOncePer())
    assert limiter.admit(1000) is None
    assert limiter.admit(1000) is None
    assert "peer uid 1000 has 2 connections open" in (limiter.admit(1000) or "")
    assert limiter.admit(1001) is None
    assert limiter.admit(1001) is None
    assert "kept for root" in (limiter.admit(1002) or "")  # 4 of 6 used by others: the last 2 are root's
    assert limiter.admit(0) is None
    assert limiter.admit(0) is None
    assert "agent.max_connections" in (limiter.admit(0) or "")
    limiter.release(1000)
    assert limiter.open == 5
    assert limiter.admit(1002) is None  # a slot of the others' share is free again
    limiter.release(0)
    assert limiter.admit(1003) is not None  # root's freed slot stays root's
    assert limiter.admit(0) is None


async def test_a_vault_penalty_is_told_for_as_long_as_it_holds() -> None:
    """``penalty_left``: how long the vault's last 429 still holds every request back (the Key Vault backend fails a
    request at once rather than wait out its deadline behind it)."""
    from signing_agent.backends.ratelimit import PriorityThrottle, ThrottleSettings

    now = [100.0]
    throttle = PriorityThrottle(
        ThrottleSettings(max_concurrency=4, rate_per_second=10.0, burst=10), clock=lambda: now[0]
    )
    assert throttle.penalty_left() == 0.0
    throttle.penalize(120.0)
    assert throttle.penalty_left() == 120.0
    throttle.penalize(5.0)  # a shorter one later does not shorten it
    now[0] += 100.0
    assert throttle.penalty_left() == 20.0
    now[0] += 30.0
    assert throttle.penalty_left() == 0.0
    throttle.close()
