"""Trust after a disaster recovery: which identity of a CCF service the agent talks to, for what.

A recovered CCF service comes back with a new service identity (see the README's "Recovery" section). A share is
fetched, decrypted and submitted only over TLS pinned to an identity the operator decided: the pinned certificate,
``accepted_service_certificates``, or (``accept_transition_to = true``) a new identity a member approved through this
agent: its fingerprint, announced out of band, and this agent's own accepting ballot on the
``transition_service_to_open`` proposal that names it (``ServiceTrust.approve_identity``). An identity the rule adopts
on the endpoint's word alone (``ServiceTrust.adopt_by_proposal``) is trusted provisionally: reads and ballots, never a
share. The state file (``recovery.store``) keeps that trust across restarts; ``ServiceTrust.restore`` puts it back.

Must not import aiohttp or the API.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from signing_agent.audit import Auditor, IdentityAdopted, IdentityApproved, RecoveryStateRefused, Subject
from signing_agent.ccf.api import Answer, GovernanceAPI, ServiceInfo
from signing_agent.certs import certificate_der, der_sha256, single_certificate_pem
from signing_agent.config import ServiceConfig
from signing_agent.context import current_request, request_or_none
from signing_agent.cose.governance import check_proposal_id
from signing_agent.errors import (
    AgentError,
    CCFError,
    CCFTrustError,
    CCFUnavailableError,
    ConfigError,
    ConflictError,
    InvalidRequestError,
)
from signing_agent.governance import Governance, Relay
from signing_agent.policy import ACCEPT_BALLOT, Action
from signing_agent.recovery.store import ADOPTED, APPROVED, RecoveryStateStore
from signing_agent.signer import Signer

_logger = logging.getLogger("signing_agent.recovery")

T = TypeVar("T")

MAX_PROPOSALS_EXAMINED = 256
"""Open or Accepted proposals whose actions adoption reads, at most, per attempt (Open ones first): a service keeps
every accepted proposal of its life, a hostile endpoint may list any number, and each costs a request."""


def fingerprint(pem: bytes) -> str:
    """A certificate's SHA-256 fingerprint (of its DER), as the agent prints and keeps it."""
    der = certificate_der(pem)
    return der_sha256(der if der is not None else pem)


async def _transition_from(
    client: GovernanceAPI, proposal_id: str, previous: set[bytes], next_der: bytes
) -> bytes | None:
    """The ``previous_service_identity`` (DER) of a ``transition_service_to_open`` action in the proposal that comes
    from one of ``previous`` and goes to ``next_der``, as the service reports the proposal's actions; else None.
    Certificates are compared as DER, so PEM line breaks and headers do not matter."""
    got = await client.proposal_actions(proposal_id, max_attempts=1)
    for transition in got.value.transitions() if got.value is not None else ():
        prev_der = certificate_der(transition.previous)
        if prev_der is not None and prev_der in previous and certificate_der(transition.next) == next_der:
            return prev_der
    return None


def _fingerprint_argument(text: str) -> str:
    """A certificate's SHA-256 fingerprint as a member types it (hex, any case, colons allowed), normalised."""
    value = text.strip().replace(":", "").lower()
    if not re.fullmatch(r"[0-9a-f]{64}", value):
        raise InvalidRequestError(
            "sha256: expected the SHA-256 fingerprint of the new service certificate (64 hex digits, colons allowed)",
            hint="openssl x509 -in service_cert.pem -noout -fingerprint -sha256",
        )
    return value


def _identity_record(configured: bytes, candidate: bytes, previous: bytes, proposal_id: str) -> dict[str, Any]:
    """What the state file keeps of a service identity adopted or approved after a recovery. ``configured_sha256``
    (of ``configured``, the configured service certificate) lets a later change of ``service_certificate`` in the
    configuration discard it."""
    return {
        "certificate": candidate.decode("ascii"),
        "sha256": fingerprint(candidate),
        "previous_sha256": der_sha256(previous),
        "configured_sha256": fingerprint(configured),
        "proposal_id": proposal_id,
    }


