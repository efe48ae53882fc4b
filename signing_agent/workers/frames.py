"""The frames between the daemon and its crypto workers: a 4-byte big-endian length, then a CBOR list.

A request frame is a list of jobs ``[job_id, op, *args]``; a reply frame a list of ``[job_id, ok, value]``. Both ends
are ours, over a pipe no one else holds; the bound is there so a bug cannot make either end allocate without limit.
"""

from __future__ import annotations

import cbor2

MAX_FRAME = 4 * 1024 * 1024
"""Bytes in one frame, at most (a batch of a few thousand jobs of a few hundred bytes each)."""

HEADER = 4


def encode(items: list[tuple[object, ...]]) -> bytes:
    body = cbor2.dumps(items)
    if len(body) > MAX_FRAME:
        raise ValueError(f"a crypto worker frame of {len(body)} bytes is over {MAX_FRAME}")
    return len(body).to_bytes(HEADER, "big") + body


def body_length(header: bytes) -> int:
    length = int.from_bytes(header, "big")
    if length > MAX_FRAME:
        raise ValueError(f"a crypto worker frame of {length} bytes is over {MAX_FRAME}")
    return length


def decode(body: bytes) -> list[tuple[object, ...]]:
    """The items of a frame, each a non-empty tuple (cbor2 5 decodes arrays as lists, cbor2 6 as tuples).

    Anything else is a ValueError, the one error both ends take for a broken peer: cbor2's own errors for a truncated
    or too deeply nested body are not ValueErrors, nor is a bad decimal fraction's."""
    try:
        items = cbor2.loads(body)
    except (cbor2.CBORError, ValueError, TypeError, ArithmeticError, RecursionError) as exc:
        raise ValueError(f"a crypto worker frame that cannot be decoded ({type(exc).__name__})") from None
    if not isinstance(items, list | tuple) or not all(isinstance(item, list | tuple) and item for item in items):
        raise ValueError("a crypto worker frame is not a list of lists")
    return [tuple(item) for item in items]
