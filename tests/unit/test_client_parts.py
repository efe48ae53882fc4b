"""The client library's parts without an agent: records, names, the HTTP framing, typed errors and the flows."""

from __future__ import annotations

import ast
import inspect
import json
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from signing_agent import errors, names
from signing_agent.client import _calls
from signing_agent.client._calls import Call, Sleep, unique_prefix
from signing_agent.client._http import MalformedAnswerError, Response, decode_response, encode_request
from signing_agent.client.errors import (
    AgentRequestError,
    AgentUnreachableError,
    CCFRefusedError,
    WaitTimeoutError,
    answered_error,
)
from signing_agent.client.results import Health, Identity, Proposal, ReloadOutcome, Signed, iso_utc
from signing_agent.client_config import SOCKET_ENV
from signing_agent.cose.governance import MsgType
from signing_agent.record import Record

# -- records -------------------------------------------------------------------------------------------------------


class Point(Record):
    x: int
    y: int = 0
    label: str | None = None


def test_a_record_is_built_compared_and_printed_like_a_frozen_dataclass() -> None:
    p = Point(1, label="a")
    assert (p.x, p.y, p.label) == (1, 0, "a")
    assert p == Point(x=1, y=0, label="a")
    assert p != Point(2)
    assert p != (1, 0, "a")
    assert hash(p) == hash(Point(1, 0, "a"))
    assert repr(p) == "Point(x=1, y=0, label='a')"
    assert p.as_dict() == {"x": 1, "y": 0, "label": "a"}
    with pytest.raises(AttributeError, match="immutable"):
        p.x = 2  # type: ignore[misc]  # the test: frozen
    with pytest.raises(AttributeError, match="immutable"):
        del p.y
    with pytest.raises(TypeError, match="missing the argument 'x'"):
        Point()  # type: ignore[call-arg]  # the test: a required field
    with pytest.raises(TypeError, match="unexpected or repeated argument 'z'"):
        Point(1, z=2)  # type: ignore[call-arg]  # the test: no such field
    with pytest.raises(TypeError, match="unexpected or repeated argument 'x'"):
        Point(1, x=2)  # type: ignore[misc]  # the test: twice
    with pytest.raises(TypeError, match="takes 3 fields"):
        Point(1, 2, "a", 4)  # type: ignore[call-arg]  # the test: too many


# -- names ---------------------------------------------------------------------------------------------------------


def _literals() -> dict[str, tuple[str, ...]]:
    """The Literal aliases of ``names``, as its source writes them (at run time they are ``str``)."""
    tree = ast.parse(Path(inspect.getfile(names)).read_text())
    found = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Subscript):
            target = node.targets[0]
            if isinstance(target, ast.Name) and ast.unparse(node.value.value) == "Literal":
                found[target.id] = tuple(typing.get_args(eval(ast.unparse(node.value), {"Literal": typing.Literal})))  # noqa: S307 -- our own source
    return found


def test_each_tuple_of_names_lists_every_value_of_its_literal() -> None:
    literals = _literals()
    assert literals["MsgTypeName"] == names.MSG_TYPES
    assert literals["AzureCredential"] == names.AZURE_CREDENTIALS
    assert literals["LogLevel"] == names.LOG_LEVELS
    assert tuple(m.value for m in MsgType) == names.MSG_TYPES


# -- the HTTP framing ----------------------------------------------------------------------------------------------


def test_a_request_is_one_http_11_exchange_that_closes() -> None:
    raw = encode_request("POST", "/v1/sign", {"a": 1}, {"X-Request-Id": "r1"})
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"POST /v1/sign HTTP/1.1\r\n")
    assert b"\r\nConnection: close" in head
    assert b"\r\nContent-Length: 8" in head
    assert b"\r\nX-Request-Id: r1" in head
    assert body == b'{"a": 1}'
    assert b"Content-Length" not in encode_request("GET", "/v1/health", None, None)
    assert b"Content-Length: 0" in encode_request("POST", "/v1/reload", None, None)


