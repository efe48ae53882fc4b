"""Recovery in the CCF governance sandbox: share issuance, disaster, identity switch, share submission.

Recovery members' RSA encryption keys are held here, in-process, and shares are decrypted as
submit_recovery_share.sh does (RSA-OAEP-256). Every COSE message is signed with CCF's ``ccf.cose.create_cose_sign1``.
"""

from __future__ import annotations

import asyncio
import base64
import secrets
import struct
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from signing_agent.sandbox import SandboxServer
from signing_agent.sandbox.identity import client_ssl_context
from signing_agent.sandbox.recovery import Share, recover_secret
from tests.support.pki import Member, make_member, make_rsa_key, pem_public
from tests.support.sandbox_client import GovClient, Reply, decrypt_share, sign

NOT_WAITING = ("ServiceNotWaitingForRecoveryShares", "Service is not waiting for recovery shares.")
ALREADY = ("NodeAlreadyRecovering", "Node is already recovering private ledger.")
END = "\nEnd of recovery procedure initiated"


@pytest.fixture(scope="module")
def people() -> dict[str, tuple[Member, rsa.RSAPrivateKey]]:
    """Members with their RSA encryption keys (RSA-2048, as keygenerator.sh --gen-enc-key makes them)."""
    return {name: (make_member(name), make_rsa_key()) for name in ("alice", "bob", "carol", "dave")}


def member(people: dict[str, tuple[Member, rsa.RSAPrivateKey]], name: str) -> Member:
    return people[name][0]


def enc_pub(people: dict[str, tuple[Member, rsa.RSAPrivateKey]], name: str) -> str:
    return pem_public(people[name][1].public_key()).decode()


@pytest.fixture
async def sandbox() -> AsyncIterator[SandboxServer]:
    async with SandboxServer(private_recovery_seconds=0.3) as server:
        yield server


async def _client(url: str, service_cert_pem: bytes) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=client_ssl_context(service_cert_pem)))


@pytest.fixture
async def gov(sandbox: SandboxServer) -> AsyncIterator[GovClient]:
    async with await _client(sandbox.url, sandbox.service_cert_pem) as session:
        yield GovClient(sandbox.url, session)


def add_recovery_members(
    sandbox: SandboxServer, people: dict[str, tuple[Member, rsa.RSAPrivateKey]], *names: str
) -> None:
    for name in names:
        sandbox.add_member(member(people, name).cert_pem, encryption_pub_key=enc_pub(people, name))


async def decrypted(gov: GovClient, people: dict[str, tuple[Member, rsa.RSAPrivateKey]], name: str) -> bytes:
    reply = await gov.encrypted_share(member(people, name).member_id)
    assert reply.status == 200, reply.body
    assert reply.json["memberId"] == member(people, name).member_id
    return decrypt_share(people[name][1], reply.json["encryptedShare"])


def assert_apply_failed(reply: Reply, message_start: str) -> None:
    assert reply.status == 500, reply.body
    code, message = reply.error
    assert code == "InternalError"
    assert message.startswith(f"Failed to apply(): Error: {message_start}"), message


async def service_info(gov: GovClient) -> dict[str, Any]:
    reply = await gov.get("/gov/service/info")
    assert reply.status == 200
    info: dict[str, Any] = reply.json
    return info


async def node_state(gov: GovClient) -> str:
    return str((await gov.get("/node/state", api=None)).json["state"])


async def wait_for_status(gov: GovClient, status: str) -> None:
    """Poll /gov/service/info for up to 5 s."""
    for _ in range(250):
        if (await service_info(gov))["status"] == status:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"the service did not become {status}")


def x_of(share: bytes) -> int:
    x: int = struct.unpack_from("<I", share)[0]
    return x


# -- share issuance ---


