"""Who gets a recovery share: attacks on the proposal rule and on the recovery state file, through the real daemon.

- A network attacker (a hostile TLS endpoint with an identity of its own, a fabricated Accepted
  ``transition_service_to_open`` chaining it to the pinned identity, and the real service's public encrypted share)
  never receives a ``:recover``: the proposal rule trusts such an identity provisionally, for reads and ballots only.
- The legitimate flow: after a disaster, a member approves the new identity through the agent (its fingerprint,
  announced out of band, and the agent's own accepting ballot on the transition), and then the watcher submits the
  share unattended.
- A recovery state file (or folder) that is not the agent's own is refused: it re-pins nothing, says so in the log
  and the audit log, and is left as it was.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import stat
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from signing_agent.client import AgentRequestError
from signing_agent.sandbox.identity import ServiceIdentity
from tests.e2e import test_recovery
from tests.e2e.test_recovery import World, assert_no_leak, audit_records, post_cose, share_forms, transition
from tests.support.forged_service import HostileCCF
from tests.support.prereq import missing
from tests.support.sandbox_client import NO, YES, sign

pytestmark = pytest.mark.e2e

setup = test_recovery.setup  # the fixture that builds a world (sandbox, members, keys, config)
Setup = test_recovery.Setup

NOBODY = 65534
WATCH = {"enabled": True, "poll_interval": 0.1, "max_backoff": 0.2, "state_dir": "state"}


def wait_until(what: str, check: Callable[[], bool], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def watcher(world: World) -> dict[str, Any]:
    (state,) = world.client.call("GET", "/v1/recovery").json()["watchers"]
    result: dict[str, Any] = state
    return result


def der_sha256(pem: str | bytes) -> str:
    cert = x509.load_pem_x509_certificate(pem.encode() if isinstance(pem, str) else pem)
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


# -- the network attacker ---


@contextlib.contextmanager
def attacked(setup: Setup) -> Iterator[tuple[World, HostileCCF]]:
    """A world whose agent uses the proposal rule and watches m0's share, configured with a hostile endpoint in place
    of the service (not started yet): its own identity, and the real service's public encrypted share of m0."""
    with setup.world(
        {"m0": "file"}, service={"recovery_identities": ["m0"], "accept_transition_to": True}, recovery=WATCH
    ) as world:
        m0 = world.people["m0"].member
        world.collect_shares()
        real_share = world.sandbox.gov_get(f"/gov/recovery/encrypted-shares/{m0.member_id}")
        with HostileCCF(world.sandbox.service_cert.read_text(), {m0.member_id: real_share}) as hostile:
            world.config.write_text(world.config.read_text().replace(world.sandbox.url, hostile.url))
            yield world, hostile


