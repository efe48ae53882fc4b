"""The CLI's one error mapper: the same refusal gives the same exit code, raised here or answered by the agent."""

from __future__ import annotations

import io

import pytest

from signing_agent import errors
from signing_agent.cli import build_parser
from signing_agent.cli_exit import EXIT_CODES_HELP, Exit, exit_code, report
from signing_agent.client import AgentNoAnswerError, AgentRequestError, AgentUnreachableError


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (errors.ConfigError("x"), Exit.USAGE),
        (errors.IdentityError("x"), Exit.USAGE),
        (errors.PinRejectedError("x"), Exit.USAGE),
        (errors.InvalidRequestError("x"), Exit.USAGE),
        (errors.UnknownIdentityError("x"), Exit.USAGE),
        (errors.UnknownServiceError("x"), Exit.USAGE),
        (errors.PolicyDeniedError("x"), Exit.POLICY),
        (errors.TooManyRequestsError("x", retry_after=1), Exit.POLICY),
        (errors.AgentTimeoutError("x"), Exit.TIMEOUT),
        (errors.CCFTimeoutError("x"), Exit.TIMEOUT),
        (errors.ConflictError("x"), Exit.ERROR),
        (errors.BackendUnavailableError("x"), Exit.ERROR),
        (errors.CCFUnavailableError("x"), Exit.ERROR),
        (errors.CCFTrustError("x"), Exit.ERROR),
        (errors.AuditError("x"), Exit.ERROR),
        (errors.ShuttingDownError("x"), Exit.ERROR),
        (errors.AgentError("x"), Exit.ERROR),
    ],
)
def test_an_error_maps_alike_raised_here_or_answered_by_the_agent(error: errors.AgentError, expected: Exit) -> None:
    assert exit_code(error) == expected
    answered = AgentRequestError(error.http_status, error.code, error.message, retryable=error.retryable)
    assert exit_code(answered) == expected


@pytest.mark.parametrize(
    ("status", "code", "expected"),
    [
        (408, "RequestTimeout", Exit.TIMEOUT),
        (413, "PayloadTooLarge", Exit.USAGE),
        (404, "NotFound", Exit.ERROR),
        (405, "MethodNotAllowed", Exit.ERROR),
        (503, "TooManyConnections", Exit.ERROR),
        (500, "HTTPError", Exit.ERROR),
        (403, "SomeNewerRefusal", Exit.POLICY),
        (504, "SomeNewerTimeout", Exit.TIMEOUT),
    ],
)
def test_the_http_layers_own_codes_map_by_status(status: int, code: str, expected: Exit) -> None:
    assert exit_code(AgentRequestError(status, code, "x")) == expected


def test_the_body_timeout_is_a_timeout_whichever_way_it_comes() -> None:
    # BodyTimeoutError (the API's 408) registers the code RequestTimeout once the API is imported: still a timeout.
    from signing_agent.api.request import BodyTimeoutError

    assert exit_code(BodyTimeoutError("x")) == Exit.TIMEOUT
    assert exit_code(AgentRequestError(408, "RequestTimeout", "x")) == Exit.TIMEOUT


@pytest.mark.parametrize("status", [400, 401, 403, 404, 409, 429, 500, 503, 504])
def test_any_answer_of_ccf_is_refused_by_ccf(status: int) -> None:
    assert exit_code(AgentRequestError(status, "ProposalNotFound", "x", from_ccf=True)) == Exit.CCF


def test_an_unreachable_or_silent_agent() -> None:
    assert exit_code(AgentUnreachableError("no agent is listening")) == Exit.UNREACHABLE
    assert exit_code(AgentNoAnswerError("no answer within 1 s")) == Exit.TIMEOUT
    assert exit_code(KeyboardInterrupt()) == Exit.INTERRUPTED
    assert exit_code(RuntimeError("a bug")) == Exit.ERROR


def test_error_codes_name_their_class() -> None:
    assert errors.error_class("InvalidRequest") is errors.InvalidRequestError
    assert errors.error_class("PinRejected") is errors.PinRejectedError
    assert errors.error_class("AgentTimeout") is errors.AgentTimeoutError
    assert errors.error_class("InternalError") is errors.AgentError
    assert errors.error_class("NotFound") is None


def _deny() -> None:
    raise errors.PolicyDeniedError("policy: denied")


def test_report_prints_one_line_and_a_traceback_only_when_verbose() -> None:
    err = io.StringIO()
    error = errors.ConfigError("agent.typo: unknown key", hint="see config.example.toml")
    assert report(error, err=err) == Exit.USAGE
    assert err.getvalue() == "signing-agent: ConfigError: agent.typo: unknown key\n  hint: see config.example.toml\n"
    err = io.StringIO()
    with pytest.raises(errors.PolicyDeniedError) as info:
        _deny()
    assert report(info.value, verbose=True, err=err) == Exit.POLICY
    assert err.getvalue().startswith("Traceback")
    assert err.getvalue().endswith("signing-agent: PolicyDenied: policy: denied\n")
    err = io.StringIO()
    assert report(AgentRequestError(401, "Unauthorized", "not a member", from_ccf=True), err=err) == Exit.CCF
    assert err.getvalue() == "signing-agent: CCF: Unauthorized (401): not a member\n"


def test_help_prints_the_table_of_exit_codes() -> None:
    text = build_parser().format_help()
    assert EXIT_CODES_HELP in text
    for code in Exit:
        assert f"\n  {code.value:<4} " in EXIT_CODES_HELP, f"exit code {code.name} is not in the help table"


def test_argparse_usage_errors_exit_2() -> None:
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(["sign", "--no-such-flag"])
    assert info.value.code == Exit.USAGE


def test_a_wait_that_ran_out_is_a_timeout_and_answered_errors_keep_their_status_line() -> None:
    from signing_agent.client.errors import WaitTimeoutError, answered_error

    assert exit_code(WaitTimeoutError("proposal p is still Open after 5 s")) == Exit.TIMEOUT
    typed = answered_error(403, {}, b'{"error": {"code": "PolicyDenied", "message": "rule x"}}')
    assert isinstance(typed, errors.PolicyDeniedError)  # the agent's own class...
    err = io.StringIO()
    assert report(typed, err=err) == Exit.POLICY
    assert err.getvalue() == "signing-agent: PolicyDenied (403): rule x\n"  # ...printed as the answer it was


def test_a_bug_in_a_command_that_talks_to_no_agent_is_not_passed_off_as_a_strange_answer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The CLI reports a ``KeyError`` (and the like) as an unreadable answer only for a command that talked to an
    agent; anywhere else it is a bug of ours, and its traceback shows."""
    from signing_agent import cli

    def broken(args: object) -> int:
        raise KeyError("a bug")

    monkeypatch.setattr(cli, "cmd_version", broken)
    with pytest.raises(KeyError, match="a bug"):
        cli.main(["version"])