async def test_share_is_issued_when_a_recovery_member_acks(
    gov: GovClient, sandbox: SandboxServer, people: dict[str, tuple[Member, rsa.RSAPrivateKey]]
) -> None:
    alice, carol = member(people, "alice"), member(people, "carol")
    sandbox.add_member(alice.cert_pem)  # not a recovery member
    set_carol = {"cert": carol.cert_pem.decode(), "encryption_pub_key": enc_pub(people, "carol")}
    reply = await gov.pass_proposal(alice, [alice], [{"name": "set_member", "args": set_carol}])
    assert reply.json["proposalState"] == "Accepted"
    listed = (await gov.get(f"/gov/service/members/{carol.member_id}")).json
    assert (listed["status"], listed["recoveryRole"]) == ("Accepted", "Participant")
    assert listed["publicEncryptionKey"] == enc_pub(people, "carol")
    none_yet = await gov.encrypted_share(carol.member_id)
    assert none_yet.status == 404
    assert none_yet.error == ("ResourceNotFound", f"Recovery share not found for member {carol.member_id}.")

    await gov.activate(carol)
    reply = await gov.encrypted_share(carol.member_id)
    assert reply.status == 200
    assert set(reply.json) == {"memberId", "encryptedShare"}
    ciphertext = base64.b64decode(reply.json["encryptedShare"], validate=True)
    assert len(ciphertext) == 256  # RSA-2048
    share = decrypt_share(people["carol"][1], reply.json["encryptedShare"])
    assert len(share) == 44
    assert x_of(share) == 1
    assert share == sandbox.issued_share(carol.member_id)
    sha1 = padding.OAEP(mgf=padding.MGF1(hashes.SHA1()), algorithm=hashes.SHA1(), label=None)  # noqa: S303
    with pytest.raises(ValueError):
        people["carol"][1].decrypt(ciphertext, sha1)

    not_recovery = await gov.encrypted_share(alice.member_id)
    assert not_recovery.error == ("ResourceNotFound", f"Recovery share not found for member {alice.member_id}.")
    bad = await gov.encrypted_share("nothex")
    assert bad.status == 400
    assert bad.error == ("InvalidResourceName", "'nothex' is not a valid hex-encoded member ID")
    upper = await gov.encrypted_share(carol.member_id.upper())
    assert upper.json["memberId"] == carol.member_id

    # a second recovery participant: everybody gets a fresh share of a fresh secret, with distinct x
    dave = member(people, "dave")
    set_dave = {"cert": dave.cert_pem.decode(), "encryption_pub_key": enc_pub(people, "dave")}
    assert (await gov.pass_proposal(alice, [alice, carol], [{"name": "set_member", "args": set_dave}])).status == 200
    assert await decrypted(gov, people, "carol") == share  # not re-issued before dave is Active
    await gov.activate(dave)
    carol_share, dave_share = await decrypted(gov, people, "carol"), await decrypted(gov, people, "dave")
    assert carol_share != share
    assert {x_of(carol_share), x_of(dave_share)} == {1, 2}


async def test_roles_owner_gets_the_full_key_and_non_participant_nothing(
    gov: GovClient, sandbox: SandboxServer, people: dict[str, tuple[Member, rsa.RSAPrivateKey]]
) -> None:
    alice, bob, carol = (member(people, n) for n in ("alice", "bob", "carol"))
    sandbox.add_member(alice.cert_pem, encryption_pub_key=enc_pub(people, "alice"))
    sandbox.add_member(bob.cert_pem, encryption_pub_key=enc_pub(people, "bob"), recovery_role="Owner")
    sandbox.add_member(carol.cert_pem, encryption_pub_key=enc_pub(people, "carol"), recovery_role="NonParticipant")
    roles = {m["memberId"]: m["recoveryRole"] for m in (await gov.get("/gov/service/members")).json["value"]}
    assert roles == {alice.member_id: "Participant", bob.member_id: "Owner", carol.member_id: "NonParticipant"}
    owner = await decrypted(gov, people, "bob")
    assert x_of(owner) == 0
    assert x_of(await decrypted(gov, people, "alice")) == 1
    assert (await gov.encrypted_share(carol.member_id)).status == 404
    # the owner's full key is the secret the participants' shares reconstruct
    assert recover_secret([Share.parse(await decrypted(gov, people, "alice"))], 1) == Share.parse(owner)


