"""Ending a helper process: it exits by itself once told, or is killed after the grace period; never left behind."""

from __future__ import annotations

import asyncio
import signal
import sys

from signing_agent.workers.reaping import reap


async def test_a_helper_that_exits_is_waited_for() -> None:
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", "pass")
    await reap(proc, grace=30.0)
    assert proc.returncode == 0


async def test_a_helper_that_does_not_exit_is_killed_after_the_grace_period() -> None:
    # Deaf to the stop signals, as the helpers are: only the kill ends it.
    code = (
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); "
        "time.sleep(600)"
    )
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", code, stdout=asyncio.subprocess.PIPE)
    assert proc.stdout is not None
    assert await proc.stdout.readline() == b"ready\n"
    await reap(proc, grace=0.2)
    assert proc.returncode == -signal.SIGKILL
