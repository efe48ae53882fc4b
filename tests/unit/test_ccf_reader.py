"""The capped reader behind every CCF answer: all of a small body, and nothing past the cap of a large one."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from signing_agent.ccf.client import AnswerTooLargeError, read_capped


class Source:
    """Chunks of ``size`` bytes, ``count`` of them (None: endless), counting how many were pulled."""

    def __init__(self, size: int, count: int | None) -> None:
        self.size = size
        self.count = count
        self.pulled = 0

    async def chunks(self) -> AsyncIterator[bytes]:
        while self.count is None or self.pulled < self.count:
            self.pulled += 1
            yield bytes([self.pulled % 256]) * self.size


async def test_a_body_within_the_cap_is_read_whole_and_in_order() -> None:
    source = Source(10, 5)
    body = await read_capped(source.chunks(), 50)
    assert body == b"".join(bytes([i]) * 10 for i in range(1, 6))
    assert source.pulled == 5


async def test_an_empty_body_is_empty() -> None:
    assert await read_capped(Source(10, 0).chunks(), 1) == b""


async def test_one_byte_over_the_cap_is_refused() -> None:
    with pytest.raises(AnswerTooLargeError):
        await read_capped(Source(10, 5).chunks(), 49)


async def test_an_endless_body_is_abandoned_at_the_cap_without_reading_further() -> None:
    source = Source(1000, None)
    with pytest.raises(AnswerTooLargeError):
        await read_capped(source.chunks(), 4500)
    assert source.pulled == 5  # four fit, the fifth crosses the cap, and no sixth is ever asked for


async def test_a_single_chunk_over_the_cap_is_refused() -> None:
    with pytest.raises(AnswerTooLargeError):
        await read_capped(Source(100, 1).chunks(), 99)