async def test_control_api_validates_recovery_members(
    gov: GovClient, sandbox: SandboxServer, people: dict[str, tuple[Member, rsa.RSAPrivateKey]]
) -> None:
    alice = member(people, "alice")
    base = f"{sandbox.url}/_sandbox/members"
    ec_key = pem_public(make_member("x").key.public_key()).decode()
    for extra in (
        {"encryption_pub_key": "not a key"},
        {"encryption_pub_key": ec_key},
        {"encryption_pub_key": enc_pub(people, "alice"), "recovery_role": "Boss"},
        {"recovery_role": "Owner"},
    ):
        async with gov.session.post(base, json={"cert": alice.cert_pem.decode(), **extra}) as r:
            assert r.status == 400, extra
    assert sandbox.state.member(alice.member_id) is None
    body = {"cert": alice.cert_pem.decode(), "encryption_pub_key": enc_pub(people, "alice")}
    async with gov.session.post(base, json=body) as r:
        assert r.status == 200
    assert len(await decrypted(gov, people, "alice")) == 44


async def test_threshold_refresh_and_removal_reissue_shares(
    gov: GovClient, sandbox: SandboxServer, people: dict[str, tuple[Member, rsa.RSAPrivateKey]]
) -> None:
    alice, bob, carol = (member(people, n) for n in ("alice", "bob", "carol"))
    add_recovery_members(sandbox, people, "alice", "bob")
    sandbox.add_member(carol.cert_pem)  # a third voter, not a recovery member
    voters = [alice, bob]

    too_high = await gov.pass_proposal(
        alice, voters, [{"name": "set_recovery_threshold", "args": {"recovery_threshold": 3}}]
    )
    assert_apply_failed(
        too_high,
        "Cannot set recovery threshold to 3: recovery threshold would be greater than the number of recovery members 2",
    )
    before = {n: await decrypted(gov, people, n) for n in ("alice", "bob")}
    ok = await gov.pass_proposal(alice, voters, [{"name": "set_recovery_threshold", "args": {"recovery_threshold": 2}}])
    assert ok.json["proposalState"] == "Accepted"
    assert (await service_info(gov))["configuration"]["recoveryThreshold"] == 2
    after = {n: await decrypted(gov, people, n) for n in ("alice", "bob")}
    assert after != before
    shares = [Share.parse(after["alice"]), Share.parse(after["bob"])]
    secret = sandbox.state._data.recovery_secret
    assert recover_secret(shares, 2).serialise() == secret
    assert recover_secret(shares[::-1], 2).serialise() == secret
    assert recover_secret(shares[:1], 1).serialise() != secret  # one share of a 2-of-2 split is not enough

    refresh = await gov.pass_proposal(alice, voters, [{"name": "trigger_recovery_shares_refresh"}])
    assert refresh.json["proposalState"] == "Accepted"
    refreshed = await decrypted(gov, people, "alice")
    assert refreshed != after["alice"]

    remove = [{"name": "remove_member", "args": {"member_id": bob.member_id}}]
    assert_apply_failed(
        await gov.pass_proposal(alice, voters, remove),
        "Number of active recovery members (1) would be less than recovery threshold (2)",
    )
    assert (await decrypted(gov, people, "alice")) == refreshed  # the failed proposal changed nothing
    lower = [{"name": "set_recovery_threshold", "args": {"recovery_threshold": 1}}]
    assert (await gov.pass_proposal(alice, voters, lower)).json["proposalState"] == "Accepted"
    lowered = await decrypted(gov, people, "alice")
    assert (await gov.pass_proposal(alice, voters, remove)).json["proposalState"] == "Accepted"
    assert (await gov.encrypted_share(bob.member_id)).status == 404
    assert (await decrypted(gov, people, "alice")) != lowered


