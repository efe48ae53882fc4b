"""The workflows against an in-memory CCF: the proposal each builds, what each refuses before anything is signed, and
the facts the checks read of the service (``ccf.facts``).

The same commands through the daemon against the sandbox are in tests/e2e/test_workflows.py.
"""

from __future__ import annotations

import json

import pytest

from signing_agent.ccf.facts import read_facts
from signing_agent.errors import CCFError, ConflictError, InvalidRequestError
from signing_agent.proposals import Needs
from signing_agent.sandbox.identity import ServiceIdentity
from signing_agent.workflows import Workflows
from tests.support.fake_ccf import FakeWorld
from tests.support.pki import make_member

pytestmark = pytest.mark.usefixtures("own_peer")
PID = "c" * 64
NODE = "ab" * 32
NOW = 1_735_689_600.0  # 2025-01-01T00:00:00Z


def workflows(world: FakeWorld) -> Workflows:
    return Workflows(world.gov, clock=lambda: NOW)


def proposed(world: FakeWorld) -> list[dict[str, object]]:
    """The actions of every proposal the fake service received."""
    return [json.loads(m.payload)["actions"] for op, m in world.service.received if op == "create_proposal"]


async def test_member_add_builds_set_member_and_refuses_an_existing_member(world: FakeWorld) -> None:
    bob = make_member("bob")
    relay = await workflows(world).member_add(
        "prod", "m0", cert=bob.cert_pem.decode(), member_data={"n": 1}, dry_run=False
    )
    assert relay.status == 200
    assert relay.body["actions"] == [{"name": "set_member", "args": {"cert": bob.cert_pem.decode(),
                                                                       "member_data": {"n": 1}}}]  # fmt: skip
    assert relay.body["member_id"] == bob.member_id
    assert proposed(world) == [relay.body["actions"]]
    world.service.add_member(bob.member_id, "Accepted")
    with pytest.raises(ConflictError, match="already a member of service 'prod' \\(Accepted\\)"):
        await workflows(world).member_add("prod", "m0", cert=bob.cert_pem.decode())
    with pytest.raises(InvalidRequestError, match=r"args\.cert: is not a PEM X\.509 certificate"):
        await workflows(world).member_add("prod", "m0", cert="nope")
    assert len(proposed(world)) == 1


async def test_a_dry_run_checks_and_explains_and_signs_nothing(world: FakeWorld) -> None:
    bob = make_member("bob")
    relay = await workflows(world).member_add("prod", "m0", cert=bob.cert_pem.decode(), dry_run=True)
    assert relay.body["dry_run"] is True
    assert relay.body["proposal"] == {"actions": [{"name": "set_member", "args": {"cert": bob.cert_pem.decode()}}]}
    assert relay.body["explanation"]["decision"]["allowed"] is True
    assert world.service.received == []
    assert world.events() == []  # explain writes no record: nothing was decided
    with pytest.raises(InvalidRequestError, match="recovery_role: needs encryption_pub_key"):
        await workflows(world).member_add("prod", "m0", cert=bob.cert_pem.decode(), recovery_role="Owner", dry_run=True)


async def test_member_remove_by_id_or_certificate(world: FakeWorld) -> None:
    bob = make_member("bob")
    with pytest.raises(ConflictError, match="is not a member"):
        await workflows(world).member_remove("prod", "m0", cert=bob.cert_pem.decode())
    world.service.add_member(bob.member_id, "Active")
    relay = await workflows(world).member_remove("prod", "m0", cert=bob.cert_pem.decode())
    assert relay.body["actions"] == [{"name": "remove_member", "args": {"member_id": bob.member_id}}]
    with pytest.raises(InvalidRequestError, match="not both"):
        await workflows(world).member_remove("prod", "m0", cert=bob.cert_pem.decode(), member_id=bob.member_id)
    with pytest.raises(InvalidRequestError, match=r"args\.member_id: 'x' is not 64 hex"):
        await workflows(world).member_remove("prod", "m0", member_id="x")