def test_a_network_attacker_with_a_fabricated_accepted_transition_never_gets_a_share(setup: Setup) -> None:
    with attacked(setup) as (world, hostile):
        m0 = world.people["m0"].member
        world.start()

        # The watcher finds the claimed identity, checks the fabricated proposal, and keeps polling.
        def polled_after_adoption() -> bool:
            paths = [r.path for r in hostile.requests()]
            actions = f"/gov/members/proposals/{hostile.proposal_id}/actions"
            return actions in paths and paths[paths.index(actions) :].count("/gov/service/info") >= 6

        wait_until("the watcher to poll the hostile endpoint after reading its proposal", polled_after_adoption)
        assert hostile.recover_posts() == []
        # (The watcher is "recovering" while it tries, then "untrusted" until its next poll.)
        wait_until("the watcher to say why", lambda: watcher(world)["state"] == "untrusted")
        assert "provisionally" in watcher(world)["last_error"]
        assert hostile.proposal_id in watcher(world)["last_error"]

        # On request, through the API and the CLI: refused before anything is decrypted or sent.
        with pytest.raises(AgentRequestError) as refused:
            world.client.call("POST", "/v1/services/default/recovery/m0/share")
        assert refused.value.code == "CCFTrustError"
        assert "provisionally" in refused.value.message
        cli = world.cli("recovery", "submit-share", "--identity", "m0")
        assert cli.returncode != 0
        assert "CCFTrustError" in cli.stderr, cli.stderr
        assert hostile.proposal_id in cli.stderr, cli.stderr

        # Provisional trust is for reads and ballots: the member can review the claim through the agent...
        review = world.client.call("GET", f"/v1/services/default/proposals/{hostile.proposal_id}").json()
        assert review["actions"][0]["args"]["next_service_identity"] == hostile.identity_pem
        # ...and ballots approve nothing. Not even the canonical accept: the agent cannot know what the member
        # reviewed, and the endpoint may show the member something harmless and the agent a transition (this
        # is what broke a rule that counted the agent's own accepting ballot as the approval).
        hostile.proposal_state = "Open"
        harmless = {"member_id": m0.member_id, "member_data": {"team": "blue"}}
        hostile.shown_actions = [{"name": "set_member_data", "args": harmless}]
        shown = world.cli("proposals", hostile.proposal_id)
        assert "set_member_data" in shown.stdout, shown.stderr
        assert "transition_service_to_open" not in shown.stdout
        hostile.shown_actions = None
        voted = world.cli("vote", hostile.proposal_id, "--accept", "--identity", "m0")
        assert voted.returncode == 0, voted.stderr
        for ballot in (NO, YES.replace("return true }", "return true; }")):
            world.client.call(
                "POST",
                f"/v1/services/default/proposals/{hostile.proposal_id}/ballots",
                {"identity": "m0", "ballot": ballot},
            )
        # Approval needs the fingerprint the member was given out of band: the real new identity's is not the
        # attacker's, so nothing is signed; a malformed one is refused too.
        announced = der_sha256(ServiceIdentity.generate().cert_pem)
        for fingerprint, says in ((announced, "no ballot was signed"), ("not-a-fingerprint", "64 hex digits")):
            refused_approval = world.cli("recovery", "approve-identity", hostile.proposal_id, "--sha256",
                                         fingerprint, "--identity", "m0")  # fmt: skip
            assert refused_approval.returncode != 0
            assert says in refused_approval.stderr, refused_approval.stderr
        ballots = [r for r in hostile.requests() if r.path.endswith(f"/ballots/{m0.member_id}:submit")]
        assert len(ballots) == 3
        count = len(hostile.requests())
        wait_until("more polls", lambda: len(hostile.requests()) >= count + 6)
        assert hostile.recover_posts() == []

        records = audit_records(world)
        assert not [r for r in records if r["event"] in ("share_submitted", "identity_approved")]
        (adopted,) = [r for r in records if r["event"] == "identity_adopted"]
        assert adopted["trust"] == "provisional"
        assert adopted["certificate_sha256"] == der_sha256(hostile.identity_pem)
        assert not [r for r in records if r["event"] == "share_failed" and r.get("error") != "CCFTrustError"]
        world.stop()
        for request in hostile.requests():
            for share in world.shares:
                for form in share_forms(share):
                    assert form not in request.body, f"a share reached the attacker in {request.path}"
        saved = json.loads((world.folder / "state" / "recovery-default.json").read_text())
        assert "approved_identity" not in saved
        assert_no_leak(world.shares, world.folder)