async def test_refresh_without_recovery_members_fails_as_in_ccf(
    gov: GovClient, sandbox: SandboxServer, people: dict[str, tuple[Member, rsa.RSAPrivateKey]]
) -> None:
    alice = member(people, "alice")
    sandbox.add_member(alice.cert_pem)
    reply = await gov.pass_proposal(alice, [alice], [{"name": "trigger_recovery_shares_refresh"}])
    assert_apply_failed(reply, "There should be at least one active recovery member to issue recovery shares")


# -- disaster and recovery ---


async def _peer_cert(sandbox: SandboxServer, service_cert_pem: bytes) -> x509.Certificate:
    port = int(sandbox.url.rsplit(":", 1)[1])
    _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client_ssl_context(service_cert_pem))
    der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    writer.close()
    await writer.wait_closed()
    return x509.load_der_x509_certificate(der)


async def test_full_disaster_recovery_flow(
    gov: GovClient, sandbox: SandboxServer, people: dict[str, tuple[Member, rsa.RSAPrivateKey]]
) -> None:
    alice, bob, carol = (member(people, n) for n in ("alice", "bob", "carol"))
    add_recovery_members(sandbox, people, "alice", "bob", "carol")
    voters = [alice, bob, carol]
    threshold = [{"name": "set_recovery_threshold", "args": {"recovery_threshold": 2}}]
    assert (await gov.pass_proposal(alice, voters, threshold)).json["proposalState"] == "Accepted"
    old_cert = sandbox.service_cert_pem
    old_info = await service_info(gov)
    assert old_info["recoveryCount"] == 0
    assert "previousServiceCreationTransactionId" not in old_info
    shares = {n: await decrypted(gov, people, n) for n in ("alice", "bob", "carol")}
    encrypted_before = (await gov.encrypted_share(alice.member_id)).json
    assert (await gov.submit_share(alice, shares["alice"])).error == NOT_WAITING  # Open: not waiting

    # the disaster, through the HTTP control API
    async with gov.session.post(f"{sandbox.url}/_sandbox/recover") as r:
        assert r.status == 200
        assert r.headers["Connection"] == "close"
        control = await r.json()
    new_cert = sandbox.service_cert_pem
    assert new_cert != old_cert
    assert control["status"] == "Recovering"
    assert control["recoveryCount"] == 1
    assert control["serviceCertificate"] == new_cert.decode()
    assert control["previousServiceCertificate"] == old_cert.decode()
    assert control["previousServiceCreationTransactionId"] == old_info["creationTransactionId"]

    # TLS: a client pinned to the old identity fails; one pinned to the new identity gets a node cert it issued
    with pytest.raises(aiohttp.ClientConnectorCertificateError):
        await gov.get("/node/state", api=None)
    node = await _peer_cert(sandbox, new_cert)
    node.verify_directly_issued_by(x509.load_pem_x509_certificate(new_cert))
    with pytest.raises(InvalidSignature):
        node.verify_directly_issued_by(x509.load_pem_x509_certificate(old_cert))
    async with await _client(sandbox.url, new_cert) as session:
        new = GovClient(sandbox.url, session)
        info = await service_info(new)
        assert info["status"] == "Recovering"
        assert info["certificate"] == new_cert.decode()
        assert info["recoveryCount"] == 1
        assert info["previousServiceCreationTransactionId"] == old_info["creationTransactionId"]
        assert info["creationTransactionId"] == control["creationTransactionId"] != old_info["creationTransactionId"]
        assert await node_state(new) == "PartOfPublicNetwork"
        network = (await new.get("/node/network", api=None)).json
        assert (network["service_status"], network["recovery_count"]) == ("Recovering", 1)
        assert network["service_certificate"] == new_cert.decode()
        members = (await new.get("/gov/service/members")).json["value"]
        assert {m["status"] for m in members} == {"Active"}
        assert (await new.encrypted_share(alice.member_id)).json == encrypted_before
        assert (await new.submit_share(alice, shares["alice"])).error == NOT_WAITING  # Recovering: not yet

        # transition_service_to_open: both identities required and checked
        only_next = {"next_service_identity": new_cert.decode()}
        assert_apply_failed(
            await new.pass_proposal(alice, voters, [{"name": "transition_service_to_open", "args": only_next}]),
            "Opening a recovering network requires both, the previous and the next service identity",
        )
        other = SandboxServer().service_cert_pem.decode()
        wrong_previous = {"previous_service_identity": other, "next_service_identity": new_cert.decode()}
        assert_apply_failed(
            await new.pass_proposal(alice, voters, [{"name": "transition_service_to_open", "args": wrong_previous}]),
            "Previous service identity does not match.",
        )
        wrong_next = {"previous_service_identity": old_cert.decode(), "next_service_identity": old_cert.decode()}
        assert_apply_failed(
            await new.pass_proposal(alice, voters, [{"name": "transition_service_to_open", "args": wrong_next}]),
            "Service identity mismatch: the next service identity",
        )
        assert (await service_info(new))["status"] == "Recovering"
        both = {"previous_service_identity": old_cert.decode(), "next_service_identity": new_cert.decode()}
        opened = await new.pass_proposal(alice, voters, [{"name": "transition_service_to_open", "args": both}])
        assert opened.json["proposalState"] == "Accepted"
        assert (await service_info(new))["status"] == "WaitingForRecoveryShares"
        assert_apply_failed(
            await new.pass_proposal(
                alice, voters, [{"name": "set_recovery_threshold", "args": {"recovery_threshold": 3}}]
            ),
            "Cannot set recovery threshold if service is WaitingForRecoveryShares",
        )

        # shares: decrypted from what was issued before the disaster
        first = await new.submit_share(alice, shares["alice"])
        assert first.status == 200
        assert first.json == {
            "message": "1/2 recovery shares successfully submitted",
            "submittedCount": 1,
            "recoveryThreshold": 2,
            "fullKeySubmitted": False,
        }
        assert "x-ms-ccf-transaction-id" in first.headers
        again = await new.submit_share(alice, shares["alice"])
        assert again.json["message"] == "1/2 recovery shares successfully submitted"
        assert again.json["submittedCount"] == 1
        last = await new.submit_share(bob, shares["bob"])
        assert last.status == 200
        assert last.json == {
            "message": "2/2 recovery shares successfully submitted" + END,
            "submittedCount": 2,
            "recoveryThreshold": 2,
            "fullKeySubmitted": False,
        }
        # the private ledger replay is observable
        state = (await new.get("/node/state", api=None)).json
        assert state["state"] == "ReadingPrivateLedger"
        assert {"recovery_target_seqno", "last_recovered_seqno"} <= set(state)
        assert (await service_info(new))["status"] == "WaitingForRecoveryShares"
        assert (await new.submit_share(carol, shares["carol"])).error == ALREADY
        await wait_for_status(new, "Open")
        assert await node_state(new) == "PartOfNetwork"
        assert (await new.get("/node/network", api=None)).json["service_status"] == "Open"
        assert (await new.submit_share(carol, shares["carol"])).error == NOT_WAITING
        # new shares for the new service
        fresh = {n: await decrypted(new, people, n) for n in ("alice", "bob", "carol")}
        assert all(fresh[n] != shares[n] for n in fresh)
        assert fresh["alice"] == sandbox.issued_share(alice.member_id)
        assert (await new.propose(alice, [{"name": "trigger_recovery_shares_refresh"}])).status == 200


