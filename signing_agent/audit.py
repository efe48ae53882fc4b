"""The audit log: one JSON line per decision, hash-chained, fsynced before a signature leaves the agent.

Each line is a compact JSON object with sorted keys. ``seq`` counts records across files; ``prev`` is the lowercase
hex SHA-256 of the previous line's bytes (without its newline), or 64 zeros for the very first record. Editing,
deleting or reordering a line breaks the chain at the next line, which ``verify_audit`` reports. (The chain cannot
show that the *last* lines were cut off or rewritten: anchor the latest hash elsewhere for that.)

Rotation by size: the current file is renamed to ``<name>.<UTC time>-<seq>`` and the new file begins with a
``rotated`` record whose ``prev`` is the hash of the old file's last line and whose ``prev_file`` names it.

Fail closed: any error writing or syncing a record raises ``AuditError`` (HTTP 503) and the caller must not release
the signature. Records never hold a secret: digests, names and ids only, never payloads, PINs or tokens.

Must not import: aiohttp, key-store backends, ``signing_agent.ccf``, ``signing_agent.cose``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from signing_agent.errors import AuditError

_logger = logging.getLogger(__name__)

GENESIS = "0" * 64
AuditEvent = Literal[
    "received",
    "denied",
    "signed",
    "forwarded",
    "failed",
    "explained",
    "rotated",
    "started",
    "share_submitted",
    "share_failed",
    "identity_adopted",
    "identity_approved",
    "recovery_state_refused",
]


def line_hash(line: bytes) -> str:
    return hashlib.sha256(line.rstrip(b"\n")).hexdigest()


class AuditSink(Protocol):
    """**Protocol:** where audit records go. ``record`` returns once the record is written, and durable (fsynced)
    unless ``sync=False``: such a record becomes durable with the next synced one, which is always written before
    a signature leaves the agent (``received`` is written unsynced; ``signed`` syncs both)."""

    async def record(self, event: AuditEvent, fields: Mapping[str, Any], *, sync: bool = True) -> None: ...

    async def aclose(self) -> None: ...


@dataclass
class MemoryAuditSink:
    """Keeps records in memory: for unit tests and embedding, never for the daemon."""

    records: list[dict[str, Any]] = field(default_factory=list)
    fail: bool = False
    """Set to make every record fail, to test fail-closed paths."""

    async def record(self, event: AuditEvent, fields: Mapping[str, Any], *, sync: bool = True) -> None:
        if self.fail:
            raise AuditError("the audit log cannot be written (test)")
        self.records.append({"event": event, **fields})

    async def aclose(self) -> None:
        return None


def _last_line(fd: int, size: int) -> bytes | None:
    """The last complete line of a file (without reading all of it). Raises AuditError on a torn last record."""
    if size == 0:
        return None
    block = 65536
    end = size
    tail = b""
    while end > 0:
        start = max(0, end - block)
        tail = os.pread(fd, end - start, start) + tail
        end = start
        if tail.count(b"\n") >= 2 or end == 0:
            break
    if not tail.endswith(b"\n"):
        raise AuditError(
            "the audit log ends with a torn record (no newline); refusing to extend it",
            hint="inspect the file with 'signing-agent audit verify', move it aside, and restart",
        )
    lines = tail[:-1].split(b"\n")
    return lines[-1] + b"\n"


def _write_all(fd: int, data: bytes) -> None:
    """One ``write`` of the whole line; a short write is an error (the caller removes the partial line)."""
    written = os.write(fd, data)
    if written != len(data):
        raise OSError(0, f"short write ({written} of {len(data)} bytes)")


class FileAuditSink:
    """Appends hash-chained JSON lines to a file (mode 0600), fsynced before ``record`` returns.

    Group commit: records that arrive while a write is in flight are written together with one ``write`` and one
    ``fsync``, so concurrent requests share the cost of the sync and each still returns only once its own record
    is durable. If the write fails, the whole group is taken back and every record in it fails (fail closed).
    """

    def __init__(self, path: Path, *, max_bytes: int, clock: Any = time.time) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self._clock = clock
        self._lock = asyncio.Lock()
        self._thread_lock = threading.Lock()
        self._fd: int | None = None
        self._size = 0
        self._prev = GENESIS
        self._seq = 0
        self._broken: str | None = None
        self._pending: list[tuple[AuditEvent, dict[str, Any], bool, asyncio.Future[None]]] = []
        self._writer: asyncio.Task[None] | None = None

    @property
    def last_hash(self) -> str:
        return self._prev

    @property
    def next_seq(self) -> int:
        return self._seq

    @property
    def broken(self) -> bool:
        """A partial record could not be taken back: nothing is written until an operator fixes it and reloads."""
        return self._broken is not None

    @classmethod
    async def open(cls, path: Path, *, max_bytes: int) -> FileAuditSink:
        sink = cls(path, max_bytes=max_bytes)
        await asyncio.to_thread(sink._open_sync)
        return sink

    def _open_sync(self) -> None:
        folder = self.path.parent
        try:
            if not folder.exists():
                folder.mkdir(mode=0o700, parents=True)
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise AuditError(f"audit.path: cannot open {self.path}: {exc.strerror}") from None
        try:
            st = os.fstat(fd)
            if st.st_mode & 0o077:
                os.fchmod(fd, 0o600)
            last = _last_line(fd, st.st_size)
            if last is not None:
                try:
                    record = json.loads(last)
                    seq = int(record["seq"])
                except (ValueError, KeyError, TypeError):
                    raise AuditError(f"audit.path: the last line of {self.path} is not an audit record") from None
                self._prev = line_hash(last)
                self._seq = seq + 1
            self._size = st.st_size
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        self._broken = None
        _logger.info("audit log %s: continuing at seq %d", self.path, self._seq)

    async def reopen(self) -> None:
        """Close and reopen the file (SIGHUP, or after an operator fixed a broken log)."""
        async with self._lock:
            await asyncio.to_thread(self._close_sync)
            await asyncio.to_thread(self._open_sync)

    async def record(self, event: AuditEvent, fields: Mapping[str, Any], *, sync: bool = True) -> None:
        """Append one record (and fsync it unless ``sync=False``). Shielded: a cancelled caller cannot leave half a
        record."""
        await asyncio.shield(self._record(event, dict(fields), sync))

    async def _record(self, event: AuditEvent, fields: dict[str, Any], sync: bool) -> None:
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((event, fields, sync, done))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.get_running_loop().create_task(self._write_pending())
        await done

    async def _write_pending(self) -> None:
        async with self._lock:
            while self._pending:
                group, self._pending = self._pending, []
                sync = any(wants_sync for _, _, wants_sync, _ in group)
                try:
                    await asyncio.to_thread(self._append_sync, [(e, f) for e, f, _, _ in group], sync=sync)
                except AuditError as exc:
                    for _, _, _, done in group:
                        if not done.done():
                            done.set_exception(exc)
                except BaseException as exc:  # pragma: no cover -- a bug or cancellation: never leave waiters hanging
                    failure = AuditError(f"cannot write the audit log {self.path}: {type(exc).__name__}")
                    for _, _, _, done in group:
                        if not done.done():
                            done.set_exception(failure)
                    raise
                else:
                    for _, _, _, done in group:
                        if not done.done():
                            done.set_result(None)

    def _encode(self, event: AuditEvent, fields: Mapping[str, Any], seq: int, prev: str) -> bytes:
        record = {
            **{k: v for k, v in fields.items() if v is not None},
            "event": event,
            "seq": seq,
            "prev": prev,
            "ts": f"{self._clock():.6f}",
        }
        return json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii") + b"\n"

    def _append_sync(self, records: Sequence[tuple[AuditEvent, Mapping[str, Any]]], *, sync: bool = True) -> None:
        """Chain and write ``records`` with one write and (``sync``) one fsync, rotating first where needed."""
        with self._thread_lock:
            if self._broken is not None:
                raise AuditError(f"the audit log is unusable: {self._broken}", hint="fix it, then SIGHUP or restart")
            if self._fd is None:
                raise AuditError("the audit log is closed")
            chunk: list[bytes] = []
            chunk_size = 0
            seq, prev = self._seq, self._prev
            for event, fields in records:
                line = self._encode(event, fields, seq, prev)
                if self._size + chunk_size > 0 and self._size + chunk_size + len(line) > self.max_bytes:
                    if chunk:
                        self._write_lines(b"".join(chunk), seq, prev)
                        chunk, chunk_size = [], 0
                    self._rotate_sync()
                    seq, prev = self._seq, self._prev
                    line = self._encode(event, fields, seq, prev)
                chunk.append(line)
                chunk_size += len(line)
                seq, prev = seq + 1, line_hash(line)
            if chunk:
                self._write_lines(b"".join(chunk), seq, prev, sync=sync)

    def _write_line(self, line: bytes) -> None:
        self._write_lines(line, self._seq + 1, line_hash(line))

    def _write_lines(self, data: bytes, next_seq: int, last_hash: str, *, sync: bool = True) -> None:
        """Write already-chained lines (and fsync); on success the chain advances to (next_seq, last_hash)."""
        fd = self._fd
        if fd is None:  # pragma: no cover -- checked by the callers
            raise AuditError("the audit log is closed")
        before = self._size
        try:
            _write_all(fd, data)
            if sync:
                os.fsync(fd)
        except OSError as exc:
            # Take back a partial group so the chain stays intact; if even that fails, stop for good.
            try:
                os.ftruncate(fd, before)
                os.fsync(fd)
            except OSError as again:
                self._broken = f"a partial record could not be removed: {again.strerror}"
            raise AuditError(f"cannot write the audit log {self.path}: {exc.strerror}") from None
        self._size = before + len(data)
        self._prev = last_hash
        self._seq = next_seq

    def _rotate_sync(self) -> None:
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(self._clock()))
        old = self.path.with_name(f"{self.path.name}.{stamp}-{self._seq}")
        try:
            os.rename(self.path, old)
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise AuditError(f"cannot rotate the audit log {self.path}: {exc.strerror}") from None
        if self._fd is not None:
            os.close(self._fd)
        self._fd = fd
        self._size = 0
        with contextlib.suppress(OSError):
            dfd = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        self._write_line(self._encode("rotated", {"prev_file": old.name}, self._seq, self._prev))
        _logger.info("audit log rotated: %s -> %s", self.path, old)

    def _close_sync(self) -> None:
        with self._thread_lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    async def aclose(self) -> None:
        if self._writer is not None and not self._writer.done():
            await self._writer
        async with self._lock:
            await asyncio.to_thread(self._close_sync)


# -- verification ----------------------------------------------------------------------------------------------


@dataclass
class AuditReport:
    files: list[str] = field(default_factory=list)
    records: int = 0
    first_break: str | None = None
    notes: list[str] = field(default_factory=list)
    last_hash: str | None = None

    @property
    def ok(self) -> bool:
        return self.first_break is None

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "files": self.files,
            "records": self.records,
            "first_break": self.first_break,
            "notes": self.notes,
            "last_hash": self.last_hash,
        }


def chain_order(paths: Sequence[Path]) -> list[Path]:
    """Files in chain order (by the ``seq`` of their first record), whatever order a shell glob gave them in.

    A file whose first line is not a record goes last, where ``verify_audit`` reports it."""

    def first_seq(path: Path) -> int:
        try:
            with path.open("rb") as f:
                return int(json.loads(f.readline())["seq"])
        except (OSError, ValueError, KeyError, TypeError):
            return 1 << 62

    return sorted(paths, key=first_seq)


def verify_audit(paths: Sequence[Path]) -> AuditReport:
    """Check the chain through ``paths`` in order (oldest first). Reports the first break; never raises on content."""
    report = AuditReport(files=[str(p) for p in paths])
    prev: str | None = None
    seq: int | None = None
    for path in paths:
        try:
            data = path.read_bytes()
        except OSError as exc:
            report.first_break = f"{path}: cannot read: {exc.strerror}"
            return report
        if data and not data.endswith(b"\n"):
            report.first_break = f"{path}: the last record is torn (no final newline)"
            return report
        for number, line in enumerate(data.split(b"\n")[:-1], start=1):
            where = f"{path}:{number}"
            try:
                record = json.loads(line)
            except ValueError:
                report.first_break = f"{where}: not a JSON record"
                return report
            if not isinstance(record, dict) or not isinstance(record.get("prev"), str):
                report.first_break = f"{where}: not an audit record (no prev)"
                return report
            got_seq = record.get("seq")
            if not isinstance(got_seq, int) or isinstance(got_seq, bool):
                report.first_break = f"{where}: not an audit record (no seq)"
                return report
            if prev is None:
                # The first record seen: the genesis, or a continuation of files not given.
                if got_seq == 0 and record["prev"] != GENESIS:
                    report.first_break = f"{where}: the first record (seq 0) does not start from the genesis hash"
                    return report
                if got_seq != 0:
                    report.notes.append(
                        f"{where}: starts at seq {got_seq}, continuing {record.get('prev_file') or 'an earlier file'}"
                        " that was not given; it is not checked"
                    )
            else:
                if record["prev"] != prev:
                    report.first_break = (
                        f"{where}: seq {got_seq}: prev does not match the hash of the line before "
                        "(a line was edited, deleted, inserted or moved)"
                    )
                    return report
                if got_seq != (seq or 0) + 1:
                    report.first_break = f"{where}: seq {got_seq} follows seq {seq}"
                    return report
            prev = line_hash(line)
            seq = got_seq
            report.records += 1
    report.last_hash = prev
    return report