def test_an_identity_claimed_as_a_bundle_smuggles_no_trust_anchor_past_the_members_fingerprint(setup: Setup) -> None:
    """The endpoint claims, in ``/node/network``, the real recovered service's certificate followed by a CA of its
    own, and presents a node certificate that CA issued. Its service info and its transition proposal name the real
    certificate, and the member approves with the real fingerprint, announced out of band: everything the member
    checks is right. Trusting the whole claimed PEM (every certificate in it becomes a trust anchor, only the first
    is fingerprinted) would then pin the attacker's CA too, and the share would go to it. Only the one certificate
    the fingerprint names may ever be trusted: a bundle is no service identity, and nothing is adopted or approved."""
    with attacked(setup) as (world, hostile):
        recovered = ServiceIdentity.generate().cert_pem.decode()  # the real new identity (public), as announced
        hostile.reported_certificate = recovered
        hostile.transition_to = recovered
        hostile.network_certificate = recovered + hostile.identity_pem
        hostile.proposal_state = "Open"  # for the ballot that approves
        world.start()
        wait_until("the watcher to read the claim", lambda: len(hostile.requests()) >= 3)

        approval = world.cli("recovery", "approve-identity", hostile.proposal_id, "--sha256",
                             der_sha256(recovered), "--identity", "m0")  # fmt: skip
        assert approval.returncode != 0, approval.stdout
        assert "Conflict" in approval.stderr, approval.stderr
        assert "no ballot was signed" in approval.stderr
        with pytest.raises(AgentRequestError) as refused:
            world.client.call("POST", "/v1/services/default/recovery/m0/share")
        assert refused.value.code == "CCFTrustError"
        count = len(hostile.requests())
        wait_until("more polls", lambda: len(hostile.requests()) >= count + 6)
        assert hostile.recover_posts() == []
        assert not [r for r in hostile.requests() if r.method == "POST"]  # not even the ballot

        records = audit_records(world)
        assert not [r for r in records if r["event"] in ("identity_adopted", "identity_approved", "signed")]
        identity = world.client.request("GET", "/v1/services/default/identity")
        assert identity.status == 502, identity.json()  # the claim is no certificate the agent would show
        world.stop()
        for request in hostile.requests():
            for share in world.shares:
                for form in share_forms(share):
                    assert form not in request.body, f"a share reached the attacker in {request.path}"
        saved = world.folder / "state" / "recovery-default.json"
        assert not saved.exists() or "identity" not in json.loads(saved.read_text())


def test_an_approved_bundle_kept_in_the_state_file_is_not_restored(setup: Setup) -> None:
    """A state file written by a version that kept the claimed bundle as it came (the attack above, approved): the
    agent restores only one certificate as an identity, never a bundle, so the attacker's CA in it carries no share
    after the upgrade."""
    with setup.world({"m0": "file"}, service={"recovery_identities": ["m0"]}, recovery=WATCH) as world:
        m0 = world.people["m0"].member
        world.collect_shares()
        real_share = world.sandbox.gov_get(f"/gov/recovery/encrypted-shares/{m0.member_id}")
        pinned = world.sandbox.service_cert.read_text()
        recovered = ServiceIdentity.generate().cert_pem.decode()
        with HostileCCF(pinned, {m0.member_id: real_share}) as hostile:
            hostile.reported_certificate = recovered
            record = {"certificate": recovered + hostile.identity_pem, "sha256": der_sha256(recovered),
                      "previous_sha256": der_sha256(pinned), "configured_sha256": der_sha256(pinned),
                      "proposal_id": hostile.proposal_id, "identity": "m0", "member_id": m0.member_id,
                      "ballot_transaction_id": "2.99", "approved_at": 1}  # fmt: skip
            state = world.folder / "state"
            state.mkdir(mode=0o700)
            saved = state / "recovery-default.json"
            saved.write_text(json.dumps({"version": 1, "submissions": {}, "approved_identity": record}))
            saved.chmod(0o600)
            world.config.write_text(world.config.read_text().replace(world.sandbox.url, hostile.url))
            world.start()
            wait_until("a poll", lambda: watcher(world)["state"] in ("untrusted", "submitted"))
            assert hostile.recover_posts() == []
            assert watcher(world)["state"] == "untrusted"
            world.stop()
            assert not [r for r in audit_records(world) if r["event"] in ("identity_adopted", "signed")]
            assert "is not one certificate; not restored" in "".join(world.stderr_log)


def test_no_share_through_a_trusted_connection_to_a_service_that_reports_another_identity(setup: Setup) -> None:
    """The endpoint presents the pinned identity, but its service info names another (a connection whose handshake
    began before a recovery, still open to the recovered service): the reported identity must be trusted for shares
    too, so nothing is fetched, decrypted or sent."""
    with setup.world({"m0": "file"}, service={"recovery_identities": ["m0"]}) as world:
        m0 = world.people["m0"].member
        world.collect_shares()
        real_share = world.sandbox.gov_get(f"/gov/recovery/encrypted-shares/{m0.member_id}")
        reported = ServiceIdentity.generate().cert_pem.decode()
        with HostileCCF(world.sandbox.service_cert.read_text(), {m0.member_id: real_share}) as hostile:
            hostile.reported_certificate = reported
            # The connection's identity is the pinned one (the world's config pins its own copy of the certificate).
            (world.folder / "service_cert.pem").write_text(hostile.identity_pem)
            world.config.write_text(world.config.read_text().replace(world.sandbox.url, hostile.url))
            world.start()
            with pytest.raises(AgentRequestError) as refused:
                world.client.call("POST", "/v1/services/default/recovery/m0/share")
            assert refused.value.code == "CCFTrustError"
            assert f"reports the service identity {der_sha256(reported)[:16]}" in refused.value.message
            assert hostile.recover_posts() == []
            assert not [r for r in hostile.requests() if "/encrypted-shares/" in r.path]
            records = audit_records(world)
            assert not [r for r in records if r["event"] in ("signed", "share_submitted")]
            world.stop()  # before the endpoint goes: the agent closes its connection to it


