"""``signing_agent.waits``: what a request was waiting for when its deadline hit."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from signing_agent.waits import Waits, waiting_for

SHORT = 0.05
"""The deadline of these tests: the waits they mark take far longer (cancelled long before)."""


async def outlive(waits: Waits, work: Callable[[], Awaitable[object]]) -> None:
    """Run ``work`` as a request under a deadline of ``SHORT`` seconds."""
    async with waits.deadline(SHORT):
        await work()


async def wait_on(*what: str) -> None:
    """Nested waits on ``what`` (outermost first) that take far longer than ``SHORT``."""
    if not what:
        await asyncio.sleep(10)
        return
    with waiting_for(what[0]):
        await wait_on(*what[1:])


async def test_the_deadline_names_the_wait_it_interrupted() -> None:
    waits = Waits()
    with pytest.raises(TimeoutError):
        await outlive(waits, lambda: wait_on("CCF service 'default': POST /gov/members/proposals:create"))
    described = waits.describe_expired()
    assert described is not None
    assert described.startswith("waiting for CCF service 'default': POST /gov/members/proposals:create (for ")
    assert waits.open == []  # the cancellation closed it


async def test_a_wait_that_ended_before_the_deadline_is_not_named() -> None:
    async def quick_then_slow() -> None:
        with waiting_for("the key store (file, identities.m0.signing_key)"):
            await asyncio.sleep(0)
        await asyncio.sleep(10)  # slow in the agent itself, waiting for nothing outside

    waits = Waits()
    with pytest.raises(TimeoutError):
        await outlive(waits, quick_then_slow)
    assert waits.expired == ()
    assert waits.describe_expired() is None


async def test_nested_waits_are_named_innermost_first() -> None:
    waits = Waits()
    with pytest.raises(TimeoutError):
        await outlive(waits, lambda: wait_on("outer", "inner"))
    described = waits.describe_expired()
    assert described is not None
    assert described.startswith("waiting for inner (for ")
    assert "; and for outer (for " in described


async def test_waits_in_tasks_the_request_started_are_named() -> None:
    waits = Waits()
    with pytest.raises(TimeoutError):
        await outlive(waits, lambda: asyncio.gather(wait_on("service a"), wait_on("service b")))
    described = waits.describe_expired()
    assert described is not None
    assert "service a" in described
    assert "service b" in described


async def test_a_request_within_its_deadline_has_nothing_expired() -> None:
    waits = Waits()
    async with waits.deadline(10):
        with waiting_for("the audit log (write and fsync)"):
            await asyncio.sleep(0)
    assert waits.expired is None
    assert waits.describe_expired() is None


async def test_a_wait_that_fails_is_closed() -> None:
    waits = Waits()
    async with waits.deadline(10):
        with pytest.raises(ValueError, match="refused"), waiting_for("the key store"):
            raise ValueError("refused")
        assert waits.open == []


async def test_outside_a_request_a_mark_records_nothing() -> None:
    waits = Waits()
    with waiting_for("the recovery watcher's CCF call"):
        await asyncio.sleep(0)
    assert waits.open == []
    assert waits.expired is None
