"""The one retry policy (CCF services, Key Vault, the recovery watcher's polling) on a fake clock: no real waiting."""

from __future__ import annotations

import email.utils

import pytest

from signing_agent.retry import Backoff, GiveUp, Retry, RetryPolicy, retry_after_seconds


class FakeClock:
    """A monotonic clock that moves only when the code under test sleeps (or a test advances it)."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def policy(**overrides: object) -> RetryPolicy:
    settings: dict[str, object] = {
        "max_attempts": 5,
        "total_timeout": 60.0,
        "backoff": Backoff(1.0, 8.0),
        "max_retry_after": 30.0,
    }
    settings.update(overrides)
    return RetryPolicy(**settings)  # type: ignore[arg-type]


def start(p: RetryPolicy, clock: FakeClock, rng: float = 0.0, **kw: int) -> Retry:
    return p.start(clock=clock, sleep=clock.sleep, rng=lambda: rng, **kw)


def test_backoff_doubles_up_to_the_maximum_with_equal_jitter() -> None:
    backoff = Backoff(0.2, 5.0)
    assert [backoff.delay(step, 1.0) for step in range(7)] == pytest.approx([0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0])
    assert [backoff.delay(step, 0.0) for step in range(3)] == pytest.approx([0.1, 0.2, 0.4])  # half fixed


def test_backoff_with_symmetric_jitter_and_no_overflow_however_many_steps() -> None:
    poll = Backoff(5.0, 60.0, jitter=(0.8, 1.2))
    assert poll.delay(0, 0.0) == pytest.approx(4.0)
    assert poll.delay(0, 1.0) == pytest.approx(6.0)
    assert poll.delay(100_000, 0.5) == pytest.approx(60.0)  # 2.0**100000 would overflow


async def test_every_attempt_is_made_then_it_gives_up_on_attempts() -> None:
    clock = FakeClock()
    retry = start(policy(), clock, rng=1.0)
    waits: list[float | GiveUp] = []
    while True:
        retry.next_attempt()
        wait = retry.after_failure()
        waits.append(wait)
        if isinstance(wait, GiveUp):
            break
        await retry.sleep(wait)
    assert waits == [1.0, 2.0, 4.0, 8.0, GiveUp.ATTEMPTS]
    assert retry.attempt == 5
    assert clock.slept == [1.0, 2.0, 4.0, 8.0]


def test_a_caller_may_lower_the_attempts_but_not_raise_them() -> None:
    clock = FakeClock()
    assert start(policy(max_attempts=5), clock, max_attempts=1).max_attempts == 1
    assert start(policy(max_attempts=2), clock, max_attempts=9).max_attempts == 2


def test_retry_after_is_honoured_instead_of_the_backoff() -> None:
    retry = start(policy(), FakeClock(), rng=1.0)
    retry.next_attempt()
    assert retry.after_failure(retry_after=7.0) == 7.0
    assert retry.after_failure(retry_after=0.0) == 0.0


def test_a_retry_after_over_the_limit_gives_up_at_once() -> None:
    retry = start(policy(max_retry_after=30.0), FakeClock())
    retry.next_attempt()
    assert retry.after_failure(retry_after=30.0) == 30.0
    assert retry.after_failure(retry_after=3600.0) is GiveUp.RETRY_AFTER


def test_a_wait_that_does_not_fit_before_the_deadline_gives_up() -> None:
    clock = FakeClock()
    retry = start(policy(total_timeout=10.0, min_attempt_seconds=1.0), clock)
    retry.next_attempt()
    clock.now += 8.5
    assert retry.remaining == pytest.approx(1.5)
    assert retry.after_failure(retry_after=0.4) == 0.4
    assert retry.after_failure(retry_after=0.5) is GiveUp.DEADLINE  # and no attempt with less than 1 s left


def test_an_attempt_is_bounded_by_what_is_left_of_the_call() -> None:
    clock = FakeClock()
    retry = start(policy(total_timeout=10.0), clock)
    assert retry.attempt_timeout(30.0) == pytest.approx(10.0)
    clock.now += 7.0
    assert retry.attempt_timeout(30.0) == pytest.approx(3.0)
    assert retry.attempt_timeout(2.0) == pytest.approx(2.0)
    clock.now += 60.0
    assert retry.attempt_timeout(2.0) == pytest.approx(0.01)  # never 0: that would mean no bound at all


@pytest.mark.parametrize(
    ("settings", "message"),
    [({"max_attempts": 0}, "max_attempts"), ({"total_timeout": 0.0}, "total_timeout")],
)
def test_a_policy_that_could_not_try_is_refused(settings: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        policy(**settings)


NOW = 1_700_000_000.0


@pytest.mark.parametrize(
    ("headers", "seconds"),
    [
        ({}, None),
        (None, None),
        ({"retry-after": "3"}, 3.0),
        ({"retry-after": " 1.5 "}, 1.5),
        ({"retry-after": "-4"}, 0.0),
        ({"retry-after": "3600"}, 3600.0),  # not capped here: the policy decides
        ({"retry-after": email.utils.formatdate(NOW + 20, usegmt=True)}, 20.0),
        ({"retry-after": email.utils.formatdate(NOW - 20, usegmt=True)}, 0.0),
        ({"retry-after": "soon"}, None),
        ({"retry-after": ""}, None),
        ({"retry-after": "nan"}, None),
        ({"retry-after": "inf"}, None),
        ({"retry-after-ms": "250"}, 0.25),
        ({"x-ms-retry-after-ms": "1500", "retry-after": "9"}, 1.5),
        ({"retry-after-ms": "x", "retry-after": "2"}, 2.0),
    ],
)
def test_one_retry_after_parser(headers: dict[str, str] | None, seconds: float | None) -> None:
    got = retry_after_seconds(headers, now=lambda: NOW)
    assert got == (pytest.approx(seconds) if seconds is not None else None)
