"""The audit log: a hash chain that verify checks, across rotation, and that fails closed."""

from __future__ import annotations

import asyncio
import json
import logging
import os
from pathlib import Path

import pytest

from signing_agent.audit import (
    GENESIS,
    MAX_ACTION_CHARS,
    MAX_ACTIONS,
    MAX_TEXT_CHARS,
    Denied,
    FileAuditSink,
    Payload,
    Received,
    Signed,
    Subject,
    actions_digest,
    bound_fields,
    chain_order,
    encode,
    line_hash,
    verify_audit,
)
from signing_agent.context import Caller, RequestContext, bound
from signing_agent.errors import AuditError, ConfigError
from signing_agent.log import RequestIdFilter
from tests.support.fakes import MemoryAuditSink
from tests.support.prereq import missing

PEER = Caller(uid=1000, gid=1000, pid=4242)


def received(request_id: str) -> Received:
    """A small record that asks not to be synced (the first record of a signing request)."""
    return Received(
        request=RequestContext(request_id, PEER), subject=Subject(identity="m0"), payload=Payload(sha256="ab" * 32)
    )


def signed(request_id: str, *, pad: str = "") -> Signed:
    """A small durable record; ``pad`` makes it bigger (for rotation)."""
    return Signed(
        request=RequestContext(request_id, PEER),
        subject=Subject(identity="m0", service=pad or None),
        payload=Payload(sha256="ab" * 32),
        rule="default",
        cose_sha256="cd" * 32,
    )


async def write(path: Path, n: int, *, max_bytes: int = 1 << 20) -> FileAuditSink:
    sink = await FileAuditSink.open(path, max_bytes=max_bytes)
    for i in range(n):
        await sink.record(received(f"r{i}"))
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
    rotated = sorted(tmp_path.glob("audit.jsonl.*"))
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
    # Middle files not named but there (the log rotated after the names were taken) are followed and verified...
    assert len(rotated) >= 3
    followed = verify_audit([rotated[0], path])
    assert followed.ok, followed.first_break
    assert followed.records == report.records
    assert "the log rotated while it was verified" in followed.notes[-1]
    # ...one whose content was changed is a break, and so is a missing one (each on its own: the changed file is
    # put back first, or it would break the chain whatever became of the missing one).
    original = rotated[-1].read_bytes()
    rotated[-1].write_bytes(original.replace(b'"seq"', b'"seq" ', 1))
    changed = verify_audit([rotated[0], path])
    assert not changed.ok
    assert f"{rotated[-1]}:2: seq" in str(changed.first_break)
    rotated[-1].write_bytes(original)
    assert verify_audit([rotated[0], path]).ok
    rotated[1].unlink()
    missing = verify_audit([rotated[0], path])
    assert not missing.ok
    assert f"{path}:1: seq" in str(missing.first_break)


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
            await sink.record(received("x"))
        assert sink.next_seq == 0
        assert sink.last_hash == GENESIS
    finally:
        await sink.aclose()


