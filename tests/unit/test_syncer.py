"""The fsync helper (``workers.syncer``) with its real child process, and the audit log's group commit over it: a
failed fsync takes the group back, a dead helper sends the log back to fsyncing on a thread, and the chain holds."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from signing_agent.audit import FileAuditSink, verify_audit
from signing_agent.errors import AuditError
from signing_agent.workers.syncer import Syncer, SyncerUnavailableError
from tests.support.procs import gone, ignored_signals, running_modules
from tests.unit.test_audit import lines, received, signed

BOUND = 60.0
"""Seconds any wait on the helper may take; a lost answer fails the test, never hangs it."""


def helper_pid() -> int:
    """The one fsync helper this test process runs (a child running a ``signing_agent.workers`` module other than
    the crypto worker's)."""
    modules = running_modules(os.getpid(), "signing_agent.workers")
    [pid] = [pid for pid, module in modules.items() if module != "signing_agent.workers.child"]
    return pid


async def until_gone(pid: int) -> None:
    async with asyncio.timeout(BOUND):
        while not gone(pid):  # noqa: ASYNC110 -- a process's end is seen in /proc only
            await asyncio.sleep(0.02)


@pytest.fixture
async def syncer() -> AsyncIterator[Syncer]:
    syncer = await Syncer.start()
    try:
        yield syncer
    finally:
        await syncer.aclose()


class CountingFsyncer:
    """The real helper, counting the fsyncs the audit log asked of it."""

    def __init__(self, inner: Syncer) -> None:
        self.inner = inner
        self.calls = 0

    async def fsync(self, fd: int) -> None:
        self.calls += 1
        await self.inner.fsync(fd)


class FailingFsyncer:
    """fsyncs on a thread, or fails with EIO while ``failing``."""

    def __init__(self) -> None:
        self.failing = False

    async def fsync(self, fd: int) -> None:
        if self.failing:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        await asyncio.to_thread(os.fsync, fd)


async def test_fsync_of_a_file_in_the_helper(syncer: Syncer, tmp_path: Path) -> None:
    fd = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        async with asyncio.timeout(BOUND):
            for i in range(20):
                os.write(fd, b"record %d\n" % i)
                await syncer.fsync(fd)
    finally:
        os.close(fd)
    assert not syncer.gone
    assert (tmp_path / "f").read_bytes().count(b"\n") == 20


async def test_a_failed_fsync_is_an_oserror_with_the_helpers_errno(syncer: Syncer, tmp_path: Path) -> None:
    """fsync of a pipe fails with EINVAL in the helper; the error comes back as it is, and the helper stays usable
    (a failed fsync is the disk's answer, not the helper's failure)."""
    read_end, write_end = os.pipe()
    try:
        async with asyncio.timeout(BOUND):
            with pytest.raises(OSError) as caught:
                await syncer.fsync(write_end)
            assert not isinstance(caught.value, SyncerUnavailableError)
            assert caught.value.errno == errno.EINVAL
            assert not syncer.gone
            fd = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT, 0o600)
            try:
                await syncer.fsync(fd)
            finally:
                os.close(fd)
    finally:
        os.close(read_end)
        os.close(write_end)


async def test_a_killed_helper_is_unavailable_for_good(syncer: Syncer, tmp_path: Path) -> None:
    pid = helper_pid()
    os.kill(pid, signal.SIGKILL)
    await until_gone(pid)
    fd = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        async with asyncio.timeout(BOUND):
            with pytest.raises(SyncerUnavailableError):
                await syncer.fsync(fd)
            assert syncer.gone
            with pytest.raises(SyncerUnavailableError, match="gone"):
                await syncer.fsync(fd)
    finally:
        os.close(fd)


async def test_the_helper_ignores_the_signals_of_a_service_stop(syncer: Syncer, tmp_path: Path) -> None:
    fd = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        async with asyncio.timeout(BOUND):
            await syncer.fsync(fd)  # the helper runs its main loop
            pid = helper_pid()
            assert {signal.SIGHUP, signal.SIGINT, signal.SIGTERM} <= ignored_signals(pid)
            for signum in (signal.SIGHUP, signal.SIGINT, signal.SIGTERM):
                os.kill(pid, signum)
            await syncer.fsync(fd)
    finally:
        os.close(fd)
    assert not syncer.gone
    assert helper_pid() == pid


async def test_aclose_ends_the_helper(tmp_path: Path) -> None:
    syncer = await Syncer.start()
    pid = helper_pid()
    await syncer.aclose()
    await until_gone(pid)
    assert syncer.gone


# -- the audit log over the helper ---------------------------------------------------------------------------------


async def record_all(sink: FileAuditSink, prefix: str, n: int) -> None:
    """``n`` concurrent durable records (they share group commits)."""
    async with asyncio.timeout(BOUND):
        await asyncio.gather(*(sink.record(signed(f"{prefix}{i}")) for i in range(n)))


