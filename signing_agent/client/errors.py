"""What a client of the agent can fail with.

::

    AgentUnreachableError          no agent on the socket: missing, nobody listening, permission denied
    └─ AgentNoAnswerError          the agent took the request but sent no (complete) answer within the timeout
    AgentRequestError              the agent answered with an error: status, code, message, retryable, retry_after
    ├─ <the agent's own class>     one per error code of signing_agent.errors, e.g. PolicyDenied is raised as a
    │                              subclass of both AgentRequestError and errors.PolicyDeniedError
    └─ CCFRefusedError             CCF's own error answer, relayed by the agent (``from_ccf``)
    WaitTimeoutError               a wait for a state change (``wait_for_proposal``, ...) ran out of time

So ``except signing_agent.errors.PolicyDeniedError`` catches a refusal of the policy whether the agent raised it
in-process or answered it over the socket, and ``except AgentRequestError`` catches every answer that is an
error. Codes that are no agent error's (the HTTP layer's ``NotFound``, ``PayloadTooLarge``, ``RequestTimeout``,
``TooManyConnections``, or a newer agent's) are plain ``AgentRequestError``.
"""

from __future__ import annotations

import functools
import json

from signing_agent.errors import error_class

TYPE_CHECKING = False  # not typing's: importing typing costs every client command 2 ms
if TYPE_CHECKING:
    from typing import Any


class AgentUnreachableError(Exception):
    """The agent's socket cannot be reached."""


UNREADABLE_ANSWER = (KeyError, TypeError, AttributeError, IndexError, ValueError)
"""What reading a result out of an answer of another shape raises (a list for an object, a field missing, not JSON)."""


def unreadable_answer(socket_path: str, exc: Exception) -> AgentUnreachableError:
    """The error for an answer of a shape the client does not read: whatever answers on the socket may be an agent of
    another version, or no agent at all; either way its answer is no result. ``exc`` is its cause (``--verbose``)."""
    error = AgentUnreachableError(
        f"the answer on {socket_path} is not one this client reads ({type(exc).__name__}: {str(exc)[:200]}); is that "
        "socket this version's agent?"
    )
    error.__cause__ = exc
    return error


class AgentNoAnswerError(AgentUnreachableError):
    """The agent took the request but sent no (complete) answer within the client's ``timeout``."""


class WaitTimeoutError(Exception):
    """A wait for a state change ran out of time; the message says what was awaited and what was last seen."""


class AgentRequestError(Exception):
    """The agent answered with an error body ``{"error": {"code", "message", "retryable"}}`` (or CCF's, relayed).

    ``retryable``: the agent says the same request may succeed later (see ``signing_agent.errors``);
    ``retry_after``: its ``Retry-After``, in seconds, when it knows when; ``request_id``: the agent's id for the
    request, which its log lines and audit records carry.
    """

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        body: Any = None,
        from_ccf: bool = False,
        retryable: bool = False,
        retry_after: float | None = None,
        request_id: str | None = None,
    ) -> None:
        Exception.__init__(self, status, code, message)  # not AgentError's: a typed subclass inherits from it too
        self.status = status
        self.code = code
        self.message = message
        self.body = body
        self.from_ccf = from_ccf
        self.retryable = retryable
        self.retry_after = retry_after
        self.request_id = request_id
        self.hint: str | None = None  # the agent's hint is already in its message

    def __str__(self) -> str:
        origin = "CCF: " if self.from_ccf else ""
        return f"{origin}{self.code} ({self.status}): {self.message}"


class CCFRefusedError(AgentRequestError):
    """CCF's own error answer, relayed by the agent: ``code`` and ``message`` are CCF's (OData ``error``)."""


@functools.cache
def typed_error_class(code: str) -> type[AgentRequestError]:
    """The class raised for an agent error ``code``: ``AgentRequestError`` and the agent's own class for it."""
    cls = error_class(code)
    if cls is None:
        return AgentRequestError
    namespace = {"__module__": __name__, "__doc__": f"{cls.__name__}, answered by the agent over its socket."}
    typed: type[AgentRequestError] = type(cls.__name__, (AgentRequestError, cls), namespace)
    return typed


def answered_error(status: int, headers: dict[str, str], body: bytes) -> AgentRequestError:
    """The error for a non-2xx answer: typed by the agent's code, or ``CCFRefusedError`` for CCF's."""
    try:
        parsed = json.loads(body) if body else None
    except ValueError:
        parsed = None
    err = parsed.get("error") if isinstance(parsed, dict) else None
    from_ccf = headers.get("x-relayed-from") == "ccf"
    retry_after = _seconds(headers.get("retry-after"))
    request_id = headers.get("x-request-id")
    cls: type[AgentRequestError] = CCFRefusedError if from_ccf else AgentRequestError
    if isinstance(err, dict):
        code, message = str(err.get("code")), str(err.get("message"))
        if not from_ccf:
            cls = typed_error_class(code)
        retryable = err.get("retryable") is True and not from_ccf
        return cls(status, code, message, parsed, from_ccf, retryable, retry_after, request_id)
    text = body.decode("utf-8", "replace")[:500]
    return cls(status, "HTTPError", text, parsed, from_ccf, False, retry_after, request_id)


def _seconds(retry_after: str | None) -> float | None:
    """A ``Retry-After`` in seconds (the agent sends whole seconds; an HTTP date is not used by it)."""
    if retry_after is None or not retry_after.strip().isdigit():
        return None
    return float(retry_after)