async def test_a_cancelled_caller_cannot_leave_half_a_record(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    sink = await FileAuditSink.open(path, max_bytes=1 << 20)
    tasks = [asyncio.create_task(sink.record(received(f"r{i}"))) for i in range(50)]
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
        await sink.record(signed(str(i)))
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
    await asyncio.gather(*(sink.record(signed(f"{i:04d}", pad="x" * 100)) for i in range(120)))
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
    await sink.record(received("r1"))  # not durable: written, not synced
    assert syncs == []  # written (the chain advanced), not synced yet
    assert json.loads((tmp_path / "audit.jsonl").read_text())["event"] == "received"
    await sink.record(signed("r1"))
    assert len(syncs) == 1
    await sink.aclose()
    assert verify_audit([tmp_path / "audit.jsonl"]).ok


async def test_a_broken_log_refuses_records_until_it_is_reopened(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    sink = await write(path, 2)
    sink._broken = "a partial record could not be removed"  # what a failed ftruncate after a failed write leaves
    assert sink.broken
    with pytest.raises(AuditError, match="unusable"):
        await sink.record(signed("refused"))
    await sink.reopen()  # the daemon does this on SIGHUP when the log is broken
    await sink.record(signed("after"))
    await sink.aclose()
    assert verify_audit([path]).ok
    assert "refused" not in path.read_text()


# -- bounded records (denials cost the caller, not the disk) ------------------------------------------------------


async def test_a_record_holds_a_bounded_digest_of_what_the_caller_sent(tmp_path: Path) -> None:
    """2.5 MB of action names, a reason that repeats them and a long executable path: a few KiB on disk, with the
    count and digest of the whole list, so the record still identifies the proposal."""
    names = [f"{i:04d}" + "a" * 2500 for i in range(1000)]
    sink = await FileAuditSink.open(tmp_path / "audit.jsonl", max_bytes=1 << 30)
    await sink.record(
        Denied(
            request=RequestContext("r" * 10_000, Caller(uid=1000, gid=1000, pid=1, exe="/x" * 3000)),
            subject=Subject(identity="m0", msg_type="proposal"),
            payload=Payload(sha256="ab" * 32, actions=tuple(names)),
            rule="voters",
            reason="proposal action(s) not allowed: " + ", ".join(names),
        )
    )
    await sink.aclose()
    data = (tmp_path / "audit.jsonl").read_bytes()
    assert len(data) < 16 * 1024
    record = json.loads(data)
    assert record["proposal_actions_count"] == 1000
    assert record["proposal_actions_sha256"] == actions_digest(names)
    assert len(record["proposal_actions"]) == MAX_ACTIONS
    assert record["proposal_actions"][0].startswith(names[0][:MAX_ACTION_CHARS])
    assert record["proposal_actions"][0].endswith("...[2504 chars]")
    assert record["reason"].startswith("proposal action(s) not allowed: 0000aaa")
    assert len(record["reason"]) < MAX_TEXT_CHARS + 120
    assert "sha256" in record["reason"]
    assert len(record["peer"]["exe"]) < MAX_TEXT_CHARS + 120
    assert len(record["request_id"]) < MAX_TEXT_CHARS + 120
    # Whatever else a record could carry is bounded the same way.
    bounded = bound_fields({"huge": 10**5000, "nested": list(range(1000))})
    assert bounded["huge"] == f"[an integer of {(10**5000).bit_length()} bits]"
    assert bounded["nested"][-1] == "...[1000 items]"
    assert verify_audit([tmp_path / "audit.jsonl"]).ok


async def test_short_values_are_kept_as_they_are(tmp_path: Path) -> None:
    sink = MemoryAuditSink()
    await sink.record(
        Denied(
            request=RequestContext("r1", PEER),
            subject=Subject(identity="m0"),
            payload=Payload(sha256="ab" * 32, actions=("set_member",)),
            rule=None,
            reason="ok",
        )
    )
    assert sink.records == [
        {
            "event": "denied",
            "request_id": "r1",
            "peer": {"uid": 1000, "gid": 1000, "pid": 4242, "exe": None},
            "identity": "m0",
            "payload_sha256": "ab" * 32,
            "proposal_actions": ["set_member"],
            "proposal_actions_count": 1,
            "proposal_actions_sha256": actions_digest(["set_member"]),
            "reason": "ok",
        }
    ]


def test_the_encoder_spreads_the_shared_parts_and_leaves_out_what_is_unknown() -> None:
    """The on-disk names are the ones the log has always had: request context, subject and payload spread out."""
    event, fields = encode(signed("r7"))
    assert event == "signed"
    assert fields == {
        "request_id": "r7",
        "peer": {"uid": 1000, "gid": 1000, "pid": 4242, "exe": None},
        "identity": "m0",
        "payload_sha256": "ab" * 32,
        "rule": "default",
        "cose_sha256": "cd" * 32,
    }
    assert encode(received("r7"))[1].keys() == {"request_id", "peer", "identity", "payload_sha256"}
    assert not received("r7").durable
    assert signed("r7").durable


# -- rotation keeps a bounded number of files, and records what it deletes ---------------------------------------


def chain_files(folder: Path) -> list[Path]:
    return chain_order([*folder.glob("audit.jsonl.*"), folder / "audit.jsonl"])


async def test_rotation_keeps_only_keep_rotated_files_and_records_what_it_deletes(tmp_path: Path) -> None:
    sink = await FileAuditSink.open(tmp_path / "audit.jsonl", max_bytes=4096, keep_rotated=2)
    for i in range(200):
        await sink.record(signed(f"{i:04d}", pad="x" * 100))
    await sink.aclose()
    files = chain_files(tmp_path)
    assert len(files) == 3, files  # two rotated files and the live one
    records = [json.loads(line) for f in files for line in lines(f)]
    pruned = [r for r in records if r["event"] == "pruned"]
    assert pruned, "no pruned record in the kept files"
    last = pruned[-1]
    assert not any((tmp_path / name).exists() for name in last["removed"])
    assert last["oldest_kept"] == files[0].name
    first = json.loads(lines(files[0])[0])
    assert (first["seq"], first["prev"]) == (last["oldest_kept_seq"], last["oldest_kept_prev"])
    report = verify_audit(files)
    assert report.ok, report.first_break
    assert "the kept chain begins here" in report.notes[0], report.notes
    assert "audit.keep_rotated" in report.notes[0]


async def test_a_rotation_cut_short_by_a_crash_leaves_no_second_copy(tmp_path: Path) -> None:
    """Rotation links the live file to its rotated name, then renames the new file into place: a crash in between
    leaves one file under two names, and the next start drops the rotated one."""
    path = tmp_path / "audit.jsonl"
    await (await write(path, 3)).aclose()
    os.link(path, tmp_path / "audit.jsonl.20260101T000000Z-3")
    await (await write(path, 1)).aclose()
    assert chain_files(tmp_path) == [path]
    assert verify_audit([path]).records == 4


async def test_keep_rotated_zero_keeps_the_live_file_only(tmp_path: Path) -> None:
    sink = await FileAuditSink.open(tmp_path / "audit.jsonl", max_bytes=4096, keep_rotated=0)
    for i in range(100):
        await sink.record(signed(f"{i:04d}", pad="x" * 100))
    await sink.aclose()
    assert chain_files(tmp_path) == [tmp_path / "audit.jsonl"]
    report = verify_audit([tmp_path / "audit.jsonl"])
    assert report.ok, report.first_break
    assert "the kept chain begins here" in report.notes[0]


async def test_a_kept_chain_rewritten_from_another_start_is_caught(tmp_path: Path) -> None:
    """The pruned record pins the hash the oldest kept file starts from: a file put in its place that continues
    something else (here: a copy whose first record claims another predecessor, re-chained) is a break."""
    sink = await FileAuditSink.open(tmp_path / "audit.jsonl", max_bytes=4096, keep_rotated=1)
    for i in range(120):
        await sink.record(signed(f"{i:04d}", pad="x" * 100))
    await sink.aclose()
    files = chain_files(tmp_path)
    assert verify_audit(files).ok
    oldest = lines(files[0])
    head = json.loads(oldest[0])
    head["prev"] = "f" * 64
    forged = [json.dumps(head, sort_keys=True, separators=(",", ":")).encode() + b"\n"]
    for line in oldest[1:]:
        record = json.loads(line)
        record["prev"] = line_hash(forged[-1])
        forged.append(json.dumps(record, sort_keys=True, separators=(",", ":")).encode() + b"\n")
    files[0].write_bytes(b"".join(forged))
    # Re-chain the rest too, except the pruned records (the agent's word): a consistent rewrite of the kept files.
    prev = line_hash(forged[-1])
    for path in files[1:]:
        out = []
        for line in lines(path):
            record = json.loads(line)
            record["prev"] = prev
            out.append(json.dumps(record, sort_keys=True, separators=(",", ":")).encode() + b"\n")
            prev = line_hash(out[-1])
        path.write_bytes(b"".join(out))
    report = verify_audit(files)
    assert not report.ok
    assert "the agent recorded another hash for it when it pruned" in str(report.first_break)


# -- a cut head fails verification ---------------------------------------------------------------------------------


async def test_verify_fails_a_log_whose_first_lines_were_cut(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    await (await write(path, 5)).aclose()
    path.write_bytes(b"".join(lines(path)[2:]))
    report = verify_audit([path])
    assert not report.ok
    assert report.first_break is not None
    assert report.first_break.startswith(f"{path}:1: the chain begins at seq 2 with a 'received' record")
    assert "cut" in report.first_break


async def test_verify_fails_a_rotated_file_without_its_rotated_record_and_an_empty_file(tmp_path: Path) -> None:
    sink = await write(tmp_path / "audit.jsonl", 40, max_bytes=4096)
    await sink.aclose()
    current = tmp_path / "audit.jsonl"
    assert verify_audit([current]).ok  # begins with its rotated record
    current.write_bytes(b"".join(lines(current)[1:]))
    assert "must begin with a 'rotated' record" in str(verify_audit([current]).first_break)
    current.write_bytes(b"")
    assert "empty" in str(verify_audit([current]).first_break)


# -- the live file is the agent's: changes behind its back stop the log until SIGHUP ---------------------------------


def tamper_with(path: Path, how: str) -> None:
    match how:
        case "emptied":
            os.truncate(path, 0)
        case "cut":
            path.write_bytes(b"".join(lines(path)[2:]))  # rewritten in place: same inode, shorter
        case "replaced":
            other = path.with_name("other")
            other.write_bytes(b"")
            other.chmod(0o600)
            other.replace(path)
        case "removed":
            path.unlink()
        case "appended":
            with path.open("ab") as f:
                f.write(b'{"forged":true}\n')


@pytest.mark.parametrize("how", ["emptied", "cut", "replaced", "removed", "appended"])
async def test_a_live_file_changed_behind_the_agents_back_stops_the_log_until_reopened(
    tmp_path: Path, how: str
) -> None:
    path = tmp_path / "audit.jsonl"
    sink = await write(path, 4)
    last_seq, last_hash = sink.next_seq, sink.last_hash
    assert await sink.problem() is None
    tamper_with(path, how)
    problem = await sink.problem()
    assert problem is not None
    assert {"emptied": "cut to 0", "cut": "cut to", "replaced": "replaced", "removed": "removed",
            "appended": "grew by"}[how] in problem  # fmt: skip
    with pytest.raises(AuditError, match="stopped"):
        await sink.record(signed("refused"))
    assert sink.next_seq == last_seq
    await sink.reopen()  # SIGHUP
    assert await sink.problem() is None
    await sink.record(signed("after"))
    await sink.aclose()
    head = json.loads(lines(path)[0])
    assert head["event"] == "discontinuity"
    assert (head["seq"], head["prev"]) == (last_seq, last_hash)  # the chain carries on, and says where it was cut
    found = list(tmp_path.glob("audit.found-*.jsonl"))
    assert [p.name for p in found] == ([] if how == "removed" else [head["found_file"]])
    report = verify_audit([path])
    assert report.ok, report.first_break
    assert "DISCONTINUITY" in report.notes[0]
    assert "refused" not in path.read_text()


async def test_a_replaced_file_starts_a_new_one_even_with_the_same_content(tmp_path: Path) -> None:
    """A restored copy (another inode, same content) is not continued silently either: the new file's discontinuity
    record carries the chain on from the agent's last hash, so the copy and the new file verify together."""
    path = tmp_path / "audit.jsonl"
    sink = await write(path, 3)
    copy = tmp_path / "copy"
    copy.write_bytes(path.read_bytes())
    copy.chmod(0o600)
    copy.replace(path)
    assert "replaced" in str(await sink.problem())
    await sink.reopen()
    await sink.record(signed("after"))
    await sink.aclose()
    assert [json.loads(line)["event"] for line in lines(path)] == ["discontinuity", "signed"]
    (found,) = tmp_path.glob("audit.found-*.jsonl")
    report = verify_audit([found, path])
    assert report.ok, report.first_break
    assert report.records == 5
    assert "the agent recorded a discontinuity" in report.notes[0]


async def test_reopen_after_a_failed_write_continues_the_same_file(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    sink = await write(path, 2)
    sink._failure = "cannot write the audit log: No space left on device"  # what a failed write leaves
    assert "No space left" in str(await sink.problem())
    await sink.reopen()
    assert await sink.problem() is None
    await sink.record(signed("after"))
    await sink.aclose()
    assert [json.loads(line)["event"] for line in lines(path)] == ["received", "received", "signed"]


# -- the lock and the files are ours ---------------------------------------------------------------------------------


async def test_a_second_sink_on_the_same_log_is_refused_until_the_first_closes(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    first = await write(path, 1)
    before = path.read_bytes()
    with pytest.raises(AuditError, match=rf"in use by another signing-agent \(pid {os.getpid()} holds the lock"):
        await FileAuditSink.open(path, max_bytes=1 << 20)
    assert path.read_bytes() == before
    await first.aclose()
    await (await FileAuditSink.open(path, max_bytes=1 << 20)).aclose()


async def test_a_symlinked_log_or_folder_is_refused_and_its_target_untouched(tmp_path: Path) -> None:
    target = tmp_path / "target"
    target.write_bytes(b"precious\n")
    target.chmod(0o644)
    folder = tmp_path / "audit"
    folder.mkdir(mode=0o700)
    (folder / "audit.jsonl").symlink_to(target)
    with pytest.raises(ConfigError, match="symlink"):
        await FileAuditSink.open(folder / "audit.jsonl", max_bytes=1 << 20)
    (tmp_path / "linked").symlink_to(folder)
    with pytest.raises(ConfigError, match="symlink"):
        await FileAuditSink.open(tmp_path / "linked" / "other.jsonl", max_bytes=1 << 20)
    assert target.read_bytes() == b"precious\n"
    assert target.stat().st_mode & 0o777 == 0o644


def _planted(tmp_path: Path, what: str) -> tuple[Path, Path]:
    """The audit log's path, and the one of its file, lock or folder the test makes another's."""
    folder = tmp_path / "audit"
    folder.mkdir(mode=0o700)
    path = folder / "audit.jsonl"
    planted = {"file": path, "lock": folder / ".audit.jsonl.lock", "folder": folder}[what]
    if what != "folder":
        planted.write_bytes(b"")
        planted.chmod(0o644)
    return path, planted


@pytest.mark.parametrize("what", ["file", "folder", "lock"])
async def test_files_of_another_user_are_refused(tmp_path: Path, what: str) -> None:
    if os.geteuid() != 0:
        missing("giving a file to another uid needs root")
    path, planted = _planted(tmp_path, what)
    os.chown(planted, 65534, 65534)
    with pytest.raises(ConfigError, match="owned by uid 65534"):
        await FileAuditSink.open(path, max_bytes=1 << 20)
    assert planted.stat().st_mode & 0o777 == (0o700 if what == "folder" else 0o644)  # no chmod on theirs


@pytest.mark.parametrize("what", ["file", "folder", "lock"])
async def test_files_writable_by_others_are_refused(tmp_path: Path, what: str) -> None:
    path, planted = _planted(tmp_path, what)
    planted.chmod(0o770 if what == "folder" else 0o620)
    with pytest.raises(ConfigError, match="group- or world-writable"):
        await FileAuditSink.open(path, max_bytes=1 << 20)


async def test_the_writer_s_own_log_lines_carry_no_caller_s_request_id(tmp_path: Path) -> None:
    """The writer task writes every caller's records (group commit): its lines (a rotation here) are its own, not
    tagged with whichever request happened to start it."""
    seen: list[tuple[str, str]] = []

    class Capture(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append((record.getMessage(), str(getattr(record, "request_id", None))))

    handler = Capture()
    handler.addFilter(RequestIdFilter())  # as the daemon's handlers do: the id is read when the line is written
    logger = logging.getLogger("signing_agent.audit")
    logger.addHandler(handler)
    old_level = logger.level
    logger.setLevel(logging.INFO)
    try:
        sink = await FileAuditSink.open(tmp_path / "audit.jsonl", max_bytes=2048)
        with bound(RequestContext("caller-1", PEER)):
            for i in range(30):
                await sink.record(signed(f"r{i}", pad="x" * 40))
        await sink.aclose()
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    rotations = [(msg, rid) for msg, rid in seen if msg.startswith("audit log rotated")]
    assert rotations, seen
    assert all(rid == "-" for _, rid in rotations), rotations