def test_a_caller_the_policy_refuses_the_ballot_gets_no_adoption_from_approve_identity(setup: Setup) -> None:
    """approve-identity adopts the endpoint's claimed identity on its way to the ballot: only for a caller who may
    cast that ballot. Another gets 403 before the agent asks the endpoint anything or writes any trust."""
    with setup.world({"m0": "file"}, service={"recovery_identities": ["m0"], "accept_transition_to": True}) as world:
        m0 = world.people["m0"].member
        real_share = world.sandbox.gov_get(f"/gov/recovery/encrypted-shares/{m0.member_id}")
        pinned = world.sandbox.service_cert.read_text()
        with HostileCCF(pinned, {m0.member_id: real_share}) as hostile:
            config = world.config.read_text().replace(world.sandbox.url, hostile.url)
            rule = f'\n[[policy.rules]]\nname = "proposals-only"\nuids = [{os.getuid()}]\nmsg_types = ["proposal"]\n'
            world.config.write_text(config + rule)
            world.start()
            before = len(hostile.requests())
            refused = world.cli("recovery", "approve-identity", hostile.proposal_id, "--sha256",
                                der_sha256(hostile.identity_pem), "--identity", "m0")  # fmt: skip
            assert refused.returncode == 4, refused.stderr  # refused by policy
            assert "PolicyDenied" in refused.stderr
            assert "proposals-only" in refused.stderr
            assert hostile.requests()[before:] == []  # nothing asked of the endpoint: no probe, no adoption
            records = audit_records(world)
            assert not [r for r in records if r["event"] in ("identity_adopted", "identity_approved")]
            assert [r["msg_type"] for r in records if r["event"] == "denied"] == ["ballot"]
            assert (
                not (world.folder / "state" / "recovery-default.json").exists()
                or "adopted_identity" not in (world.folder / "state" / "recovery-default.json").read_text()
            )


# -- the legitimate flow ---


