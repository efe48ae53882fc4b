"""Azure Key Vault end to end: three subprocesses, no fakes in the agent.

The Key Vault double (``python -m tests.doubles.keyvault``, with its managed-identity token endpoint), the CCF sandbox
(``python -m signing_agent sandbox``) and the daemon (``python -m signing_agent serve``), whose identities sign with
keys in the vault through the real Azure SDK and ``ManagedIdentityCredential``, pinned key versions and the double's
CA as ``ca_bundle``. The members' certificates are made here, so the vault's keys are checked against them at start-up.

Covered: every governance message type signs through ``POST /v1/sign`` and verifies with CCF's own
``ccf.cose.validate_cose_sign1``; a new member whose key is in the vault is proposed, voted in and activated in the
sandbox; 429s (with and without ``Retry-After``) are absorbed; exactly one vault request per signature after warm-up;
the ``[keyvault]`` table reaches the daemon; a vault key that does not match the certificate stops the daemon at start.
"""

from __future__ import annotations

import base64
import contextlib
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cbor2
import pytest
from ccf.cose import validate_cose_sign1

from signing_agent.audit import verify_audit
from signing_agent.client import AgentClient
from tests.doubles.keyvault import OTHER_AZURE_ENV
from tests.support.agent import DaemonProcess, cli_env, daemon, short_dir, write_toml
from tests.support.keyvault_proc import KeyVaultProcess, keyvault
from tests.support.pki import Member, make_member
from tests.support.sandbox_proc import SandboxProcess, sandbox

pytestmark = pytest.mark.e2e

PROPOSAL_ID = "c" * 64
KEYVAULT_MAX_ATTEMPTS = 3
KEYVAULT_MAX_CONCURRENCY = 4


@dataclass
class World:
    folder: Path
    members: dict[str, Member]
    vault: KeyVaultProcess
    sandbox: SandboxProcess
    agent: DaemonProcess
    env: dict[str, str]

    @property
    def client(self) -> AgentClient:
        return AgentClient(self.agent.socket, timeout=60)

    def vault_signs(self, since: int = 0) -> list[dict[str, Any]]:
        return [r for r in self.vault.requests()[since:] if r["op"] == "sign"]