async def test_a_recovery_member_below_the_threshold_is_refused_before_signing(world: FakeWorld) -> None:
    world.service.recovery_threshold = 1
    world.service.add_member(world.m0.member_id, "Active", publicEncryptionKey="PEM")
    with pytest.raises(InvalidRequestError, match=r"Number of active recovery members \(0\)"):
        await workflows(world).member_remove("prod", "m0", member_id=world.m0.member_id)
    assert world.events() == []


async def test_node_trust_for_a_pending_node_valid_from_now(world: FakeWorld) -> None:
    world.service.nodes[NODE] = {"nodeId": NODE, "status": "Pending"}
    relay = await workflows(world).node_trust("prod", "m0", NODE)
    assert relay.body["actions"] == [{"name": "transition_node_to_trusted",
                                      "args": {"node_id": NODE, "valid_from": "20250101000000Z"}}]  # fmt: skip
    world.service.nodes[NODE]["status"] = "Trusted"
    with pytest.raises(ConflictError, match="is Trusted, not Pending"):
        await workflows(world).node_trust("prod", "m0", NODE)
    with pytest.raises(InvalidRequestError, match="has no node"):
        await workflows(world).node_trust("prod", "m0", "cd" * 32)
    world.service.nodes[NODE]["status"] = "Pending"
    with pytest.raises(InvalidRequestError, match=r"validity_period_days.*max allowed is 365"):
        await workflows(world).node_trust("prod", "m0", NODE, validity_days=366)


async def test_node_retire_a_node_that_is_not_retired_yet(world: FakeWorld) -> None:
    world.service.nodes[NODE] = {"nodeId": NODE, "status": "Trusted"}
    relay = await workflows(world).node_retire("prod", "m0", NODE)
    assert relay.body["actions"] == [{"name": "remove_node", "args": {"node_id": NODE}}]
    world.service.nodes[NODE]["status"] = "Retired"
    with pytest.raises(ConflictError, match="Retired already"):
        await workflows(world).node_retire("prod", "m0", NODE)
    with pytest.raises(ConflictError, match="has no such node"):
        await workflows(world).node_retire("prod", "m0", "cd" * 32)


async def test_service_open_of_a_new_service_to_the_identity_it_presents(world: FakeWorld) -> None:
    with pytest.raises(ConflictError, match="is Open, not Opening"):
        await workflows(world).service_open("prod", "m0")
    world.service.status = "Opening"
    with pytest.raises(InvalidRequestError, match="at least one active recovery member"):
        await workflows(world).service_open("prod", "m0")
    world.service.add_member(world.m0.member_id, "Active", publicEncryptionKey="PEM")
    relay = await workflows(world).service_open("prod", "m0")
    identity = world.service.identity.decode()
    assert relay.body["actions"] == [
        {"name": "transition_service_to_open", "args": {"next_service_identity": identity}}
    ]
    assert len(relay.body["service_identity"]["next_sha256"]) == 64


async def recovered(world: FakeWorld) -> tuple[str, str]:
    """The service recovered with a new identity, which the configuration lists (reloaded: the clients are made
    again); (previous, next) as PEM text."""
    previous = world.service.identity.decode()
    new = ServiceIdentity.generate().cert_pem
    world.service.identity = new
    world.service.status = "Recovering"
    world.service.previous_identity = previous.encode()
    world.ccf.accepted["prod"] = (new,)
    await world.gov.ccf.aclose()
    return previous, new.decode()


async def test_recovery_accept_from_the_pinned_identity_to_the_presented_one(world: FakeWorld) -> None:
    with pytest.raises(ConflictError, match="is Open, not Recovering"):
        await workflows(world).recovery_accept("prod", "m0")
    previous, following = await recovered(world)
    relay = await workflows(world).recovery_accept("prod", "m0")
    assert relay.body["actions"] == [{"name": "transition_service_to_open", "args": {
        "previous_service_identity": previous, "next_service_identity": following}}]  # fmt: skip
    assert set(relay.body["service_identity"]) == {"previous_sha256", "next_sha256"}


async def test_recovery_accept_puts_in_the_text_the_service_reports(world: FakeWorld) -> None:
    previous, following = await recovered(world)
    relay = await workflows(world).recovery_accept(
        "prod", "m0", previous=previous.replace("\n", "\r\n"), following=following.replace("\n", "\r\n")
    )
    assert relay.body["actions"][0]["args"] == {"previous_service_identity": previous,
                                                 "next_service_identity": following}  # fmt: skip
    with pytest.raises(InvalidRequestError, match=r"next: not a PEM X\.509 certificate"):
        await workflows(world).recovery_accept("prod", "m0", following="junk")