def test_after_a_disaster_a_member_votes_the_transition_through_the_agent_then_the_watcher_submits(
    setup: Setup,
) -> None:
    with setup.world(
        {"m0": "file", "m1": "file"},
        service={"recovery_identities": ["m0"], "accept_transition_to": True},
        recovery=WATCH,
    ) as world:
        world.start()
        threshold = world.pass_proposal(
            [{"name": "set_recovery_threshold", "args": {"recovery_threshold": 2}}], ["m0", "m1"]
        )["proposalId"]
        m0, m1 = world.people["m0"].member, world.people["m1"].member
        previous, new_cert = world.disaster()

        # The transition is proposed with the members' own tooling (the agent trusts the new identity for nothing
        # yet), and m1 votes there too.
        # (created_at now: not older than the proposal the agent made above, which CCF would refuse.)
        proposal = sign(m0, "proposal", {"actions": transition(previous, new_cert)}, created_at=int(time.time()))
        pid = post_cose(world.sandbox, "/gov/members/proposals:create", proposal)["proposalId"]
        post_cose(
            world.sandbox,
            f"/gov/members/proposals/{pid}/ballots/{m1.member_id}:submit",
            sign(m1, "ballot", {"ballot": YES}, proposal_id=pid),
        )

        # Within a poll, the watcher trusts the new identity provisionally: m0 can review the proposal through the
        # agent, but no share goes to it.
        def reviewable() -> bool:
            try:
                world.client.call("GET", f"/v1/services/default/proposals/{pid}")
            except AgentRequestError:
                return False
            return True

        wait_until("the provisional adoption", reviewable)
        with pytest.raises(AgentRequestError) as refused:
            world.client.call("POST", "/v1/services/default/recovery/m1/share")
        assert refused.value.code == "CCFTrustError"
        assert pid in refused.value.message
        assert world.recover_posts() == []

        # m0 approves the new identity through the agent, with the fingerprint announced out of band: a wrong one
        # is refused before anything is signed, the right one votes accept, and that ballot is the approval.
        approve = ["recovery", "approve-identity", pid, "--identity", "m0", "--sha256"]
        wrong = world.cli(*approve, der_sha256(ServiceIdentity.generate().cert_pem))
        assert wrong.returncode != 0
        assert "Conflict" in wrong.stderr, wrong.stderr
        assert "no ballot was signed" in wrong.stderr
        assert not [r for r in world.sandbox.requests(f"{pid}/ballots/{m0.member_id}") if r["method"] == "POST"]
        fingerprint = x509.load_pem_x509_certificate(new_cert.encode()).fingerprint(hashes.SHA256()).hex(":")
        not_a_transition = world.cli("recovery", "approve-identity", threshold, "--identity", "m0", "--sha256",
                                     fingerprint)  # fmt: skip
        assert "is not a transition_service_to_open" in not_a_transition.stderr, not_a_transition.stderr
        approval = world.cli(*approve, fingerprint.upper())  # as openssl prints it
        assert approval.returncode == 0, approval.stderr
        assert f"service identity {der_sha256(new_cert)} approved" in approval.stdout
        assert "Accepted" in approval.stdout
        world.sandbox.wait_for_status("WaitingForRecoveryShares")
        world.collect_shares()
        (post,) = world.wait_for_recover_posts(1, timeout=60)
        assert post["status"] == 200
        assert post["path"].split("/")[-1] == f"{m0.member_id}:recover"
        # The second share on request, through the same approved identity.
        done = world.client.call("POST", "/v1/services/default/recovery/m1/share").json()
        assert done["message"].endswith("End of recovery procedure initiated"), done
        world.sandbox.wait_for_status("Open")

        records = audit_records(world)
        events = [r["event"] for r in records if r["event"] in ("identity_adopted", "identity_approved")]
        assert events == ["identity_adopted", "identity_approved"]
        (adopted,) = [r for r in records if r["event"] == "identity_adopted"]
        assert (adopted["trust"], adopted["proposal_id"]) == ("provisional", pid)
        assert adopted["previous_sha256"] == der_sha256(previous)
        (approved,) = [r for r in records if r["event"] == "identity_approved"]
        assert approved["proposal_id"] == pid
        assert approved["identity"] == "m0"
        assert approved["certificate_sha256"] == der_sha256(new_cert)
        assert approved["previous_sha256"] == der_sha256(previous)
        ballot_seq = next(r["seq"] for r in records if r["event"] == "forwarded" and r.get("msg_type") == "ballot"
                          and r.get("proposal_id") == pid)  # fmt: skip
        shares = [r for r in records if r["event"] == "share_submitted"]
        assert [(r["identity"], r["unattended"]) for r in shares] == [("m0", True), ("m1", False)]
        assert ballot_seq < approved["seq"] < shares[0]["seq"]
        saved = json.loads((world.folder / "state" / "recovery-default.json").read_text())
        assert saved["approved_identity"]["certificate"] == new_cert
        assert saved["approved_identity"]["proposal_id"] == pid
        assert "adopted_identity" not in saved

        # The approval survives a restart: the recovered service is pinned, and nothing is submitted again.
        world.stop()
        world.start()
        status = world.client.call("GET", "/v1/services/default/status").json()
        assert (status["status"], status["certificate"]) == ("Open", new_cert)
        assert len(world.recover_posts()) == 2
        world.stop()
        assert_no_leak(world.shares, world.folder)


# -- the recovery state file ---


def _plant_other_owner(state: Path, planted: bytes) -> None:
    path = state / "recovery-default.json"
    path.write_bytes(planted)
    path.chmod(0o600)
    os.chown(path, NOBODY, NOBODY)


