"""The audit log: one JSON line per decision, hash-chained, fsynced before a signature leaves the agent.

Each line is a compact JSON object with sorted keys. ``seq`` counts records across files; ``prev`` is the lowercase
hex SHA-256 of the previous line's bytes (without its newline), or 64 zeros for the very first record. Editing,
deleting or reordering a line breaks the chain at the next line, which ``verify_audit`` reports. A chain that does not
start at seq 0 must start with a ``rotated`` or ``discontinuity`` record, so cutting off the first lines is a break
too. (The chain cannot show that the *last* lines were cut off or rewritten: anchor the latest hash elsewhere.)

Rotation by size: the current file is renamed to ``<name>.<UTC time>-<seq>`` and the new file begins with a
``rotated`` record whose ``prev`` is the hash of the old file's last line and whose ``prev_file`` names it. Only
``keep_rotated`` rotated files are kept: a ``pruned`` record, written before older files are deleted, names them and
the hash the oldest kept file starts from.

Bounded records: ``bound_fields`` caps every string and list a caller can grow (proposal action names, reasons that
embed them, executable paths, request ids), so a denied request costs the caller, not the disk.

The live file is the agent's alone: it is opened with ``O_NOFOLLOW`` in a folder owned by the agent's user (or root)
that nobody else can write, under an exclusive lock (``.<name>.lock`` beside it) held for the process lifetime. A
live file that is removed, replaced, truncated or appended to behind the agent's back stops the log (fail closed);
SIGHUP (``reopen``) then continues the file only if it still ends with the agent's last record, and otherwise starts
a new file with a ``discontinuity`` record, never silently.

What a line says is typed: every record the agent writes is one of the frozen types of the closed union
``AuditRecord`` (``Received``, ``Denied``, ``Signed``, ``Forwarded``, ``Failed``, ``ShareSubmitted``, ...), built where
the decision is made, with the request context (``signing_agent.context``) and a shared ``Subject`` (identity, member
id, message type, proposal id, CCF service). ``encode`` is the one place a record becomes the fields of its line (the
names on disk are unchanged); ``Auditor`` is the one way records reach the sink.

Fail closed: any error writing or syncing a record raises ``AuditError`` (HTTP 503) and the caller must not release
the signature (``Auditor`` also counts it in ``signing_agent_audit_write_failures_total``). Records never hold a
secret: digests, names and ids only, never payloads, PINs or tokens.

Must not import: aiohttp, key-store backends, ``signing_agent.ccf``, ``signing_agent.cose``.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import errno
import fcntl
import functools
import hashlib
import io
import json
import logging
import os
import re
import stat
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, Protocol

from signing_agent import files
from signing_agent.context import RequestContext
from signing_agent.errors import AgentError, AuditError, ConfigError
from signing_agent.files import NotOursError, Problem, fsync_folder
from signing_agent.metrics import Metrics
from signing_agent.waits import waiting_for

_logger = logging.getLogger(__name__)

GENESIS = "0" * 64
AuditEvent = Literal[
    "received",
    "denied",
    "signed",
    "forwarded",
    "failed",
    "rotated",
    "started",
    "share_submitted",
    "share_failed",
    "identity_adopted",
    "pruned",
    "discontinuity",
    "throttled",
    "identity_approved",
    "recovery_state_refused",
]

FILE_STARTS = frozenset({"rotated", "discontinuity"})
"""The records that may begin a chain that does not start at seq 0."""

DEFAULT_KEEP_ROTATED = 10
MAX_ACTIONS = 32
"""Proposal action names kept in a record (``proposal_actions_count`` and ``_sha256`` cover the whole list)."""
MAX_ACTION_CHARS = 128
MAX_TEXT_CHARS = 512
"""Any other string (a reason embedding action names, an executable path, a request id) is cut here."""
MAX_LIST_ITEMS = 32
MIN_FREE_BYTES = 64 * 1024
"""Health reports the audit log as unavailable when its file system has less room than this."""

_INT_LIMIT = 1 << 64


def line_hash(line: bytes) -> str:
    return hashlib.sha256(line.rstrip(b"\n")).hexdigest()


class AuditSink(Protocol):
    """**Protocol:** where audit records go. ``record`` returns once the record is written, and durable (fsynced)
    unless the record's type is not ``durable``: such a record becomes durable with the next durable one, which is
    always written before a signature leaves the agent (``received`` is written unsynced; ``signed`` syncs both).
    A sink writes what ``encode`` makes of the record, and nothing else."""

    async def record(self, record: AuditRecord) -> None: ...

    def enqueue(self, record: AuditRecord) -> asyncio.Future[None]:
        """Queue ``record`` now, before any record queued or recorded after this call, and return the future of its
        write (``record`` is this, awaited)."""
        ...

    @property
    def failing(self) -> bool:
        """The last write failed, or the log stopped: a request should wait for its records before going on."""
        ...

    async def problem(self) -> str | None:
        """Why records cannot be written now (for health), or None."""
        ...

    async def aclose(self) -> None: ...


# -- bounded records -----------------------------------------------------------------------------------------------


def _clip(text: str, limit: int, *, digest: bool = True) -> str:
    if len(text) <= limit:
        return text
    if not digest:
        return f"{text[:limit]}...[{len(text)} chars]"
    sha = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()
    return f"{text[:limit]}...[{len(text)} chars, sha256 {sha}]"


def _bounded(value: Any) -> Any:
    """``value`` with every string and list cut to size, recursively; other scalars as they are."""
    if value is None or isinstance(value, bool | float):
        return value
    if isinstance(value, int):
        return value if -_INT_LIMIT < value < _INT_LIMIT else f"[an integer of {value.bit_length()} bits]"
    if isinstance(value, str):
        return _clip(value, MAX_TEXT_CHARS)
    if isinstance(value, Mapping):
        return {_clip(str(k), MAX_TEXT_CHARS): _bounded(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        items = [_bounded(v) for v in value[:MAX_LIST_ITEMS]]
        if len(value) > MAX_LIST_ITEMS:
            items.append(f"...[{len(value)} items]")
        return items
    return _clip(str(value), MAX_TEXT_CHARS)


def actions_digest(names: Sequence[str]) -> str:
    """SHA-256 of the JSON array of all the action names (compact, ASCII-escaped): ``proposal_actions_sha256``."""
    return hashlib.sha256(json.dumps(list(names), separators=(",", ":")).encode("ascii")).hexdigest()


def bound_fields(fields: Mapping[str, Any]) -> dict[str, Any]:
    """What a record may hold of ``fields``: None dropped, caller-controlled strings and lists cut to size.

    Proposal action names: the first ``MAX_ACTIONS``, each cut to ``MAX_ACTION_CHARS``, plus the count and digest of
    the whole list, so a 2.5 MB list of names costs a few KiB and can still be matched against the proposal."""
    out: dict[str, Any] = {}
    for key, value in fields.items():
        if value is None:
            continue
        if key == "proposal_actions" and isinstance(value, list | tuple):
            names = [str(v) for v in value]
            out[key] = [_clip(n, MAX_ACTION_CHARS, digest=False) for n in names[:MAX_ACTIONS]]
            out["proposal_actions_count"] = len(names)
            out["proposal_actions_sha256"] = actions_digest(names)
        else:
            out[key] = _bounded(value)
    return out


# -- the records ---------------------------------------------------------------------------------------------------
#
# A closed union of frozen record types, one per kind of decision; ``encode`` is the only place a record becomes the
# fields of a JSON line. A field's name is its name on disk, except the shared parts, which are spread out:
# ``request`` (a ``RequestContext``) is ``request_id`` and ``peer``; ``subject`` (a ``Subject``) is ``identity``,
# ``member_id``, ``msg_type``, ``proposal_id`` and ``service``; ``payload`` (a ``Payload``) is ``payload_sha256``,
# ``proposal_actions`` and ``ballot_sha256``; ``share`` (a ``Share``) is ``recovery_count``,
# ``creation_transaction_id`` and ``unattended``. A None is left out of the line, and ``bound_fields`` cuts whatever a
# caller can grow.


class _Record:
    """What every record type has: its ``event`` name, and whether it is synced on its own (``durable``)."""

    __slots__ = ()
    event: ClassVar[AuditEvent]
    durable: ClassVar[bool] = True


@dataclass(frozen=True, slots=True, kw_only=True)
class Subject:
    """What a record is about, as far as it is known: the member identity, the message, the CCF service."""

    identity: str | None = None
    member_id: str | None = None
    msg_type: str | None = None
    proposal_id: str | None = None
    service: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Payload:
    """What is (or would be) signed, as a record may show it: digests and names, never the bytes."""

    sha256: str
    actions: tuple[str, ...] | None = None
    """Proposal action names (for a ballot: those of the proposal it votes on); None or empty: left out."""
    ballot_sha256: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Share:
    """Which recovery a share is for, and whether a watcher (``unattended``) or a caller submitted it."""

    recovery_count: int | None
    creation_transaction_id: str | None
    unattended: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class Received(_Record):
    """A signing request, before the policy decides (written unsynced: the decision's record syncs it)."""

    event: ClassVar[AuditEvent] = "received"
    durable: ClassVar[bool] = False
    request: RequestContext
    subject: Subject
    payload: Payload


@dataclass(frozen=True, slots=True, kw_only=True)
class Denied(_Record):
    """The policy refused a message (``payload`` None: refused before there was one, as for a recovery share)."""

    event: ClassVar[AuditEvent] = "denied"
    request: RequestContext
    subject: Subject
    payload: Payload | None = None
    rule: str | None
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class PeerRefused(_Record):
    """A peer no policy rule admits, refused at the door. Not synced on its own: nothing leaves the agent, and an
    unauthorised peer must not be able to make the agent fsync at will; the next durable record makes it durable."""

    event: ClassVar[AuditEvent] = "denied"
    durable: ClassVar[bool] = False
    request: RequestContext
    route: str
    rule: str | None
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Signed(_Record):
    event: ClassVar[AuditEvent] = "signed"
    request: RequestContext
    subject: Subject
    payload: Payload
    rule: str | None
    cose_sha256: str


CANCELLED = "Cancelled"
"""A ``failed`` record's ``error`` when the agent stopped waiting (``Auditor.record_cancelled``): for a signed
message, it may have reached CCF or not."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Failed(_Record):
    """Signing failed in the key store (``rule`` set), or a signed message got no answer from CCF (``cose_sha256``
    set); ``error`` is the agent error's code, or ``CANCELLED``."""

    event: ClassVar[AuditEvent] = "failed"
    request: RequestContext
    subject: Subject
    payload: Payload
    rule: str | None = None
    cose_sha256: str | None = None
    error: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Forwarded(_Record):
    """CCF's answer to a signed message (its errors included: they are answers)."""

    event: ClassVar[AuditEvent] = "forwarded"
    request: RequestContext
    subject: Subject
    payload: Payload
    cose_sha256: str
    ccf_status: int
    ccf_error: str | None
    transaction_id: str | None
    attempts: int


@dataclass(frozen=True, slots=True, kw_only=True)
class ShareSubmitted(_Record):
    """A recovery share CCF took. Never the share: the member, the recovery, and CCF's (scrubbed) answer."""

    event: ClassVar[AuditEvent] = "share_submitted"
    request: RequestContext
    subject: Subject
    share: Share
    ccf_status: int
    transaction_id: str | None
    attempts: int
    ccf_message: str
    submitted_count: int | None
    recovery_threshold: int | None


@dataclass(frozen=True, slots=True, kw_only=True)
class ShareFailed(_Record):
    """A recovery share that was not submitted: CCF refused (``ccf_status``), or the agent failed (``error``)."""

    event: ClassVar[AuditEvent] = "share_failed"
    request: RequestContext
    subject: Subject
    share: Share
    ccf_status: int | None = None
    ccf_error: str | None = None
    error: str | None = None
    ccf_message: str
    transaction_id: str | None = None
    attempts: int | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class IdentityAdopted(_Record):
    """A service identity put to use after a recovery (``trust``: ``approved`` or ``provisional``), now or restored
    from the recovery state file (``restored_from``)."""

    event: ClassVar[AuditEvent] = "identity_adopted"
    subject: Subject
    certificate_sha256: str
    previous_sha256: str | None
    trust: str
    restored_from: str | None = None
    request: RequestContext | None = None
    """The request (or watcher) whose work adopted it; None when restored at start-up."""


@dataclass(frozen=True, slots=True, kw_only=True)
class IdentityApproved(_Record):
    """A member approved a new service identity for recovery shares, through this agent's accepting ballot."""

    event: ClassVar[AuditEvent] = "identity_approved"
    request: RequestContext
    subject: Subject
    certificate_sha256: str
    previous_sha256: str
    ballot_transaction_id: str | None


@dataclass(frozen=True, slots=True, kw_only=True)
class RecoveryStateRefused(_Record):
    """A recovery state file the agent cannot trust: nothing was restored from it."""

    event: ClassVar[AuditEvent] = "recovery_state_refused"
    subject: Subject
    path: str
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Started(_Record):
    event: ClassVar[AuditEvent] = "started"
    pid: int
    config: str | None


@dataclass(frozen=True, slots=True, kw_only=True)
class Throttled(_Record):
    """What a peer's denial budget dropped in one window (``signing_agent.denials``); ``peer`` holds its uid only."""

    event: ClassVar[AuditEvent] = "throttled"
    peer: Mapping[str, int]
    dropped: int
    denied: int
    malformed: int
    first_ts: str
    last_ts: str
    """UNIX times with six decimals, as the sink's own ``ts``."""

    @classmethod
    def summary(cls, *, uid: int, denied: int, malformed: int, first_ts: float, last_ts: float) -> Throttled:
        return cls(
            peer={"uid": uid},
            dropped=denied + malformed,
            denied=denied,
            malformed=malformed,
            first_ts=f"{first_ts:.6f}",
            last_ts=f"{last_ts:.6f}",
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class Rotated(_Record):
    """The head of a file that continues the chain of ``prev_file`` (the sink writes it when it rotates)."""

    event: ClassVar[AuditEvent] = "rotated"
    prev_file: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Pruned(_Record):
    """Rotated files about to be deleted, and where the kept chain then begins."""

    event: ClassVar[AuditEvent] = "pruned"
    removed: tuple[str, ...]
    oldest_kept: str
    oldest_kept_seq: int | None
    oldest_kept_prev: str | None


@dataclass(frozen=True, slots=True, kw_only=True)
class Discontinuity(_Record):
    """The head of a new file after the live one was changed behind the agent's back (``found_file``: what was
    there, moved aside)."""

    event: ClassVar[AuditEvent] = "discontinuity"
    reason: str
    found_file: str | None


AuditRecord = (
    Received
    | Denied
    | PeerRefused
    | Signed
    | Failed
    | Forwarded
    | ShareSubmitted
    | ShareFailed
    | IdentityAdopted
    | IdentityApproved
    | RecoveryStateRefused
    | Started
    | Throttled
    | Rotated
    | Pruned
    | Discontinuity
)
"""Every record the agent writes."""

Encoded = tuple[AuditEvent, dict[str, Any]]
"""An encoded record: its event name and its (bounded) fields, before the sink adds ``seq``, ``prev`` and ``ts``."""


def _spread(name: str, value: object) -> dict[str, Any]:
    """The on-disk fields of one field of a record (the shared parts spread out; see above)."""
    if isinstance(value, RequestContext):
        return {"request_id": value.request_id, "peer": value.caller.as_dict()}
    if name == "request" and value is None:  # work no request asked for (start-up): no request fields at all
        return {}
    if isinstance(value, Subject):
        return {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    if isinstance(value, Share):
        return {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    if isinstance(value, Payload):
        actions = list(value.actions) if value.actions else None
        return {"payload_sha256": value.sha256, "proposal_actions": actions, "ballot_sha256": value.ballot_sha256}
    if isinstance(value, tuple):
        return {name: list(value)}
    if isinstance(value, Mapping):
        return {name: dict(value)}
    return {name: value}


def encode(record: AuditRecord) -> Encoded:
    """The one encoder: a record's event name and the fields of its JSON line, bounded (``bound_fields``)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(record):
        out.update(_spread(f.name, getattr(record, f.name)))
    return record.event, bound_fields(out)


class Auditor:
    """The one way records reach the audit log: fail closed, and counted.

    ``record`` returns once the record is written (and durable, for a ``durable`` record type); on any failure it
    counts the failure in ``signing_agent_audit_write_failures_total`` and raises ``AuditError``, and the caller must
    not release a signature. One per process, around the process's sink, injected wherever a decision is recorded.
    """

    def __init__(self, sink: AuditSink, *, metrics: Metrics) -> None:
        self.sink = sink
        self._metrics = metrics

    async def record(self, record: AuditRecord) -> None:
        with self._counted():
            await self.sink.record(record)

    def enqueue(self, record: AuditRecord) -> QueuedRecord:
        """Queue ``record`` for the next write without waiting for it: whatever is recorded after this call is
        written after it. The caller must wait until it is ``written`` before it records what follows from it."""
        return QueuedRecord(self.sink.enqueue(record), self._metrics)

    async def record_cancelled(self, record: AuditRecord, *, after: QueuedRecord | None = None) -> None:
        """``record`` (a ``failed`` with ``error=CANCELLED``) for a request whose task is being cancelled (its
        deadline, ``agent.request_timeout``, ran out, or the agent stops): the outcome the request will never reach.
        Written after ``after`` (its ``received``), and shielded, so a second cancellation does not lose it; a log
        that cannot take it does not replace the cancellation (the failure is counted, and the log reports it)."""

        async def write() -> None:
            if after is not None:
                await after.written()
            await self.record(record)

        with contextlib.suppress(AuditError):
            await asyncio.shield(write())

    @property
    def failing(self) -> bool:
        return self.sink.failing

    @contextlib.contextmanager
    def _counted(self) -> Iterator[None]:
        try:
            yield
        except AuditError:
            self._metrics.audit_write_failures.inc()
            raise
        except Exception as exc:
            self._metrics.audit_write_failures.inc()
            raise AuditError(f"the audit log cannot be written: {exc}") from exc

    async def problem(self) -> str | None:
        """Why records cannot be written now (for health), or None."""
        return await self.sink.problem()


class QueuedRecord:
    """A record on its way to the log (``Auditor.enqueue``)."""

    def __init__(self, future: asyncio.Future[None], metrics: Metrics) -> None:
        self._future = future
        self._metrics = metrics
        self._counted = False

    async def written(self) -> None:
        """Wait until it is written; raises ``AuditError`` if it could not be (counted once, however often asked)."""
        try:
            await asyncio.shield(self._future)
        except Exception as exc:
            if not self._counted:
                self._counted = True
                self._metrics.audit_write_failures.inc()
            if isinstance(exc, AuditError):
                raise
            raise AuditError(f"the audit log cannot be written: {exc}") from exc

    async def settle(self) -> None:
        """Wait for it on the way out of a request that failed anyway: a failed write is counted, not raised."""
        with contextlib.suppress(AuditError):
            await self.written()


class DryRunAuditSink:
    """Writes nothing: for ``signing-agent check-config``, which opens a configuration as ``serve`` would (restoring
    the recovery trust, which is audited) without touching the audit log a running agent holds. Never serves."""

    async def record(self, record: AuditRecord) -> None:
        encode(record)  # what the agent would write must still encode

    def enqueue(self, record: AuditRecord) -> asyncio.Future[None]:
        encode(record)
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done

    @property
    def failing(self) -> bool:
        return False

    async def problem(self) -> str | None:
        return None

    async def aclose(self) -> None:
        return None


# -- files that are really ours ------------------------------------------------------------------------------------


def _why(problem: Problem, st: os.stat_result) -> str:
    """Why a file or folder of the agent's (``signing_agent.files``) is refused, in the audit log's words."""
    if problem == "owner":
        return f"is owned by uid {st.st_uid}, not by the agent's user (uid {os.geteuid()}) or root"
    return f"is group- or world-writable (mode {stat.S_IMODE(st.st_mode):04o})"


_AUDIT_FOLDER_HINT = "keep the audit log in a folder of its own, mode 0700, owned by the agent's user"


def open_own_folder(
    folder: Path, setting: str = "audit.path", *, error: type[AgentError] = AuditError, hint: str = _AUDIT_FOLDER_HINT
) -> int:
    """A folder the agent keeps files in (``setting`` names it in messages), as a descriptor: created 0700 when
    missing; refused (``ConfigError``) when it is a symlink, is not owned by the agent's user or root, or others may
    write it (they could swap its files or plant their own; ``signing_agent.files``). Other failures raise
    ``error``."""
    try:
        files.make_private_folder(folder)
    except OSError as exc:
        raise error(f"{setting}: cannot create the folder {folder}: {exc.strerror}") from None
    try:
        return files.open_own_folder(folder)
    except NotOursError as exc:
        if exc.st is None:  # a symlink, or not a folder
            raise ConfigError(f"{setting}: {folder} is a symlink or not a folder; refusing it") from None
        why = _why(exc.problem, exc.st)
        raise ConfigError(f"{setting}: the folder {folder} {why}; refusing it", hint=hint) from None
    except OSError as exc:
        raise error(f"{setting}: cannot open the folder {folder}: {exc.strerror}") from None


def open_own_file(
    folder_fd: int, path: Path, flags: int, setting: str = "audit.path", *, error: type[AgentError] = AuditError
) -> int:
    """Open ``path`` (in the folder ``folder_fd``) without following a symlink, and only if it is a regular file of
    ours: never a file planted by another user, whose mode we will not touch. Narrowed to 0600 when readable by
    others."""
    try:
        fd = files.open_in_folder(folder_fd, path, flags)
    except NotOursError:
        raise ConfigError(f"{setting}: {path} is a symlink; refusing to follow it") from None
    except OSError as exc:
        raise error(f"{setting}: cannot open {path}: {exc.strerror}") from None
    try:
        problem = _narrow_own_file(fd)
    except OSError as exc:
        os.close(fd)
        raise error(f"{setting}: cannot check {path}: {exc.strerror}") from None
    if problem is not None:
        os.close(fd)
        hint = "move it aside and look at it: the agent only writes its own files"
        raise ConfigError(f"{setting}: {path} {problem}; refusing it", hint=hint)
    return fd


def _narrow_own_file(fd: int) -> str | None:
    """Why the open file is not ours to write, or None (after narrowing a file of ours that others may read)."""
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        return "is not a regular file"
    problem = files.foreign(st)
    if problem is not None:
        return _why(problem, st)
    if st.st_mode & 0o077:
        if st.st_uid != os.geteuid():
            return f"is readable by others (mode {stat.S_IMODE(st.st_mode):04o}) and not ours to chmod"
        os.fchmod(fd, 0o600)
    return None


def lock_path(log: Path) -> Path:
    """The audit log's lock file: ``.<name>.lock`` beside it, hidden so that ``audit verify audit.jsonl*`` does not
    pick it up."""
    return log.with_name(f".{log.name}.lock")


def _lock_holder(fd: int, path: Path) -> str | None:
    """Take the exclusive lock on the open lock file ``fd`` (``path``): None when taken (it is held until ``fd`` is
    closed), else who holds it, ``pid N`` as the holder wrote it."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise AuditError(f"audit.path: cannot lock {path}: {exc.strerror}") from None
        holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        return f"pid {holder}" if holder.isdigit() else "pid unknown"
    return None


class AuditLock:
    """An exclusive ``flock`` on ``.<name>.lock`` beside the audit log, held for the life of the process (SIGHUP too).

    A second agent started against the same audit log finds it taken and stops before it writes anything: it would
    otherwise append a ``started`` record to the live log and break its chain. The file holds the holder's pid, for
    the message; it is never removed (removing a lock file lets two processes lock two different files)."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd: int | None = fd

    @classmethod
    def acquire(cls, folder_fd: int, path: Path, *, log: Path) -> AuditLock:
        fd = open_own_file(folder_fd, path, os.O_RDWR | os.O_CREAT)
        try:
            who = _lock_holder(fd, path)
        except BaseException:
            os.close(fd)
            raise
        if who is not None:
            os.close(fd)
            raise AuditError(
                f"audit.path: {log} is in use by another signing-agent ({who} holds the lock {path}); "
                "this one writes nothing and exits",
                hint="stop the running agent first (systemctl stop signing-agent), or give this one its own audit.path",
            )
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        except OSError as exc:
            os.close(fd)
            raise AuditError(f"audit.path: cannot write {path}: {exc.strerror}") from None
        return cls(path, fd)

    @staticmethod
    def probe(folder_fd: int, path: Path) -> str | None:
        """Who holds the lock at ``path`` (``pid N``), or None when it is free: for ``check-config`` beside a running
        agent. A free lock is taken and released at once; nothing is written, and a missing lock file is not made."""
        try:
            os.stat(path.name, dir_fd=folder_fd, follow_symlinks=False)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise AuditError(f"audit.path: cannot inspect {path}: {exc.strerror}") from None
        fd = open_own_file(folder_fd, path, os.O_RDWR)
        try:
            return _lock_holder(fd, path)
        finally:
            os.close(fd)  # releases the lock, if it was taken here

    def held(self) -> bool:
        """Whether the lock file at ``path`` is still the one we locked (its folder may have been removed)."""
        if self._fd is None:
            return False
        try:
            ours, there = os.fstat(self._fd), os.stat(self.path, follow_symlinks=False)
        except OSError:
            return False
        return (ours.st_dev, ours.st_ino) == (there.st_dev, there.st_ino)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


# -- writing -------------------------------------------------------------------------------------------------------


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


def _first_record(folder_fd: int, name: str) -> dict[str, Any] | None:
    """The first record of a rotated file, or None when it cannot be read as one."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=folder_fd)
    except OSError:
        return None
    try:
        with os.fdopen(fd, "rb") as f:
            record = _parsed(f.readline(MAX_LINE_BYTES))
    except OSError:
        return None
    return record if isinstance(record, dict) else None


MAX_LINE_BYTES = 1 << 20
"""The longest line read as a record. The agent's records are a few KiB at most (every caller-controlled string is cut
at 512 characters, every list at 32 items); a longer line is no record of the agent's."""


def _parsed(line: bytes) -> Any:
    """A line as JSON, or None when it is none: ``ValueError`` for bad JSON or bytes that are not UTF-8, and
    ``RecursionError`` for a line nested deeper than the interpreter goes (``[[[[...``), which no record is."""
    try:
        return json.loads(line)
    except (ValueError, RecursionError):
        return None


def _write_all(fd: int, data: bytes) -> None:
    """One ``write`` of the whole line; a short write is an error (the caller removes the partial line)."""
    written = os.write(fd, data)
    if written != len(data):
        raise OSError(0, f"short write ({written} of {len(data)} bytes)")


class Fsyncer(Protocol):
    """**Protocol:** fsyncs a descriptor somewhere other than the event loop's thread (``workers.syncer.Syncer``).
    Raises ``OSError`` when the fsync failed, and ``RuntimeError`` when it cannot be asked (then the log fsyncs on a
    thread from there on)."""

    async def fsync(self, fd: int) -> None: ...


class FileAuditSink:
    """Appends hash-chained JSON lines to a file (mode 0600), fsynced before ``record`` returns.

    Group commit: records that arrive while a write is in flight are written together with one ``write`` and one
    ``fsync``, so concurrent requests share the cost of the sync and each still returns only once its own record
    is durable. If the write fails, the whole group is taken back and every record in it fails (fail closed).
    """

    def __init__(
        self,
        path: Path,
        *,
        max_bytes: int,
        keep_rotated: int = DEFAULT_KEEP_ROTATED,
        clock: Any = time.time,
        fsyncer: Fsyncer | None = None,
    ) -> None:
        self.path = path
        self._fsyncer = fsyncer
        self.max_bytes = max_bytes
        self.keep_rotated = keep_rotated
        self._clock = clock
        self._lock = asyncio.Lock()
        self._thread_lock = threading.Lock()
        self._fd: int | None = None
        self._size = 0
        self._prev = GENESIS
        self._seq = 0
        self._broken: str | None = None
        self._stopped: str | None = None
        self._failure: str | None = None
        self._file_lock: AuditLock | None = None
        self._rotated = re.compile(re.escape(path.name) + r"\.\d{8}T\d{6}Z-(\d+)")
        self._pending: list[tuple[Encoded, bool, asyncio.Future[None]]] = []
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

    @property
    def lock_path(self) -> Path:
        """``.<name>.lock`` beside the log: hidden, so ``audit verify audit.jsonl*`` does not pick it up."""
        return lock_path(self.path)

    @classmethod
    async def open(
        cls,
        path: Path,
        *,
        max_bytes: int,
        keep_rotated: int = DEFAULT_KEEP_ROTATED,
        lock: bool = True,
        fsyncer: Fsyncer | None = None,
    ) -> FileAuditSink:
        """Open (or create) the log and continue its chain. ``lock``: take ``<path>.lock`` first, or refuse to start
        when another agent holds it (before anything is written). ``fsyncer``: where group commits are fsynced
        (default: a thread)."""
        sink = cls(path, max_bytes=max_bytes, keep_rotated=keep_rotated, fsyncer=fsyncer)
        await asyncio.to_thread(sink._open_sync, lock)
        return sink

    def _open_sync(self, lock: bool) -> None:
        folder_fd = open_own_folder(self.path.parent)
        try:
            if lock:
                self._file_lock = AuditLock.acquire(folder_fd, self.lock_path, log=self.path)
            self._open_live(folder_fd)
        except BaseException:
            if self._file_lock is not None:
                self._file_lock.release()
                self._file_lock = None
            raise
        finally:
            os.close(folder_fd)
        _logger.info("audit log %s: continuing at seq %d", self.path, self._seq)

    def _open_live(self, folder_fd: int) -> None:
        """Open the file at the path and continue its chain from its last record."""
        fd = open_own_file(folder_fd, self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT)
        try:
            st = os.fstat(fd)
            if st.st_nlink > 1:
                self._drop_rotated_names(folder_fd, st)
            last = _last_line(fd, st.st_size)
            prev, seq = GENESIS, 0
            if last is not None:
                try:
                    seq = int(json.loads(last)["seq"]) + 1
                except (ValueError, KeyError, TypeError):
                    raise AuditError(f"audit.path: the last line of {self.path} is not an audit record") from None
                prev = line_hash(last)
        except BaseException:
            os.close(fd)
            raise
        if self._fd is not None:
            os.close(self._fd)
        self._fd, self._size, self._prev, self._seq = fd, st.st_size, prev, seq
        self._broken = self._stopped = self._failure = None

    def _drop_rotated_names(self, folder_fd: int, live: os.stat_result) -> None:
        """A crash between the two steps of a rotation leaves the live file under its rotated name too (the rotation
        did not happen): drop that name, or the same records would be verified twice."""
        for name in os.listdir(folder_fd):
            if not self._rotated.fullmatch(name):
                continue
            try:
                other = os.stat(name, dir_fd=folder_fd, follow_symlinks=False)
            except OSError:
                continue
            if (other.st_dev, other.st_ino) == (live.st_dev, live.st_ino):
                os.unlink(name, dir_fd=folder_fd)
                _logger.warning(
                    "audit log %s: removed %s, a second name left by an unfinished rotation", self.path, name
                )

    async def reopen(self) -> None:
        """SIGHUP, in any failing state. After write errors (a full disk) or a broken record an operator removed, the
        file still ends with the last record this agent wrote and the chain continues in it. After the file was
        changed behind the agent's back (removed, replaced, emptied, cut, extended), or when it does not end with
        that record, what is there is moved aside and a new file begins with a ``discontinuity`` record that carries
        the chain on (its ``prev`` is the agent's last hash). Never continues silently."""
        async with self._lock:
            await asyncio.to_thread(self._reopen_sync)

    def _reopen_sync(self) -> None:
        with self._thread_lock:
            folder_fd = open_own_folder(self.path.parent)
            try:
                if self._file_lock is not None and not self._file_lock.held():
                    self._file_lock.release()
                    self._file_lock = AuditLock.acquire(folder_fd, self.lock_path, log=self.path)
                reason = self._discontinuity(folder_fd)
                if reason is None:
                    self._open_live(folder_fd)
                    _logger.warning("audit log %s reopened; continuing at seq %d", self.path, self._seq)
                else:
                    self._start_after_discontinuity(folder_fd, reason)
            finally:
                os.close(folder_fd)

    def _discontinuity(self, folder_fd: int) -> str | None:
        """Why the chain cannot simply continue in the file at the path, or None: it was changed behind our back (the
        log stopped), or it does not end with this agent's last record (a torn tail nobody removed)."""
        if self._stopped is not None:
            return self._stopped  # changed behind our back: whatever is there now, the gap is recorded
        try:
            fd = os.open(self.path.name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=folder_fd)
        except FileNotFoundError:
            return "the live file was removed"
        except OSError as exc:
            return f"the live file cannot be opened: {exc.strerror}"
        try:
            last = _last_line(fd, os.fstat(fd).st_size)
        except AuditError:
            last = b"torn"
        finally:
            os.close(fd)
        if (GENESIS if last is None else line_hash(last)) == self._prev:
            return None
        return self._broken or "the live file does not end with the agent's last record"

    def _start_after_discontinuity(self, folder_fd: int, reason: str) -> None:
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(self._clock()))
        found = f"{self.path.stem}.found-{stamp}-{self._seq}{self.path.suffix}"
        try:
            os.stat(self.path.name, dir_fd=folder_fd, follow_symlinks=False)
        except FileNotFoundError:
            found_name: str | None = None
        else:
            found_name = found
        header = [Discontinuity(reason=reason, found_file=found_name)]

        def swap(tmp: str) -> None:
            if found_name is not None:
                os.rename(self.path.name, found_name, src_dir_fd=folder_fd, dst_dir_fd=folder_fd)
            os.rename(tmp, self.path.name, src_dir_fd=folder_fd, dst_dir_fd=folder_fd)

        self._install(folder_fd, header, swap, what="start a new audit log")
        self._broken = self._stopped = self._failure = None
        _logger.warning(
            "audit log %s: %s; started a new file at seq %d with a discontinuity record%s",
            self.path,
            reason,
            self._seq - 1,
            f" (what was there is kept as {found_name})" if found_name else "",
        )

    def _install(
        self,
        folder_fd: int,
        header: Sequence[AuditRecord],
        swap: Any,
        *,
        what: str,
    ) -> None:
        """Write ``header`` to a fresh hidden file, fsync it, let ``swap(tmp_name)`` put it at the path, and make it
        the live file. On any failure nothing changes: the path keeps a complete file, never an empty one."""
        tmp = f".{self.path.name}.new"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp, dir_fd=folder_fd)
        seq, prev = self._seq, self._prev
        data = b""
        for record in header:
            line = self._encode(encode(record), seq, prev)
            data += line
            seq, prev = seq + 1, line_hash(line)
        fd = -1
        try:
            fd = os.open(
                tmp,
                os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                0o600,
                dir_fd=folder_fd,
            )
            _write_all(fd, data)
            os.fsync(fd)
            swap(tmp)
        except OSError as exc:
            if fd >= 0:
                os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=folder_fd)
            raise AuditError(f"cannot {what} {self.path}: {exc.strerror}") from None
        fsync_folder(folder_fd)
        if self._fd is not None:
            os.close(self._fd)
        self._fd, self._size, self._seq, self._prev = fd, len(data), seq, prev

    async def problem(self) -> str | None:
        """Why records cannot be written now, or None: a stopped or broken log, a live file changed behind our back,
        the last write failing, or a file system with less than ``MIN_FREE_BYTES`` left. For ``/v1/health``."""
        return await asyncio.to_thread(self._problem_sync)

    def _problem_sync(self) -> str | None:
        with self._thread_lock:
            try:
                self._check_usable()
            except AuditError as exc:
                return exc.message
            if self._failure is not None:
                return self._failure
            assert self._fd is not None  # noqa: S101 -- _check_usable
            try:
                vfs = os.fstatvfs(self._fd)
            except OSError as exc:
                return f"cannot check the free space for the audit log {self.path}: {exc.strerror}"
            free = vfs.f_bavail * vfs.f_frsize
            if free < MIN_FREE_BYTES:
                return f"the audit log {self.path} has {free} bytes left on its file system"
        return None

    def _check_usable(self) -> None:
        """Raise AuditError unless records may be appended: the log is open, not broken, not stopped, and the file at
        the path is still the one we write, with exactly what we wrote (else stop, until SIGHUP)."""
        if self._broken is not None:
            raise AuditError(
                f"the audit log {self.path} is unusable: {self._broken}", hint="fix it, then SIGHUP or restart"
            )
        if self._stopped is None and self._fd is not None:
            self._stopped = self._tampered(self._fd)
            if self._stopped is not None:
                _logger.error(
                    "audit log %s: %s; nothing is signed until an operator looks at it and sends SIGHUP "
                    "(the agent then starts a new file with a discontinuity record)",
                    self.path,
                    self._stopped,
                )
        if self._stopped is not None:
            raise AuditError(
                f"the audit log {self.path} stopped: {self._stopped}",
                hint="look at the audit log's folder, then SIGHUP: the agent starts a new file and records the gap",
            )
        if self._fd is None:
            raise AuditError("the audit log is closed")

    def _tampered(self, fd: int) -> str | None:
        """How the live file differs from what this agent wrote to it, or None."""
        try:
            ours = os.fstat(fd)
        except OSError as exc:  # pragma: no cover -- fstat on an open descriptor
            return f"the live file cannot be checked: {exc.strerror}"
        if not stat.S_ISREG(ours.st_mode):
            return None  # a device (tests write to /dev/full): nothing to compare
        try:
            there = os.stat(self.path, follow_symlinks=False)
        except FileNotFoundError:
            return "the live file was removed (or its folder was)"
        except OSError as exc:
            return f"the live file cannot be checked: {exc.strerror}"
        if (there.st_dev, there.st_ino) != (ours.st_dev, ours.st_ino):
            return "the live file was replaced by another file"
        if ours.st_size < self._size:
            return f"the live file was cut to {ours.st_size} bytes (the agent had written {self._size})"
        if ours.st_size > self._size:
            return f"the live file grew by {ours.st_size - self._size} bytes the agent did not write"
        return None

    async def record(self, record: AuditRecord) -> None:
        """Append one record (and fsync it, unless its type is not ``durable``). Shielded: a cancelled caller cannot
        leave half a record."""
        with waiting_for("the audit log (write and fsync)"):
            await asyncio.shield(self.enqueue(record))

    @property
    def failing(self) -> bool:
        return self._failure is not None or self._stopped is not None or self._broken is not None or self._fd is None

    def enqueue(self, record: AuditRecord) -> asyncio.Future[None]:
        """Queue one record for the next group; the future is done once the group is written (and fsynced, if any
        record in it is ``durable``)."""
        encoded = encode(record)
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((encoded, record.durable, done))
        if self._writer is None or self._writer.done():
            # A fresh context: the writer commits every caller's records, and its own log lines (rotation, write
            # failures) belong to no request, not to whichever one happened to start it.
            self._writer = asyncio.get_running_loop().create_task(self._write_pending(), context=contextvars.Context())
        return done

    async def _write_pending(self) -> None:
        async with self._lock:
            while self._pending:
                group, self._pending = self._pending, []
                sync = any(wants_sync for _, wants_sync, _ in group)
                try:
                    await self._append([encoded for encoded, _, _ in group], sync=sync)
                except AuditError as exc:
                    for _, _, done in group:
                        if not done.done():
                            done.set_exception(exc)
                except BaseException as exc:  # pragma: no cover -- a bug or cancellation: never leave waiters hanging
                    failure = AuditError(f"cannot write the audit log {self.path}: {type(exc).__name__}")
                    for _, _, done in group:
                        if not done.done():
                            done.set_exception(failure)
                    raise
                else:
                    for _, _, done in group:
                        if not done.done():
                            done.set_result(None)

    def _encode(self, encoded: Encoded, seq: int, prev: str) -> bytes:
        """The line of an encoded record at ``seq``, after the line whose hash is ``prev``."""
        event, fields = encoded
        record = {
            **fields,
            "event": event,
            "seq": seq,
            "prev": prev,
            "ts": f"{self._clock():.6f}",
        }
        return json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii") + b"\n"

    async def _append(self, records: Sequence[Encoded], *, sync: bool) -> None:
        """Chain and write ``records`` on the event loop's thread, then fsync them in a thread.

        The write lands in the page cache in microseconds; handing the whole group to a thread instead (as the agent
        once did) cost more than the write: the thread's JSON encoding and hashing took the GIL from the event loop
        and every hand-over of the GIL stalled it. Only the fsync, which waits on the disk without the GIL, goes to a
        thread. A group that does not fit in the live file (a rotation: once per ``max_bytes``) goes to a thread
        whole, as before."""
        with self._thread_lock:
            self._check_usable()
            with self._reporting(done=False):
                before = self._write_here(records)
            if before is not None and not sync:  # done; a synced group is done once its fsync is (_sync_written)
                self._written_again()
        if before is None:
            await asyncio.to_thread(self._append_sync, records, sync=sync)
        elif sync:
            await self._sync_written(before)

    @contextlib.contextmanager
    def _reporting(self, *, done: bool = True) -> Iterator[None]:
        """Log the first of a run of failed writes, and (``done``: the records are written and synced when the block
        is) the write that ends the run. A write whose fsync is still to come ends no run: the log stays ``failing``."""
        try:
            yield
        except AuditError as exc:
            if self._failure is None:
                _logger.error("audit log %s: %s", self.path, exc.message)  # noqa: TRY400 -- no traceback needed
            self._failure = exc.message
            raise
        if done:
            self._written_again()

    def _written_again(self) -> None:
        if self._failure is not None:
            _logger.warning("audit log %s: records are written again", self.path)
            self._failure = None

    def _write_here(self, records: Sequence[Encoded]) -> tuple[int, int, str] | None:
        """Write ``records`` without fsync; the chain's state before them (to take them back if the fsync fails), or
        None when they would not fit in the live file."""
        seq, prev = self._seq, self._prev
        lines: list[bytes] = []
        for encoded in records:
            line = self._encode(encoded, seq, prev)
            lines.append(line)
            seq, prev = seq + 1, line_hash(line)
        data = b"".join(lines)
        if self._size + len(data) > self.max_bytes:
            return None
        before = (self._size, self._seq, self._prev)
        self._write_lines(data, seq, prev, sync=False)
        return before

    async def _sync_written(self, before: tuple[int, int, str]) -> None:
        """fsync what ``_write_here`` wrote; if that fails, take it back (the chain returns to ``before``)."""
        fd = self._fd
        if fd is None:  # pragma: no cover -- closed only under the writer's lock
            raise AuditError("the audit log is closed")
        failure = await self._fsync(fd)
        with self._thread_lock, self._reporting():
            if failure is not None:
                size, seq, prev = before
                self._take_back(fd, size)
                self._size, self._seq, self._prev = size, seq, prev
                raise AuditError(f"cannot write the audit log {self.path}: {failure.strerror}")

    async def _fsync(self, fd: int) -> OSError | None:
        """fsync ``fd`` off the event loop's thread: with the fsyncer while it works, else on a thread."""
        if self._fsyncer is not None:
            try:
                await self._fsyncer.fsync(fd)
            except OSError as exc:
                return exc
            except RuntimeError as exc:
                _logger.warning("audit log %s: %s; fsyncing on a thread from now on", self.path, exc)
                self._fsyncer = None
            else:
                return None
        try:
            await asyncio.to_thread(os.fsync, fd)
        except OSError as exc:
            return exc
        return None

    def _take_back(self, fd: int, size: int) -> None:
        """Cut the live file back to ``size`` bytes so the chain stays intact; if even that fails, stop for good."""
        try:
            os.ftruncate(fd, size)
            os.fsync(fd)
        except OSError as again:
            self._broken = f"a partial record could not be removed: {again.strerror}"

    def _append_sync(self, records: Sequence[Encoded], *, sync: bool = True) -> None:
        """Chain and write ``records`` with one write and (``sync``) one fsync, rotating first where needed."""
        with self._thread_lock:
            self._check_usable()
            with self._reporting():
                self._append_chunks(records, sync=sync)

    def _append_chunks(self, records: Sequence[Encoded], *, sync: bool) -> None:
        chunk: list[bytes] = []
        chunk_size = 0
        seq, prev = self._seq, self._prev
        for encoded in records:
            line = self._encode(encoded, seq, prev)
            if self._size + chunk_size > 0 and self._size + chunk_size + len(line) > self.max_bytes:
                if chunk:
                    self._write_lines(b"".join(chunk), seq, prev)
                    chunk, chunk_size = [], 0
                self._rotate_sync()
                seq, prev = self._seq, self._prev
                line = self._encode(encoded, seq, prev)
            chunk.append(line)
            chunk_size += len(line)
            seq, prev = seq + 1, line_hash(line)
        if chunk:
            self._write_lines(b"".join(chunk), seq, prev, sync=sync)

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
            self._take_back(fd, before)  # a partial group
            raise AuditError(f"cannot write the audit log {self.path}: {exc.strerror}") from None
        self._size = before + len(data)
        self._prev = last_hash
        self._seq = next_seq

    def _rotate_sync(self) -> None:
        """Give the live file its rotated name, and put a new file that begins with the ``rotated`` record (and,
        beyond ``keep_rotated`` files, a ``pruned`` record) in its place, in one atomic rename: the path always holds
        a complete file. Pruned files are deleted only once the record naming them is durable."""
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(self._clock()))
        old = f"{self.path.name}.{stamp}-{self._seq}"
        try:
            folder_fd = open_own_folder(self.path.parent)
        except AgentError as exc:
            raise AuditError(f"cannot rotate the audit log {self.path}: {exc.message}") from None
        try:
            try:
                os.link(self.path.name, old, src_dir_fd=folder_fd, dst_dir_fd=folder_fd, follow_symlinks=False)
            except OSError as exc:
                raise AuditError(f"cannot rotate the audit log {self.path}: {exc.strerror}") from None
            try:
                header: list[AuditRecord] = [Rotated(prev_file=old)]
                removed, pruned = self._prune_plan(folder_fd)
                if pruned is not None:
                    header.append(pruned)

                def swap(tmp: str) -> None:
                    os.rename(tmp, self.path.name, src_dir_fd=folder_fd, dst_dir_fd=folder_fd)

                self._install(folder_fd, header, swap, what="rotate the audit log")
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(old, dir_fd=folder_fd)
                raise
            for name in removed:
                try:
                    os.unlink(name, dir_fd=folder_fd)
                except OSError as exc:
                    _logger.warning("audit log: cannot delete the old file %s: %s", name, exc.strerror)
            fsync_folder(folder_fd)
        finally:
            os.close(folder_fd)
        _logger.info("audit log rotated: %s -> %s%s", self.path, old, f"; deleted {len(removed)}" if removed else "")

    def _prune_plan(self, folder_fd: int) -> tuple[list[str], Pruned | None]:
        """The rotated files beyond ``keep_rotated`` (oldest first, at most ``MAX_LIST_ITEMS`` at a time, so the
        record names every one), and the ``pruned`` record: what goes, and where the kept chain then begins."""
        rotated = sorted((int(m[1]), name) for name in os.listdir(folder_fd) if (m := self._rotated.fullmatch(name)))
        excess = min(len(rotated) - self.keep_rotated, MAX_LIST_ITEMS)
        if excess <= 0:
            return [], None
        removed = [name for _, name in rotated[:excess]]
        if excess < len(rotated):
            kept_name = rotated[excess][1]  # named after the seq its successor begins at; read its own first record
            first = _first_record(folder_fd, kept_name) or {}
            seq, prev = first.get("seq"), first.get("prev")
            kept_seq = seq if isinstance(seq, int) and not isinstance(seq, bool) else None
            kept_prev = prev if isinstance(prev, str) else None
        else:  # keep_rotated = 0: the new live file is the oldest kept one; it starts from the current hash
            kept_seq, kept_name, kept_prev = self._seq, self.path.name, self._prev
        return removed, Pruned(
            removed=tuple(removed), oldest_kept=kept_name, oldest_kept_seq=kept_seq, oldest_kept_prev=kept_prev
        )

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
        if self._file_lock is not None:
            self._file_lock.release()
            self._file_lock = None


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
            with _open_log(path) as f:
                seq = _parsed(f.readline(MAX_LINE_BYTES))["seq"]
        except (OSError, NotALogError, KeyError, TypeError):
            return 1 << 62
        return seq if isinstance(seq, int) and not isinstance(seq, bool) else 1 << 62

    return sorted(paths, key=first_seq)


