"""Ending a helper process the daemon started (a crypto worker, the fsync helper), for both of their owners."""

from __future__ import annotations

import asyncio
import contextlib

EXIT_GRACE = 5.0
"""Seconds a helper whose pipe the daemon closed has to exit by itself before it is killed."""


async def reap(proc: asyncio.subprocess.Process, grace: float = EXIT_GRACE) -> None:
    """Wait for ``proc``, which was told to end (its pipe closed), for ``grace`` seconds; then kill it and wait. A
    helper ignores stop signals, so a stuck one ends only this way, and none is left a zombie."""
    try:
        await asyncio.wait_for(proc.wait(), grace)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