def _plant_0644(state: Path, planted: bytes) -> None:
    path = state / "recovery-default.json"
    path.write_bytes(planted)
    path.chmod(0o644)


def _plant_symlink(state: Path, planted: bytes) -> None:
    target = state.parent / "elsewhere.json"
    target.write_bytes(planted)
    target.chmod(0o600)
    (state / "recovery-default.json").symlink_to(target)


def _plant_in_a_group_writable_folder(state: Path, planted: bytes) -> None:
    path = state / "recovery-default.json"
    path.write_bytes(planted)
    path.chmod(0o600)
    state.chmod(0o770)


def _plant_in_a_folder_of_another_user(state: Path, planted: bytes) -> None:
    _plant_in_a_group_writable_folder(state, planted)
    state.chmod(0o700)
    os.chown(state, NOBODY, NOBODY)


def _plant_behind_a_symlinked_folder(state: Path, planted: bytes) -> None:
    real = state.parent / "real-state"
    real.mkdir(mode=0o700)
    (real / "recovery-default.json").write_bytes(planted)
    (real / "recovery-default.json").chmod(0o600)
    state.rmdir()
    state.symlink_to(real)


PLANTS = {
    "file owned by another uid": _plant_other_owner,
    "file of mode 0644": _plant_0644,
    "file that is a symlink": _plant_symlink,
    "group-writable folder": _plant_in_a_group_writable_folder,
    "folder owned by another uid": _plant_in_a_folder_of_another_user,
    "folder that is a symlink": _plant_behind_a_symlinked_folder,
}


def _snapshot(state: Path) -> list[tuple[str, bool, int, int, bytes]]:
    """What the planted files look like: name, symlink?, owner, mode, content."""
    found = []
    for path in [state, *sorted(state.parent.glob("*.json")), *sorted(state.glob("*")), *sorted(
            state.parent.glob("real-state/*"))]:  # fmt: skip
        st = path.lstat()
        content = path.read_bytes() if path.is_file() and not path.is_symlink() else b""
        found.append((str(path), path.is_symlink(), st.st_uid, stat.S_IMODE(st.st_mode), content))
    return found


@pytest.mark.parametrize("plant", PLANTS.values(), ids=PLANTS.keys())
def test_a_planted_state_file_re_pins_nothing(setup: Setup, plant: Callable[[Path, bytes], None]) -> None:
    if os.getuid() != 0:
        missing("chown to another uid needs root")
    attacker = ServiceIdentity.generate()
    with setup.world({"m0": "file"}, service={"recovery_identities": ["m0"], "accept_transition_to": True},
                     recovery=WATCH) as world:  # fmt: skip
        pinned = world.sandbox.service_cert.read_text()
        record = {
            "certificate": attacker.cert_pem.decode(),
            "sha256": der_sha256(attacker.cert_pem),
            "previous_sha256": der_sha256(pinned),
            "configured_sha256": der_sha256(pinned),
            "proposal_id": "ab" * 32,
            "adopted_at": 1,
        }
        planted = {"version": 1, "submissions": {}, "adopted_identity": record, "approved_identity": record}
        state = world.folder / "state"
        state.mkdir(mode=0o700)
        plant(state, json.dumps(planted).encode())
        before = _snapshot(state)
        world.start()
        # Still pinned to the configured identity: the real service answers through the agent.
        status = world.client.call("GET", "/v1/services/default/status").json()
        assert status["certificate"] == pinned
        wait_until("the watcher to report the refused state", lambda: watcher(world)["state"] == "failed")
        assert "refused" in watcher(world)["last_error"]
        with pytest.raises(AgentRequestError) as refused:
            world.client.call("POST", "/v1/services/default/recovery/m0/share")
        assert "refused" in refused.value.message
        world.stop()
        records = audit_records(world)
        (refusal,) = [r for r in records if r["event"] == "recovery_state_refused"]
        assert refusal["service"] == "default"
        assert "refused" in refusal["reason"]
        assert not [r for r in records if r["event"] in ("identity_adopted", "identity_approved")]
        assert "recovery state refused" in world.stderr_log[-1]
        assert world.recover_posts() == []
        assert _snapshot(state) == before, "the planted file was changed"
