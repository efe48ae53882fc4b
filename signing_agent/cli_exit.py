"""The CLI's one error mapper: every subcommand's failure becomes one line on stderr and one documented exit code.

Owns the exit codes (``Exit``), the table printed in ``signing-agent --help`` (``EXIT_CODES_HELP``), and
``report()``, which every command goes through (``cli.main`` and ``cli_keys``). An error of the agent is classified
by its class, one the agent answered over the socket by its code (``errors.error_class``) or, for the HTTP layer's
own codes, by its status; so the same refusal gives the same exit code whether it was raised here or there.

Imports the standard library, ``errors`` and ``client`` only: client commands must start fast.
"""

from __future__ import annotations

import enum
import sys

from signing_agent.client.errors import (
    AgentNoAnswerError,
    AgentRequestError,
    AgentUnreachableError,
    WaitTimeoutError,
)
from signing_agent.errors import (
    AgentError,
    AgentTimeoutError,
    CCFTimeoutError,
    ConfigError,
    InvalidRequestError,
    PolicyDeniedError,
    TooManyRequestsError,
    UnknownIdentityError,
    UnknownServiceError,
    error_class,
)

TYPE_CHECKING = False  # not typing's: importing typing costs every client command 2 ms
if TYPE_CHECKING:
    from typing import TextIO


class Exit(enum.IntEnum):
    """The exit codes of every ``signing-agent`` command, ``serve`` included (``sandbox``, with its own parser,
    keeps to 0, 1 and 2)."""

    OK = 0
    ERROR = 1
    """Any other failure, or a command whose answer is "no" (health not ok, ``--explain`` denied, a broken audit
    chain, a failed ``check-config``)."""
    USAGE = 2
    """Usage or configuration error: bad arguments (argparse's own 2), an invalid configuration, a PIN the token
    refused, a request the agent refused as malformed or naming an unknown identity or service."""
    UNREACHABLE = 3
    """No agent on the socket: missing, nobody listening, no permission to connect, or whatever answers is no agent
    this command can read (an answer over the client's cap, or of another shape)."""
    POLICY = 4
    """Refused by the agent's policy: ``PolicyDenied`` (403), or ``TooManyRequests`` (429) after too many denials."""
    CCF = 5
    """Refused by CCF: CCF's own error answer (4xx/5xx), relayed by the agent."""
    TIMEOUT = 6
    """Timed out: ``RequestTimeout`` (408), ``AgentTimeout`` (504, the message names what was slow), ``CCFTimeout``
    (504), no answer within the client's own time limit, or a ``--wait`` whose state change did not come."""
    INTERRUPTED = 130
    """Ctrl-C."""


EXIT_CODES_HELP = """\
exit codes (the same for every command):
  0    success
  1    other failure, or the answer is no (health not ok, --explain denied, broken audit chain, check-config)
  2    usage or configuration error (bad arguments, invalid config or one `reload` refused, PIN refused,
       InvalidRequest, UnknownIdentity, UnknownService, PayloadTooLarge, an ambiguous id prefix)
  3    agent unreachable (no socket, connection refused, permission denied, an answer it cannot read)
  4    refused by the agent's policy (PolicyDenied 403, TooManyRequests 429)
  5    refused by CCF (CCF's error answer, relayed)
  6    timeout (RequestTimeout 408, AgentTimeout 504, CCFTimeout 504, no answer within --timeout, --wait ran out)
  130  interrupted
"""

_BY_CLASS: tuple[tuple[type[AgentError], Exit], ...] = (
    (PolicyDeniedError, Exit.POLICY),
    (TooManyRequestsError, Exit.POLICY),
    (AgentTimeoutError, Exit.TIMEOUT),
    (CCFTimeoutError, Exit.TIMEOUT),
    (ConfigError, Exit.USAGE),
    (InvalidRequestError, Exit.USAGE),
    (UnknownIdentityError, Exit.USAGE),
    (UnknownServiceError, Exit.USAGE),
)
"""First match wins (``isinstance``): a subclass added later lands with its parent."""

_BY_STATUS = {403: Exit.POLICY, 429: Exit.POLICY, 408: Exit.TIMEOUT, 504: Exit.TIMEOUT, 413: Exit.USAGE}
"""For the rest, by HTTP status: the HTTP layer's own codes (``RequestTimeout``, ``PayloadTooLarge``) and those of a
newer agent."""


def _classified(cls: type[AgentError] | None, status: int) -> Exit:
    for base, code in _BY_CLASS:
        if cls is not None and issubclass(cls, base):
            return code
    return _BY_STATUS.get(status, Exit.ERROR)


def exit_code(exc: BaseException) -> Exit:
    """The exit code for a failure of any command."""
    match exc:
        case AgentNoAnswerError() | WaitTimeoutError():
            return Exit.TIMEOUT
        case AgentUnreachableError():
            return Exit.UNREACHABLE
        case AgentRequestError(from_ccf=True):
            return Exit.CCF
        case AgentRequestError():
            return _classified(error_class(exc.code), exc.status)
        case AgentError():
            return _classified(type(exc), exc.http_status)
        case KeyboardInterrupt():
            return Exit.INTERRUPTED
        case _:
            return Exit.ERROR


def describe(exc: BaseException) -> str:
    """The one line (and hint) printed for a failure, never a traceback."""
    if isinstance(exc, AgentError) and not isinstance(exc, AgentRequestError):  # the agent's answer says more
        return f"{exc.code}: {exc.diagnostics()}"
    return str(exc)


def report(exc: BaseException, *, verbose: bool = False, err: TextIO | None = None) -> Exit:
    """Print ``exc`` as ``signing-agent: ...`` on ``err`` (stderr), with its traceback first when ``verbose``, and
    return its exit code."""
    err = err or sys.stderr
    if verbose:
        import traceback

        traceback.print_exception(exc, file=err)
    print(f"signing-agent: {describe(exc)}", file=err)
    return exit_code(exc)