class NotALogError(Exception):
    """A path ``audit verify`` was given that is no file to read to its end (a FIFO, a device, a folder)."""


def _open_log(path: Path) -> io.BufferedReader:
    """``path`` opened to be verified: a regular file, else ``NotALogError``. Opened without blocking and checked on
    the opened file, so that a FIFO, ``/dev/zero`` or a terminal named as a log (or swapped for one) is refused
    instead of hanging ``audit verify`` or growing it without end."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        regular = stat.S_ISREG(os.fstat(fd).st_mode)
    except BaseException:
        os.close(fd)
        raise
    if not regular:
        os.close(fd)
        raise NotALogError(f"{path}: not a regular file")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def _lines(f: io.BufferedReader) -> Iterator[bytes]:
    """The file's lines, each with its newline (the last one may lack it), none longer than ``MAX_LINE_BYTES`` + 1:
    a longer one is read no further than that, so a huge line costs no memory."""
    while line := f.readline(MAX_LINE_BYTES + 1):
        yield line
        if len(line) > MAX_LINE_BYTES:
            return


@dataclass
class _Start:
    """The first record verified, and the ``pruned`` records seen after it: where the kept chain begins."""

    where: str
    record: dict[str, Any]
    kept: dict[int, tuple[str | None, str]] = field(default_factory=dict)
    """``oldest_kept_seq`` -> (``oldest_kept_prev``, where the ``pruned`` record is)."""
    removed: dict[str, str] = field(default_factory=dict)
    """A pruned file's name -> where the ``pruned`` record is."""

    def saw(self, record: dict[str, Any], where: str) -> None:
        if record.get("event") != "pruned":
            return
        seq = record.get("oldest_kept_seq")
        if isinstance(seq, int):
            prev = record.get("oldest_kept_prev")
            self.kept[seq] = (prev if isinstance(prev, str) else None, where)
        removed = record.get("removed")
        for name in removed if isinstance(removed, list) else []:
            self.removed[str(name)] = where

    def conclude(self, report: AuditReport) -> None:
        """Where the chain begins, and whether that matches what the agent recorded when it pruned older files."""
        seq, record = self.record["seq"], self.record
        if seq == 0:
            return
        recorded = self.kept.get(seq)
        if recorded is not None and recorded[0] is not None and recorded[0] != record["prev"]:
            report.first_break = (
                f"{self.where}: the chain begins at seq {seq}, but the agent recorded another hash for it when it "
                f"pruned older files ({recorded[1]}): its first record was replaced"
            )
            return
        if record.get("event") == "discontinuity":
            report.notes.append(
                f"{self.where}: DISCONTINUITY at seq {seq}: {record.get('reason')}; the agent started this file, "
                "the records before it are not in the files given"
            )
            return
        earlier = record.get("prev_file") or "an earlier file"
        if recorded is not None or earlier in self.removed:
            where = recorded[1] if recorded is not None else self.removed[earlier]
            report.notes.append(
                f"{self.where}: the kept chain begins here at seq {seq}; older files were deleted by the agent "
                f"(audit.keep_rotated), as recorded at {where}"
            )
            return
        report.notes.append(f"{self.where}: starts at seq {seq}, continuing {earlier} that was not given; not checked")


