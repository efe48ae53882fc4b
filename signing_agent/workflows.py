"""The consortium's workflows, each one call: add and remove members, trust and retire nodes, open the service,
accept a recovery, refresh the recovery shares; and the reads a member needs for them.

Each workflow builds the exact proposal CCF's default constitution expects (``signing_agent.proposals``), refuses
what would do nothing (``ConflictError``, 409: a member that is already one, a node that is not Pending, a service
that is not waiting to be opened) and then goes the way of every proposal: ``Governance.propose``, where the
checks of ``proposals.check_proposal`` run against the service's state and the policy decides, before anything is
signed. A dry run (``dry_run``) builds and checks the same proposal and asks the policy (``Signer.explain``)
without signing or sending anything.

Service identities go into a ``transition_service_to_open`` as the PEM text the service reports (CCF compares the
text byte for byte): the agent's own files count only as the certificate they hold.

Uses the governance layer only (never the HTTP layer); the API's routes and the CLI are its callers.
"""

from __future__ import annotations

import datetime
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from signing_agent.ccf.api import GovernanceAPI, PreviousIdentity
from signing_agent.certs import certificate_der, der_sha256
from signing_agent.cose.governance import MsgType, compact_json
from signing_agent.errors import CCFError, ConflictError, InvalidRequestError
from signing_agent.governance import Governance, Relay
from signing_agent.proposals import (
    check_proposal,
    fingerprint,
    member_id_of,
    open_service,
    proposal,
    refresh_shares,
    remove_member,
    remove_node,
    set_member,
    trust_node,
    x509_time,
)
from signing_agent.signer import SignRequest


@dataclass(frozen=True, slots=True)
class IdentityReport:
    """``service identity``: what the endpoint presents, and whether the agent trusts it."""

    service: str
    certificate: str
    sha256: str
    trust: str
    """``pinned``, ``listed`` (``accepted_service_certificates``), ``provisional`` (adopted after a recovery, for
    reads and ballots only) or ``untrusted``."""
    pinned_sha256: str

    def as_dict(self) -> dict[str, Any]:
        return {
            "service": self.service,
            "certificate": self.certificate,
            "sha256": self.sha256,
            "trust": self.trust,
            "trusted": self.trust in ("pinned", "listed"),
            "pinned_sha256": self.pinned_sha256,
        }