class ServiceTrust:
    """The trust rules for the CCF services of one configuration generation: restore, adopt, approve, and the two
    ways to read from a service (``read``: a provisional identity will do; ``share_read``: only one decided for
    shares)."""

    def __init__(self, signer: Signer, governance: Governance, state_dir: Path, *, auditor: Auditor) -> None:
        self.signer = signer
        self.governance = governance
        self.state_dir = state_dir
        self.auditor = auditor
        self._adopt_lock = asyncio.Lock()
        self._provisional_proposal: dict[str, str] = {}
        self._applied: dict[tuple[str, str], dict[str, Any]] = {}
        """The state file records this generation put to use, by service and key (``APPROVED``, ``ADOPTED``)."""

    def store(self, service: str) -> RecoveryStateStore:
        """The state file of the CCF service ``service``."""
        return RecoveryStateStore.for_path(self.state_dir / f"recovery-{service}.json")

    def _service(self, service: str) -> ServiceConfig:
        return self.governance.ccf.config(service)

    async def restore(self) -> None:
        """Restore the trust kept in the state files (unless the configured certificate changed since): an identity
        approved after an earlier recovery is pinned, one adopted provisionally is trusted for reads and ballots.
        Each restored identity is audited. A state file the agent cannot trust is refused: logged, audited
        (``recovery_state_refused``), nothing restored from it, and recovery for that service stops (its watchers
        and submissions fail with the reason) until an operator moves the file aside."""
        for name in self.governance.services:
            store = self.store(name)
            try:
                await self._restore_service(name, store, changed_only=False)
            except ConfigError as exc:
                _logger.error("service %s: recovery state refused, nothing restored from it: %s", name, exc.message)  # noqa: TRY400
                await self.auditor.record(
                    RecoveryStateRefused(subject=Subject(service=name), path=str(store.path), reason=exc.message)
                )

    async def catch_up(self) -> None:
        """Put to use what an older generation wrote to the state files after this one restored them: an approval
        (or adoption) made by a request that was still running in the generation a reload replaced would otherwise
        stay in the state file and the audit log only, not in the configuration that serves. The daemon calls this
        once the old generation has closed, so no request of it can write after."""
        for name in self.governance.services:
            try:
                await self._restore_service(name, self.store(name), changed_only=True)
            except ConfigError as exc:
                _logger.error("service %s: recovery state refused: %s", name, exc.message)  # noqa: TRY400

    async def _restore_service(self, name: str, store: RecoveryStateStore, *, changed_only: bool) -> None:
        """The trust in ``name``'s state file put to use (``changed_only``: what differs from what this generation
        put to use); ``ConfigError`` for a state file the agent cannot trust."""
        data = await store.load()
        configured: str | None = None
        for key, trust in ((APPROVED, "approved"), (ADOPTED, "provisional")):
            record = data.get(key)
            if not isinstance(record, dict) or (changed_only and record == self._applied.get((name, key))):
                continue
            text = record.get("certificate")
            # Exactly one certificate: a bundle (kept by a version that took one from an endpoint) would trust
            # more than the fingerprint that was checked.
            pem = single_certificate_pem(text.encode()) if isinstance(text, str) else None
            if pem is None:
                if isinstance(text, str):
                    _logger.warning("service %s: the recovery state's %s is not one certificate; not restored",
                                    name, key)  # fmt: skip
                continue
            configured = configured or fingerprint(await self.governance.ccf.configured_identity(name))
            if record.get("configured_sha256") != configured:
                _logger.warning(
                    "service %s: the configured service_certificate changed since identity %s was adopted; "
                    "using the configured one",
                    name,
                    fingerprint(pem)[:16],
                )
                continue
            await self._trust(name, pem, trust, record, restored_from=store.path)

    async def _trust(
        self, service: str, pem: bytes, trust: str, record: Mapping[str, Any], *, restored_from: Path | None = None
    ) -> None:
        """Put an identity to use (pinned when approved, else provisional) and audit it as ``identity_adopted``."""
        proposal_id = record.get("proposal_id")
        previous = record.get("previous_sha256")
        adopted = IdentityAdopted(
            subject=Subject(service=service, proposal_id=proposal_id if isinstance(proposal_id, str) else None),
            certificate_sha256=fingerprint(pem),
            previous_sha256=previous if isinstance(previous, str) else None,
            trust=trust,
            restored_from=str(restored_from) if restored_from is not None else None,
            request=request_or_none(),
        )
        await self.auditor.record(adopted)
        self._applied[(service, APPROVED if trust == "approved" else ADOPTED)] = dict(record)
        if trust == "approved":
            self.governance.ccf.pin(service, pem)
            self.governance.ccf.trust_provisionally(service, None)
        else:
            self.governance.ccf.trust_provisionally(service, pem)
            self._provisional_proposal[service] = str(proposal_id)
        _logger.warning(
            "service %s: %s service identity %s (%s, proposal %s)%s",
            service,
            "pinning the approved" if trust == "approved" else "trusting for reads and ballots only the",
            adopted.certificate_sha256[:16],
            "restored from the recovery state" if restored_from is not None else "adopted now",
            proposal_id,
            ""
            if trust == "approved"
            else "; no recovery share goes to it until a member approves it through this agent "
            "(signing-agent recovery approve-identity)",
        )

    async def _decided(self, service: str) -> tuple[GovernanceAPI, set[bytes]]:
        """The client trusted for everything (shares included) and its identities as DER: the pinned one (configured,
        or approved after a recovery) and ``accepted_service_certificates``. Never a provisional identity."""
        client = await self.governance.ccf.client(service)
        return client, {d for d in (certificate_der(p) for p in client.trusted_pems) if d is not None}

    async def read(self, service: str, read: Callable[[GovernanceAPI], Awaitable[Answer[T]]]) -> Answer[T]:
        """A read that may go to a provisional identity; on a trust failure, the proposal rule may adopt one, once."""
        try:
            return await read(await self.governance.ccf.client(service, provisional=True))
        except CCFTrustError:
            if not self._service(service).accept_transition_to or not await self.adopt_by_proposal(service):
                raise
        return await read(await self.governance.ccf.client(service, provisional=True))

    async def share_read(self, service: str, read: Callable[[GovernanceAPI], Awaitable[Answer[T]]]) -> Answer[T]:
        """A read on the way to a share: only from an identity trusted for shares (never a provisional one)."""
        client, _ = await self._decided(service)
        try:
            return await read(client)
        except CCFTrustError as exc:
            raise await self._untrusted_for_shares(service, exc) from None

    async def service_info(self, service: str, *, for_share: bool = False) -> ServiceInfo:
        """The service's info through the trust guard (``for_share``: the share guard); a non-200 answer is a
        ``CCFError``."""
        read = self.share_read if for_share else self.read
        info = await read(service, lambda api: api.service_info())
        if info.value is None:
            raise CCFError(f"service {service!r}: {info.request} answered {info.status}")
        if for_share:
            await self._reports_a_trusted_identity(service, info.value)
        return info.value

    async def _reports_a_trusted_identity(self, service: str, info: ServiceInfo) -> None:
        """On the way to a share, the identity the service reports for itself must be one trusted for shares too, not
        only the one its connection presented: a connection made before a recovery (its handshake against the old
        identity) must not carry a share to the recovered service. A service that reports none is judged by its TLS
        identity alone."""
        if info.certificate is None:
            return
        reported = certificate_der(info.certificate)
        _, trusted = await self._decided(service)
        if reported is None or reported not in trusted:
            shown = fingerprint(info.certificate.encode())[:16] if reported is not None else "(not a certificate)"
            raise CCFTrustError(
                f"service {service!r} reports the service identity {shown} in its service info, which is not an "
                "identity trusted for recovery shares: no share was decrypted or sent",
                hint="after a recovery, a member approves the new identity (signing-agent recovery approve-identity) "
                "or lists it in accepted_service_certificates and reloads",
            )

    async def _untrusted_for_shares(self, service: str, exc: CCFTrustError) -> CCFTrustError:
        """The error for a share refused because the service's identity is not trusted for shares; under the
        proposal rule, first try to adopt it provisionally, so that the members can vote the transition through
        the agent (the error says how)."""
        adoption: AgentError | None = None
        if self._service(service).accept_transition_to and self.governance.ccf.provisional_identity(service) is None:
            try:
                await self.adopt_by_proposal(service)
            except AgentError as failed:
                adoption = failed
        provisional = self.governance.ccf.provisional_identity(service)
        if provisional is None:
            if adoption is None:
                return exc
            return CCFTrustError(
                f"{exc.message}; the identity the endpoint claims could not be adopted either: {adoption.message}",
                hint=exc.hint,
            )
        proposal_id = self._provisional_proposal.get(service, "?")
        return CCFTrustError(
            f"service {service!r} did not present an identity trusted for recovery shares (the pinned one or "
            f"accepted_service_certificates); its identity {fingerprint(provisional)[:16]} is trusted "
            f"provisionally only, after transition_service_to_open proposal {proposal_id}: no share was decrypted "
            "or sent",
            hint="a member who has the new service certificate's fingerprint from out of band approves it through this "
            f"agent (signing-agent recovery approve-identity {proposal_id} --sha256 <fingerprint>), which votes "
            "accept on that proposal; or list the certificate in accepted_service_certificates and reload",
        )

    async def adopt_by_proposal(self, service: str) -> bool:
        """The ``accept_transition_to`` rule, step one: trust a new service identity *provisionally* (reads and
        ballots, so that members can review and vote the transition through the agent; never a recovery share).
        True when one was adopted.

        1. Read the identity the endpoint claims (``/node/network``, over TLS that verifies nothing; nothing but
           that GET is sent).
        2. Connect again with TLS pinned to that claim alone: the endpoint must present a node certificate endorsed
           by it, and ``/gov/service/info`` must report the same certificate.
        3. Over that connection, an Open or Accepted ``transition_service_to_open`` proposal must name an identity
           trusted for shares (pinned or listed) as ``previous_service_identity`` and the claimed one as
           ``next_service_identity`` (certificates compared as DER).

        Every one of those is the endpoint's word: a network attacker can serve all three (its own identity, a
        fabricated proposal list). That keeps reads and ballots from an unrelated service, and is why it earns no
        share: step two, ``approve_identity``, needs the member's fingerprint and this agent's own accepting ballot.
        """
        async with self._adopt_lock:
            return await self._adopt_locked(service)

    async def _adopt_locked(self, service: str) -> bool:
        ccf = self.governance.ccf
        _, decided = await self._decided(service)
        candidate = await ccf.presented_identity(service)
        candidate_der = certificate_der(candidate)
        if candidate_der is None:
            raise CCFTrustError(f"service {service!r} claims a service certificate that is not a certificate")
        provisional = ccf.provisional_identity(service)
        if candidate_der in decided or (provisional is not None and certificate_der(provisional) == candidate_der):
            return False  # already trusted: the TLS failure was something else
        async with ccf.probe(service, candidate) as probe:
            info = await probe.service_info(max_attempts=1)
            reported = info.value.certificate if info.value is not None else None
            if reported is None or certificate_der(reported) != candidate_der:
                _logger.warning("service %s: its service info does not report the identity it presents", service)
                return False
            found = await self._transition_proposal(probe, decided, candidate_der)
        if found is None:
            _logger.warning(
                "service %s presents identity %s, which no Open or Accepted transition_service_to_open proposal "
                "names after an identity trusted for shares: not trusted",
                service,
                fingerprint(candidate)[:16],
            )
            return False
        proposal_id, previous = found
        record = _identity_record(await ccf.configured_identity(service), candidate, previous, proposal_id)
        record.update(adopted_at=int(time.time()), trust="provisional")

        def change(data: dict[str, Any]) -> None:
            data[ADOPTED] = record

        await self.store(service).update(change)
        await self._trust(service, candidate, "provisional", record)
        return True

    @staticmethod
    async def _transition_proposal(
        probe: GovernanceAPI, decided: set[bytes], candidate_der: bytes
    ) -> tuple[str, bytes] | None:
        """The first Open or Accepted proposal that transitions from ``decided`` to the candidate, with the previous
        identity it names (DER): the Open ones first, and at most ``MAX_PROPOSALS_EXAMINED`` of them (each costs a
        request for its actions: an endpoint listing a hundred thousand must not cost as many)."""
        listed = await probe.proposals(max_attempts=1)
        candidates = [
            (proposal.state != "Open", pid)
            for proposal in listed.value or ()
            if (pid := proposal.proposal_id) is not None and proposal.state in ("Open", "Accepted")
        ]
        candidates.sort(key=lambda candidate: candidate[0])  # Open first; stable: the service's order within each
        if len(candidates) > MAX_PROPOSALS_EXAMINED:
            _logger.warning(
                "the service lists %d Open or Accepted proposals; looking for a transition_service_to_open in the "
                "first %d only (list the new identity in accepted_service_certificates instead)",
                len(candidates),
                MAX_PROPOSALS_EXAMINED,
            )
        for _, pid in candidates[:MAX_PROPOSALS_EXAMINED]:
            previous = await _transition_from(probe, pid, decided, candidate_der)
            if previous is not None:
                return pid, previous
        return None

    async def approve_identity(
        self,
        service: str,
        identity: str,
        proposal_id: str,
        sha256: str,
    ) -> Relay:
        """The ``accept_transition_to`` rule, step two: ``identity`` votes accept on the ``transition_service_to_open``
        proposal ``proposal_id``, and that approves the new service identity it names for recovery shares.

        ``sha256`` is the member's own evidence: the fingerprint (SHA-256 of the DER) of the new service certificate,
        announced out of band. Before anything is signed, it must be the fingerprint of the provisionally trusted
        identity (adopted now if need be), and the proposal's actions must hold a ``transition_service_to_open`` from
        an identity trusted for shares to it; else a ``ConflictError`` and no ballot. Then the canonical accepting
        ballot is signed and forwarded like any ballot (the policy decides), and only when the service takes it is
        the identity approved: audited (``identity_approved``) and written to the state file, then pinned. Only the
        member's fingerprint binds the approval to what the member checked: the endpoint may show a proposal one way
        to the member and another to the agent, so a plain accepting ballot approves nothing.
        """
        cfg = self._service(service)
        check_proposal_id(proposal_id)
        wanted = _fingerprint_argument(sha256)
        member_id = self.signer.identity(identity).member_id
        if not cfg.accept_transition_to:
            raise InvalidRequestError(
                f"service {service!r} does not use the proposal rule (accept_transition_to = false): there is no "
                "identity to approve; no ballot was signed",
                hint="list the new service certificate in accepted_service_certificates and reload",
            )
        # A caller who may not cast this ballot gets nothing done for it: no adoption, no state file, no reads.
        await self.signer.precheck(Action.approving_transition(identity, service, proposal_id))
        async with self._adopt_lock:
            if self.governance.ccf.provisional_identity(service) is None:
                with contextlib.suppress(CCFTrustError, CCFUnavailableError):
                    await self._adopt_locked(service)
            candidate = self.governance.ccf.provisional_identity(service)
            _, decided = await self._decided(service)
            if candidate is None:
                if wanted in {der_sha256(d) for d in decided}:
                    raise ConflictError(
                        f"service identity {wanted[:16]} is already trusted for recovery shares on service "
                        f"{service!r}: nothing to approve; no ballot was signed"
                    )
                raise ConflictError(
                    f"service {service!r} presents no new identity that an Open or Accepted "
                    "transition_service_to_open proposal names after an identity trusted for shares: nothing to "
                    "approve; no ballot was signed"
                )
            presented = fingerprint(candidate)
            if presented != wanted:
                # Prefixes only: the member must take the fingerprint from the announcement, never from the endpoint.
                raise ConflictError(
                    f"service {service!r} presents identity {presented[:16]}..., not {wanted[:16]}...: no ballot was "
                    "signed",
                    hint="the endpoint is not the recovered service that was announced: do not vote; investigate",
                )
            client = await self.governance.ccf.client(service, provisional=True)
            previous = await _transition_from(client, proposal_id, decided, certificate_der(candidate) or b"")
            if previous is None:
                raise ConflictError(
                    f"proposal {proposal_id} is not a transition_service_to_open from an identity trusted for shares "
                    f"to {wanted[:16]}: no ballot was signed"
                )
            relay = await self.governance.vote(service, identity, proposal_id, ACCEPT_BALLOT)
            if not 200 <= relay.status < 300:
                return relay  # CCF refused the ballot: nothing is approved
            record = _identity_record(await self.governance.ccf.configured_identity(service), candidate, previous,
                                      proposal_id)  # fmt: skip
            record.update(identity=identity, member_id=member_id, ballot_transaction_id=relay.transaction_id,
                          approved_at=int(time.time()))  # fmt: skip
            try:
                await self._approve(service, candidate, record)
            except AgentError as exc:
                raise type(exc)(
                    f"the ballot was forwarded (CCF answered {relay.status}), but approving service identity "
                    f"{wanted[:16]} for recovery shares failed: {exc.message}",
                    hint="no recovery share goes to that identity; fix the cause and approve again, or list the "
                    "identity in accepted_service_certificates and reload",
                ) from None
        ballot = relay.body  # CCF's answer to the ballot as a JSON object, or None (``Relay.of``)
        return Relay(
            status=200,
            body={"service": service, "certificate_sha256": wanted, "previous_sha256": record["previous_sha256"],
                  "proposal_id": proposal_id, "identity": identity, "approved": True, "ballot": ballot},
            transaction_id=relay.transaction_id,
        )  # fmt: skip

    async def _approve(self, service: str, candidate: bytes, record: dict[str, Any]) -> None:
        """Audit, then keep, then pin: the approval is durable before any share can go to the identity."""
        await self.auditor.record(
            IdentityApproved(
                request=current_request(),
                subject=Subject(
                    identity=record["identity"],
                    member_id=record["member_id"],
                    proposal_id=record["proposal_id"],
                    service=service,
                ),
                certificate_sha256=record["sha256"],
                previous_sha256=record["previous_sha256"],
                ballot_transaction_id=record["ballot_transaction_id"],
            )
        )

        def change(data: dict[str, Any]) -> None:
            data[APPROVED] = record
            data.pop(ADOPTED, None)

        await self.store(service).update(change)
        self.governance.ccf.pin(service, candidate)
        self.governance.ccf.trust_provisionally(service, None)
        self._provisional_proposal.pop(service, None)
        self._applied[(service, APPROVED)] = dict(record)
        self._applied.pop((service, ADOPTED), None)
        _logger.warning(
            "service %s: the new service identity %s (was %s) is approved for recovery shares by %s's accepting "
            "ballot on proposal %s",
            service,
            record["sha256"][:16],
            record["previous_sha256"][:16],
            record["identity"],
            record["proposal_id"],
        )
