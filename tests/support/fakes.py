"""Test doubles for the unit tier: an in-memory audit sink, and the request contexts a test acts under.

Production code has no test modes; these stand in for the real pieces (a ``FileAuditSink``, the API's middleware or
a recovery watcher binding the context) where a unit test needs no file or socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from signing_agent.audit import Auditor, AuditRecord, encode
from signing_agent.context import Caller, RequestContext, bound
from signing_agent.denials import DenialThrottle
from signing_agent.errors import AuditError
from signing_agent.identity import Identity
from signing_agent.metrics import METRICS
from signing_agent.policy import default_policy
from signing_agent.signer import Signer


@dataclass
class MemoryAuditSink:
    """Keeps the records as the file sink would write them (without ``seq``, ``prev`` and ``ts``)."""

    records: list[dict[str, Any]] = field(default_factory=list)
    fail: bool = False
    """Set to make every record fail, to test fail-closed paths."""
    durable: list[bool] = field(default_factory=list)
    """Whether each record asked to be synced."""

    async def record(self, record: AuditRecord) -> None:
        self._keep(record)

    def _keep(self, record: AuditRecord) -> None:
        if self.fail:
            raise AuditError("the audit log cannot be written (test)")
        event, fields = encode(record)
        self.records.append({"event": event, **fields})
        self.durable.append(record.durable)

    def enqueue(self, record: AuditRecord) -> asyncio.Future[None]:
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        try:
            self._keep(record)
        except AuditError as exc:
            done.set_exception(exc)
        else:
            done.set_result(None)
        return done

    @property
    def failing(self) -> bool:
        return self.fail

    async def problem(self) -> str | None:
        return "the audit log cannot be written (test)" if self.fail else None

    async def aclose(self) -> None:
        return None


def memory_auditor(sink: MemoryAuditSink | None = None) -> Auditor:
    return Auditor(sink if sink is not None else MemoryAuditSink(), metrics=METRICS)


def signing_service(identities: Mapping[str, Identity], auditor: Auditor | None = None) -> Signer:
    """A ``Signer`` with the default policy (the test's own uid and root may do everything)."""
    return Signer(
        identities,
        policy=default_policy(os.getuid()),
        auditor=auditor if auditor is not None else memory_auditor(),
        denials=denials(),
    )


def denials() -> DenialThrottle:
    """A denial budget as the daemon's default (30 per minute)."""
    return DenialThrottle(30, 60.0)


@contextlib.contextmanager
def as_peer(uid: int, *, request_id: str = "test-request", gid: int | None = None) -> Iterator[RequestContext]:
    """Act as the socket peer ``uid`` for the code inside (the API's middleware does this for each request)."""
    with bound(RequestContext.for_peer(request_id, Caller(uid=uid, gid=uid if gid is None else gid, pid=4242))) as ctx:
        yield ctx


@contextlib.contextmanager
def as_agent() -> Iterator[RequestContext]:
    """Act as the agent itself (a recovery watcher does this for each poll)."""
    with bound(RequestContext.for_agent()) as ctx:
        yield ctx