async def _recovering(
    sandbox: SandboxServer, people: dict[str, tuple[Member, rsa.RSAPrivateKey]], *names: str
) -> tuple[aiohttp.ClientSession, GovClient]:
    """Recover in-process and pass transition_service_to_open: the service waits for shares."""
    old_cert = sandbox.service_cert_pem
    await sandbox.recover()
    session = await _client(sandbox.url, sandbox.service_cert_pem)
    gov = GovClient(sandbox.url, session)
    both = {"previous_service_identity": old_cert.decode(), "next_service_identity": sandbox.service_cert_pem.decode()}
    voters = [member(people, n) for n in names]
    reply = await gov.pass_proposal(voters[0], voters, [{"name": "transition_service_to_open", "args": both}])
    assert reply.json["proposalState"] == "Accepted"
    return session, gov


async def test_recover_request_errors(
    sandbox: SandboxServer, people: dict[str, tuple[Member, rsa.RSAPrivateKey]]
) -> None:
    alice, bob, dave = (member(people, n) for n in ("alice", "bob", "dave"))
    add_recovery_members(sandbox, people, "alice", "bob")
    sandbox.add_member(dave.cert_pem, status="Accepted")
    share = sandbox.issued_share(alice.member_id)
    assert share is not None
    session, gov = await _recovering(sandbox, people, "alice", "bob")
    async with session:
        wrong_member = await gov.submit_share(alice, share, url_member_id=bob.member_id)
        assert wrong_member.status == 400
        assert wrong_member.error == (
            "InvalidAuthenticationInfo",
            f"Member ID from path parameter ({bob.member_id}) does not match member ID from body signature "
            f"({alice.member_id}).",
        )
        bad_id = await gov.submit_share(alice, share, url_member_id="nothex")
        assert bad_id.error == ("InvalidResourceName", "'nothex' is not a valid hex-encoded member ID")
        url = f"/gov/recovery/members/{alice.member_id}:recover"
        no_share = await gov.post(url, sign(alice, "recovery_share", {"shares": "x"}))
        assert no_share.status == 400
        assert no_share.error == ("InvalidInput", "[json.exception.type_error.302] type must be string, but is null")
        not_json = await gov.post(url, sign(alice, "recovery_share", b"share"))
        assert not_json.status == 400
        assert not_json.error[0] == "InvalidInput"
        not_b64 = await gov.submit_share(alice, "%%%")
        assert not_b64.status == 500
        assert not_b64.error[0] == "InternalError"
        accepted_only = await gov.post(
            f"/gov/recovery/members/{dave.member_id}:recover", sign(dave, "recovery_share", {"share": "AAAA"})
        )
        assert accepted_only.status == 401
        assert accepted_only.auth_reason == ("active_member_cose_sign1", "Signer is not an ACTIVE member")
        wrong_type = await gov.post(url, sign(alice, "ballot", {"share": "AAAA"}))
        assert wrong_type.auth_reason[1] == (
            "Found ccf.gov.msg.type set to ballot, expected ccf.gov.msg.type to be recovery_share"
        )
        assert sandbox.state.submitted_share_members() == []
        # a recovery member that is not yet Active cannot be activated during recovery
        carol = member(people, "carol")
        sandbox.add_member(carol.cert_pem, status="Accepted", encryption_pub_key=enc_pub(people, "carol"))
        update = await gov.post(f"/gov/members/state-digests/{carol.member_id}:update", sign(carol, "state_digest"))
        ack = await gov.post(f"/gov/members/state-digests/{carol.member_id}:ack", sign(carol, "ack", update.body))
        assert ack.error == ("InvalidInput", "Recovery members cannot be activated during recovery.")