class Workflows:
    """The workflows of one configuration generation, over its ``Governance``."""

    def __init__(self, governance: Governance, *, clock: Callable[[], float] = time.time) -> None:
        self.governance = governance
        self._clock = clock

    # -- reads ---

    async def _read_client(self, service: str) -> GovernanceAPI:
        """Reads may go to an identity trusted provisionally after a recovery, as the member's other reads do."""
        return await self.governance.ccf.client(service, provisional=True)

    async def members(self, service: str) -> Relay:
        """The service's members, each with ``identity``: the name of the agent's identity it is, or None."""
        got = await (await self._read_client(service)).members()
        if got.value is None:
            return Relay.of(got)
        ours = {ident.member_id: name for name, ident in self.governance.signer.identities.items()}
        listed = [{**m.fields, "identity": ours.get(m.member_id)} for m in got.value]
        return Relay(status=200, body={"value": listed}, transaction_id=got.transaction_id, from_ccf=True)

    async def nodes(self, service: str) -> Relay:
        got = await (await self._read_client(service)).nodes()
        if got.value is None:
            return Relay.of(got)
        body = {"value": [dict(n.fields) for n in got.value]}
        return Relay(status=200, body=body, transaction_id=got.transaction_id, from_ccf=True)

    async def service_identity(self, service: str) -> IdentityReport:
        """The identity the endpoint presents now (read over TLS that verifies nothing: nothing else is sent), its
        fingerprint, and how the agent trusts it."""
        ccf = self.governance.ccf
        presented = await ccf.presented_identity(service)
        der = certificate_der(presented)
        if der is None:
            raise CCFError(f"service {service!r} presents a service certificate that is not a certificate")
        pinned, *listed = (certificate_der(p) for p in (await ccf.client(service)).trusted_pems)
        provisional = ccf.provisional_identity(service)
        if der == pinned:
            trust = "pinned"
        elif der in listed:
            trust = "listed"
        elif provisional is not None and certificate_der(provisional) == der:
            trust = "provisional"
        else:
            trust = "untrusted"
        return IdentityReport(
            service=service,
            certificate=presented.decode("ascii"),
            sha256=der_sha256(der),
            trust=trust,
            pinned_sha256=der_sha256(pinned) if pinned is not None else "",
        )

    async def pending(self, service: str, identity: str) -> Relay:
        """The Open proposals ``identity`` has not voted on yet, each with its actions as proposed."""
        member_id = self.governance.signer.identity(identity).member_id
        client = await self._read_client(service)
        listed = await client.proposals()
        if listed.value is None:
            return Relay.of(listed)
        pending = []
        for p in listed.value:
            if p.state != "Open" or p.proposal_id is None:
                continue
            ballot = await client.ballot(p.proposal_id, member_id)
            if ballot.ok:
                continue
            actions = await client.proposal_actions(p.proposal_id)
            listed_actions = actions.value.listed() if actions.value is not None else None
            pending.append({**p.fields, "actions": listed_actions})
        body = {"identity": identity, "memberId": member_id, "value": pending}
        return Relay(status=200, body=body, transaction_id=listed.transaction_id, from_ccf=True)

    # -- proposals ---

    async def _propose(
        self, service: str, identity: str, built: dict[str, Any], *, dry_run: bool, **extra: Any
    ) -> Relay:
        """Submit ``built`` (or, ``dry_run``, check it and ask the policy): the answer is CCF's Proposal object
        with the proposal's ``actions`` (and ``extra``), or CCF's error unchanged."""
        payload = compact_json(built)
        gov = self.governance
        if dry_run:
            facts = await gov.proposal_facts(service, payload)
            request = SignRequest(
                identity=identity, msg_type=MsgType.PROPOSAL, payload=payload, service=service, service_facts=facts
            )
            gov.signer.check_proposal(request)
            explanation = await gov.signer.explain(request)
            body = {"dry_run": True, "service": service, "proposal": built, "explanation": explanation.as_dict()}
            return Relay(status=200, body={**body, **extra})
        relay = await gov.propose(service, identity, payload)
        if relay.status != 200 or not isinstance(relay.body, dict):
            return relay
        body = {**relay.body, "actions": built["actions"], **extra}
        return Relay(status=200, body=body, transaction_id=relay.transaction_id, from_ccf=True)

    def _known(self, identity: str) -> None:
        """An unknown identity is named before the service is asked anything."""
        self.governance.signer.identity(identity)

    def _static_check(self, built: dict[str, Any]) -> None:
        """The argument checks, before the service is asked anything."""
        check_proposal(compact_json(built), None)

    async def member_add(
        self,
        service: str,
        identity: str,
        *,
        cert: str,
        encryption_pub_key: str | None = None,
        member_data: Any = None,
        recovery_role: str | None = None,
        dry_run: bool = False,
    ) -> Relay:
        """``set_member``; refused when the certificate is already a member's (set_member would reset it to
        Accepted)."""
        self._known(identity)
        member = set_member(
            cert, encryption_pub_key=encryption_pub_key, member_data=member_data, recovery_role=recovery_role
        )
        built = proposal(member)
        self._static_check(built)
        member_id = member_id_of(cert)
        got = await (await self.governance.ccf.client(service)).member(member_id)
        if got.value is not None:
            raise ConflictError(
                f"{member_id} is already a member of service {service!r} ({got.value.status}): set_member would "
                "register it again as Accepted; nothing was signed"
            )
        if got.status != 404:
            return Relay.of(got)
        return await self._propose(service, identity, built, dry_run=dry_run, member_id=member_id)

    async def member_remove(
        self,
        service: str,
        identity: str,
        *,
        member_id: str | None = None,
        cert: str | None = None,
        dry_run: bool = False,
    ) -> Relay:
        """``remove_member`` by member id (or the member's certificate); refused when it is not a member."""
        self._known(identity)
        if (member_id is None) == (cert is None):
            raise InvalidRequestError("give member_id or cert (the member's certificate), not both")
        if cert is not None:
            member_id = member_id_of(cert)
        assert member_id is not None  # noqa: S101 -- one of the two is set
        built = proposal(remove_member(member_id))
        self._static_check(built)
        got = await (await self.governance.ccf.client(service)).member(member_id)
        if got.status == 404:
            raise ConflictError(
                f"{member_id} is not a member of service {service!r}: remove_member would do nothing; nothing was "
                "signed"
            )
        if got.value is None:
            return Relay.of(got)
        return await self._propose(service, identity, built, dry_run=dry_run, member_id=member_id)

    async def _node(self, service: str, node_id: str) -> tuple[str | None, Relay | None]:
        """The node's status (None: no such node), or CCF's answer when the list could not be read."""
        got = await (await self.governance.ccf.client(service)).nodes()
        if got.value is None:
            return None, Relay.of(got)
        return next((n.status or "" for n in got.value if n.node_id == node_id), None), None

    async def node_trust(
        self,
        service: str,
        identity: str,
        node_id: str,
        *,
        valid_from: str | None = None,
        validity_days: int | None = None,
        dry_run: bool = False,
    ) -> Relay:
        """``transition_node_to_trusted`` for a Pending node, valid from ``valid_from`` (default: now, in the form
        CCF's own tooling writes)."""
        self._known(identity)
        if valid_from is None:
            valid_from = x509_time(datetime.datetime.fromtimestamp(self._clock(), datetime.UTC))
        built = proposal(trust_node(node_id, valid_from, validity_days))
        self._static_check(built)
        status, failed = await self._node(service, node_id)
        if failed is not None:
            return failed
        if status is None:
            raise InvalidRequestError(
                f"node_id: service {service!r} has no node {node_id}: CCF would refuse the proposal when it is "
                f'accepted ("No such node: {node_id}"); nothing was signed',
                hint=f"signing-agent nodes --service {service}",
            )
        if status != "Pending":
            raise ConflictError(
                f"node {node_id} of service {service!r} is {status}, not Pending: transition_node_to_trusted would "
                "do nothing; nothing was signed"
            )
        return await self._propose(service, identity, built, dry_run=dry_run)

    async def node_retire(self, service: str, identity: str, node_id: str, *, dry_run: bool = False) -> Relay:
        """``remove_node``: a Pending node is removed, a Trusted one retired."""
        self._known(identity)
        built = proposal(remove_node(node_id))
        self._static_check(built)
        status, failed = await self._node(service, node_id)
        if failed is not None:
            return failed
        if status is None or status == "Retired":
            what = "has no such node" if status is None else f"has node {node_id} Retired already"
            raise ConflictError(f"service {service!r} {what}: remove_node would do nothing; nothing was signed")
        return await self._propose(service, identity, built, dry_run=dry_run)

    async def _status_and_identity(self, service: str) -> tuple[GovernanceAPI, str, str]:
        """The client for proposals, the service's status, and the identity (PEM text) it reports."""
        client = await self.governance.ccf.client(service)
        info = await client.service_info()
        if info.value is None or info.value.status is None or info.value.certificate is None:
            raise CCFError(
                f"service {service!r} answered {info.status} to {info.request or 'GET /gov/service/info'} without "
                "its status and identity; nothing was signed"
            )
        return client, info.value.status, info.value.certificate

    @staticmethod
    def _as_reported(given: str | None, reported: str, option: str) -> str:
        """The identity for a proposal: the service's text, for ``given`` when it is the same certificate."""
        if given is None:
            return reported
        der = certificate_der(given)
        if der is None:
            raise InvalidRequestError(f"{option}: not a PEM X.509 certificate")
        return reported if der == certificate_der(reported) else given

    async def service_open(self, service: str, identity: str, *, dry_run: bool = False) -> Relay:
        """``transition_service_to_open`` of a new service (``Opening``), to the identity it presents."""
        self._known(identity)
        _, status, presented = await self._status_and_identity(service)
        if status != "Opening":
            hint = "signing-agent recovery accept" if status == "Recovering" else None
            raise ConflictError(
                f"service {service!r} is {status}, not Opening: there is nothing to open; nothing was signed",
                hint=f"a recovered service is opened with {hint}" if hint else None,
            )
        built = proposal(open_service(presented))
        return await self._propose(
            service, identity, built, dry_run=dry_run, service_identity={"next_sha256": fingerprint(presented)}
        )

    async def recovery_accept(
        self,
        service: str,
        identity: str,
        *,
        previous: str | None = None,
        following: str | None = None,
        dry_run: bool = False,
    ) -> Relay:
        """``transition_service_to_open`` of a recovered service, from ``previous`` (default: the identity the agent
        pinned before the disaster) to ``following`` (default: the identity the service presents, which the agent
        must trust). Both go in as the text the service reports."""
        self._known(identity)
        client, status, presented = await self._status_and_identity(service)
        if status != "Recovering":
            raise ConflictError(
                f"service {service!r} is {status}, not Recovering: there is no recovery to accept; nothing was signed"
            )
        recovered_from = PreviousIdentity.of(await client.previous_service_identity())
        reported_previous = recovered_from.pem if recovered_from is not None else None
        if previous is None:
            previous = self._pinned_before(service, client, presented, reported_previous)
        elif reported_previous is not None:
            previous = self._as_reported(previous, reported_previous, "previous")
        following = self._as_reported(following, presented, "next")
        built = proposal(open_service(following, previous))
        identities = {"previous_sha256": fingerprint(previous), "next_sha256": fingerprint(following)}
        return await self._propose(service, identity, built, dry_run=dry_run, service_identity=identities)

    @staticmethod
    def _pinned_before(service: str, client: GovernanceAPI, presented: str, reported: str | None) -> str:
        """The identity the agent pinned before the disaster, as the text the service reports for it."""
        pinned = client.trusted_pems[0].decode("ascii")
        pinned_der = certificate_der(pinned)
        if pinned_der is None or pinned_der == certificate_der(presented):
            raise InvalidRequestError(
                f"service {service!r}: the agent pins the identity the service presents now, so it does not know the "
                "identity from before the disaster; give it (previous_service_identity, --previous FILE)"
            )
        if reported is None:
            return pinned
        if certificate_der(reported) != pinned_der:
            raise ConflictError(
                f"service {service!r} recovered from identity {fingerprint(reported) or '?'}, not from the one this "
                f"agent pinned ({der_sha256(pinned_der)}): it is not the service the agent knew; nothing was signed",
                hint="if that is expected, give the previous identity explicitly (--previous FILE)",
            )
        return reported

    async def refresh_shares(self, service: str, identity: str, *, dry_run: bool = False) -> Relay:
        """``trigger_recovery_shares_refresh`` (no ``args``): new shares for the active recovery members."""
        self._known(identity)
        return await self._propose(service, identity, proposal(refresh_shares()), dry_run=dry_run)
