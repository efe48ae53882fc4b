"""The typed CCF governance client: every operation asks CCF's path, and every answer is parsed once, here.

A recording transport stands in for ``CCFClient`` (pinned TLS, retries and caps are tested against real servers in
tests/component and tests/e2e).
"""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
import trustme

from signing_agent.ccf import api
from signing_agent.ccf.api import (
    Answer,
    CCFGovernanceClient,
    EncryptedShare,
    HttpConnector,
    Member,
    Node,
    NodeState,
    PreviousIdentity,
    Proposal,
    ProposalActions,
    RecoverySubmission,
    ServiceInfo,
    ServiceTransition,
    StateDigest,
    presented_certificate,
)
from signing_agent.ccf.client import CCFResponse
from signing_agent.config import ServiceConfig

PID = "a" * 64
MID = "b" * 64


def response(status: int = 200, body: Any = None, *, raw: bytes | None = None) -> CCFResponse:
    if raw is None:
        raw = json.dumps(body).encode() if body is not None else b""
    return CCFResponse(
        status=status, body=body if body is not None else raw, raw=raw, content_type="", transaction_id="2.9"
    )


class RecordingTransport:
    """Answers every request with ``answer`` and records what was asked."""

    def __init__(self, answer: CCFResponse) -> None:
        self.answer = answer
        self.requests: list[tuple[str, str, bool, int | None, bytes | None]] = []
        self.config = ServiceConfig(name="s", url="https://ccf")
        self.trusted_pems: tuple[bytes, ...] = (b"pinned",)

    async def get(self, path: str, *, gov: bool = True, max_attempts: int | None = None) -> CCFResponse:
        self.requests.append(("GET", path, gov, max_attempts, None))
        return self.answer

    async def post_cose(self, path: str, cose: bytes) -> CCFResponse:
        self.requests.append(("POST", path, True, None, cose))
        return self.answer

    async def aclose(self) -> None:
        pass


CALLS: list[tuple[str, tuple[Any, ...], str, str]] = [
    ("service_info", (), "GET", "/gov/service/info"),
    ("members", (), "GET", "/gov/service/members"),
    ("member", (MID,), "GET", f"/gov/service/members/{MID}"),
    ("nodes", (), "GET", "/gov/service/nodes"),
    ("proposals", (), "GET", "/gov/members/proposals"),
    ("proposal", (PID,), "GET", f"/gov/members/proposals/{PID}"),
    ("proposal_actions", (PID,), "GET", f"/gov/members/proposals/{PID}/actions"),
    ("ballot", (PID, MID), "GET", f"/gov/members/proposals/{PID}/ballots/{MID}"),
    ("encrypted_share", (MID,), "GET", f"/gov/recovery/encrypted-shares/{MID}"),
    ("create_proposal", (b"cose",), "POST", "/gov/members/proposals:create"),
    ("submit_ballot", (PID, MID, b"cose"), "POST", f"/gov/members/proposals/{PID}/ballots/{MID}:submit"),
    ("withdraw_proposal", (PID, b"cose"), "POST", f"/gov/members/proposals/{PID}:withdraw"),
    ("update_state_digest", (MID, b"cose"), "POST", f"/gov/members/state-digests/{MID}:update"),
    ("ack_state_digest", (MID, b"cose"), "POST", f"/gov/members/state-digests/{MID}:ack"),
    ("submit_recovery_share", (MID, b"cose"), "POST", f"/gov/recovery/members/{MID}:recover"),
]


@pytest.mark.parametrize(("operation", "args", "method", "path"), CALLS, ids=[c[0] for c in CALLS])
async def test_each_operation_asks_ccf_s_path(operation: str, args: tuple[Any, ...], method: str, path: str) -> None:
    transport = RecordingTransport(response(200, {}))
    client = CCFGovernanceClient(transport)
    answer = await getattr(client, operation)(*args)
    assert isinstance(answer, Answer)
    sent = args[-1] if method == "POST" else None
    assert transport.requests == [(method, path, True, None, sent)]
    assert client.trusted_pems == (b"pinned",)
    assert client.config.name == "s"


async def test_node_state_is_no_governance_path_and_probes_try_once() -> None:
    transport = RecordingTransport(response(200, {"state": "PartOfNetwork"}))
    client = CCFGovernanceClient(transport)
    got = await client.node_state(max_attempts=1)
    assert got.value == NodeState("PartOfNetwork")
    assert transport.requests == [("GET", "/node/state", False, 1, None)]


