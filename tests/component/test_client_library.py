"""``signing_agent.client``: the sync and async clients against the real API on a real Unix socket, wired to the
CCF governance sandbox over real TLS. Every route, typed results and typed errors, and the two clients alike."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from ccf.cose import validate_cose_sign1
from cryptography import x509

from signing_agent import errors
from signing_agent.client import (
    ACCEPT_BALLOT,
    REJECT_BALLOT,
    AgentClient,
    AgentRequestError,
    AgentUnreachableError,
    AsyncAgentClient,
    CCFRefusedError,
    WaitTimeoutError,
)
from signing_agent.sandbox import SandboxServer
from tests.support.agent import agent_config, file_identity, running_agent
from tests.support.pki import Member, make_member

THRESHOLD = {"actions": [{"name": "set_recovery_threshold", "args": {"recovery_threshold": 1}}]}  # no effect: 1 already
CONSTITUTION = {"actions": [{"name": "set_constitution", "args": {"constitution": "x"}}]}


@pytest.fixture(scope="module")
def members() -> dict[str, Member]:
    return {"m0": make_member("m0"), "m1": make_member("m1", "secp256r1"), "m2": make_member("m2")}


@dataclass
class World:
    socket: Path
    sandbox: SandboxServer
    members: dict[str, Member]


@pytest.fixture
async def world(workdir: Path, members: dict[str, Member]) -> AsyncIterator[World]:
    async with SandboxServer(members=[members["m0"].cert_pem]) as sandbox:
        sandbox.add_member(members["m1"].cert_pem, status="Accepted")
        cert = sandbox.write_service_cert(workdir / "service_cert.pem")
        tables: dict[str, object] = {
            "agent": {"socket": workdir / "run" / "agent.sock"},
            "services.default": {"url": sandbox.url, "service_certificate": cert},
            "policy.rules": [{"name": "no-constitution", "uids": [os.getuid()], "actions_deny": ["set_constitution"]}],
        }
        for name, member in members.items():
            key, pem = member.write(workdir / "keys")
            tables.update(file_identity(name, pem, key))
        async with running_agent(agent_config(workdir, tables)) as sock:
            yield World(sock, sandbox, members)


async def test_every_route_through_the_async_client(world: World) -> None:
    agent = AsyncAgentClient(world.socket, timeout=30)
    health = await agent.health()
    assert (health.ok, health.generation, health.last_reload) == (True, 1, None)
    assert {c.name: c.details["members"] for c in health.services} == {
        "default": {"m0": "Active", "m1": "Accepted", "m2": "NotAMember"}
    }
    idents = await agent.identities()
    assert [(i.name, i.member_id) for i in idents] == [(n, m.member_id) for n, m in world.members.items()]
    assert [s.name for s in await agent.services()] == ["default"]
    assert await agent.pick_service() == "default"
    assert await agent.resolve_identity(world.members["m1"].member_id[:6]) == "m1"
    assert "signing_agent_requests_total" in await agent.metrics()

    signed = await agent.sign("m0", "proposal", json.dumps(THRESHOLD).encode())
    assert signed.member_id == world.members["m0"].member_id
    cert = x509.load_pem_x509_certificate(world.members["m0"].cert_pem)
    validate_cose_sign1(cert.public_key(), bytes(signed))
    explained = await agent.explain("m0", "proposal", json.dumps(CONSTITUTION).encode())
    assert (explained.allowed, explained.decision.rule, explained.proposal_actions) == (
        False, "no-constitution", ("set_constitution",),
    )  # fmt: skip

    created = await agent.propose("default", "m0", THRESHOLD)
    assert created.open
    assert created.transaction_id
    listed = await agent.proposals("default", actions=True)
    assert [(p.proposal_id, p.action_names) for p in listed] == [(created.proposal_id, ("set_recovery_threshold",))]
    assert (await agent.proposals("default"))[0].actions is None
    assert await agent.resolve_proposal_id("default", created.proposal_id[:5].upper()) == created.proposal_id
    shown = await agent.proposal("default", created.proposal_id)
    assert (shown.action_names, shown.ballots) == (("set_recovery_threshold",), {})
    voted = await agent.vote("default", "m0", created.proposal_id)  # the canonical accepting ballot
    assert voted.state == "Accepted"
    assert (await agent.wait_for_proposal("default", created.proposal_id, timeout=5)).state == "Accepted"

    mine = await agent.propose("default", "m0", json.dumps(THRESHOLD).encode())  # exact bytes
    withdrawn = await agent.withdraw("default", "m0", mine.proposal_id)
    assert withdrawn is not None
    assert withdrawn.state == "Withdrawn"
    assert await agent.withdraw("default", "m0", "f" * 64) is None  # no such proposal: nothing to withdraw

    activated = await agent.activate("default", "m1")
    assert (activated.member_id, activated.status) == (world.members["m1"].member_id, "Active")
    status = await agent.status("default")
    assert (status.status, [(m.name, m.status) for m in status.identities]) == (
        "Open", [("m0", "Active"), ("m1", "Active"), ("m2", "NotAMember")],
    )  # fmt: skip
    assert not any(m.needs_activation for m in status.identities)
    recovery = await agent.recovery()
    assert (recovery.enabled, recovery.watchers) == (False, ())
    with pytest.raises(errors.UnsupportedOperationError):  # this in-process agent has no configuration file
        await agent.reload()


async def test_errors_are_typed_by_the_agents_codes(world: World) -> None:
    agent = AsyncAgentClient(world.socket, timeout=30)
    with pytest.raises(errors.PolicyDeniedError) as denied:
        await agent.propose("default", "m0", CONSTITUTION)
    assert isinstance(denied.value, AgentRequestError)
    assert (denied.value.status, denied.value.code) == (403, "PolicyDenied")
    assert "no-constitution" in denied.value.message
    assert denied.value.request_id
    with pytest.raises(errors.UnknownIdentityError):
        await agent.sign("ghost", "ack")
    with pytest.raises(errors.UnknownServiceError):
        await agent.status("nowhere")
    with pytest.raises(errors.InvalidRequestError, match="needs proposal_id"):
        await agent.sign("m0", "ballot")
    with pytest.raises(CCFRefusedError) as refused:  # m2 is no member of the service: CCF says so
        await agent.propose("default", "m2", THRESHOLD)
    assert (refused.value.status, refused.value.from_ccf) == (401, True)
    opened = await agent.propose("default", "m0", THRESHOLD)
    with pytest.raises(WaitTimeoutError, match="still Open"):
        await agent.wait_for_proposal("default", opened.proposal_id, timeout=0.2)
    await agent.vote("default", "m0", opened.proposal_id)
    with pytest.raises(errors.ConflictError):  # a ballot for a proposal that is not Open: nothing signed
        await agent.vote("default", "m0", opened.proposal_id, REJECT_BALLOT)
    with pytest.raises(AgentUnreachableError, match="no agent is listening"):
        await AsyncAgentClient(world.socket.with_name("none.sock")).health()


async def test_the_sync_client_answers_as_the_async_one(world: World) -> None:
    sync, aio = AgentClient(world.socket, timeout=30), AsyncAgentClient(world.socket, timeout=30)
    assert await asyncio.to_thread(sync.identities) == await aio.identities()
    assert (await asyncio.to_thread(sync.status, "default")).identities == (await aio.status("default")).identities
    created = await asyncio.to_thread(sync.propose, "default", "m0", THRESHOLD)
    voted = await asyncio.to_thread(sync.vote, "default", "m0", created.proposal_id, ACCEPT_BALLOT)
    assert voted.state == "Accepted"
    assert await asyncio.to_thread(sync.resolve_proposal_id, "default", created.proposal_id[:8]) == created.proposal_id
    with pytest.raises(errors.PolicyDeniedError):
        await asyncio.to_thread(sync.propose, "default", "m0", CONSTITUTION)
    signed = await asyncio.to_thread(sync.sign, "m1", "state_digest")
    assert signed.member_id == world.members["m1"].member_id