MAX_FOLLOWED = 32
"""Files ``verify_audit`` follows back through ``prev_file``, at most, to join a log that rotated while it read."""
_ROTATED_NAME = re.compile(r".+\.\d{8}T\d{6}Z-\d+")
"""A rotated file's name (``<name>.<UTC time>-<seq>``): the only kind of file the agent deletes (``keep_rotated``)."""


@dataclass
class _Files:
    """The files ``verify_audit`` reads, as the agent may change them while it reads: a rotated file pruned since it
    was named, a second name of the live file left by a rotation cut short (a crash), and a rotation since the files
    were named (the live file's predecessor is then a file nobody named)."""

    queue: list[Path]
    report: AuditReport
    seen: dict[tuple[int, int], Path] = field(default_factory=dict)
    handled: set[Path] = field(default_factory=set)
    read: int = 0
    current: Path | None = None

    def next(self) -> tuple[Path, io.BufferedReader, tuple[int, int]] | None:
        """The next file to verify, open (``_open_log``: the caller closes it), or None at the end; a file that
        cannot be read, or is no regular file, ends the run (``OSError``, ``NotALogError``)."""
        while self.queue:
            path = self.current = self.queue.pop(0)
            self.handled.add(path)
            try:
                f = _open_log(path)
            except FileNotFoundError:
                if not _ROTATED_NAME.fullmatch(path.name):
                    raise
                self.report.notes.append(
                    f"{path}: gone before it was read (the agent deletes the oldest rotated files, "
                    "audit.keep_rotated); verified without it"
                )
                continue
            st = os.fstat(f.fileno())
            key = (st.st_dev, st.st_ino)
            if key in self.seen:
                f.close()
                self.report.notes.append(
                    f"{path}: the same file as {self.seen[key]}, verified once (a rotation cut short by a crash "
                    "leaves the live file under its rotated name too, until the agent next starts)"
                )
                continue
            self.seen[key] = path
            self.read += 1
            return path, f, key
        return None

    def predecessors(self, path: Path, key: tuple[int, int], record: dict[str, Any], prev: str | None) -> bool:
        """Whether the log rotated after the files were named: ``path`` begins with a ``rotated`` record that does
        not continue the chain (whose last hash is ``prev``), and the files its ``prev_file`` names lead back, beside
        it, to one that continues the chain exactly. Those are then verified first, and ``path`` after them (it was
        not counted)."""
        walk: list[Path] = []
        head = record
        while len(walk) < MAX_FOLLOWED:
            name = head.get("prev_file")
            if head.get("event") != "rotated" or not isinstance(name, str) or "/" in name or name in (".", ".."):
                return False
            earlier = path.parent / name
            if earlier in self.handled or earlier in walk or not earlier.is_file():
                return False
            try:
                with _open_log(earlier) as f:
                    head = _parsed(f.readline(MAX_LINE_BYTES + 1))
            except (OSError, NotALogError):
                return False
            if not isinstance(head, dict):
                return False
            walk.insert(0, earlier)
            if head.get("prev") == prev:
                break
        else:
            return False
        del self.seen[key]
        self.read -= 1
        self.queue[:0] = [*walk, path]
        self.report.files.extend(str(p) for p in walk)
        self.report.notes.append(
            f"{path}: the log rotated while it was verified; followed prev_file back through "
            + ", ".join(str(p) for p in reversed(walk))
        )
        return True