async def test_an_error_answer_has_no_value_and_keeps_ccf_s_answer() -> None:
    error = {"error": {"code": "ProposalNotFound", "message": f"Could not find proposal {PID}."}}
    got = await CCFGovernanceClient(RecordingTransport(response(404, error))).proposal(PID)
    assert got.value is None
    assert (got.ok, got.status, got.error_code, got.transaction_id) == (False, 404, "ProposalNotFound", "2.9")
    assert got.error_message == f"Could not find proposal {PID}."
    assert got.raw == json.dumps(error).encode()
    assert got.json_object() == error


def test_service_info() -> None:
    body = {"status": "Open", "certificate": "PEM", "recoveryCount": 2, "creationTransactionId": "2.1", "x": 1}
    info = ServiceInfo.parse(response(body=body))
    assert info == ServiceInfo("Open", "PEM", 2, "2.1", body)
    odd = ServiceInfo.parse(response(body={"status": 3, "recoveryCount": True, "creationTransactionId": 7}))
    assert odd is not None
    assert (odd.status, odd.certificate, odd.recovery_count, odd.creation_transaction_id) == (None, None, None, None)
    assert ServiceInfo.parse(response(raw=b"<html>")) is None


def test_members() -> None:
    assert Member.parse_one(MID)(response(body={"status": "Active"})) == Member(MID, "Active")
    assert Member.parse_one(MID)(response(body={"memberId": "c" * 64, "status": 5})) == Member("c" * 64, None)
    assert Member.parse_one(MID)(response(body=["x"])) is None
    listed = {"value": [{"memberId": MID, "status": "Accepted"}, {"status": "Active"}, "junk"]}
    assert Member.parse_list(response(body=listed)) == (Member(MID, "Accepted"),)
    assert Member.parse_list(response(body={"value": {}})) is None


def test_members_carry_their_recovery_role_and_key() -> None:
    body = {"memberId": MID, "status": "Active", "recoveryRole": "Owner", "publicEncryptionKey": "PEM", "x": 1}
    (member,) = Member.parse_list(response(body={"value": [body]})) or ()
    assert (member.recovery_role, member.encryption_key, member.fields) == ("Owner", "PEM", body)


def test_service_info_configuration() -> None:
    configuration = {"recoveryThreshold": 2, "maximumNodeCertificateValidityDays": 30}
    info = ServiceInfo.parse(response(body={"configuration": configuration}))
    assert info is not None
    assert (info.recovery_threshold, info.max_node_validity_days) == (2, 30)
    bare = ServiceInfo.parse(response(body={"configuration": 5}))
    assert bare is not None
    assert (bare.recovery_threshold, bare.max_node_validity_days) == (None, None)


async def test_the_previous_identity_a_service_recovered_from() -> None:
    transport = RecordingTransport(response(200, {"previous_service_identity": "PEM"}))
    got = await CCFGovernanceClient(transport).previous_service_identity()
    assert transport.requests == [("GET", "/node/service/previous_identity", False, None, None)]
    assert PreviousIdentity.of(got) == PreviousIdentity("PEM")
    none = {"error": {"code": "ResourceNotFound", "message": PreviousIdentity.NOT_A_RECOVERY}}
    assert PreviousIdentity.of(Answer.parse(response(404, none), PreviousIdentity.parse)) == PreviousIdentity(None)
    unknown = {"error": {"code": "ResourceNotFound", "message": "Unknown path: /node/service/previous_identity."}}
    assert PreviousIdentity.of(Answer.parse(response(404, unknown), PreviousIdentity.parse)) is None
    assert PreviousIdentity.parse(response(body={"previous_service_identity": 3})) is None


def test_nodes() -> None:
    listed = {"value": [{"nodeId": "n0", "status": "Trusted"}, {"status": "Pending"}]}
    assert Node.parse_list(response(body=listed)) == (Node("n0", "Trusted"),)


def test_proposals() -> None:
    body = {"proposalId": PID, "proposerId": MID, "proposalState": "Open", "ballotCount": 0}
    assert Proposal.parse(response(body=body)) == Proposal(PID, MID, "Open", body)
    bad_id = Proposal.parse(response(body={**body, "proposalId": "../../x"}))
    assert bad_id is not None
    assert bad_id.proposal_id is None  # never put in a path
    listed = Proposal.parse_list(response(body={"value": [body, 3]}))
    assert listed == (Proposal(PID, MID, "Open", body),)