async def test_wrong_shares_are_rejected_when_combined(
    sandbox: SandboxServer, people: dict[str, tuple[Member, rsa.RSAPrivateKey]]
) -> None:
    alice, bob = member(people, "alice"), member(people, "bob")
    add_recovery_members(sandbox, people, "alice", "bob")
    async with await _client(sandbox.url, sandbox.service_cert_pem) as session:
        gov = GovClient(sandbox.url, session)
        threshold = [{"name": "set_recovery_threshold", "args": {"recovery_threshold": 2}}]
        assert (await gov.pass_proposal(alice, [alice, bob], threshold)).json["proposalState"] == "Accepted"
    good = {m.member_id: sandbox.issued_share(m.member_id) or b"" for m in (alice, bob)}
    session, gov = await _recovering(sandbox, people, "alice", "bob")
    async with session:
        forged = struct.pack("<I", 1) + secrets.token_bytes(40)
        assert forged != good[alice.member_id]
        # as in CCF, a share is only checked when the threshold is reached and the shares are combined
        assert (await gov.submit_share(alice, forged)).json["submittedCount"] == 1
        failed = await gov.submit_share(bob, good[bob.member_id])
        assert failed.status == 500
        assert failed.error == ("InternalError", "Failed to initiate private recovery.")
        assert sandbox.state.submitted_share_members() == []  # cleared, so members can start over
        assert (await service_info(gov))["status"] == "WaitingForRecoveryShares"
        assert await node_state(gov) == "PartOfPublicNetwork"
        # another member's (valid) share, submitted twice, is not two shares either
        assert (await gov.submit_share(alice, good[bob.member_id])).status == 200
        assert (await gov.submit_share(bob, good[bob.member_id])).error[1] == "Failed to initiate private recovery."
        short = await gov.submit_share(alice, good[alice.member_id][:40])
        assert short.status == 200
        assert (await gov.submit_share(bob, good[bob.member_id])).status == 500
        assert (await gov.submit_share(alice, good[alice.member_id])).status == 200
        done = await gov.submit_share(bob, good[bob.member_id])
        assert done.json["message"] == "2/2 recovery shares successfully submitted" + END
        await wait_for_status(gov, "Open")