def verify_audit(paths: Sequence[Path]) -> AuditReport:
    """Check the chain through ``paths`` in order (oldest first). Reports the first break; never raises on content.

    A chain must begin at seq 0 from the genesis hash, or with a ``rotated`` or ``discontinuity`` record (the head of
    a later file): anything else means its first lines were cut off. Where the agent pruned older files, the kept
    chain must begin from the hash it recorded.

    A live log can be verified while the agent writes it (``_Files``): a rotated file pruned since it was named is
    left out (as if it had not been named), a second name of the same file is read once, and a file that begins
    with a ``rotated`` record whose predecessors were not named (the log rotated meanwhile) has them verified first,
    found through their ``prev_file`` names beside it, if they join the chain exactly."""
    report = AuditReport(files=[str(p) for p in paths])
    chain = _Chain()
    files = _Files(list(paths), report)
    while True:
        try:
            got = files.next()
        except NotALogError as exc:
            report.first_break = str(exc)
            return report
        except OSError as exc:
            report.first_break = f"{files.current}: cannot read: {exc.strerror}"
            return report
        if got is None:
            break
        path, f, key = got
        with f:
            if not _verify_file(path, f, report, chain, functools.partial(files.predecessors, path, key)):
                return report
    if files.read == 0:
        report.first_break = "no audit file to verify: every file named is gone"
        return report
    if chain.start is not None:
        chain.start.conclude(report)
    report.last_hash = chain.prev if report.ok else None
    return report