async def test_the_audit_log_fsyncs_in_the_helper_then_on_a_thread_once_it_dies(
    syncer: Syncer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "signing_agent.audit")
    path = tmp_path / "audit.jsonl"
    counting = CountingFsyncer(syncer)
    sink = await FileAuditSink.open(path, max_bytes=1 << 20, fsyncer=counting)
    try:
        await sink.record(received("r"))  # not durable: no fsync of its own
        await record_all(sink, "a", 50)
        assert counting.calls >= 1
        assert verify_audit([path]).ok

        pid = helper_pid()
        os.kill(pid, signal.SIGKILL)
        await until_gone(pid)
        await record_all(sink, "b", 50)  # the first group finds the helper dead and fsyncs on a thread instead
        asked = counting.calls
        await record_all(sink, "c", 50)
        assert counting.calls == asked, "the audit log went on asking a dead helper"
    finally:
        await sink.aclose()
    report = verify_audit([path])
    assert report.ok, report.first_break
    assert len(lines(path)) == 151
    fallbacks = [r for r in caplog.records if "fsyncing on a thread from now on" in r.getMessage()]
    assert len(fallbacks) == 1, caplog.text
    assert fallbacks[0].levelno == logging.WARNING


async def test_a_failed_fsync_fails_the_group_and_takes_it_back(tmp_path: Path) -> None:
    """The group is written before its fsync: when the fsync fails, every record of the group fails (fail closed)
    and the file is cut back to before the group, so the next record continues the chain where it was."""
    path = tmp_path / "audit.jsonl"
    fsyncer = FailingFsyncer()
    sink = await FileAuditSink.open(path, max_bytes=1 << 20, fsyncer=fsyncer)
    try:
        await record_all(sink, "a", 3)
        before = path.read_bytes()
        fsyncer.failing = True
        async with asyncio.timeout(BOUND):
            results = await asyncio.gather(*(sink.record(signed(f"lost{i}")) for i in range(5)), return_exceptions=True)
        assert all(isinstance(r, AuditError) for r in results), results
        assert all("Input/output error" in r.message for r in results if isinstance(r, AuditError))
        assert path.read_bytes() == before
        fsyncer.failing = False
        await record_all(sink, "b", 2)
    finally:
        await sink.aclose()
    report = verify_audit([path])
    assert report.ok, report.first_break
    records = [line.decode() for line in lines(path)]
    assert len(records) == 5
    assert not any("lost" in r for r in records)
    assert [r.count('"request_id":"b') for r in records] == [0, 0, 0, 1, 1]


async def test_a_record_that_is_not_durable_is_written_without_the_helper(tmp_path: Path) -> None:
    """Only durable records wait for an fsync: a group of ``received`` records never asks the fsyncer."""
    fsyncer = FailingFsyncer()
    fsyncer.failing = True
    path = tmp_path / "audit.jsonl"
    sink = await FileAuditSink.open(path, max_bytes=1 << 20, fsyncer=fsyncer)
    try:
        async with asyncio.timeout(BOUND):
            await asyncio.gather(*(sink.record(received(f"r{i}")) for i in range(5)))
    finally:
        await sink.aclose()
    assert len(lines(path)) == 5
    assert verify_audit([path]).ok


async def test_a_run_of_failed_fsyncs_is_one_failure_until_a_group_is_durable(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A group whose write lands but whose fsync fails is no success: while fsyncs keep failing, the log stays
    ``failing`` (a request then waits for its ``received`` record before any key store) and says so once, not once
    per group with a "written again" between; the first durable group ends the run."""
    caplog.set_level(logging.WARNING, "signing_agent.audit")
    path = tmp_path / "audit.jsonl"
    fsyncer = FailingFsyncer()
    sink = await FileAuditSink.open(path, max_bytes=1 << 20, fsyncer=fsyncer)
    failing_while_syncing: list[bool] = []
    fsync = fsyncer.fsync

    async def watched(fd: int) -> None:
        failing_while_syncing.append(sink.failing)  # the group is written, its fsync not done
        await fsync(fd)

    fsyncer.fsync = watched  # type: ignore[method-assign]
    try:
        fsyncer.failing = True
        async with asyncio.timeout(BOUND):
            for i in range(3):
                with pytest.raises(AuditError):
                    await sink.record(signed(f"lost{i}"))
        fsyncer.failing = False
        await record_all(sink, "b", 1)
        assert not sink.failing
    finally:
        await sink.aclose()
    assert failing_while_syncing == [False, True, True, True]
    messages = [r.getMessage() for r in caplog.records]
    assert sum("Input/output error" in m for m in messages) == 1, messages
    assert sum("records are written again" in m for m in messages) == 1, messages
    assert verify_audit([path]).ok