def daemon_env(vault: KeyVaultProcess) -> dict[str, str]:
    # The agent's aiohttp session trusts the environment's proxies: the vault on 127.0.0.1 must never go through one.
    return {**vault.env, "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}


def agent_tables(
    folder: Path, vault: KeyVaultProcess, certs: dict[str, Path], keys: dict[str, str], services: dict[str, Any]
) -> dict[str, dict[str, Any]]:
    """``keys`` maps an identity to the vault key it signs with (normally its own)."""
    tables: dict[str, dict[str, Any]] = {
        "agent": {"socket": folder / "run" / "agent.sock"},
        "keyvault": {"max_attempts": KEYVAULT_MAX_ATTEMPTS, "max_concurrency": KEYVAULT_MAX_CONCURRENCY},
    }
    for name, cert in certs.items():
        tables[f"identities.{name}"] = {"certificate": cert}
        tables[f"identities.{name}.signing_key"] = vault.key_table(keys[name])
    for name, service in services.items():
        tables[f"services.{name}"] = service
    return tables


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    folder = short_dir("sa-kv-")
    # m0 and m1 are members of the service; m2 (P-521) is in the vault but not yet a member; stranger is a vault key
    # that belongs to no certificate.
    members = {
        "m0": make_member("m0", "secp384r1"),
        "m1": make_member("m1", "secp256r1"),
        "m2": make_member("m2", "secp521r1"),
        "stranger": make_member("stranger", "secp384r1"),
    }
    paths = {name: m.write(folder / "keys") for name, m in members.items()}
    try:
        with (
            pytest.MonkeyPatch.context() as mp,
            keyvault(folder / "vault", {name: key for name, (key, _) in paths.items()}) as vault,
            sandbox(folder / "sandbox", [paths["m0"][1], paths["m1"][1]]) as sb,
        ):
            for name in OTHER_AZURE_ENV:
                mp.delenv(name, raising=False)
            service = {
                "url": sb.url,
                "service_certificate": sb.service_cert,
                "request_timeout": 5.0,
                "max_attempts": 4,
                "backoff_initial": 0.05,
                "backoff_max": 0.2,
            }
            names = ("m0", "m1", "m2")
            tables = agent_tables(
                folder,
                vault,
                {n: paths[n][1] for n in names},
                {n: n for n in names},
                {"default": service},
            )
            env = daemon_env(vault)
            with daemon(write_toml(folder / "agent.toml", tables), env=env) as agent:
                yield World(folder, members, vault, sb, agent, env)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def proposal(i: int) -> bytes:
    """A distinct, valid proposal per ``i``."""
    return (
        b'{"actions":[{"name":"transition_node_to_trusted","args":{"node_id":"%064x","valid_from":"20240101000000Z"}}]}'
        % i
    )


def sign(world: World, identity: str, msg_type: str, payload: bytes = b"", **extra: Any) -> bytes:
    body = {
        "identity": identity,
        "msg_type": msg_type,
        "payload_base64": base64.b64encode(payload).decode(),
        **extra,
    }
    return world.client.call("POST", "/v1/sign", body).body


# ----- (a) every message type, verified by CCF's reference implementation -----

MESSAGES: list[tuple[str, bytes, dict[str, Any]]] = [
    ("proposal", b'{"actions":[{"name":"transition_node_to_trusted","args":{"node_id":"ab"}}]}', {}),
    ("ballot", b'{"ballot":"export function vote(p,i){return true}"}', {"proposal_id": PROPOSAL_ID}),
    ("withdrawal", b"", {"proposal_id": PROPOSAL_ID}),
    ("state_digest", b"", {}),
    ("ack", b'{"stateDigest":"' + b"d" * 64 + b'"}', {}),
    ("recovery_share", b'{"share":"AAAA"}', {}),
]


@pytest.mark.parametrize(("msg_type", "payload", "extra"), MESSAGES, ids=[m[0] for m in MESSAGES])
@pytest.mark.parametrize("identity", ["m0", "m1", "m2"], ids=["P-384", "P-256", "P-521"])
def test_every_message_type_signs_in_the_vault_and_verifies_with_ccf(
    world: World, identity: str, msg_type: str, payload: bytes, extra: dict[str, Any]
) -> None:
    member = world.members[identity]
    before = len(world.vault.requests())
    cose = sign(world, identity, msg_type, payload, **extra)
    validate_cose_sign1(member.cert.public_key(), cose)
    message = cbor2.loads(cose)
    headers = cbor2.loads(message.value[0])
    assert headers["ccf.gov.msg.type"] == msg_type
    assert headers[4] == member.member_id.encode()  # kid: the member id from the configured certificate
    assert headers[1] == {"m0": -35, "m1": -7, "m2": -36}[identity]
    if "proposal_id" in extra:
        assert headers["ccf.gov.msg.proposal_id"] == PROPOSAL_ID
    assert message.value[2] == payload
    # The signature came from the vault, from this identity's pinned key version.
    [signed] = world.vault_signs(before)
    assert signed["path"] == f"/keys/{identity}/{world.vault.version(identity)}/sign"
    assert signed["status"] == 200


# ----- (b) governance against the sandbox: a member whose key is in the vault joins -----


def test_a_vault_member_is_proposed_voted_in_and_activated(world: World) -> None:
    m2 = world.members["m2"]
    proposal = {"actions": [{"name": "set_member", "args": {"cert": m2.cert_pem.decode()}}]}
    created = world.client.call(
        "POST", "/v1/services/default/proposals", {"identity": "m0", "proposal": proposal}
    ).json()
    pid = created["proposalId"]
    assert (created["proposalState"], created["proposerId"]) == ("Open", world.members["m0"].member_id)

    ballot = {"ballot": "export function vote (proposal, proposerId) { return true }"}
    first = world.client.call(
        "POST", f"/v1/services/default/proposals/{pid}/ballots", {"identity": "m0", **ballot}
    ).json()
    assert first["proposalState"] == "Open"
    second = world.client.call(
        "POST", f"/v1/services/default/proposals/{pid}/ballots", {"identity": "m1", **ballot}
    ).json()
    assert second["proposalState"] == "Accepted"
    assert world.sandbox.gov_get(f"/gov/service/members/{m2.member_id}")["status"] == "Accepted"

    before = len(world.vault.requests())
    activated = world.client.call("POST", "/v1/services/default/members/m2/activate").json()
    assert (activated["memberId"], activated["status"]) == (m2.member_id, "Active")
    assert world.sandbox.gov_get(f"/gov/service/members/{m2.member_id}")["status"] == "Active"
    # The state digest update and the ack were both signed by m2's key in the vault (ES512).
    assert [r["path"] for r in world.vault_signs(before)] == [f"/keys/m2/{world.vault.version('m2')}/sign"] * 2

    # The new member governs: its proposal is accepted by the sandbox's COSE verification.
    mine = world.client.call(
        "POST",
        "/v1/services/default/proposals",
        {
            "identity": "m2",
            "proposal": {
                "actions": [
                    {
                        "name": "transition_node_to_trusted",
                        "args": {"node_id": "ab" * 32, "valid_from": "20240101000000Z"},
                    }
                ]
            },
        },
    ).json()
    assert mine["proposerId"] == m2.member_id


# ----- (c) throttling, (d) one request per signature, [keyvault] in the daemon -----


@pytest.mark.parametrize(
    ("retry_after", "count", "min_seconds"),
    [("1", 1, 0.95), (None, 2, 0.0)],
    ids=["with-retry-after", "without-retry-after"],
)
def test_429s_from_the_vault_are_absorbed(
    world: World, retry_after: str | None, count: int, min_seconds: float
) -> None:
    before = len(world.vault.requests())
    world.vault.inject(status=429, retry_after=retry_after, count=count)
    started = time.monotonic()
    cose = sign(world, "m0", "state_digest")
    elapsed = time.monotonic() - started
    validate_cose_sign1(world.members["m0"].cert.public_key(), cose)
    assert [r["status"] for r in world.vault_signs(before)] == [429] * count + [200]
    assert elapsed >= min_seconds


def test_exactly_one_vault_request_per_signature_after_warm_up(world: World) -> None:
    sign(world, "m1", "state_digest")  # warm-up (the daemon already signed a probe at start-up)
    before = len(world.vault.requests())
    for i in range(10):
        sign(world, "m1", "proposal", proposal(i))
    new = world.vault.requests()[before:]
    assert len(new) == 10
    assert {(r["op"], r["status"], r["authorized"]) for r in new} == {("sign", 200, True)}


def test_keyvault_max_attempts_from_the_config_file(world: World) -> None:
    before = len(world.vault.requests())
    world.vault.inject(status=503, count=KEYVAULT_MAX_ATTEMPTS)  # the default of 5 attempts would get through
    resp = world.client.request(
        "POST", "/v1/sign", {"identity": "m0", "msg_type": "state_digest", "payload_base64": ""}
    )
    assert resp.status == 503, resp.body
    assert resp.json()["error"]["code"] == "BackendUnavailable"
    assert resp.json()["error"]["retryable"] is True
    assert "retry-after" not in resp.headers  # the vault did not say when
    assert [r["status"] for r in world.vault_signs(before)] == [503] * KEYVAULT_MAX_ATTEMPTS


def test_keyvault_max_concurrency_from_the_config_file(world: World) -> None:
    n = 3 * KEYVAULT_MAX_CONCURRENCY
    world.vault.inject(status=None, delay=0.2, count=n)  # slow signs, so that they overlap
    with ThreadPoolExecutor(n) as pool:
        results = list(pool.map(lambda i: sign(world, "m0", "proposal", proposal(i)), range(n)))
    for cose in results:
        validate_cose_sign1(world.members["m0"].cert.public_key(), cose)
    # Shared by every key on the vault's host; the default cap of 16 would let all of them in at once.
    assert world.vault.max_in_flight() == KEYVAULT_MAX_CONCURRENCY


# ----- (e) a vault key that does not match the certificate -----


def test_a_vault_key_that_does_not_match_the_certificate_stops_the_daemon(world: World) -> None:
    folder = world.folder / "mismatch"
    folder.mkdir()
    _, cert = world.members["m0"].write(folder)
    tables = agent_tables(folder, world.vault, {"m0": cert}, {"m0": "stranger"}, {})
    config = write_toml(folder / "agent.toml", tables)
    ready = folder / "ready"
    result = subprocess.run(
        [sys.executable, "-m", "signing_agent", "serve", "--config", str(config), "--ready-file", str(ready)],
        capture_output=True,
        text=True,
        env=cli_env(world.env),
        timeout=60,
        check=False,
    )
    assert result.returncode != 0
    assert not ready.exists()
    assert not (folder / "run" / "agent.sock").exists()
    stranger_kid = world.vault.kids["stranger"]
    expected = (
        f"identities.m0: the signing key at {stranger_kid} does not match the certificate {cert} "
        f"(member id {world.members['m0'].member_id})"
    )
    assert expected in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


# ----- (f) what the agent says when the vault is slow or asks for a long wait: each on an agent of its own -----


@contextlib.contextmanager
def own_agent(
    world: World, name: str, agent: dict[str, Any] | None = None, keyvault: dict[str, Any] | None = None
) -> Iterator[DaemonProcess]:
    """A daemon of its own for m0 on the world's vault: its throttle and deadline do not touch the world's agent."""
    folder = world.folder / name
    folder.mkdir()
    _, cert = world.members["m0"].write(folder)
    tables = agent_tables(folder, world.vault, {"m0": cert}, {"m0": "m0"}, {})
    tables["agent"].update(agent or {})
    tables["keyvault"].update(keyvault or {})
    with daemon(write_toml(folder / "agent.toml", tables), env=world.env) as proc:
        yield proc


def cli_sign(world: World, agent: DaemonProcess) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "signing_agent", "sign", "--ccf-gov-msg-type", "state_digest", "--out", "/dev/null"],
        capture_output=True,
        text=True,
        env=cli_env({**world.env, "SIGNING_AGENT_SOCK": str(agent.socket)}),
        timeout=60,
        check=False,
    )