@dataclass
class _Chain:
    """Where ``verify_audit`` is in the chain: the last hash and seq, and how the chain began."""

    prev: str | None = None
    seq: int | None = None
    start: _Start | None = None


def _verify_file(
    path: Path,
    f: io.BufferedReader,
    report: AuditReport,
    chain: _Chain,
    rejoin: Callable[[dict[str, Any], str | None], bool],
) -> bool:
    """Check one file's lines, continuing ``chain``; False (and ``report.first_break``) at the first break.

    ``rejoin``: asked about the file's first record when it does not continue the chain; True when the files
    between were found and queued before this one (``_Files.predecessors``), which is then read again after them."""
    number = 0
    try:
        for number, raw in enumerate(_lines(f), start=1):
            where = f"{path}:{number}"
            if len(raw) > MAX_LINE_BYTES:
                report.first_break = f"{where}: a line of more than {MAX_LINE_BYTES} bytes is no audit record"
                return False
            if not raw.endswith(b"\n"):
                report.first_break = f"{path}: the last record is torn (no final newline)"
                return False
            if number == 1 and chain.start is not None:
                head = _parsed(raw[:-1])
                if isinstance(head, dict) and head.get("prev") != chain.prev and rejoin(head, chain.prev):
                    return True
            if not _verify_line(where, raw[:-1], report, chain):
                return False
    except OSError as exc:
        report.first_break = f"{path}: cannot read: {exc.strerror}"
        return False
    if number == 0:
        report.first_break = f"{path}: empty; every audit file begins with a record"
        return False
    return True


