"""What the agent reads of a service before it signs a proposal to it: the ``ServiceFacts`` its checks need.

``signing_agent.proposals`` says what a proposal needs (``needs``) and judges it against the facts
(``check_proposal``); this module reads them, over the connection the proposal itself would go through (pinned TLS,
trusted for proposals), so the identity it reports is one the agent already trusts or is refused as untrusted.
An answer that cannot be read is a ``CCFError``: a proposal that cannot be checked is not signed.
"""

from __future__ import annotations

import dataclasses
from typing import TypeVar

from signing_agent.ccf.api import Answer, GovernanceAPI, PreviousIdentity
from signing_agent.certs import certificate_der
from signing_agent.errors import CCFError
from signing_agent.proposals import MemberFact, Needs, ServiceFacts

T = TypeVar("T")


def _read(service: str, answer: Answer[T]) -> T:
    if answer.value is None:
        code = f" {answer.error_code}" if answer.error_code else ""
        raise CCFError(
            f"service {service!r} answered {answer.status}{code} to {answer.request or 'a read'}: the proposal cannot "
            "be checked against the service's state; nothing was signed"
        )
    return answer.value


async def read_facts(api: GovernanceAPI, service: str, needs: Needs) -> ServiceFacts:
    """The facts ``needs`` asks for, as ``service`` (reached through ``api``) reports them."""
    facts = ServiceFacts(service=service)
    if Needs.INFO in needs:
        info = _read(service, await api.service_info())
        trusted = {der for der in (certificate_der(pem) for pem in api.trusted_pems) if der is not None}
        identity_der = certificate_der(info.certificate) if info.certificate is not None else None
        facts = dataclasses.replace(
            facts,
            status=info.status,
            identity=info.certificate,
            identity_trusted=identity_der is not None and identity_der in trusted,
            recovery_threshold=info.recovery_threshold,
            max_node_validity_days=info.max_node_validity_days,
        )
    if Needs.PREVIOUS_IDENTITY in needs:
        previous = PreviousIdentity.of(await api.previous_service_identity())
        facts = dataclasses.replace(
            facts, recovered_from=previous.pem if previous else None, recovered_from_known=previous is not None
        )
    if Needs.MEMBERS in needs:
        members = _read(service, await api.members())
        facts = dataclasses.replace(
            facts,
            members=tuple(
                MemberFact(m.member_id, m.status, m.encryption_key is not None, m.recovery_role) for m in members
            ),
        )
    return facts