async def test_recovery_accept_refuses_a_service_that_recovered_from_another(world: FakeWorld) -> None:
    await recovered(world)
    world.service.previous_identity = ServiceIdentity.generate().cert_pem
    with pytest.raises(ConflictError, match="not from the one this agent pinned"):
        await workflows(world).recovery_accept("prod", "m0")
    assert world.service.received == []


async def test_recovery_accept_without_a_previous_identity_to_go_by(world: FakeWorld) -> None:
    _, following = await recovered(world)
    world.ccf.configured["prod"] = following.encode()  # the operator pinned the new identity itself
    with pytest.raises(InvalidRequestError, match="give it"):
        await workflows(world).recovery_accept("prod", "m0")


async def test_refresh_shares_has_no_args(world: FakeWorld) -> None:
    world.service.add_member(world.m0.member_id, "Active", publicEncryptionKey="PEM")
    relay = await workflows(world).refresh_shares("prod", "m0")
    assert relay.body["actions"] == [{"name": "trigger_recovery_shares_refresh"}]


async def test_service_identity_and_how_it_is_trusted(world: FakeWorld) -> None:
    report = await workflows(world).service_identity("prod")
    assert (report.trust, report.sha256 == report.pinned_sha256) == ("pinned", True)
    _, following = await recovered(world)
    assert (await workflows(world).service_identity("prod")).trust == "listed"
    world.ccf.accepted["prod"] = ()
    await world.gov.ccf.aclose()
    assert (await workflows(world).service_identity("prod")).trust == "untrusted"
    world.gov.ccf.trust_provisionally("prod", following.encode())
    report = await workflows(world).service_identity("prod")
    assert report.as_dict()["trust"] == "provisional"
    assert report.as_dict()["trusted"] is False


async def test_members_and_pending_proposals(world: FakeWorld) -> None:
    listed = (await workflows(world).members("prod")).body["value"]
    assert listed == [{"memberId": world.m0.member_id, "status": "Active", "identity": "m0"}]
    world.service.add_proposal(PID, [{"name": "remove_node", "args": {"node_id": NODE}}])
    world.service.add_proposal("d" * 64, [], state="Accepted")
    pending = (await workflows(world).pending("prod", "m0")).body
    assert [p["proposalId"] for p in pending["value"]] == [PID]
    assert pending["value"][0]["actions"] == [{"name": "remove_node", "args": {"node_id": NODE}}]
    world.service.ballots[(PID, world.m0.member_id)] = "x"
    assert (await workflows(world).pending("prod", "m0")).body["value"] == []
    assert (await workflows(world).nodes("prod")).body == {"value": [{"nodeId": "n0", "status": "Trusted"}]}


async def test_a_proposal_that_cannot_be_checked_is_not_signed(world: FakeWorld) -> None:
    world.service.add_member(world.m0.member_id, "Active", publicEncryptionKey="PEM")
    world.service.answer_next("members", 503, {"error": {"code": "ServiceUnavailable", "message": "busy"}})
    with pytest.raises(CCFError, match="cannot be checked"):
        await workflows(world).refresh_shares("prod", "m0")
    assert world.events() == []
    assert world.service.received == []


async def test_facts_say_when_the_previous_identity_is_unknown(world: FakeWorld) -> None:
    client = await world.gov.ccf.client("prod")
    known = await read_facts(client, "prod", Needs.PREVIOUS_IDENTITY)
    assert (known.recovered_from, known.recovered_from_known) == (None, True)
    world.service.answer_next("previous_service_identity", 404, {"error": {"code": "ResourceNotFound",
                                                                            "message": "Unknown path"}})  # fmt: skip
    older = await read_facts(client, "prod", Needs.PREVIOUS_IDENTITY)
    assert older.recovered_from_known is False
    info = await read_facts(client, "prod", Needs.INFO)
    assert (info.status, info.identity_trusted, info.max_node_validity_days) == ("Open", True, 365)