def _verify_line(where: str, line: bytes, report: AuditReport, chain: _Chain) -> bool:
    """Check one record against the chain so far and advance it; False (and ``report.first_break``) if it breaks."""
    record = _parsed(line)
    if record is None:
        report.first_break = f"{where}: not a JSON record"
        return False
    if not isinstance(record, dict) or not isinstance(record.get("prev"), str):
        report.first_break = f"{where}: not an audit record (no prev)"
        return False
    got_seq = record.get("seq")
    if not isinstance(got_seq, int) or isinstance(got_seq, bool):
        report.first_break = f"{where}: not an audit record (no seq)"
        return False
    if chain.start is None:
        # The first record seen: the genesis, or the head of a later file.
        if got_seq == 0 and record["prev"] != GENESIS:
            report.first_break = f"{where}: the first record (seq 0) does not start from the genesis hash"
            return False
        if got_seq != 0 and record.get("event") not in FILE_STARTS:
            report.first_break = (
                f"{where}: the chain begins at seq {got_seq} with a {record.get('event')!r} record: a chain "
                "that does not begin at seq 0 must begin with a 'rotated' record (its first lines were cut)"
            )
            return False
        chain.start = _Start(where, record)
    else:
        if record["prev"] != chain.prev:
            report.first_break = (
                f"{where}: seq {got_seq}: prev does not match the hash of the line before "
                "(a line was edited, deleted, inserted or moved)"
            )
            return False
        if got_seq != (chain.seq or 0) + 1:
            report.first_break = f"{where}: seq {got_seq} follows seq {chain.seq}"
            return False
        if record.get("event") == "discontinuity":
            report.notes.append(f"{where}: the agent recorded a discontinuity: {record.get('reason')}")
    chain.start.saw(record, where)
    chain.prev = line_hash(line)
    chain.seq = got_seq
    report.records += 1
    return True
