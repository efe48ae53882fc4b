"""COSE_Sign1 governance messages against CCF's own reference implementation (the ``ccf`` package)."""

from __future__ import annotations

import base64
import json

import cbor2
import pytest
from ccf.cose import create_cose_sign1, create_cose_sign1_prepare, validate_cose_sign1
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from hypothesis import given, settings
from hypothesis import strategies as st

from signing_agent.algorithms import ES256, ES384, ES512, der_to_raw, for_public_key
from signing_agent.cose.governance import GovernanceRequest, MsgType, prepare_governance
from signing_agent.cose.sign1 import decode, finish, prepare, verify
from signing_agent.errors import InvalidRequestError, SigningFailedError
from tests.support.pki import Member, make_member

PROPOSAL_ID = "a" * 64
CREATED_AT = 1_719_792_000

PAYLOADS: dict[MsgType, bytes] = {
    MsgType.PROPOSAL: b'{"actions":[{"name":"transition_node_to_trusted","args":{"node_id":"00","valid_from":"x"}}]}',
    MsgType.BALLOT: b'{"ballot":"export function vote (proposal, proposerId) { return true }"}',
    MsgType.WITHDRAWAL: b"",
    MsgType.STATE_DIGEST: b"",
    MsgType.ACK: b'{"memberId":"x","stateDigest":"' + b"b" * 64 + b'"}',
    MsgType.RECOVERY_SHARE: b'{"share":"' + base64.b64encode(bytes(44)) + b'"}',
}


def sign_with(member: Member, request: GovernanceRequest) -> bytes:
    """What the agent does, with the key in process (the service layer does it with a key store)."""
    alg = for_public_key(member.key.public_key())
    tbs = prepare_governance(alg, member.member_id, request)
    der = member.key.sign(tbs.digest, ec.ECDSA(Prehashed(alg.hash_algorithm())))
    return finish(tbs, der_to_raw(alg, der))


def reference_headers(request: GovernanceRequest) -> dict[str, object]:
    headers: dict[str, object] = {"ccf.gov.msg.type": str(request.msg_type)}
    if request.proposal_id:
        headers["ccf.gov.msg.proposal_id"] = request.proposal_id
    headers["ccf.gov.msg.created_at"] = request.created_at
    return headers


@pytest.fixture(scope="module", params=["secp256r1", "secp384r1", "secp521r1"])
def member(request: pytest.FixtureRequest) -> Member:
    return make_member("m", request.param)


@pytest.mark.parametrize("msg_type", list(MsgType))
def test_every_message_type_verifies_with_ccf_and_matches_its_headers(member: Member, msg_type: MsgType) -> None:
    request = GovernanceRequest(
        msg_type=msg_type,
        created_at=CREATED_AT,
        payload=PAYLOADS[msg_type],
        proposal_id=PROPOSAL_ID if msg_type.needs_proposal_id else None,
    )
    ours = sign_with(member, request)
    validate_cose_sign1(member.cert.public_key(), ours)

    theirs = create_cose_sign1(
        request.payload, member.key_pem.decode(), member.cert_pem.decode(), reference_headers(request)
    )
    ours_msg, theirs_msg = cbor2.loads(ours), cbor2.loads(theirs)
    assert ours_msg.tag == theirs_msg.tag == 18
    # Same inputs, same created_at: the protected header is byte-for-byte CCF's (the signatures differ:
    # pycose signs deterministically, OpenSSL and HSMs with a random nonce).
    assert ours_msg.value[0] == theirs_msg.value[0]
    assert cbor2.loads(ours_msg.value[0]) == cbor2.loads(theirs_msg.value[0])
    assert ours_msg.value[1] == theirs_msg.value[1] == {}
    assert ours_msg.value[2] == theirs_msg.value[2] == request.payload
    assert len(ours_msg.value[3]) == len(theirs_msg.value[3]) == for_public_key(member.key.public_key()).signature_size


def test_wire_format_details() -> None:
    member = make_member("m", "secp384r1")
    request = GovernanceRequest(msg_type=MsgType.BALLOT, created_at=CREATED_AT, payload=b"{}", proposal_id=PROPOSAL_ID)
    message = sign_with(member, request)
    assert message[:2] == bytes([0xD2, 0x84])  # tag 18, array of 4
    decoded = decode(message)
    assert decoded.headers[1] == -35
    assert decoded.headers[4] == member.member_id.encode("ascii")  # a bstr, lowercase hex of sha256(DER)
    assert isinstance(decoded.headers[4], bytes)
    assert decoded.headers["ccf.gov.msg.created_at"] == CREATED_AT
    assert decoded.headers["ccf.gov.msg.proposal_id"] == PROPOSAL_ID
    assert list(decoded.headers) == [
        1,
        4,
        "ccf.gov.msg.type",
        "ccf.gov.msg.proposal_id",
        "ccf.gov.msg.created_at",
    ]
    verify(decoded, member.cert.public_key())  # type: ignore[arg-type]


