"""The audit log: a hash chain that verify checks, across rotation, and that fails closed."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest

from signing_agent.audit import GENESIS, FileAuditSink, chain_order, line_hash, verify_audit
from signing_agent.errors import AuditError
from tests.support.prereq import missing


async def write(path: Path, n: int, *, max_bytes: int = 1 << 20) -> FileAuditSink:
    sink = await FileAuditSink.open(path, max_bytes=max_bytes)
    for i in range(n):
        await sink.record("received", {"request_id": f"r{i}", "payload_sha256": "ab" * 32})
    return sink


def lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


async def test_records_are_chained_json_lines_in_a_private_file(tmp_path: Path) -> None:
    path = tmp_path / "audit" / "audit.jsonl"
    sink = await write(path, 3)
    await sink.aclose()
    assert path.stat().st_mode & 0o777 == 0o600
    records = [json.loads(line) for line in lines(path)]
    assert [r["seq"] for r in records] == [0, 1, 2]
    assert records[0]["prev"] == GENESIS
    assert records[1]["prev"] == line_hash(lines(path)[0])
    assert records[2]["event"] == "received"
    report = verify_audit([path])
    assert report.ok, report.first_break
    assert report.records == 3
    assert report.last_hash == line_hash(lines(path)[-1])


async def test_reopening_continues_the_chain(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    await (await write(path, 2)).aclose()
    await (await write(path, 2)).aclose()
    report = verify_audit([path])
    assert (report.ok, report.records) == (True, 4)


@pytest.mark.parametrize("tamper", ["edit", "delete", "reorder", "insert"])
async def test_verify_catches_tampering(tmp_path: Path, tamper: str) -> None:
    path = tmp_path / "audit.jsonl"
    await (await write(path, 5)).aclose()
    content = lines(path)
    match tamper:
        case "edit":
            content[2] = content[2].replace(b'"r2"', b'"r9"')
        case "delete":
            del content[2]
        case "reorder":
            content[1], content[2] = content[2], content[1]
        case "insert":
            content.insert(3, content[3])
    path.write_bytes(b"".join(content))
    report = verify_audit([path])
    assert not report.ok
    assert report.first_break is not None
    # The break shows at the first line whose prev no longer matches the line before it.
    expected = {"edit": 4, "delete": 3, "reorder": 2, "insert": 5}[tamper]
    assert report.first_break.startswith(f"{path}:{expected}:")


async def test_verify_catches_a_torn_tail_and_the_sink_refuses_to_extend_it(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    await (await write(path, 2)).aclose()
    with path.open("ab") as f:
        f.write(b'{"half":')
    assert "torn" in str(verify_audit([path]).first_break)
    with pytest.raises(AuditError, match="torn"):
        await FileAuditSink.open(path, max_bytes=1 << 20)


async def test_rotation_keeps_the_chain_across_files(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    sink = await write(path, 40, max_bytes=4096)
    await sink.aclose()
    rotated = sorted(p for p in tmp_path.iterdir() if p.name != "audit.jsonl")
    assert rotated, "nothing was rotated"
    rotated.sort(key=lambda p: int(p.name.rsplit("-", 1)[1]))
    files = [*rotated, path]
    assert all(p.stat().st_size <= 4096 for p in files)
    report = verify_audit(files)
    assert report.ok, report.first_break
    assert report.records == 40 + len(rotated)
    first_of_current = json.loads(lines(path)[0])
    assert first_of_current["event"] == "rotated"
    assert first_of_current["prev_file"] == rotated[-1].name
    assert first_of_current["prev"] == line_hash(lines(rotated[-1])[-1])
    # The current file alone verifies, noting that it continues an earlier one.
    alone = verify_audit([path])
    assert alone.ok
    assert "continuing" in alone.notes[0]
    # A missing middle file is a break.
    if len(rotated) >= 2:
        assert not verify_audit([rotated[0], path]).ok


async def test_an_unwritable_log_fails_closed_at_open(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    path.mkdir()  # unwritable as a file even for root
    with pytest.raises(AuditError, match="cannot open"):
        await FileAuditSink.open(path, max_bytes=1 << 20)


async def test_a_write_error_fails_closed_and_leaves_no_partial_record(tmp_path: Path) -> None:
    """/dev/full accepts the open and fails every write with ENOSPC, as a full disk would."""
    if not os.path.exists("/dev/full"):
        missing("/dev/full (a device every Linux has)")
    sink = FileAuditSink(Path("/dev/full"), max_bytes=1 << 40)
    sink._fd = os.open("/dev/full", os.O_WRONLY)
    try:
        with pytest.raises(AuditError, match="cannot write"):
            await sink.record("received", {"request_id": "x"})
        assert sink.next_seq == 0
        assert sink.last_hash == GENESIS
    finally:
        await sink.aclose()


async def test_a_cancelled_caller_cannot_leave_half_a_record(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    sink = await FileAuditSink.open(path, max_bytes=1 << 20)
    tasks = [asyncio.create_task(sink.record("received", {"request_id": f"r{i}"})) for i in range(50)]
    await asyncio.sleep(0)
    for task in tasks[::2]:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await sink.aclose()
    report = verify_audit([path])
    assert report.ok, report.first_break
    # Shielded writes finish even for cancelled callers.
    assert report.records == 50


async def test_concurrent_records_share_fsyncs_and_stay_chained(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Group commit: 200 concurrent records need far fewer fsyncs, and each waiter returns only after its sync."""
    syncs = 0
    real_fsync = os.fsync

    def counting_fsync(fd: int) -> None:
        nonlocal syncs
        syncs += 1
        real_fsync(fd)

    sink = await FileAuditSink.open(tmp_path / "audit.jsonl", max_bytes=1 << 20)
    monkeypatch.setattr("signing_agent.audit.os.fsync", counting_fsync)
    durable: list[int] = []

    async def one(i: int) -> None:
        await sink.record("signed", {"request_id": str(i)})
        durable.append(syncs)  # at least one fsync happened before this record was acknowledged

    await asyncio.gather(*(one(i) for i in range(200)))
    await sink.aclose()
    assert 0 < syncs < 200
    assert min(durable) >= 1
    report = verify_audit([tmp_path / "audit.jsonl"])
    assert report.ok, report.as_dict()
    lines = (tmp_path / "audit.jsonl").read_text().splitlines()
    assert sorted(json.loads(line)["request_id"] for line in lines) == sorted(str(i) for i in range(200))