def test_proposal_actions_keep_the_bytes_as_proposed() -> None:
    raw = b'{"actions": [{"name": "set_member", "args": {}}]}'
    actions = ProposalActions.parse(response(raw=raw))
    assert actions.raw == raw
    assert actions.listed() == [{"name": "set_member", "args": {}}]
    assert ProposalActions(b"[1]").listed() == "[1]"
    assert ProposalActions(b"\xff").listed() == "\ufffd"


def test_transitions_name_both_identities() -> None:
    def transition(**args: Any) -> dict[str, Any]:
        return {"name": "transition_service_to_open", "args": args}

    raw = json.dumps(
        {
            "actions": [
                transition(previous_service_identity="OLD", next_service_identity="NEW"),
                transition(next_service_identity="FIRST"),  # a new service: no previous identity
                transition(previous_service_identity=1, next_service_identity="NEW"),
                {"name": "set_member", "args": {"previous_service_identity": "A", "next_service_identity": "B"}},
                {"name": "transition_service_to_open", "args": "x"},
                "junk",
            ]
        }
    ).encode()
    assert ProposalActions(raw).transitions() == (ServiceTransition("OLD", "NEW"),)
    assert ProposalActions(b"not json").transitions() == ()
    assert ProposalActions(b'{"actions": {}}').transitions() == ()


def test_state_digest() -> None:
    assert StateDigest.parse(response(body={"memberId": MID, "stateDigest": "d"})) == StateDigest(MID, "d")
    assert StateDigest.parse(response(body={"memberId": MID})) is None
    assert StateDigest.parse(response(body={"stateDigest": 1})) is None


def test_encrypted_share() -> None:
    encoded = base64.b64encode(b"\x01" * 256).decode()
    assert EncryptedShare.parse(response(body={"encryptedShare": encoded})) == EncryptedShare(b"\x01" * 256)
    assert EncryptedShare.parse(response(body={"encryptedShare": "***"})) is None
    assert EncryptedShare.parse(response(body={"encryptedShare": 5})) is None
    assert EncryptedShare.parse(response(body={})) is None


def test_recovery_submission() -> None:
    message = "1/2 recovery shares successfully submitted"
    body = {"message": message, "submittedCount": 1, "recoveryThreshold": 2}
    assert RecoverySubmission.parse(response(body=body)) == RecoverySubmission(message, 1, 2)
    assert RecoverySubmission.parse(response(raw=b"text")) == RecoverySubmission("", None, None)


def test_the_presented_certificate() -> None:
    one, other = trustme.CA().cert_pem.bytes().decode(), trustme.CA().cert_pem.bytes().decode()
    assert presented_certificate(200, {"service_certificate": one}) == one.encode()
    assert presented_certificate(200, {"service_certificate": f"padding\n{one}more\n"}) == one.encode()
    assert presented_certificate(200, {"service_certificate": one + other}) is None  # a bundle is no identity
    assert presented_certificate(404, {"service_certificate": one}) is None
    assert presented_certificate(200, {"service_certificate": "-----BEGIN CERTIFICATE-----\nMII\n"}) is None
    assert presented_certificate(200, {"service_certificate": "hello"}) is None
    assert presented_certificate(200, None) is None


def test_json_nested_deeper_than_python_parses_is_no_proposal() -> None:
    deep = b"[" * 100_000 + b"]" * 100_000
    assert ProposalActions(deep).transitions() == ()
    assert ProposalActions(b'{"actions": ' + deep + b"}").listed() == (b'{"actions": ' + deep + b"}").decode()


async def test_an_identity_url_is_fetched_once_per_configuration(monkeypatch: pytest.MonkeyPatch) -> None:
    """The identity endpoint is asked once, however often clients are rebuilt (after an adoption, a re-pin): an
    endpoint that changed its answer later would not change what the configuration pins."""
    fetched: list[str] = []

    async def fetch(config: ServiceConfig) -> bytes:
        fetched.append(config.name)
        return f"pem {len(fetched)}".encode()

    monkeypatch.setattr(api, "configured_service_certificate", fetch)
    connector = HttpConnector()
    config = ServiceConfig(name="s", url="https://ccf", identity_url="https://identity/x")
    assert [await connector.configured_identity(config) for _ in range(3)] == [b"pem 1"] * 3
    assert fetched == ["s"]
    assert await HttpConnector().configured_identity(config) == b"pem 2"  # a reload's generation fetches anew
