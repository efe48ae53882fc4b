"""What the sandbox grew for the consortium's workflows, over real HTTPS and signed with CCF's own ``ccf.cose``.

The nodes table (a node joins through the control API, is trusted, retired), ``/node/service/previous_identity``,
the default constitution's argument checks with its messages, and its ``apply``: ``set_member`` registering a member
again as Accepted, ``transition_service_to_open`` comparing identities as PEM text and doing nothing on an open
service, opening a new service only with recovery members to issue shares to, ``valid_from`` read by CCF's parser.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from signing_agent.sandbox import SandboxServer
from signing_agent.sandbox.identity import ServiceIdentity, client_ssl_context
from tests.support.pki import Member, make_member, make_rsa_key, pem_public
from tests.support.sandbox_client import GovClient

NODE = "ab" * 32


@pytest.fixture(scope="module")
def alice() -> Member:
    return make_member("alice")


@pytest.fixture(scope="module")
def bob() -> Member:
    return make_member("bob")


@pytest.fixture
async def sandbox(alice: Member) -> AsyncIterator[SandboxServer]:
    async with SandboxServer() as server:
        server.add_member(alice.cert_pem, encryption_pub_key=pem_public(make_rsa_key().public_key()))
        yield server


async def _failed_validation(gov: GovClient, member: Member, action: dict[str, Any]) -> str:
    reply = await gov.propose(member, [action])
    assert reply.status == 400, reply.body
    code, message = reply.error
    assert code == "ProposalFailedToValidate"
    prefix = f"Proposal failed to validate: {action['name']} at position 0 failed validation: "
    assert message.startswith(prefix), message
    return message.removeprefix(prefix)


@pytest.mark.parametrize(
    ("action", "error"),
    [
        ({"name": "set_member"}, "TypeError: cannot read property 'cert' of undefined"),
        ({"name": "set_member", "args": {"cert": "x"}},
         "Error: cert must be a valid X509 certificate (bundle) in PEM format"),
        ({"name": "remove_member", "args": {"member_id": "ab"}}, "Error: member_id must contain exactly 64 characters"),
        ({"name": "remove_member", "args": {"member_id": "x" * 64}},
         "Error: member_id contains non-hexadecimal character"),
        ({"name": "remove_member", "args": {"cert": "x"}}, "Error: member_id must be of type string but is undefined"),
        ({"name": "transition_node_to_trusted", "args": {"node_id": NODE}},
         "Error: valid_from must be of type string but is undefined"),
        ({"name": "transition_node_to_trusted",
          "args": {"node_id": NODE, "valid_from": "x", "validity_period_days": 0}},
         "Error: validity_period_days must be greater than 1"),
        ({"name": "remove_node", "args": {"node_id": 5}}, "Error: node_id must be of type string but is number"),
        ({"name": "trigger_recovery_shares_refresh", "args": {}},
         'Error: Proposal does not accept any argument, found "[object Object]"'),
        ({"name": "transition_service_to_open", "args": {}},
         "Error: next service identity (PEM certificate) must be of type string but is undefined"),
        ({"name": "set_recovery_threshold", "args": {"recovery_threshold": 255}},
         "Error: threshold must be lower than 254"),
        ({"name": "set_constitution", "args": {}}, "Error: undefined must be of type string but is undefined"),
    ],
)  # fmt: skip
async def test_the_default_constitution_s_argument_checks(
    gov: GovClient, alice: Member, action: dict[str, Any], error: str
) -> None:
    assert await _failed_validation(gov, alice, action) == error


async def test_set_member_recovery_role_needs_an_encryption_key(gov: GovClient, alice: Member, bob: Member) -> None:
    args: dict[str, Any] = {"cert": bob.cert_pem.decode(), "recovery_role": "NonParticipant"}
    assert (await _failed_validation(gov, alice, {"name": "set_member", "args": args})) == (
        "Error: Cannot specify a recovery_role value when encryption_pub_key is not specified"
    )
    args["recovery_role"] = None
    assert (await _failed_validation(gov, alice, {"name": "set_member", "args": args})) == (
        "Error: recovery_role must be one of NonParticipant,Participant,Owner"
    )


async def test_nodes_join_are_trusted_and_retired(gov: GovClient, sandbox: SandboxServer, alice: Member) -> None:
    (own,) = (await gov.get("/gov/service/nodes")).json["value"]
    assert (own["nodeId"], own["status"]) == (sandbox.state.node_id, "Trusted")
    node = sandbox.add_node({"region": "west"})
    pending = (await gov.get(f"/gov/service/nodes/{node}")).json
    assert (pending["status"], pending["nodeData"]) == ("Pending", {"region": "west"})
    assert "BEGIN CERTIFICATE" in pending["certificate"]
    trust = {"name": "transition_node_to_trusted", "args": {"node_id": node, "valid_from": "2024-01-01 00:00:00"}}
    assert (await gov.pass_proposal(alice, [alice], [trust])).json["proposalState"] == "Accepted"
    assert (await gov.get(f"/gov/service/nodes/{node}")).json["status"] == "Trusted"
    retire = {"name": "remove_node", "args": {"node_id": node}}
    assert (await gov.pass_proposal(alice, [alice], [retire])).json["proposalState"] == "Accepted"
    assert (await gov.get(f"/gov/service/nodes/{node}")).json["status"] == "Retired"
    joining = sandbox.add_node()
    removed = {"name": "remove_node", "args": {"node_id": joining}}
    assert (await gov.pass_proposal(alice, [alice], [removed])).status == 200
    assert (await gov.get(f"/gov/service/nodes/{joining}")).error == (
        "ResourceNotFound", f"Node {joining} does not exist."
    )  # fmt: skip


@pytest.mark.parametrize(
    ("args", "failure"),
    [
        ({"node_id": NODE, "valid_from": "20240101000000Z"}, f"No such node: {NODE}"),
        ({"valid_from": "tomorrow"}, "'tomorrow' does not match any accepted time format"),
        ({"valid_from": "20240101000000Z", "validity_period_days": 366}, "Validity period 366 is not allowed: max "
                                                                          "allowed is 365"),
    ],
)  # fmt: skip
async def test_trusting_a_node_fails_to_apply_as_in_ccf(
    gov: GovClient, sandbox: SandboxServer, alice: Member, args: dict[str, Any], failure: str
) -> None:
    node = sandbox.add_node()
    action = {"name": "transition_node_to_trusted", "args": {"node_id": node, **args}}
    reply = await gov.pass_proposal(alice, [alice], [action])
    assert reply.status == 500
    assert reply.error == ("InternalError", f"Failed to apply(): Error: {failure}")
    assert (await gov.get(f"/gov/service/nodes/{node}")).json["status"] == "Pending"  # rolled back


async def test_nodes_join_through_the_control_api(sandbox: SandboxServer) -> None:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=sandbox.client_ssl_context())) as session:
        async with session.post(f"{sandbox.url}/_sandbox/nodes", json={"node_data": {"n": 1}}) as resp:
            joined = await resp.json()
        async with session.post(f"{sandbox.url}/_sandbox/nodes", json={"nope": 1}) as resp:
            assert resp.status == 400
    assert joined["status"] == "Pending"
    node = sandbox.state.node(joined["nodeId"])
    assert node is not None
    assert node.node_data == {"n": 1}


async def test_set_member_registers_an_active_member_again_as_accepted(
    gov: GovClient, sandbox: SandboxServer, alice: Member, bob: Member
) -> None:
    bob_id = sandbox.add_member(bob.cert_pem, status="Active")
    again = {"name": "set_member", "args": {"cert": bob.cert_pem.decode(), "member_data": {"v": 2}}}
    assert (await gov.pass_proposal(alice, [alice, bob], [again])).json["proposalState"] == "Accepted"
    member = (await gov.get(f"/gov/service/members/{bob_id}")).json
    assert (member["status"], member["memberData"]) == ("Accepted", {"v": 2})
    unknown = "ab" * 32
    assert (await gov.get(f"/gov/service/members/{unknown}")).error == (
        "ResourceNotFound", f"Member {unknown} does not exist."
    )  # fmt: skip
    assert bob_id in {m["memberId"] for m in (await gov.get("/gov/service/members")).json["value"]}


async def test_opening_an_open_service_does_nothing(gov: GovClient, sandbox: SandboxServer, alice: Member) -> None:
    other = ServiceIdentity.generate().cert_pem.decode()
    action = {"name": "transition_service_to_open", "args": {"next_service_identity": other}}
    assert (await gov.pass_proposal(alice, [alice], [action])).json["proposalState"] == "Accepted"
    assert (await gov.get("/gov/service/info")).json["status"] == "Open"
    assert (await gov.get("/node/service/previous_identity", api=None)).error == (
        "ResourceNotFound", "This service is not a recovery of a previous service."
    )  # fmt: skip


async def test_a_new_service_opens_to_its_identity_as_text_with_recovery_members(alice: Member) -> None:
    async with SandboxServer(service_status="Opening") as sandbox:
        connector = aiohttp.TCPConnector(ssl=sandbox.client_ssl_context())
        async with aiohttp.ClientSession(connector=connector) as session:
            gov = GovClient(sandbox.url, session)
            sandbox.add_member(alice.cert_pem)
            identity = sandbox.service_cert_pem.decode()
            rewrapped = {"name": "transition_service_to_open",
                         "args": {"next_service_identity": identity.replace("\n", "\r\n")}}  # fmt: skip
            reply = await gov.pass_proposal(alice, [alice], [rewrapped])
            assert reply.status == 500
            assert reply.error[1].startswith("Failed to apply(): Error: Service identity mismatch")
            action = {"name": "transition_service_to_open", "args": {"next_service_identity": identity}}
            reply = await gov.pass_proposal(alice, [alice], [action])
            assert reply.error[1] == (
                "Failed to apply(): Error: Failed to issue recovery shares: There should be at least one active "
                "recovery member to issue recovery shares"
            )
            carol = make_member("carol")
            sandbox.add_member(carol.cert_pem, encryption_pub_key=pem_public(make_rsa_key().public_key()))
            assert (await gov.pass_proposal(alice, [alice, carol], [action])).json["proposalState"] == "Accepted"
            assert (await gov.get("/gov/service/info")).json["status"] == "Open"
            assert sandbox.issued_share(carol.member_id) is not None


async def test_the_previous_identity_is_compared_as_text(alice: Member) -> None:
    async with SandboxServer() as sandbox:
        sandbox.add_member(alice.cert_pem, encryption_pub_key=pem_public(make_rsa_key().public_key()))
        previous = sandbox.service_cert_pem.decode()
        await sandbox.recover()
        following = sandbox.service_cert_pem.decode()
        connector = aiohttp.TCPConnector(ssl=client_ssl_context(sandbox.service_cert_pem))
        async with aiohttp.ClientSession(connector=connector) as session:
            gov = GovClient(sandbox.url, session)
            reported = (await gov.get("/node/service/previous_identity", api=None)).json
            assert reported == {"previous_service_identity": previous}
            rewrapped = {
                "previous_service_identity": previous.replace("\n", "\r\n"),
                "next_service_identity": following,
            }
            reply = await gov.pass_proposal(alice, [alice], [{"name": "transition_service_to_open", "args": rewrapped}])
            assert reply.error[1].startswith("Failed to apply(): Error: Previous service identity does not match.")
            both = {"previous_service_identity": previous, "next_service_identity": following}
            reply = await gov.pass_proposal(alice, [alice], [{"name": "transition_service_to_open", "args": both}])
            assert reply.json["proposalState"] == "Accepted"
            assert (await gov.get("/gov/service/info")).json["status"] == "WaitingForRecoveryShares"
            nodes = {n["nodeId"]: n["status"] for n in (await gov.get("/gov/service/nodes")).json["value"]}
            assert nodes[sandbox.state.node_id] == "Trusted"
            assert sorted(nodes.values()) == ["Retired", "Trusted"]  # the node from before the disaster


def test_the_control_api_is_in_the_help() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "signing_agent", "sandbox", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for call in ("/_sandbox/members", "/_sandbox/nodes", "/_sandbox/recover", "/_sandbox/faults", "/_sandbox/requests"):
        assert call in out
    assert "--opening" in out
    assert "--recovery-threshold" in out