def test_a_vault_that_asks_for_a_long_wait_gives_retry_after(world: World) -> None:
    # The default total_timeout (30 s): the second signature must fail at once, not wait it out in the throttle.
    with own_agent(world, "long-wait") as agent:
        world.vault.inject(status=429, retry_after="120", count=1)  # over the default max_retry_after (30 s)
        resp = AgentClient(agent.socket, timeout=60).request(
            "POST", "/v1/sign", {"identity": "m0", "msg_type": "state_digest", "payload_base64": ""}
        )
        vault_requests = len(world.vault.requests())
        started = time.monotonic()
        result = cli_sign(world, agent)  # the vault's throttle penalty holds: refused at once, the vault not asked
        waited = time.monotonic() - started
        assert len(world.vault.requests()) == vault_requests
    assert resp.status == 503, resp.body
    error = resp.json()["error"]
    assert (error["code"], error["retryable"]) == ("BackendUnavailable", True)
    assert resp.headers["retry-after"] == "120"
    assert result.returncode == 1, result.stderr  # another failure: neither policy, nor CCF, nor a timeout
    assert "signing-agent: BackendUnavailable (503)" in result.stderr
    assert "the vault asked to wait 1" in result.stderr, result.stderr  # about 120 s more, of the vault's 120
    assert "longer than this request may take (30s)" in result.stderr
    assert waited < 25  # not the whole total_timeout in the throttle (30 s), however slow this machine


def test_a_slow_vault_is_a_timeout_that_names_the_key_store(world: World) -> None:
    """agent.request_timeout runs out while the vault takes its time: a 504 that says so (exit 6), not a 503."""
    with own_agent(world, "slow", {"request_timeout": 1.0}) as agent:
        world.vault.inject(status=None, delay=3.0, count=1)
        result = cli_sign(world, agent)
        audit = agent.socket.parent / "audit.jsonl"
        assert verify_audit([audit]).ok
        received, failed = (json.loads(line) for line in audit.read_text().splitlines()[-2:])
        # The log says the agent stopped waiting for the vault: the request does not end at "received".
        assert (received["event"], failed["event"], failed["error"]) == ("received", "failed", "Cancelled")
        assert failed["request_id"] == received["request_id"]
    assert result.returncode == 6, result.stderr
    assert "signing-agent: AgentTimeout (504)" in result.stderr
    assert "waiting for the key store (azure-keyvault, identities.m0.signing_key)" in result.stderr
    assert "CCF" not in result.stderr.split("hint:")[0]