def test_digest_follows_the_alg_not_the_certificate_signature_hash() -> None:
    """A P-384 key in a certificate self-signed with SHA-256: CCF's prepare hashes with SHA-256 (wrong)."""
    member = make_member("m", "secp384r1", sig_hash=hashes.SHA256())
    request = GovernanceRequest(msg_type=MsgType.PROPOSAL, created_at=CREATED_AT, payload=PAYLOADS[MsgType.PROPOSAL])
    message = sign_with(member, request)
    validate_cose_sign1(member.cert.public_key(), message)

    tbs = prepare_governance(ES384, member.member_id, request)
    assert len(tbs.digest) == 48
    theirs = create_cose_sign1_prepare(request.payload, member.cert_pem.decode(), reference_headers(request))
    assert theirs["alg"] == "ES384"
    assert len(base64.b64decode(theirs["value"])) == 32  # the quirk we do not copy


def test_finish_reuses_the_exact_protected_bytes() -> None:
    tbs = prepare(ES256, {4: b"k", "ccf.gov.msg.created_at": 1}, b"payload")
    message = cbor2.loads(finish(tbs, bytes(64)))
    assert message.value[0] is not None
    assert message.value[0] == tbs.protected


@pytest.mark.parametrize(("alg", "size"), [(ES256, 64), (ES384, 96), (ES512, 132)])
def test_finish_refuses_a_signature_of_the_wrong_size(alg: object, size: int) -> None:
    tbs = prepare(alg, {}, b"")  # type: ignore[arg-type]
    finish(tbs, bytes(size))
    with pytest.raises(SigningFailedError, match="raw bytes"):
        finish(tbs, bytes(size + 8))  # e.g. a DER signature slipping through


def test_a_tampered_message_does_not_verify() -> None:
    member = make_member("m", "secp256r1")
    request = GovernanceRequest(msg_type=MsgType.PROPOSAL, created_at=CREATED_AT, payload=PAYLOADS[MsgType.PROPOSAL])
    decoded = decode(sign_with(member, request))
    forged = type(decoded)(decoded.protected, decoded.headers, decoded.payload + b" ", decoded.signature)
    with pytest.raises(SigningFailedError):
        verify(forged, member.cert.public_key())  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\x58\x10abc", "not valid CBOR"),
        (cbor2.dumps([b"", {}, b"", b""]), "not tagged 18"),
        (cbor2.dumps(cbor2.CBORTag(18, [b"", {}, b""])), "4 elements"),
        (cbor2.dumps(cbor2.CBORTag(18, [b"", {}, None, b""])), "attached"),
        (cbor2.dumps(cbor2.CBORTag(18, [cbor2.dumps([1]), {}, b"", b""])), "must be a map"),
        # decimal fractions (tag 4) that cbor2 cannot build: decimal.InvalidOperation, then OverflowError
        (bytes.fromhex("c4821b7fffffffffffffff01"), "not valid CBOR"),
        (cbor2.dumps(cbor2.CBORTag(4, [2**70, 1])), "not valid CBOR"),
        (
            cbor2.dumps(cbor2.CBORTag(18, [bytes.fromhex("a101c4821b7fffffffffffffff01"), {}, b"", b""])),
            "protected header is not valid CBOR",
        ),
    ],
)
def test_decode_refuses_malformed_messages(data: bytes, message: str) -> None:
    with pytest.raises(InvalidRequestError, match=message):
        decode(data)


@settings(max_examples=60, deadline=None)
@given(payload=st.binary(max_size=2048), created_at=st.integers(0, 9_999_999_999))
def test_any_payload_bytes_verify_with_ccf(payload: bytes, created_at: int) -> None:
    member = _P256
    request = GovernanceRequest(msg_type=MsgType.STATE_DIGEST, created_at=created_at, payload=payload)
    message = sign_with(member, request)
    validate_cose_sign1(member.cert.public_key(), message)
    decoded = decode(message)
    assert decoded.payload == payload
    assert decoded.headers["ccf.gov.msg.created_at"] == created_at


_P256 = make_member("p", "secp256r1")


def test_json_payload_round_trip_is_exact() -> None:
    payload = json.dumps({"actions": [{"name": "x", "args": {"ü": 1}}]}, ensure_ascii=False).encode()
    request = GovernanceRequest(msg_type=MsgType.PROPOSAL, created_at=1, payload=payload)
    assert decode(sign_with(_P256, request)).payload == payload