async def test_rotation_inside_a_group_keeps_the_chain(tmp_path: Path) -> None:
    sink = await FileAuditSink.open(tmp_path / "audit.jsonl", max_bytes=4096)
    await asyncio.gather(*(sink.record("signed", {"request_id": f"{i:04d}", "pad": "x" * 100}) for i in range(120)))
    await sink.aclose()
    files = chain_order([tmp_path / "audit.jsonl", *tmp_path.glob("audit.jsonl.*")])
    assert files[-1] == tmp_path / "audit.jsonl"
    assert len(files) > 2
    assert chain_order(list(reversed(files))) == files
    report = verify_audit(files)
    assert report.ok, report.as_dict()
    assert all(f.stat().st_size <= 4096 for f in files)


async def test_an_unsynced_record_becomes_durable_with_the_next_synced_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sink = await FileAuditSink.open(tmp_path / "audit.jsonl", max_bytes=1 << 20)
    syncs: list[int] = []
    real_fsync = os.fsync

    def counting_fsync(fd: int) -> None:
        syncs.append(fd)
        real_fsync(fd)

    monkeypatch.setattr("signing_agent.audit.os.fsync", counting_fsync)
    await sink.record("received", {"request_id": "r1"}, sync=False)
    assert syncs == []  # written (the chain advanced), not synced yet
    assert json.loads((tmp_path / "audit.jsonl").read_text())["event"] == "received"
    await sink.record("signed", {"request_id": "r1"})
    assert len(syncs) == 1
    await sink.aclose()
    assert verify_audit([tmp_path / "audit.jsonl"]).ok


async def test_a_broken_log_refuses_records_until_it_is_reopened(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    sink = await write(path, 2)
    sink._broken = "a partial record could not be removed"  # what a failed ftruncate after a failed write leaves
    assert sink.broken
    with pytest.raises(AuditError, match="unusable"):
        await sink.record("signed", {"request_id": "refused"})
    await sink.reopen()  # the daemon does this on SIGHUP when the log is broken
    await sink.record("signed", {"request_id": "after"})
    await sink.aclose()
    assert verify_audit([path]).ok
    assert "refused" not in path.read_text()
