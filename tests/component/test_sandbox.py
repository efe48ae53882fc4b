"""The CCF governance sandbox over real HTTPS, driven by CCF's own signing tools (ccf.cose, CLI)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import cbor2
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from signing_agent.sandbox import SandboxServer
from signing_agent.sandbox.__main__ import main as sandbox_main
from signing_agent.sandbox.cose import GovEnvelope
from signing_agent.sandbox.errors import GovError
from signing_agent.sandbox.state import GovernanceState
from tests.support.pki import Member, make_member
from tests.support.prereq import require_executable
from tests.support.sandbox_client import (
    API,
    NO,
    YES,
    GovClient,
    gov_header,
    next_created_at,
    raw_cose,
    sign,
)

CREATE = "/gov/members/proposals:create"
WWW = 'COSE-SIGN1 realm="Signed request access"'


@pytest.fixture(scope="module")
def alice() -> Member:
    return make_member("alice")


@pytest.fixture(scope="module")
def bob() -> Member:
    return make_member("bob", curve="secp256r1", sig_hash=None)


@pytest.fixture(scope="module")
def carol() -> Member:
    return make_member("carol")


@pytest.fixture
async def sandbox(alice: Member, bob: Member) -> AsyncIterator[SandboxServer]:
    async with SandboxServer(members=[alice.cert_pem, bob.cert_pem]) as server:
        yield server


def noop_action() -> list[dict[str, Any]]:
    return [{"name": "remove_node", "args": {"node_id": "0" * 64}}]  # no such node: removing it does nothing


def assert_401(reply: Any, policy: str, message: str) -> None:
    assert reply.status == 401, reply.body
    assert reply.headers["WWW-Authenticate"] == WWW
    assert reply.json["error"]["code"] == "InvalidAuthenticationInfo"
    assert reply.json["error"]["message"] == "Invalid authentication credentials."
    assert reply.auth_reason == (policy, message)


# -- identity and TLS ---


async def test_tls_node_cert_is_issued_by_the_pinned_service_identity(sandbox: SandboxServer) -> None:
    service = x509.load_pem_x509_certificate(sandbox.service_cert_pem)
    assert service.subject.rfc4514_string() == "CN=CCF Service"
    assert isinstance(service.public_key(), ec.EllipticCurvePublicKey)
    assert service.public_key().curve.name == "secp384r1"  # type: ignore[union-attr]
    _, writer = await asyncio.open_connection(
        "127.0.0.1", int(sandbox.url.rsplit(":", 1)[1]), ssl=sandbox.client_ssl_context()
    )
    ssl_object = writer.get_extra_info("ssl_object")
    node = x509.load_der_x509_certificate(ssl_object.getpeercert(binary_form=True))
    writer.close()
    await writer.wait_closed()
    node.verify_directly_issued_by(service)
    san = node.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]


async def test_tls_default_trust_store_does_not_trust_the_sandbox(sandbox: SandboxServer) -> None:
    async with aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.ClientConnectorCertificateError):
            await session.get(f"{sandbox.url}/node/state")


async def test_service_identity_can_be_kept_or_changed_across_restarts(tmp_path: Path) -> None:
    async with SandboxServer() as first:
        key_pem = first.identity.key_pem
        cert_pem = first.service_cert_pem
        written = first.write_service_cert(tmp_path / "service.pem")
    assert written.read_bytes() == cert_pem
    async with SandboxServer(service_key_pem=key_pem, service_cert_pem=cert_pem) as same:
        assert same.service_cert_pem == cert_pem
        connector = aiohttp.TCPConnector(ssl=ssl.create_default_context(cafile=str(written)))
        async with (
            aiohttp.ClientSession(connector=connector) as session,
            session.get(f"{same.url}/gov/service/info?{API}") as response,
        ):
            assert (await response.json())["certificate"] == cert_pem.decode()
    async with SandboxServer(service_key_pem=key_pem) as renewed:
        assert renewed.service_cert_pem != cert_pem
        assert (
            x509.load_pem_x509_certificate(renewed.service_cert_pem).public_key()
            == x509.load_pem_x509_certificate(cert_pem).public_key()
        )
    async with SandboxServer() as other:
        assert other.service_cert_pem != cert_pem


# -- transport / HTTP ---


async def test_api_version_missing_and_unsupported(gov: GovClient, alice: Member) -> None:
    missing = await gov.get("/gov/service/info", api=None)
    assert missing.status == 400
    assert missing.error == (
        "MissingApiVersionParameter",
        "The api-version query parameter (?api-version=) is required for all requests. "
        "The supported api-versions are: 2023-06-01-preview, 2024-07-01",
    )
    bad = await gov.get("/gov/service/info", api="api-version=2022-01-01")
    assert bad.status == 400
    assert bad.error == (
        "UnsupportedApiVersionValue",
        "Unsupported api-version '2022-01-01'. The supported api-versions are: 2023-06-01-preview, 2024-07-01",
    )
    preview = await gov.get("/gov/service/info", api="api-version=2023-06-01-preview")
    assert preview.status == 200
    signed = await gov.post(CREATE, sign(alice, "proposal", {"actions": noop_action()}), api=None)
    assert signed.error[0] == "MissingApiVersionParameter"


async def test_authentication_runs_before_the_api_version_check(gov: GovClient, carol: Member) -> None:
    reply = await gov.post(CREATE, sign(carol, "proposal", {"actions": []}), api=None)
    assert_401(reply, "active_member_cose_sign1", "Signer is not a known member")


@pytest.mark.parametrize(
    ("content_type", "reason"),
    [
        (None, "Missing content-type header"),
        ("application/json", "Content type is not set to application/cose"),
        ("application/cose; charset=utf-8", "Content type is not set to application/cose"),
    ],
)
async def test_content_type(gov: GovClient, alice: Member, content_type: str | None, reason: str) -> None:
    reply = await gov.post(CREATE, sign(alice, "proposal", {"actions": []}), content_type=content_type)
    assert_401(reply, "active_member_cose_sign1", reason)


async def test_unknown_path_and_method(gov: GovClient) -> None:
    assert (await gov.get("/gov/nope")).status == 404
    reply = await gov.get(CREATE)
    assert reply.status == 405
    assert reply.error[0] == "MethodNotAllowed"


# -- COSE parsing: malformed -> 500 InternalError ---


def _malformed(alice: Member) -> list[tuple[str, bytes, str]]:
    h = gov_header
    no_alg = {k: v for k, v in h(alice).items() if k != 1}
    no_kid = {k: v for k, v in h(alice).items() if k != 4}
    no_created = {k: v for k, v in h(alice).items() if k != "ccf.gov.msg.created_at"}
    good = raw_cose(alice, h(alice))
    return [
        ("truncated", good[:-5], "Failed to parse COSE_Sign1 outer array"),
        ("not cbor tag", b"\x01", "COSE_Sign1 is not tagged"),
        ("untagged", raw_cose(alice, h(alice), tag=None), "COSE_Sign1 is not tagged"),
        ("wrong tag", raw_cose(alice, h(alice), tag=98), "COSE_Sign1 is not tagged"),
        ("3 items", cbor2.dumps(cbor2.CBORTag(18, cbor2.loads(good).value[:3])), "outer array"),
        ("protected map", cbor2.dumps(cbor2.CBORTag(18, [h(alice), {}, b"", b"s"])), "protected header"),
        ("no alg", raw_cose(alice, no_alg), "Missing algorithm in protected header"),
        ("text alg", raw_cose(alice, h(alice, "proposal", {1: "ES384"})), "protected header"),
        ("no kid", raw_cose(alice, no_kid), "Missing kid in protected header"),
        ("text kid", raw_cose(alice, h(alice, "proposal", {4: alice.member_id})), "kid"),
        ("no created_at", raw_cose(alice, no_created), "Missing created_at in protected header"),
        (
            "text created_at",
            raw_cose(alice, h(alice, "proposal", {"ccf.gov.msg.created_at": "2024-07-01T00:00:00Z"})),
            "created_at",
        ),
        (
            "negative created_at",
            raw_cose(alice, h(alice, "proposal", {"ccf.gov.msg.created_at": -1})),
            "Header parameter created_at must be positive",
        ),
        ("int type", raw_cose(alice, h(alice, "proposal", {"ccf.gov.msg.type": 1})), "ccf.gov.msg.type"),
        (
            "int proposal_id",
            raw_cose(alice, h(alice, "proposal", {"ccf.gov.msg.proposal_id": 7})),
            "proposal_id",
        ),
        (
            "nil payload",
            raw_cose(alice, h(alice), items=[cbor2.dumps(h(alice)), {}, None, b"s"]),
            "COSE_Sign1",
        ),
    ]


async def test_malformed_cose_is_a_500_internal_error(gov: GovClient, sandbox: SandboxServer, alice: Member) -> None:
    before = sandbox.state.txid
    for name, body, text in _malformed(alice):
        reply = await gov.post(CREATE, body)
        assert reply.status == 500, name
        code, message = reply.error
        assert code == "InternalError", name
        assert text in message, (name, message)
        assert "WWW-Authenticate" not in reply.headers
    assert sandbox.state.txid == before


# -- authentication (401 reasons, in order) ---


async def test_unsupported_algorithm(gov: GovClient, alice: Member) -> None:
    reply = await gov.post(CREATE, raw_cose(alice, gov_header(alice, "proposal", {1: -8})))
    assert_401(reply, "active_member_cose_sign1", "Unsupported algorithm: -8")
    # alg is checked before the signer: an unknown signer with a bad alg reports the alg
    unknown = gov_header(alice, "proposal", {1: -37, 4: b"0" * 64})
    assert_401(
        await gov.post(CREATE, raw_cose(alice, unknown)),
        "active_member_cose_sign1",
        "Unsupported algorithm: -37",
    )


async def test_unknown_signer_and_uppercase_kid(gov: GovClient, alice: Member, carol: Member) -> None:
    assert_401(
        await gov.post(CREATE, sign(carol, "proposal", {"actions": []})),
        "active_member_cose_sign1",
        "Signer is not a known member",
    )
    upper = gov_header(alice, "proposal", {4: alice.member_id.upper().encode()})
    assert_401(
        await gov.post(CREATE, raw_cose(alice, upper)),
        "active_member_cose_sign1",
        "Signer is not a known member",
    )


async def test_bad_signatures(gov: GovClient, alice: Member, bob: Member) -> None:
    good = sign(alice, "proposal", {"actions": noop_action()})
    outer = cbor2.loads(good)
    protected, unprotected, payload, signature = outer.value
    flipped = bytes([signature[0] ^ 1]) + signature[1:]
    cases = {
        "flipped": cbor2.dumps(cbor2.CBORTag(18, [protected, unprotected, payload, flipped])),
        "other payload": cbor2.dumps(cbor2.CBORTag(18, [protected, unprotected, b"{}", signature])),
        "der": raw_cose(alice, gov_header(alice), der=True),
        # P-256 key, alg ES384, signed with SHA-384: a valid ECDSA signature, but alg does not match the curve
        "alg/curve": raw_cose(bob, gov_header(bob, "proposal", {1: -35}), sign_alg=-35),
        "hash/alg": raw_cose(alice, gov_header(alice), sign_alg=-7),
    }
    for name, body in cases.items():
        reply = await gov.post(CREATE, body)
        assert reply.status == 401, name
        assert reply.auth_reason == ("active_member_cose_sign1", "Failed to validate COSE Sign1"), name
    # correct hand-built envelopes are accepted (P-384 and P-256): the cases above fail for their reason
    assert (await gov.post(CREATE, raw_cose(alice, gov_header(alice), b'{"actions":[]}'))).status == 200
    assert (await gov.post(CREATE, raw_cose(bob, gov_header(bob), b'{"actions":[]}', sign_alg=-7))).status == 200


async def test_message_type_per_endpoint(gov: GovClient, alice: Member) -> None:
    assert_401(
        await gov.post(CREATE, sign(alice, None, {"actions": []})),
        "active_member_cose_sign1",
        "Missing ccf.gov.msg.type, expected ccf.gov.msg.type to be proposal",
    )
    assert_401(
        await gov.post(CREATE, sign(alice, "ballot", {"actions": []})),
        "active_member_cose_sign1",
        "Found ccf.gov.msg.type set to ballot, expected ccf.gov.msg.type to be proposal",
    )
    update = f"/gov/members/state-digests/{alice.member_id}:update"
    assert_401(
        await gov.post(update, sign(alice, "ack")),
        "member_cose_sign1",
        "Found ccf.gov.msg.type set to ack, expected ccf.gov.msg.type to be state_digest",
    )
    pid = "a" * 64
    expectations = {
        f"/gov/members/proposals/{pid}:withdraw": "withdrawal",
        f"/gov/members/proposals/{pid}/ballots/{alice.member_id}:submit": "ballot",
        f"/gov/members/state-digests/{alice.member_id}:ack": "ack",
        f"/gov/recovery/members/{alice.member_id}:recover": "recovery_share",
    }
    for path, expected in expectations.items():
        reply = await gov.post(path, sign(alice, "proposal", proposal_id=pid))
        assert reply.status == 401, path
        assert reply.auth_reason[1].endswith(f"expected ccf.gov.msg.type to be {expected}"), path


async def test_accepted_member_is_not_active_but_may_update(
    gov: GovClient, sandbox: SandboxServer, carol: Member
) -> None:
    sandbox.add_member(carol.cert_pem, status="Accepted")
    assert_401(
        await gov.post(CREATE, sign(carol, "proposal", {"actions": noop_action()})),
        "active_member_cose_sign1",
        "Signer is not an ACTIVE member",
    )
    pid = "b" * 64
    for path, msg_type in [
        (f"/gov/members/proposals/{pid}:withdraw", "withdrawal"),
        (f"/gov/members/proposals/{pid}/ballots/{carol.member_id}:submit", "ballot"),
    ]:
        reply = await gov.post(path, sign(carol, msg_type, {"ballot": YES}, proposal_id=pid))
        assert reply.auth_reason == ("active_member_cose_sign1", "Signer is not an ACTIVE member")
    update = await gov.post(f"/gov/members/state-digests/{carol.member_id}:update", sign(carol, "state_digest"))
    assert update.status == 200


# -- proposals:create ---


async def test_create_returns_a_proposal_bound_to_the_state(
    gov: GovClient, sandbox: SandboxServer, alice: Member
) -> None:
    cose = sign(alice, "proposal", {"actions": noop_action()})
    signature = cbor2.loads(cose).value[3]
    root = bytes.fromhex(sandbox.state.root_hex)
    seqno = sandbox.state.seqno
    reply = await gov.post(CREATE, cose)
    assert reply.status == 200
    expected_id = hashlib.sha256(root + hashlib.sha256(signature).digest()).hexdigest()
    assert reply.json == {
        "proposalId": expected_id,
        "proposerId": alice.member_id,
        "proposalState": "Open",
        "ballotCount": 0,
    }
    assert reply.headers["x-ms-ccf-transaction-id"] == f"2.{seqno + 1}"
    actions = await gov.get(f"/gov/members/proposals/{expected_id}/actions")
    assert actions.body == cbor2.loads(cose).value[2]


@pytest.mark.parametrize(
    ("actions", "message"),
    [
        ([{"name": "make_coffee", "args": {}}], "Proposal failed to validate: make_coffee: no such action"),
        (
            [{"name": "set_member", "args": {}}],
            "Proposal failed to validate: set_member at position 0 failed validation: "
            "Error: cert must be a valid X509 certificate (bundle) in PEM format",
        ),
        (
            [
                {"name": "set_recovery_threshold", "args": {"recovery_threshold": 1}},
                {"name": "set_service_recent_cose_proposals_window_size", "args": {"proposal_count": "1"}},
            ],
            "Proposal failed to validate: set_service_recent_cose_proposals_window_size at position 1 failed "
            "validation: Error: proposal_count must be an integer",
        ),
    ],
)
async def test_create_validation_failures(
    gov: GovClient, sandbox: SandboxServer, alice: Member, actions: list[dict[str, Any]], message: str
) -> None:
    before = sandbox.state.txid
    reply = await gov.propose(alice, actions)
    assert reply.status == 400
    assert reply.error == ("ProposalFailedToValidate", message)
    assert "x-ms-ccf-transaction-id" not in reply.headers
    assert sandbox.state.txid == before
    assert sandbox.state.proposals() == []


async def test_create_non_json_is_a_500_syntax_error(gov: GovClient, alice: Member) -> None:
    reply = await gov.post(CREATE, sign(alice, "proposal", b"not json"))
    assert reply.status == 500
    code, message = reply.error
    assert code == "InternalError"
    assert message.startswith("Failed to execute validation: SyntaxError")


async def test_created_at_too_large(gov: GovClient, sandbox: SandboxServer, alice: Member) -> None:
    reply = await gov.propose(alice, noop_action(), created_at=10_000_000_000)
    assert reply.error == ("InvalidCreatedAt", "Header parameter created_at value is too large")
    assert (await gov.propose(alice, noop_action(), created_at=9_999_999_999)).status == 200
    assert sandbox.state.recent_proposal_keys()[0].startswith("9999999999:")


async def test_byte_identical_resend_is_a_replay_naming_the_original(gov: GovClient, alice: Member) -> None:
    cose = sign(alice, "proposal", {"actions": noop_action()})
    first = await gov.post(CREATE, cose)
    assert first.status == 200
    again = await gov.post(CREATE, cose)
    assert again.status == 400
    assert again.error == (
        "ProposalReplay",
        f"Proposal submission replay, already exists as proposal {first.json['proposalId']}",
    )
    # the same content re-signed (same created_at) by CCF's deterministic signer is the same bytes: a replay
    created_at = next_created_at()
    resigned = await gov.post(CREATE, sign(alice, "proposal", {"actions": noop_action()}, created_at=created_at))
    assert resigned.status == 200
    again = await gov.post(CREATE, sign(alice, "proposal", {"actions": noop_action()}, created_at=created_at))
    assert again.error[0] == "ProposalReplay"
    # validation runs first: an invalid proposal reports ProposalFailedToValidate even when it is a replay
    bad = sign(alice, "proposal", {"actions": [{"name": "nope"}]}, created_at=created_at)
    assert (await gov.post(CREATE, bad)).error[0] == "ProposalFailedToValidate"
    assert (await gov.post(CREATE, bad)).error[0] == "ProposalFailedToValidate"
    listing = await gov.get("/gov/members/proposals")
    assert [p["proposalId"] for p in listing.json["value"]] == [
        first.json["proposalId"],
        resigned.json["proposalId"],
    ]


async def test_median_rule_and_empty_table(gov: GovClient, alice: Member) -> None:
    # empty table: no lower bound at all
    assert (await gov.propose(alice, noop_action(), created_at=5)).status == 200
    base = 1_700_000_000
    for offset in range(4):
        assert (await gov.propose(alice, noop_action(), created_at=base + offset)).status == 200
    # 5 keys: 5, base..base+3 (sorted as strings) -> median keys[2] = base+1
    other_action = [{"name": "remove_node", "args": {"node_id": "1" * 64}}]
    old = await gov.propose(alice, other_action, created_at=base)
    assert old.status == 400
    assert old.error == (
        "ProposalCreatedTooLongAgo",
        f"Proposal created too long ago, created_at must be greater than {base + 1}",
    )
    assert (await gov.propose(alice, other_action, created_at=base + 1)).status == 200  # equal is accepted
    assert (await gov.propose(alice, noop_action(), created_at=0)).error[0] == "ProposalCreatedTooLongAgo"


def _envelope(created_at: int, n: int) -> GovEnvelope:
    body = json.dumps({"actions": []}).encode()
    return GovEnvelope(-35, b"k", created_at, "proposal", None, b"", body, n.to_bytes(8, "big"))


def test_replay_window_of_100_as_in_ccf_tests() -> None:
    """TGOV: 100 proposals at now..now+99 -> now+49 rejected, now+50 accepted; window 1 -> only >= latest."""
    state = GovernanceState("service")
    member = make_member("solo")
    signer = state.add_member(member.cert_pem)
    now = 1_720_000_000
    for i in range(100):
        state.create_proposal(_envelope(now + i, i), signer, b"")
    assert len(state.recent_proposal_keys()) == 100
    with pytest.raises(GovError) as rejected:
        state.create_proposal(_envelope(now + 49, 1000), signer, b"")
    assert rejected.value.code == "ProposalCreatedTooLongAgo"
    assert rejected.value.message.endswith(str(now + 50))
    state.create_proposal(_envelope(now + 50, 1001), signer, b"")
    keys = state.recent_proposal_keys()
    assert len(keys) == 100
    assert keys[0].startswith(f"{now + 1}:")  # the oldest key was evicted
    state._data.window_size = 1  # what set_service_recent_cose_proposals_window_size does
    state.create_proposal(_envelope(now + 200, 1002), signer, b"")
    assert len(state.recent_proposal_keys()) == 1
    with pytest.raises(GovError):
        state.create_proposal(_envelope(now + 199, 1003), signer, b"")
    state.create_proposal(_envelope(now + 200, 1004), signer, b"")


# -- ballots and resolution ---


async def _open_proposal(gov: GovClient, member: Member, actions: list[dict[str, Any]] | None = None) -> str:
    reply = await gov.propose(member, actions or noop_action())
    assert reply.status == 200, reply.body
    proposal_id: str = reply.json["proposalId"]
    return proposal_id


async def test_ballot_checks(gov: GovClient, sandbox: SandboxServer, alice: Member, bob: Member) -> None:
    sandbox.add_member(make_member("dave").cert_pem)  # 3 active members: one yes is not a majority
    pid = await _open_proposal(gov, alice)
    url = f"/gov/members/proposals/{pid}/ballots/{alice.member_id}:submit"
    other = "c" * 64
    mismatch = await gov.post(url, sign(alice, "ballot", {"ballot": YES}, proposal_id=other))
    assert mismatch.error == ("InvalidResourceName", "Authenticated proposal id does not match URL")
    wrong_member = f"/gov/members/proposals/{pid}/ballots/{bob.member_id}:submit"
    reply = await gov.post(wrong_member, sign(alice, "ballot", {"ballot": YES}, proposal_id=pid))
    assert reply.error == ("InvalidResourceName", "Authenticated member id does not match URL")
    bad_id = await gov.post(
        "/gov/members/proposals/xyz/ballots/x:submit",
        sign(alice, "ballot", {"ballot": YES}, proposal_id="xyz"),
    )
    assert bad_id.error == ("InvalidResourceName", "'xyz' is not a valid hex-encoded proposal ID")
    unknown = await gov.vote(alice, other)
    assert unknown.status == 404
    assert unknown.error == ("ProposalNotFound", f"Could not find proposal {other}.")
    no_field = await gov.post(url, sign(alice, "ballot", {"vote": YES}, proposal_id=pid))
    assert no_field.error == (
        "InvalidInput",
        'Signed request body is not a JSON object containing required string field "ballot"',
    )
    not_json = await gov.post(url, sign(alice, "ballot", b"{", proposal_id=pid))
    assert not_json.status == 400
    assert not_json.error[0] == "InvalidInput"
    first = await gov.vote(alice, pid, YES)
    assert first.status == 200
    assert first.json["ballotCount"] == 1
    assert first.json["proposalState"] == "Open"
    txid = sandbox.state.txid
    same = await gov.vote(alice, pid, YES)
    assert same.status == 200
    assert same.json == first.json
    assert sandbox.state.txid == txid  # idempotent: no write
    different = await gov.vote(alice, pid, NO)
    assert different.error == (
        "VoteAlreadyExists",
        f"Different ballot already submitted by {alice.member_id} for {pid}.",
    )
    ballot = await gov.get(f"/gov/members/proposals/{pid}/ballots/{alice.member_id}")
    assert ballot.status == 200
    assert ballot.headers["Content-Type"].startswith("text/javascript")
    assert ballot.body.decode() == YES
    missing = await gov.get(f"/gov/members/proposals/{pid}/ballots/{bob.member_id}")
    assert missing.error == ("VoteNotFound", f"Member {bob.member_id} has not voted for proposal {pid}.")
    gone = await gov.get(f"/gov/members/proposals/{other}/ballots/{bob.member_id}")
    assert gone.error == ("ProposalNotFound", f"Proposal {other} does not exist.")


async def test_majority_accepts_and_applies_set_member(
    gov: GovClient, sandbox: SandboxServer, alice: Member, bob: Member, carol: Member
) -> None:
    pid = await _open_proposal(
        gov,
        alice,
        [{"name": "set_member", "args": {"cert": carol.cert_pem.decode(), "member_data": {"n": 3}}}],
    )
    one = await gov.vote(alice, pid)
    assert one.json["proposalState"] == "Open"  # 1 of 2 is not a strict majority; proposer has no implicit vote
    assert sandbox.state.member(carol.member_id) is None
    two = await gov.vote(bob, pid)
    assert two.status == 200
    assert two.json == {
        "proposalId": pid,
        "proposerId": alice.member_id,
        "proposalState": "Accepted",
        "ballotCount": 2,
        "finalVotes": {alice.member_id: True, bob.member_id: True},
        "voteFailures": {},
    }
    member = await gov.get(f"/gov/service/members/{carol.member_id}")
    assert member.json["status"] == "Accepted"
    assert member.json["memberData"] == {"n": 3}
    assert member.json["certificate"] == carol.cert_pem.decode()
    closed = await gov.vote(alice, pid, NO)
    assert closed.error == (
        "ProposalNotOpen",
        f"Proposal {pid} is currently in state Accepted - only Open proposals can receive votes",
    )


async def test_rejection_and_unsupported_ballots(gov: GovClient, alice: Member, bob: Member) -> None:
    pid = await _open_proposal(gov, alice)
    weird = "export function vote (proposal, proposerId) { return proposal.length > 0 }"
    assert (await gov.vote(bob, pid, weird)).json["proposalState"] == "Open"
    pid2 = await _open_proposal(gov, alice)
    assert (await gov.vote(alice, pid2, "export function vote(proposal,proposerId){return false;}")).status == 200
    rejected = await gov.vote(bob, pid2, NO)
    assert rejected.json["proposalState"] == "Rejected"
    assert rejected.json["finalVotes"] == {alice.member_id: False, bob.member_id: False}
    accepted = await gov.vote(alice, pid, YES)
    # alice's yes is 1 of 2, bob's ballot cannot be evaluated: still Open
    assert accepted.json["proposalState"] == "Open"
    assert accepted.json["ballotCount"] == 2


async def test_vote_failures_are_reported_once_closed(
    gov: GovClient, sandbox: SandboxServer, alice: Member, bob: Member
) -> None:
    erin = make_member("erin")
    sandbox.add_member(erin.cert_pem)
    pid = await _open_proposal(gov, alice)
    throwing = "export function vote (p, q) { throw new Error('no') }"
    assert (await gov.vote(bob, pid, throwing)).status == 200  # a failing ballot does not fail the request
    assert (await gov.vote(alice, pid)).json["proposalState"] == "Open"  # 1 of 3
    assert "voteFailures" not in (await gov.get(f"/gov/members/proposals/{pid}")).json
    closed = await gov.vote(erin, pid)
    assert closed.json["proposalState"] == "Accepted"
    assert closed.json["ballotCount"] == 3
    assert closed.json["finalVotes"] == {alice.member_id: True, erin.member_id: True}
    assert list(closed.json["voteFailures"]) == [bob.member_id]
    assert "reason" in closed.json["voteFailures"][bob.member_id]


async def test_leaving_open_deletes_other_closed_proposals(gov: GovClient, alice: Member, bob: Member) -> None:
    first = await _open_proposal(gov, alice)
    assert (await gov.withdraw(alice, first)).json["proposalState"] == "Withdrawn"
    still_open = await _open_proposal(gov, alice)
    second = await _open_proposal(gov, alice)
    await gov.vote(alice, second)
    assert (await gov.vote(bob, second)).json["proposalState"] == "Accepted"
    listing = await gov.get("/gov/members/proposals")
    ids = {p["proposalId"]: p["proposalState"] for p in listing.json["value"]}
    assert ids == {still_open: "Open", second: "Accepted"}
    assert (await gov.get(f"/gov/members/proposals/{first}")).error == (
        "ProposalNotFound",
        f"Could not find proposal {first}.",
    )


# -- withdraw ---


async def test_withdraw_rules(gov: GovClient, sandbox: SandboxServer, alice: Member, bob: Member) -> None:
    unknown = "d" * 64
    reply = await gov.withdraw(alice, unknown)
    assert reply.status == 204
    pid = await _open_proposal(gov, alice)
    mismatch = await gov.post(f"/gov/members/proposals/{pid}:withdraw", sign(alice, "withdrawal", proposal_id=unknown))
    assert mismatch.error == ("InvalidResourceName", "Authenticated proposal id does not match URL")
    not_proposer = await gov.withdraw(bob, pid)
    assert not_proposer.status == 403
    assert not_proposer.error == (
        "AuthorizationFailed",
        f"Proposal {pid} can only be withdrawn by proposer {alice.member_id}, not caller {bob.member_id}.",
    )
    withdrawn = await gov.withdraw(alice, pid)
    assert withdrawn.status == 200
    assert withdrawn.json["proposalState"] == "Withdrawn"
    assert withdrawn.json["finalVotes"] == {}
    txid = sandbox.state.txid
    again = await gov.withdraw(alice, pid)
    assert again.status == 200
    assert again.json == withdrawn.json
    assert sandbox.state.txid == txid
    accepted = await _open_proposal(gov, alice)
    await gov.vote(alice, accepted)
    await gov.vote(bob, accepted)
    late = await gov.withdraw(alice, accepted)
    assert late.error == (
        "ProposalNotOpen",
        f"Proposal {accepted} is currently in state Accepted and cannot be withdrawn.",
    )


# -- member activation ---


async def test_member_activation_flow(
    gov: GovClient, sandbox: SandboxServer, alice: Member, bob: Member, carol: Member
) -> None:
    pid = await _open_proposal(gov, alice, [{"name": "set_member", "args": {"cert": carol.cert_pem.decode()}}])
    await gov.vote(alice, pid)
    assert (await gov.vote(bob, pid)).json["proposalState"] == "Accepted"
    cid = carol.member_id
    record = await gov.get(f"/gov/members/state-digests/{cid}")
    assert record.status == 200
    wrong = await gov.post(f"/gov/members/state-digests/{alice.member_id}:update", sign(carol, "state_digest"))
    assert wrong.status == 400
    assert wrong.error == (
        "InvalidAuthenticationInfo",
        f"Member ID from path parameter ({alice.member_id}) does not match member ID from body signature ({cid}).",
    )
    update = await gov.post(f"/gov/members/state-digests/{cid}:update", sign(carol, "state_digest"))
    assert update.status == 200
    digest = update.json["stateDigest"]
    assert update.json == {"memberId": cid, "stateDigest": digest}
    assert len(digest) == 64
    assert (await gov.get(f"/gov/members/state-digests/{cid}")).json == update.json
    ack_url = f"/gov/members/state-digests/{cid}:ack"
    missing = await gov.post(ack_url, sign(carol, "ack", {"digest": digest}))
    assert missing.error == (
        "InvalidInput",
        'Signed request body is not a JSON object containing required string field "stateDigest"',
    )
    bad = await gov.post(ack_url, sign(carol, "ack", {"stateDigest": "0" * 64}))
    assert bad.error == (
        "StateDigestMismatch",
        f"Submitted state digest is not valid.\nExpected\n {digest}\nReceived\n {'0' * 64}",
    )
    assert sandbox.state.member(cid).status == "Accepted"  # type: ignore[union-attr]
    ok = await gov.post(ack_url, sign(carol, "ack", update.body))  # the :update response, signed as-is
    assert ok.status == 204
    assert ok.body == b""
    assert "x-ms-ccf-transaction-id" in ok.headers
    assert (await gov.get(f"/gov/service/members/{cid}")).json["status"] == "Active"
    assert (await gov.post(ack_url, sign(carol, "ack", update.body))).status == 204  # re-ack is fine
    assert (await gov.propose(carol, noop_action())).status == 200


async def test_ack_without_record_is_403(gov: GovClient, sandbox: SandboxServer, carol: Member) -> None:
    sandbox.add_member(carol.cert_pem, status="Accepted")
    sandbox.state._data.acks.pop(carol.member_id)
    reply = await gov.post(
        f"/gov/members/state-digests/{carol.member_id}:ack", sign(carol, "ack", {"stateDigest": "x"})
    )
    assert reply.status == 403
    assert reply.error == ("AuthorizationFailed", f"No ACK record exists for member {carol.member_id}.")
    assert (await gov.get(f"/gov/members/state-digests/{carol.member_id}")).error[0] == "ResourceNotFound"


# -- reads ---


async def test_service_and_node_reads(gov: GovClient, sandbox: SandboxServer, alice: Member, bob: Member) -> None:
    info = await gov.get("/gov/service/info")
    assert info.json["status"] == "Open"
    assert info.json["certificate"] == sandbox.service_cert_pem.decode()
    assert info.json["configuration"]["recentCoseProposalsWindowSize"] == 100
    assert info.headers["x-ms-ccf-transaction-id"] == sandbox.state.txid
    members = await gov.get("/gov/service/members")
    assert {m["memberId"]: m["status"] for m in members.json["value"]} == {
        alice.member_id: "Active",
        bob.member_id: "Active",
    }
    unknown = "e" * 64
    assert (await gov.get(f"/gov/service/members/{unknown}")).error == (
        "ResourceNotFound",
        f"Member {unknown} does not exist.",
    )
    assert (await gov.get("/gov/service/members/nothex")).error == (
        "InvalidResourceName",
        "'nothex' is not a valid hex-encoded member ID",
    )
    upper = await gov.get(f"/gov/service/members/{alice.member_id.upper()}")
    assert upper.json["memberId"] == alice.member_id
    constitution = await gov.get("/gov/service/constitution")
    assert constitution.headers["Content-Type"].startswith("text/javascript")
    assert b"export function resolve" in constitution.body
    tx = await gov.get(f"/gov/service/transactions/{sandbox.state.txid}")
    assert tx.json == {"transactionId": sandbox.state.txid, "status": "Committed"}
    future = await gov.get(f"/gov/service/transactions/2.{sandbox.state.seqno + 10}")
    assert future.json["status"] == "Unknown"
    node = await gov.get("/node/state", api=None)
    assert node.json["state"] == "PartOfNetwork"
    network = await gov.get("/node/network", api=None)
    assert network.json["service_status"] == "Open"
    assert network.json["service_certificate"] == sandbox.service_cert_pem.decode()
    shares = await gov.get(f"/gov/recovery/encrypted-shares/{alice.member_id}")
    assert shares.status == 404


async def test_governance_actions_change_the_service(gov: GovClient, alice: Member, bob: Member) -> None:
    actions = [
        {"name": "set_service_recent_cose_proposals_window_size", "args": {"proposal_count": 1}},
        {"name": "set_constitution", "args": {"constitution": "export function resolve() {}"}},
        {"name": "set_member_data", "args": {"member_id": bob.member_id, "member_data": {"role": "ops"}}},
    ]
    pid = await _open_proposal(gov, alice, actions)
    await gov.vote(alice, pid)
    assert (await gov.vote(bob, pid)).json["proposalState"] == "Accepted"
    info = (await gov.get("/gov/service/info")).json
    assert info["configuration"]["recentCoseProposalsWindowSize"] == 1
    assert info["configuration"]["recoveryThreshold"] == 1  # set_recovery_threshold: test_sandbox_recovery.py
    assert (await gov.get("/gov/service/constitution")).body == b"export function resolve() {}"
    assert (await gov.get(f"/gov/service/members/{bob.member_id}")).json["memberData"] == {"role": "ops"}
    remove = await _open_proposal(gov, alice, [{"name": "remove_member", "args": {"member_id": bob.member_id}}])
    await gov.vote(alice, remove)
    assert (await gov.vote(bob, remove)).json["proposalState"] == "Accepted"
    assert (await gov.get(f"/gov/service/members/{bob.member_id}")).status == 404
    assert_401(await gov.propose(bob, noop_action()), "active_member_cose_sign1", "Signer is not a known member")


async def test_failed_apply_is_a_500_and_records_nothing(
    gov: GovClient, sandbox: SandboxServer, alice: Member, bob: Member
) -> None:
    no_such_node = {"node_id": "ab" * 32, "valid_from": "20240101000000Z"}
    pid = await _open_proposal(gov, alice, [{"name": "transition_node_to_trusted", "args": no_such_node}])
    await gov.vote(alice, pid)
    txid = sandbox.state.txid
    reply = await gov.vote(bob, pid)
    assert reply.status == 500
    code, message = reply.error
    assert code == "InternalError"
    assert message == f"Failed to apply(): Error: No such node: {'ab' * 32}"
    assert sandbox.state.txid == txid
    proposal = (await gov.get(f"/gov/members/proposals/{pid}")).json
    assert proposal["proposalState"] == "Open"
    assert proposal["ballotCount"] == 1


# -- fault injection ---


async def test_fault_reset_closes_before_processing(gov: GovClient, sandbox: SandboxServer, alice: Member) -> None:
    sandbox.faults.reset(r":create$", method="POST")
    with pytest.raises(aiohttp.ClientError):
        await gov.propose(alice, noop_action())
    assert sandbox.state.proposals() == []
    assert [(r.method, r.path, r.status, r.fault) for r in sandbox.requests] == [("POST", CREATE, None, "reset")]
    assert (await gov.propose(alice, noop_action())).status == 200  # count=1: used up


async def test_fault_drop_after_applies_then_loses_the_response(
    gov: GovClient, sandbox: SandboxServer, alice: Member
) -> None:
    sandbox.faults.drop_after(r"proposals:create", method="POST")
    cose = sign(alice, "proposal", {"actions": noop_action()})
    with pytest.raises(aiohttp.ClientError):
        await gov.post(CREATE, cose)
    (created,) = sandbox.state.proposals()
    retry = await gov.post(CREATE, cose)
    assert retry.error == (
        "ProposalReplay",
        f"Proposal submission replay, already exists as proposal {created.proposal_id}",
    )
    assert len(sandbox.state.proposals()) == 1
    assert [(r.status, r.fault) for r in sandbox.requests] == [(200, "drop_after"), (400, None)]


async def test_fault_status_answers_without_processing(gov: GovClient, sandbox: SandboxServer, alice: Member) -> None:
    sandbox.faults.status(r":create$", 503, retry_after="1", count=2)
    sandbox.faults.status(r":create$", 429, code="TooManyRequests", message="slow down")
    for _ in range(2):
        busy = await gov.propose(alice, noop_action())
        assert busy.status == 503
        assert busy.headers["Retry-After"] == "1"
        assert busy.error[0] == "ServiceUnavailable"
    throttled = await gov.propose(alice, noop_action())
    assert throttled.status == 429
    assert throttled.error == ("TooManyRequests", "slow down")
    assert "Retry-After" not in throttled.headers
    assert sandbox.state.proposals() == []
    assert (await gov.propose(alice, noop_action())).status == 200
    reads = await gov.get("/gov/service/info")  # the rule matched only :create
    assert reads.status == 200


async def test_fault_delay_and_method_filter(gov: GovClient, sandbox: SandboxServer) -> None:
    sandbox.faults.delay(r"^/node/state$", 0.5, method="GET")
    sandbox.faults.reset(r"^/node/state$", method="POST")
    started = time.monotonic()
    assert (await gov.get("/node/state", api=None)).status == 200
    assert time.monotonic() - started >= 0.5
    started = time.monotonic()
    assert (await gov.get("/node/state", api=None)).status == 200
    assert time.monotonic() - started < 0.5
    assert [rule.kind for rule in sandbox.faults.pending()] == ["reset"]


async def test_control_api_over_http(gov: GovClient, sandbox: SandboxServer, carol: Member) -> None:
    session = gov.session
    base = f"{sandbox.url}/_sandbox"
    async with session.post(f"{base}/members", json={"cert": carol.cert_pem.decode(), "status": "Accepted"}) as r:
        assert r.status == 200
        assert (await r.json()) == {"memberId": carol.member_id}
    assert sandbox.state.member(carol.member_id).status == "Accepted"  # type: ignore[union-attr]
    rule = {"kind": "status", "path": "^/gov/service/info$", "status": 503, "retry_after": 2, "count": 1}
    async with session.post(f"{base}/faults", json=rule) as r:
        assert r.status == 200
        assert (await r.json())["retry_after"] == "2"
    async with session.get(f"{base}/faults") as r:
        assert len((await r.json())["value"]) == 1
    busy = await gov.get("/gov/service/info")
    assert busy.status == 503
    assert busy.headers["Retry-After"] == "2"
    async with session.post(f"{base}/faults", json={"kind": "explode", "path": "x"}) as r:
        assert r.status == 400
    async with session.post(f"{base}/faults", json={"kind": "reset", "path": "."}) as r:
        assert r.status == 200
    async with session.delete(f"{base}/faults") as r:
        assert r.status == 204
    assert (await gov.get("/gov/service/info")).status == 200
    async with session.get(f"{base}/requests") as r:
        log = (await r.json())["value"]
    assert [(e["method"], e["path"], e["status"], e["fault"]) for e in log] == [
        ("GET", "/gov/service/info", 503, "status"),
        ("GET", "/gov/service/info", 200, None),
    ]
    assert log[1]["query"] == API
    async with session.delete(f"{base}/requests") as r:
        assert r.status == 204
    assert sandbox.requests == []


# -- CCF's own CLI and the sandbox CLI ---


async def test_ccf_cose_sign1_cli_output_is_accepted(gov: GovClient, alice: Member, tmp_path: Path) -> None:
    tool = require_executable_in_venv("ccf_cose_sign1")
    key, cert = alice.write(tmp_path)
    content = tmp_path / "proposal.json"
    content.write_text(json.dumps({"actions": noop_action()}))
    result = await asyncio.to_thread(
        subprocess.run,
        [
            tool,
            "--ccf-gov-msg-type",
            "proposal",
            "--ccf-gov-msg-created_at",
            time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(next_created_at())),
            "--signing-key",
            str(key),
            "--signing-cert",
            str(cert),
            "--content",
            str(content),
        ],
        capture_output=True,
        check=True,
        timeout=30,
    )
    reply = await gov.post(CREATE, result.stdout)
    assert reply.status == 200, reply.body
    assert reply.json["proposerId"] == alice.member_id


def require_executable_in_venv(name: str) -> str:
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else require_executable(name)


async def test_sandbox_cli_runs_until_sigterm(alice: Member, tmp_path: Path) -> None:
    _, cert = alice.write(tmp_path)
    ready = tmp_path / "ready"
    ca = tmp_path / "service.pem"
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "signing_agent.sandbox",
        "--member-cert",
        str(cert),
        "--ready-file",
        str(ready),
        "--service-cert-out",
        str(ca),
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        for _ in range(200):
            if ready.exists():
                break
            await asyncio.sleep(0.05)
        url = ready.read_text().strip()
        connector = aiohttp.TCPConnector(ssl=ssl.create_default_context(cafile=str(ca)))
        async with aiohttp.ClientSession(connector=connector) as session:
            gov = GovClient(url, session)
            members = await gov.get("/gov/service/members")
            assert [m["memberId"] for m in members.json["value"]] == [alice.member_id]
            assert (await gov.propose(alice, noop_action())).status == 200
    finally:
        process.terminate()
        _, stderr = await asyncio.wait_for(process.communicate(), timeout=10)
    assert process.returncode == 0
    log = stderr.decode()
    assert "listening on https://127.0.0.1:" in log
    assert f"POST {CREATE} -> 200" in log


def test_sandbox_cli_rejects_bad_arguments(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert sandbox_main(["--member-cert", str(tmp_path / "missing.pem")]) == 2
    assert "error:" in capsys.readouterr().err
    assert sandbox_main(["--service-cert", str(tmp_path / "c.pem")]) == 2
