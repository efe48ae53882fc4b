"""Recovery shares end to end: the daemon, the CCF sandbox and the Key Vault double as subprocesses, real tokens.

Members' encryption keys live in an NSS softoken (native RSA-OAEP-SHA256), in SoftHSM2 (no OAEP-SHA256: a clear
error, or ``oaep = "host"``), in the Key Vault double (RSA-OAEP-256) and in PEM files. The test keeps a copy of each
RSA key only to learn the plaintext shares the sandbox issued (by decrypting ``encryptedShare`` itself, never
through the agent), so that after every flow it can scan the agent's stderr, audit log, state folder and the whole
work folder for them in raw, base64, urlsafe base64 and hex: nothing may be found.

Covered: on-request submission with every key store and a threshold that completes recovery; the unattended
watchers submitting once per recovery, not again after a restart, and again on the next recovery; the trust guard
(no share to an identity that is not listed; the proposal rule trusts one approved outside the agent provisionally,
which earns no share, until the operator lists it; the provisional adoption survives a restart). The attacks on that
guard, and the flow where the agent's own ballot approves the identity, are in ``test_recovery_trust.py``.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from signing_agent.client import AgentClient, AgentRequestError
from signing_agent.sandbox.identity import ServiceIdentity
from tests.doubles.keyvault import OTHER_AZURE_ENV
from tests.support import tokens
from tests.support.agent import DaemonProcess, cli_env, daemon, short_dir, write_toml
from tests.support.keyvault_proc import KeyVaultProcess, keyvault
from tests.support.pki import Member, make_member, make_rsa_key, pem_private, pem_public
from tests.support.sandbox_client import YES, decrypt_share, sign
from tests.support.sandbox_proc import SandboxProcess, sandbox
from tests.support.tokens import TokenInfo, import_member, import_rsa, unique_label

pytestmark = [pytest.mark.e2e, pytest.mark.softhsm, pytest.mark.nss]

# The token fixtures are session-scoped in tests.support.tokens; bind them here so pytest finds them.
softhsm = tokens.softhsm
nss_token = tokens.nss_token


@dataclass
class Person:
    member: Member
    enc: rsa.RSAPrivateKey


@dataclass
class World:
    folder: Path
    sandbox: SandboxProcess
    config: Path
    env: dict[str, str]
    people: dict[str, Person]
    agent: DaemonProcess | None = None
    shares: list[bytes] = field(default_factory=list)
    """Every plaintext share the sandbox issued to an agent identity, for the leak scan."""
    stderr_log: list[str] = field(default_factory=list)
    _ctx: Any = None

    @property
    def client(self) -> AgentClient:
        assert self.agent is not None
        return AgentClient(self.agent.socket, timeout=60)

    def start(self) -> DaemonProcess:
        assert self.agent is None
        self._ctx = daemon(self.config, env=self.env)
        self.agent = self._ctx.__enter__()
        return self.agent

    def stop(self) -> None:
        if self.agent is not None:
            self.stderr_log.append(self.agent.stderr)
            self._ctx.__exit__(None, None, None)
            self.agent = None

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        assert self.agent is not None
        return subprocess.run(
            [sys.executable, "-m", "signing_agent", *args],
            capture_output=True,
            text=True,
            env=cli_env({"SIGNING_AGENT_SOCK": str(self.agent.socket)}),
            timeout=60,
            check=False,
        )

    def pass_proposal(self, actions: list[dict[str, Any]], voters: list[str]) -> dict[str, Any]:
        created = self.client.call(
            "POST", "/v1/services/default/proposals", {"identity": voters[0], "proposal": {"actions": actions}}
        ).json()
        pid = created["proposalId"]
        result: dict[str, Any] = created
        for voter in voters:
            result = self.client.call(
                "POST", f"/v1/services/default/proposals/{pid}/ballots", {"identity": voter, "ballot": YES}
            ).json()
            if result["proposalState"] != "Open":
                break
        assert result["proposalState"] == "Accepted", result
        return result

    def disaster(self, new: ServiceIdentity | None = None) -> tuple[str, str]:
        """The service restarts Recovering with a new identity; (previous, next) service certificates."""
        previous = self.sandbox.service_cert.read_text()
        answer = self.sandbox.recover(*((new.key_pem, new.cert_pem) if new is not None else ()))
        assert answer["status"] == "Recovering"
        return previous, answer["serviceCertificate"]

    def collect_shares(self) -> None:
        """Learn the plaintext share of every agent identity, the way a member's script would (test-only)."""
        for person in self.people.values():
            got = self.sandbox.gov_get(f"/gov/recovery/encrypted-shares/{person.member.member_id}")
            self.shares.append(decrypt_share(person.enc, got["encryptedShare"]))

    def recover_posts(self) -> list[dict[str, Any]]:
        return [r for r in self.sandbox.requests(":recover") if r["method"] == "POST"]

    def wait_for_recover_posts(self, count: int, timeout: float = 15.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while len(posts := self.recover_posts()) < count and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(posts) == count, posts
        return posts


def transition(previous: str, nxt: str) -> list[dict[str, Any]]:
    args = {"previous_service_identity": previous, "next_service_identity": nxt}
    return [{"name": "transition_service_to_open", "args": args}]


def share_forms(share: bytes) -> list[bytes]:
    b64 = base64.b64encode(share)
    url = base64.urlsafe_b64encode(share)
    return [share, b64, b64.rstrip(b"="), url, url.rstrip(b"="), share.hex().encode(), share.hex().upper().encode()]


def assert_no_leak(shares: list[bytes], *places: Path) -> int:
    """No share, in any of its forms, in any file under ``places``; returns the number of files scanned."""
    assert shares
    scanned = 0
    for place in places:
        files = [place] if place.is_file() else [p for p in place.rglob("*") if p.is_file()]
        for path in files:
            data = path.read_bytes()
            scanned += 1
            for share in shares:
                for form in share_forms(share):
                    assert form not in data, f"a recovery share leaked into {path}"
    return scanned


def audit_records(world: World) -> list[dict[str, Any]]:
    path = world.folder / "run" / "audit.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def p11_table(token: TokenInfo, label: str, **extra: Any) -> dict[str, Any]:
    table: dict[str, Any] = {
        "backend": "pkcs11",
        "module": token.module,
        "token_label": token.token_label,
        "key_label": label,
        "pin_file": token.pin_file,
    }
    if token.init_params:
        table["init_params"] = token.init_params
    table.update(extra)
    return table


def identity_tables(
    name: str,
    kind: str,
    person: Person,
    folder: Path,
    *,
    softhsm: tokens.SoftHSMSetup | None = None,
    nss: TokenInfo | None = None,
    vault: KeyVaultProcess | None = None,
) -> dict[str, dict[str, Any]]:
    """``kind``: file | nss | softhsm | softhsm-host | keyvault."""
    key_path, cert_path = person.member.write(folder / "keys")
    tables: dict[str, dict[str, Any]] = {f"identities.{name}": {"certificate": cert_path}}
    match kind:
        case "file":
            enc_path = folder / "keys" / f"{name}_enc_privk.pem"
            enc_path.write_bytes(pem_private(person.enc))
            enc_path.chmod(0o600)
            signing = {"backend": "file", "path": key_path}
            encryption: dict[str, Any] = {"backend": "file", "path": enc_path}
        case "nss" | "softhsm" | "softhsm-host":
            token = nss if kind == "nss" else (softhsm.tokens["agent-a"] if softhsm is not None else None)
            assert token is not None
            label = unique_label(name)
            import_member(token, person.member.key, label=label)
            import_rsa(token, person.enc, label=f"{label}-enc")
            signing = p11_table(token, label)
            encryption = p11_table(token, f"{label}-enc", **({"oaep": "host"} if kind == "softhsm-host" else {}))
        case "keyvault":
            assert vault is not None
            signing = vault.key_table(name)
            encryption = vault.key_table(f"{name}-enc")
        case _:
            raise AssertionError(kind)
    tables[f"identities.{name}.signing_key"] = signing
    tables[f"identities.{name}.encryption_key"] = encryption
    return tables


@dataclass
class Setup:
    """Builds a world: the sandbox (and the Key Vault double when needed), members, keys and the agent's config."""

    request: pytest.FixtureRequest

    @contextlib.contextmanager
    def world(
        self,
        kinds: dict[str, str],
        *,
        service: dict[str, Any] | None = None,
        recovery: dict[str, Any] | None = None,
    ) -> Iterator[World]:
        folder = short_dir("sa-rec-")
        people = {name: Person(make_member(name), make_rsa_key()) for name in kinds}
        hsm = self.request.getfixturevalue("softhsm") if any(k.startswith("softhsm") for k in kinds.values()) else None
        nss = self.request.getfixturevalue("nss_token") if "nss" in kinds.values() else None
        env: dict[str, str] = dict(hsm.env) if hsm is not None else {}
        try:
            with contextlib.ExitStack() as stack, pytest.MonkeyPatch.context() as mp:
                vault = None
                if "keyvault" in kinds.values():
                    seeds: dict[str, Path | str] = {}
                    for name, kind in kinds.items():
                        if kind == "keyvault":
                            key_path, _ = people[name].member.write(folder / "vault-keys")
                            enc_path = folder / "vault-keys" / f"{name}_enc.pem"
                            enc_path.write_bytes(pem_private(people[name].enc))
                            seeds[name], seeds[f"{name}-enc"] = key_path, enc_path
                    vault = stack.enter_context(keyvault(folder / "vault", seeds))
                    for var in OTHER_AZURE_ENV:
                        mp.delenv(var, raising=False)
                    env.update(vault.env, NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost")
                sb = stack.enter_context(sandbox(folder / "sandbox"))
                for person in people.values():
                    sb.add_member(
                        person.member.cert_pem, encryption_pub_key=pem_public(person.enc.public_key()).decode()
                    )
                # A copy: the sandbox rewrites its own file on recovery, and the agent must not follow that silently.
                pinned = folder / "service_cert.pem"
                shutil.copyfile(sb.service_cert, pinned)
                tables: dict[str, Any] = {"agent": {"socket": folder / "run" / "agent.sock"}}
                for name, kind in kinds.items():
                    tables.update(identity_tables(name, kind, people[name], folder, softhsm=hsm, nss=nss, vault=vault))
                tables["services.default"] = {
                    "url": sb.url,
                    "service_certificate": pinned,
                    "request_timeout": 5.0,
                    "max_attempts": 3,
                    "backoff_initial": 0.05,
                    "backoff_max": 0.2,
                    **(service or {}),
                }
                if recovery is not None:
                    tables["recovery"] = recovery
                config = write_toml(folder / "agent.toml", tables)
                world = World(folder, sb, config, env, people)
                try:
                    yield world
                finally:
                    world.stop()
        finally:
            shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def setup(request: pytest.FixtureRequest) -> Setup:
    return Setup(request)


def test_on_request_with_every_key_store_completes_recovery(setup: Setup) -> None:
    kinds = {"nss": "nss", "hsm": "softhsm", "hsmhost": "softhsm-host", "kv": "keyvault", "file": "file"}
    nxt = ServiceIdentity.generate()
    with setup.world(kinds) as world:
        (world.folder / "next_cert.pem").write_bytes(nxt.cert_pem)
        text = world.config.read_text().replace(
            "[services.default]\n", '[services.default]\naccepted_service_certificates = ["next_cert.pem"]\n'
        )
        world.config.write_text(text)
        world.start()
        voters = ["nss", "kv", "file"]
        world.pass_proposal([{"name": "set_recovery_threshold", "args": {"recovery_threshold": 4}}], voters)
        previous, new_cert = world.disaster(nxt)
        assert new_cert == nxt.cert_pem.decode()
        world.pass_proposal(transition(previous, new_cert), voters)  # through the agent: the listed identity
        world.sandbox.wait_for_status("WaitingForRecoveryShares")
        world.collect_shares()

        # SoftHSM2 2.6 has no OAEP-SHA256: a clear error, and nothing was sent.
        refused = world.cli("recovery", "submit-share", "--identity", "hsm")
        assert refused.returncode != 0
        assert "UnsupportedOperation" in refused.stderr or "lacks RSA-OAEP with SHA-256" in refused.stderr
        assert 'oaep = "host"' in refused.stderr, refused.stderr
        assert world.recover_posts() == []

        first = world.cli("recovery", "submit-share", "--identity", "nss")
        assert first.returncode == 0, first.stderr
        assert "1/4 recovery shares successfully submitted" in first.stdout
        for count, name in ((2, "hsmhost"), (3, "kv")):
            resp = world.client.call("POST", f"/v1/services/default/recovery/{name}/share")
            assert resp.headers["x-relayed-from"] == "ccf"
            body = resp.json()
            assert (body["submittedCount"], body["recoveryThreshold"]) == (count, 4), body
        last = world.cli("recovery", "submit-share", "--identity", "file", "--json")
        assert last.returncode == 0, last.stderr
        body = json.loads(last.stdout)
        assert body["message"] == "4/4 recovery shares successfully submitted\nEnd of recovery procedure initiated"
        world.sandbox.wait_for_status("Open")
        posts = world.recover_posts()
        assert sorted(p["path"].split("/")[-1].split(":")[0] for p in posts) == sorted(
            world.people[n].member.member_id for n in ("nss", "hsmhost", "kv", "file")
        )

        audit = audit_records(world)
        submitted = [r for r in audit if r["event"] == "share_submitted"]
        assert [r["identity"] for r in submitted] == ["nss", "hsmhost", "kv", "file"]
        assert {r["recovery_count"] for r in submitted} == {1}
        failed = [r for r in audit if r["event"] == "share_failed"]
        assert [(r["identity"], r["error"]) for r in failed] == [("hsm", "UnsupportedOperation")]
        world.stop()
        assert_no_leak(world.shares, world.folder)
        assert all(b"share" not in line.encode() or "recovery share" in line for line in world.stderr_log)


def test_watchers_submit_once_per_recovery_and_never_again_after_a_restart(setup: Setup) -> None:
    kinds = {"nss": "nss", "hsmhost": "softhsm-host", "kv": "keyvault", "file": "file"}
    watched = ["nss", "hsmhost", "kv"]
    identities = [ServiceIdentity.generate(), ServiceIdentity.generate()]
    with setup.world(
        kinds,
        service={"recovery_identities": watched, "accepted_service_certificates": ["next1.pem", "next2.pem"]},
        recovery={"enabled": True, "poll_interval": 0.2, "max_backoff": 1.0, "state_dir": "state"},
    ) as world:
        for i, ident in enumerate(identities, start=1):
            (world.folder / f"next{i}.pem").write_bytes(ident.cert_pem)
        world.start()
        voters = ["nss", "kv", "file"]
        watchers = world.client.call("GET", "/v1/recovery").json()
        assert watchers["enabled"] is True
        assert {w["identity"]: w["state"] for w in watchers["watchers"]} == dict.fromkeys(watched, "watching")
        world.pass_proposal([{"name": "set_recovery_threshold", "args": {"recovery_threshold": 4}}], voters)

        for recovery_count, ident in enumerate(identities, start=1):
            previous, new_cert = world.disaster(ident)
            world.pass_proposal(transition(previous, new_cert), voters)
            world.sandbox.wait_for_status("WaitingForRecoveryShares")
            world.collect_shares()
            posts = world.wait_for_recover_posts(4 * (recovery_count - 1) + 3)
            assert all(p["status"] == 200 for p in posts)
            mine = {p["path"].split("/")[-1].split(":")[0] for p in posts[-3:]}
            assert mine == {world.people[n].member.member_id for n in watched}

            # The sandbox logs each :recover before the watcher has read CCF's answer and recorded it: wait for that.
            deadline = time.monotonic() + 10
            while True:
                status = world.client.call("GET", "/v1/services/default/status").json()
                states = {w["identity"]: w for w in status["recovery_watchers"]}
                if all(w["state"] == "submitted" for w in states.values()) or time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            assert {n: w["state"] for n, w in states.items()} == dict.fromkeys(watched, "submitted")
            assert {w["last_submission"]["recoveryCount"] for w in states.values()} == {recovery_count}
            metrics = world.client.request("GET", "/metrics").body.decode()
            assert (
                'signing_agent_recovery_watcher_state{identity="kv",service="default",state="submitted"} 1.0' in metrics
            )

            if recovery_count == 1:
                # A restart while the service still waits: the state file says the shares are in.
                world.stop()
                world.start()
                time.sleep(1.0)  # five polls
                assert len(world.recover_posts()) == 3
                restarted = world.client.call("GET", "/v1/recovery").json()["watchers"]
                assert {w["state"] for w in restarted} == {"submitted"}

            done = world.client.call("POST", "/v1/services/default/recovery/file/share").json()
            assert done["message"].endswith("End of recovery procedure initiated"), done
            world.sandbox.wait_for_status("Open")

        assert len(world.recover_posts()) == 8  # per recovery: 3 watchers and one share on request
        state_file = world.folder / "state" / "recovery-default.json"
        assert stat.S_IMODE(state_file.stat().st_mode) == 0o600
        saved = json.loads(state_file.read_text())
        assert {n: s["recoveryCount"] for n, s in saved["submissions"].items()} == dict.fromkeys([*watched, "file"], 2)
        watcher_records = [r for r in audit_records(world) if r["event"] == "share_submitted" and r["unattended"]]
        assert len(watcher_records) == 6
        world.stop()
        assert_no_leak(world.shares, world.folder)


def post_cose(sb: SandboxProcess, path: str, cose: bytes) -> dict[str, Any]:
    """A governance POST straight to the sandbox (a member acting without the agent)."""
    url = f"{sb.url}{path}?api-version=2024-07-01"
    req = urllib.request.Request(url, data=cose, method="POST", headers={"Content-Type": "application/cose"})  # noqa: S310
    with urllib.request.urlopen(req, context=sb._ctx(), timeout=10) as resp:  # noqa: S310 -- https to loopback
        result: dict[str, Any] = json.loads(resp.read())
    return result


def test_trust_guard_no_share_to_an_unapproved_identity_then_the_proposal_rule(setup: Setup) -> None:
    unrelated = ServiceIdentity.generate()
    with setup.world(
        {"m0": "file"},
        service={"recovery_identities": ["m0"], "accepted_service_certificates": ["unrelated.pem"]},
        recovery={"enabled": True, "poll_interval": 0.2, "max_backoff": 0.4, "state_dir": "state"},
    ) as world:
        (world.folder / "unrelated.pem").write_bytes(unrelated.cert_pem)
        world.start()
        # The watcher's first poll before the disaster: its connection is then open, verified against the pinned
        # identity, and closed by the sandbox's restart. A TLS handshake still under way while the sandbox restarts
        # would outlive it with the previous identity (a restarted CCF node keeps no connection), and the watcher
        # would read the recovered service through it.
        deadline = time.monotonic() + 30
        while world.client.call("GET", "/v1/recovery").json()["watchers"][0]["last_checked_at"] is None:
            assert time.monotonic() < deadline, "the watcher never polled"
            time.sleep(0.02)
        m0 = world.people["m0"].member
        previous, new_cert = world.disaster()
        # The member opens the recovered service without the agent (the agent does not trust it yet).
        proposal = sign(m0, "proposal", {"actions": transition(previous, new_cert)})
        created = post_cose(world.sandbox, "/gov/members/proposals:create", proposal)
        pid = created["proposalId"]
        ballot = sign(m0, "ballot", {"ballot": YES}, proposal_id=pid)
        post_cose(world.sandbox, f"/gov/members/proposals/{pid}/ballots/{m0.member_id}:submit", ballot)
        world.sandbox.wait_for_status("WaitingForRecoveryShares")
        world.collect_shares()

        time.sleep(1.0)
        assert world.recover_posts() == []
        (watcher,) = world.client.call("GET", "/v1/recovery").json()["watchers"]
        assert watcher["state"] == "untrusted", watcher
        assert "pinned service certificate" in watcher["last_error"]
        with pytest.raises(AgentRequestError) as refused:
            world.client.call("POST", "/v1/services/default/recovery/m0/share")
        assert refused.value.code == "CCFTrustError"
        assert world.recover_posts() == []

        # Opt in to the proposal rule: the accepted transition names the pinned identity as previous, but the member
        # voted it outside the agent, so the agent has only the endpoint's word: provisional trust, no share.
        world.config.write_text(
            world.config.read_text().replace(
                "[services.default]\n", "[services.default]\naccept_transition_to = true\n"
            )
        )
        assert world.agent is not None
        world.agent.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 30
        while True:
            (watcher,) = world.client.call("GET", "/v1/recovery").json()["watchers"]
            if "provisionally" in (watcher["last_error"] or "") or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert watcher["state"] == "untrusted", watcher
        assert pid in watcher["last_error"]
        assert world.recover_posts() == []
        adopted = [r for r in audit_records(world) if r["event"] == "identity_adopted"]
        assert [(r["service"], r["proposal_id"], r["trust"]) for r in adopted] == [("default", pid, "provisional")]
        assert adopted[0]["peer"]["uid"] == os.getuid()  # the watcher's work: the agent's own caller and request id
        assert adopted[0]["request_id"]
        saved = json.loads((world.folder / "state" / "recovery-default.json").read_text())
        assert saved["adopted_identity"]["certificate"] == new_cert
        assert saved["adopted_identity"]["proposal_id"] == pid
        assert "approved_identity" not in saved

        # The operator lists the identity (after comparing its fingerprint out of band): the share goes.
        (world.folder / "recovered.pem").write_text(new_cert)
        world.config.write_text(
            world.config.read_text().replace('["unrelated.pem"]', '["unrelated.pem", "recovered.pem"]')
        )
        world.agent.proc.send_signal(signal.SIGHUP)
        (post,) = world.wait_for_recover_posts(1, timeout=30)
        assert post["status"] == 200
        world.sandbox.wait_for_status("Open")

        # The provisional adoption survives a restart (reads keep working without the list), still without shares.
        world.config.write_text(
            world.config.read_text().replace('["unrelated.pem", "recovered.pem"]', '["unrelated.pem"]')
        )
        world.stop()
        world.start()
        status = world.client.call("GET", "/v1/services/default/status").json()
        assert status["status"] == "Open"
        assert status["certificate"] == new_cert
        restored = [r for r in audit_records(world) if r["event"] == "identity_adopted"][-1]
        assert restored["trust"] == "provisional"
        assert restored["restored_from"] == str(world.folder / "state" / "recovery-default.json")
        assert "request_id" not in restored  # start-up work: no request asked for it
        world.stop()
        assert_no_leak(world.shares, world.folder)