def test_answers_are_framed_by_length_chunks_or_the_end_of_the_stream() -> None:
    by_length = decode_response(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-A: b\r\n\r\n{}trailing")
    assert (by_length.status, by_length.body, by_length.headers["x-a"]) == (200, b"{}", "b")
    chunked = decode_response(
        b"HTTP/1.1 404 Not Found\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2;x\r\nde\r\n0\r\n\r\n"
    )
    assert (chunked.status, chunked.body) == (404, b"abcde")
    assert decode_response(b"HTTP/1.0 204 No Content\r\n\r\n").body == b""
    assert Response(200, {}, b'{"x": [1]}').json() == {"x": [1]}
    for broken, says in [
        (b"", "closed the connection"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 9", "ended before its headers"),
        (b"SSH-2.0-OpenSSH\r\n\r\n", "not an HTTP answer"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nshort", "ended after 5 of its 9 bytes"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "malformed chunk"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n9\r\nabc", "inside a chunk"),
    ]:
        with pytest.raises(MalformedAnswerError, match=says):
            decode_response(broken)


# -- typed errors --------------------------------------------------------------------------------------------------


def _error_body(code: str, message: str = "no", retryable: bool = False) -> bytes:
    return f'{{"error": {{"code": "{code}", "message": "{message}", "retryable": {str(retryable).lower()}}}}}'.encode()


def test_an_agent_error_is_raised_as_the_agents_own_class_and_an_answer() -> None:
    denied = answered_error(403, {"x-request-id": "r9"}, _error_body("PolicyDenied", "rule x"))
    assert isinstance(denied, errors.PolicyDeniedError)
    assert isinstance(denied, errors.RequestError)
    assert isinstance(denied, AgentRequestError)
    assert (denied.status, denied.code, denied.message, denied.request_id) == (403, "PolicyDenied", "rule x", "r9")
    assert str(denied) == "PolicyDenied (403): rule x"
    assert type(answered_error(403, {}, _error_body("PolicyDenied"))) is type(denied)  # one class per code
    throttled = answered_error(429, {"retry-after": "7"}, _error_body("TooManyRequests", retryable=True))
    assert errors.TooManyRequestsError in type(throttled).__mro__  # (mypy cannot picture the two together)
    assert (throttled.retryable, throttled.retry_after) == (True, 7.0)
    unknown = answered_error(404, {}, _error_body("NotFound"))
    assert type(unknown) is AgentRequestError  # the HTTP layer's codes are no agent error's
    garbage = answered_error(502, {}, b"<html>")
    assert (type(garbage), garbage.code, garbage.message) == (AgentRequestError, "HTTPError", "<html>")


def test_a_refusal_of_ccf_is_ccfs_never_the_agents() -> None:
    ccf = answered_error(400, {"x-relayed-from": "ccf"}, _error_body("PolicyDenied", "CCF's own words", retryable=True))
    assert isinstance(ccf, CCFRefusedError)
    assert not isinstance(ccf, errors.AgentError)
    assert (ccf.from_ccf, ccf.retryable) == (True, False)
    assert str(ccf) == "CCF: PolicyDenied (400): CCF's own words"


def test_both_clients_raise_an_error_answer_and_return_any_other() -> None:
    ok = Response(204, {}, b"")
    assert _calls.checked(ok) is ok
    assert _calls.checked(Response(299, {}, b"x")).body == b"x"
    with pytest.raises(errors.PolicyDeniedError) as info:
        _calls.checked(Response(403, {}, _error_body("PolicyDenied", "rule x")))
    assert isinstance(info.value, AgentRequestError)
    with pytest.raises(AgentRequestError) as redirected:
        _calls.checked(Response(300, {}, b""))
    assert redirected.value.status == 300


def test_both_clients_find_the_socket_as_the_cli_does(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from signing_agent.client.aio import AsyncAgentClient
    from signing_agent.client.sync import AgentClient

    monkeypatch.setenv(SOCKET_ENV, str(tmp_path / "env.sock"))
    for cls in (AgentClient, AsyncAgentClient):
        found = cls()
        assert (found.socket_path, found.on_wait, found.notice_after) == (str(tmp_path / "env.sock"), None, 1.0)
        given = cls(tmp_path / "given.sock", timeout=3.0, on_wait=print, notice_after=0.5)
        assert (given.socket_path, given.timeout, given.on_wait, given.notice_after) == (
            str(tmp_path / "given.sock"), 3.0, print, 0.5
        )  # fmt: skip


# -- results -------------------------------------------------------------------------------------------------------


def test_results_keep_what_the_agent_sent_and_times_read_as_iso_8601_utc() -> None:
    assert iso_utc(0) == "1970-01-01T00:00:00Z"
    assert iso_utc(None) is None
    health = Health.from_json(
        {
            "status": "degraded",
            "version": "9",
            "generation": 3,
            "audit": {"status": "ok"},
            "identities": [{"name": "m0", "status": "unavailable", "error": "gone", "checked_at": 1.5}],
            "services": [{"name": "default", "status": "ok", "members": {"m0": "Accepted"}}],
            "last_reload": {"reloaded": False, "generation": 3, "at": 10.0, "error": "bad"},
            "new_field": 1,
        }
    )
    assert (health.ok, health.generation, health.identities[0].error, health.identities[0].checked_at) == (
        False, 3, "gone", 1.5,
    )  # fmt: skip
    assert health.services[0].details["members"] == {"m0": "Accepted"}
    assert health.last_reload == ReloadOutcome(False, 3, 10.0, "bad")
    assert health.raw["new_field"] == 1
    signed = Signed.from_answer(b"\xd2", {"x-member-id": "ab", "x-created-at": "12", "x-cose-sha256": "cd"})
    assert (bytes(signed), signed.member_id, signed.created_at) == (b"\xd2", "ab", 12)
    proposal = Proposal.from_json(
        {"proposalId": "p", "proposalState": "Open", "ballotCount": 1, "actions": [{"name": "a"}, {"name": "b"}]},
        "2.5",
    )
    assert (proposal.open, proposal.action_names, proposal.transaction_id) == (True, ("a", "b"), "2.5")
    assert Identity.from_json({"name": "m0", "warnings": ["w"]}).warnings == ("w",)


# -- flows ---------------------------------------------------------------------------------------------------------

P1, P2, P3 = "ab12" + "0" * 60, "ab34" + "0" * 60, "cd56" + "0" * 60


def drive(flow: Any, answer: Callable[[Call[Any]], Any]) -> Any:
    """Run a flow as the clients do, answering each call with ``answer``; the calls made are in ``drive.calls``."""
    calls: list[str] = []
    drive.calls = calls  # type: ignore[attr-defined]  # for the test's eyes
    try:
        step = next(flow)
        while True:
            if isinstance(step, Sleep):
                calls.append("sleep")
                step = flow.send(None)
                continue
            calls.append(f"{step.method} {step.path}")
            try:
                value = answer(step)
            except Exception as exc:  # noqa: BLE001 -- thrown into the flow, as the clients do
                step = flow.throw(exc)
            else:
                step = flow.send(value)
    except StopIteration as stop:
        return stop.value


def identities_answer(*idents: tuple[str, str]) -> Callable[[Call[Any]], Any]:
    return lambda call: [Identity.from_json({"name": n, "member_id": m}) for n, m in idents]


def test_unique_prefixes_match_as_git_matches_hashes() -> None:
    assert unique_prefix("cd56", [P1, P2, P3], "proposal") == P3
    assert unique_prefix(P1, [P1, P2], "proposal") == P1
    with pytest.raises(errors.InvalidRequestError) as ambiguous:
        unique_prefix("ab", [P1, P2], "proposal")
    assert "at least 4" in ambiguous.value.message
    with pytest.raises(errors.InvalidRequestError) as ambiguous:
        unique_prefix("ab12", [P1, "ab12" + "1" * 60], "proposal")
    assert "is ambiguous" in ambiguous.value.message
    assert P1 in ambiguous.value.message
    assert "ab12" + "1" * 60 in ambiguous.value.message
    with pytest.raises(errors.InvalidRequestError, match="no member id starts with 'ef01'"):
        unique_prefix("ef01", [P1], "member")


def test_an_identity_is_named_or_given_by_its_member_id_or_the_only_one() -> None:
    one = identities_answer(("m0", P1))
    assert drive(_calls.resolve_identity("m0"), one) == "m0"
    assert drive.calls == []  # type: ignore[attr-defined]  # a name is sent as it is: no extra request
    assert drive(_calls.resolve_identity(None), one) == "m0"
    two = identities_answer(("m0", P1), ("m1", P3))
    assert drive(_calls.resolve_identity("CD56"), two) == "m1"  # a member id prefix, any case
    assert drive(_calls.resolve_identity("abcd"), identities_answer(("abcd", P3))) == "abcd"  # a name first
    with pytest.raises(errors.InvalidRequestError, match="several identities"):
        drive(_calls.resolve_identity(None), two)


def test_a_service_is_named_or_the_only_one_or_default() -> None:
    def services(*named: str) -> Callable[[Call[Any]], Any]:
        return lambda call: _calls.services().parse(
            Response(200, {}, json.dumps({"services": [{"name": n} for n in named]}).encode())
        )

    assert drive(_calls.pick_service("x"), services("a", "b")) == "x"
    assert drive(_calls.pick_service(None), services("only")) == "only"
    assert drive(_calls.pick_service(None), services("a", "default")) == "default"
    with pytest.raises(errors.InvalidRequestError, match=r"several services \(a, b\)"):
        drive(_calls.pick_service(None), services("a", "b"))


def test_a_proposal_id_prefix_is_looked_up_and_a_full_id_is_not() -> None:
    twin = "ab12" + "1" * 60
    listed = lambda call: [Proposal.from_json({"proposalId": p}) for p in (P1, P2, P3, twin)]  # noqa: E731
    assert drive(_calls.resolve_proposal_id("default", P1), listed) == P1
    assert drive.calls == []  # type: ignore[attr-defined]
    assert drive(_calls.resolve_proposal_id("default", "CD56"), listed) == P3
    assert drive.calls == ["GET /v1/services/default/proposals"]  # type: ignore[attr-defined]
    with pytest.raises(errors.InvalidRequestError, match="'ab12' is ambiguous"):
        drive(_calls.resolve_proposal_id("default", "ab12"), listed)


def test_a_wait_polls_until_the_state_changes_or_says_what_it_last_saw() -> None:
    states = iter(["Open", "Open", "Accepted"])
    listed = lambda call: [Proposal.from_json({"proposalId": P1, "proposalState": next(states)})]  # noqa: E731
    assert drive(_calls.wait_for_proposal("default", P1, timeout=60, interval=0), listed).state == "Accepted"
    assert drive.calls.count("sleep") == 2  # type: ignore[attr-defined]
    still = lambda call: [Proposal.from_json({"proposalId": P1, "proposalState": "Open"})]  # noqa: E731
    with pytest.raises(WaitTimeoutError, match=f"proposal {P1} is still Open after 0 s"):
        drive(_calls.wait_for_proposal("default", P1, timeout=0, interval=0.01), still)


def test_waiting_for_an_agent_rides_out_an_unreachable_socket() -> None:
    answers: list[Any] = [AgentUnreachableError("not yet"), Health.from_json({"status": "ok"})]

    def answer(call: Call[Any]) -> Any:
        value = answers.pop(0)
        if isinstance(value, Exception):
            raise value
        return value

    assert drive(_calls.wait_for_agent(60, healthy=True, interval=0), answer).ok
    with pytest.raises(WaitTimeoutError, match="not yet"):
        drive(
            _calls.wait_for_agent(0, healthy=True), lambda call: (_ for _ in ()).throw(AgentUnreachableError("not yet"))
        )


def test_names_in_a_route_are_refused_not_escaped() -> None:
    with pytest.raises(errors.InvalidRequestError, match=r"service '\.\./x'"):
        _calls.status("../x")
    with pytest.raises(errors.InvalidRequestError, match="proposal 'a/b'"):
        _calls.proposal("default", "a/b")


def test_a_result_reads_as_the_json_it_came_from() -> None:
    health = Health.from_json({"status": "ok", "identities": [{"name": "m0", "status": "ok"}]})
    assert health["status"] == "ok"  # as when the client returned dicts
    assert health["identities"][0]["name"] == "m0"
    ident = Identity.from_json({"name": "m0", "member_id": "ab", "new": 1})
    assert (ident["name"], ident["new"], ident.raw["member_id"]) == ("m0", 1, "ab")
    with pytest.raises(KeyError):
        health["nothing"]
