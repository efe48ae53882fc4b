"""Who is asking, for the request being handled: one ``RequestContext`` in a ``ContextVar``, set once at the edge.

The API's peer middleware binds it for each request (the request id and the socket peer's kernel credentials);
each recovery watcher binds one for each of its polls, with the agent's own credentials and a request id that
starts with ``WATCHER_REQUEST_ID_PREFIX``, a form the API never accepts from a client. The service layer reads it
(``current_request``) instead of taking ``caller``/``request_id`` parameters; the audit records carry it; the log
filter (``signing_agent.log``) adds its request id to every log line.

There is no default: code that signs, decides or audits on behalf of someone and finds no context raises
``LookupError``, so a new entry point that forgot to say who is asking fails loudly instead of acting as the agent.

A leaf: imports nothing from the package.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import secrets
from collections.abc import Iterator
from dataclasses import dataclass

WATCHER_REQUEST_ID_PREFIX = "watcher-"
"""The agent's own work (the recovery watchers) has request ids of this form; the API refuses it from a caller's
``X-Request-Id`` (case-insensitively), so a caller can never pass its requests off as the agent's."""


@dataclass(frozen=True, slots=True)
class Caller:
    """The process on the other end of the socket. ``exe`` is None when it could not be read."""

    uid: int
    gid: int
    pid: int
    exe: str | None = None

    def as_dict(self) -> dict[str, int | str | None]:
        return {"uid": self.uid, "gid": self.gid, "pid": self.pid, "exe": self.exe}


@dataclass(frozen=True, slots=True)
class RequestContext:
    """One request: its id (in logs, audit records and the API's answer) and who asked."""

    request_id: str
    caller: Caller

    @classmethod
    def for_peer(cls, request_id: str, caller: Caller) -> RequestContext:
        """A socket peer's request. Its id can never take the agent's own form (the API already refuses it)."""
        if request_id.lower().startswith(WATCHER_REQUEST_ID_PREFIX):
            raise ValueError(f"a peer's request id may not start with {WATCHER_REQUEST_ID_PREFIX!r}")
        return cls(request_id, caller)

    @classmethod
    def for_agent(cls) -> RequestContext:
        """The agent's own work (a recovery watcher's poll): its own credentials and a fresh ``watcher-`` id."""
        return cls(f"{WATCHER_REQUEST_ID_PREFIX}{secrets.token_hex(6)}", agent_caller())

    @property
    def by_agent(self) -> bool:
        """The agent's own work, not a peer's request (only ``for_agent`` makes such ids)."""
        return self.request_id.startswith(WATCHER_REQUEST_ID_PREFIX)


def agent_caller() -> Caller:
    """The agent itself, as the policy sees it: its own uid, gid and pid."""
    return Caller(uid=os.getuid(), gid=os.getgid(), pid=os.getpid(), exe=None)


_CURRENT: contextvars.ContextVar[RequestContext] = contextvars.ContextVar("signing_agent_request")


def current_request() -> RequestContext:
    """The request being handled; ``LookupError`` outside one (a bug: every entry point binds one)."""
    try:
        return _CURRENT.get()
    except LookupError:
        raise LookupError("no request context: bind one (signing_agent.context.bound) before acting") from None


def request_or_none() -> RequestContext | None:
    """The request being handled, or None outside one (start-up work that no request asked for)."""
    return _CURRENT.get(None)


def request_id() -> str | None:
    """The current request's id, or None outside a request (for log lines)."""
    ctx = _CURRENT.get(None)
    return ctx.request_id if ctx is not None else None


@contextlib.contextmanager
def bound(ctx: RequestContext) -> Iterator[RequestContext]:
    """Make ``ctx`` the current request for the code inside (and the tasks it creates), then restore the previous."""
    token = _CURRENT.set(ctx)
    try:
        yield ctx
    finally:
        _CURRENT.reset(token)