async def test_owner_full_key_recovers_alone(
    sandbox: SandboxServer, people: dict[str, tuple[Member, rsa.RSAPrivateKey]]
) -> None:
    bob = member(people, "bob")
    add_recovery_members(sandbox, people, "alice")
    sandbox.add_member(bob.cert_pem, encryption_pub_key=enc_pub(people, "bob"), recovery_role="Owner")
    full_key = sandbox.issued_share(bob.member_id)
    assert full_key is not None
    assert x_of(full_key) == 0
    session, gov = await _recovering(sandbox, people, "alice", "bob")
    async with session:
        reply = await gov.submit_share(bob, full_key)
        assert reply.json == {
            "message": "Full recovery key successfully submitted" + END,
            "submittedCount": 1,
            "recoveryThreshold": 1,
            "fullKeySubmitted": True,
        }
        await wait_for_status(gov, "Open")


async def test_recover_with_a_given_identity_and_control_errors(
    sandbox: SandboxServer, gov: GovClient, tmp_path: Path
) -> None:
    sandbox.service_cert_out = tmp_path / "service.pem"
    identity = SandboxServer().identity
    async with gov.session.post(f"{sandbox.url}/_sandbox/recover", json={"nope": 1}) as r:
        assert r.status == 400
    same = {"service_key": sandbox.identity.key_pem.decode(), "service_cert": sandbox.service_cert_pem.decode()}
    async with gov.session.post(f"{sandbox.url}/_sandbox/recover", json=same) as r:
        assert r.status == 400
    assert sandbox.state.service_status == "Open"
    assert (await gov.get("/node/state", api=None)).status == 200  # leaves a keep-alive connection in the pool
    await sandbox.recover(identity.key_pem, identity.cert_pem)
    await asyncio.sleep(0.05)
    with pytest.raises(aiohttp.ClientConnectorCertificateError):  # open connections were closed, as by a restart
        await gov.get("/node/state", api=None)
    assert sandbox.service_cert_pem == identity.cert_pem
    assert sandbox.state.service_info()["certificate"] == identity.cert_pem.decode()
    assert (tmp_path / "service.pem").read_bytes() == identity.cert_pem
    await sandbox.recover()  # a second disaster before the first recovery finished
    info = sandbox.state.service_info()
    assert (info["status"], info["recoveryCount"]) == ("Recovering", 2)
    assert sandbox.state.previous_service_cert_pem == identity.cert_pem.decode()
    node = await _peer_cert(sandbox, sandbox.service_cert_pem)
    node.verify_directly_issued_by(x509.load_pem_x509_certificate(sandbox.service_cert_pem))
