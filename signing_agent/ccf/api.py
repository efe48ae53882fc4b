"""CCF's governance API (api-version 2024-07-01) as the agent uses it: its paths, the shapes of its answers, and the
``GovernanceAPI`` Protocol that the governance, recovery and health layers talk to.

This is the one module that knows CCF's paths and what CCF answers. Every answer is an ``Answer``: CCF's response
exactly as it came (a ``CCFResponse``: status, raw bytes, transaction id; relayed unchanged to the agent's API
clients), and, when CCF said yes with the expected shape, its typed ``value``, parsed once here (``ServiceInfo``,
``Member``, ``Proposal``, ``ProposalActions``, ``StateDigest``, ``EncryptedShare``...). A ``value`` of None means
CCF said no, or said something else than expected: callers never look inside a body themselves. See
../shared/ccf-governance.md §5 for the shapes.

``CCFGovernanceClient`` implements the Protocol over ``CCFClient`` (pinned TLS, retries, capped answers). A
``Connector`` makes clients and reads the identities a service is trusted by; ``HttpConnector`` is the real one,
used by ``ccf.connections.CCFConnections``, the one place clients are built. Unit tests put an in-memory fake behind
both Protocols (tests/support/fake_ccf.py).
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
import ssl
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

from signing_agent.ccf.client import (
    CCFClient,
    CCFResponse,
    _read_cert,
    configured_service_certificate,
    get_json,
    pem_bytes,
    short_text,
)
from signing_agent.certs import single_certificate_pem
from signing_agent.config import ServiceConfig
from signing_agent.errors import CCFError, CCFTimeoutError, CCFTrustError, CCFUnavailableError
from signing_agent.names import is_ccf_id

T = TypeVar("T")

TRANSITION_ACTION = "transition_service_to_open"


# --- paths --------------------------------------------------------------------------------------------------------


class Paths:
    """CCF's paths, as ``str.format`` templates (``?api-version`` is added by ``CCFClient`` to the ``/gov`` ones).
    The ids put in them are checked first: 64 lowercase hex."""

    SERVICE_INFO = "/gov/service/info"
    MEMBERS = "/gov/service/members"
    MEMBER = "/gov/service/members/{member_id}"
    NODES = "/gov/service/nodes"
    NODE = "/gov/service/nodes/{node_id}"
    PROPOSALS = "/gov/members/proposals"
    CREATE_PROPOSAL = "/gov/members/proposals:create"
    PROPOSAL = "/gov/members/proposals/{proposal_id}"
    PROPOSAL_ACTIONS = "/gov/members/proposals/{proposal_id}/actions"
    WITHDRAW = "/gov/members/proposals/{proposal_id}:withdraw"
    BALLOT = "/gov/members/proposals/{proposal_id}/ballots/{member_id}"
    SUBMIT_BALLOT = "/gov/members/proposals/{proposal_id}/ballots/{member_id}:submit"
    UPDATE_STATE_DIGEST = "/gov/members/state-digests/{member_id}:update"
    ACK_STATE_DIGEST = "/gov/members/state-digests/{member_id}:ack"
    ENCRYPTED_SHARE = "/gov/recovery/encrypted-shares/{member_id}"
    RECOVER = "/gov/recovery/members/{member_id}:recover"
    NODE_STATE = "/node/state"
    NODE_NETWORK = "/node/network"
    PREVIOUS_IDENTITY = "/node/service/previous_identity"


def _path(template: str, **ids: str) -> str:
    """``template`` with ``ids`` put in, each checked first: every id CCF puts in a path is 64 lowercase hex. An id
    that came in an answer (a member the service lists) is never sent as it is: ``..``, ``?`` or ``#`` in it would
    make the request another one."""
    for name, value in ids.items():
        if not is_ccf_id(value):
            raise CCFError(f"{name} {value[:80]!r} is not a CCF id (64 lowercase hex): nothing was sent")
    return template.format(**ids)


# --- answers ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Answer(CCFResponse, Generic[T]):
    """CCF's answer to one request, as it came (a ``CCFResponse``: relayed unchanged), and its typed ``value``: None
    unless CCF said yes (2xx) in the expected shape."""

    value: T | None = None

    @classmethod
    def parse(cls, response: CCFResponse, parse: Callable[[CCFResponse], T | None]) -> Answer[T]:
        """``response`` with its value parsed by ``parse`` when CCF said yes."""
        fields = {f.name: getattr(response, f.name) for f in dataclasses.fields(CCFResponse)}
        return cls(**fields, value=parse(response) if response.ok else None)


def _object(body: object) -> dict[str, Any] | None:
    return body if isinstance(body, dict) else None  # the same test as CCFResponse.json_object


def _text(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _word(value: object) -> str | None:
    """A short word (a state) as the agent may repeat it: ``client.short_text``."""
    return short_text(value) if isinstance(value, str) else None


def _count(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


# --- shapes -------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ServiceInfo:
    """``GET /gov/service/info``."""

    status: str | None
    """``Opening``, ``Open``, ``WaitingForRecoveryShares``, ``Recovering``."""
    certificate: str | None
    """The service identity (PEM)."""
    recovery_count: int | None
    creation_transaction_id: str | None
    fields: Mapping[str, Any]
    """The whole object as CCF sent it."""

    @classmethod
    def parse(cls, response: CCFResponse) -> ServiceInfo | None:
        body = _object(response.body)
        if body is None:
            return None
        return cls(
            status=_word(body.get("status")),
            certificate=_text(body.get("certificate")),
            recovery_count=_count(body.get("recoveryCount")),
            creation_transaction_id=_text(body.get("creationTransactionId")),
            fields=body,
        )

    def _configuration(self, key: str) -> int | None:
        configuration = _object(self.fields.get("configuration"))
        return _count(configuration.get(key)) if configuration is not None else None

    @property
    def recovery_threshold(self) -> int | None:
        return self._configuration("recoveryThreshold")

    @property
    def max_node_validity_days(self) -> int | None:
        """``maximumNodeCertificateValidityDays``: the longest ``validity_period_days`` a node may be trusted for."""
        return self._configuration("maximumNodeCertificateValidityDays")


@dataclass(frozen=True, slots=True)
class Member:
    """``GET /gov/service/members/{memberId}``, or one of ``GET /gov/service/members``."""

    member_id: str
    status: str | None
    """``Accepted`` or ``Active``."""
    recovery_role: str | None = None
    """``NonParticipant``, ``Participant`` or ``Owner``."""
    encryption_key: str | None = None
    """``publicEncryptionKey`` (PEM): a recovery member's."""
    fields: Mapping[str, Any] = field(default_factory=dict, compare=False)
    """The whole object as CCF sent it."""

    @classmethod
    def from_object(cls, body: Mapping[str, Any], member_id: str) -> Member:
        return cls(
            member_id,
            _word(body.get("status")),
            _text(body.get("recoveryRole")),
            _text(body.get("publicEncryptionKey")),
            body,
        )

    @staticmethod
    def parse_one(member_id: str) -> Callable[[CCFResponse], Member | None]:
        def parse(response: CCFResponse) -> Member | None:
            body = _object(response.body)
            return None if body is None else Member.from_object(body, _text(body.get("memberId")) or member_id)

        return parse

    @staticmethod
    def parse_list(response: CCFResponse) -> tuple[Member, ...] | None:
        values = _values(response)
        if values is None:
            return None
        return tuple(
            Member.from_object(entry, member_id)
            for entry in values
            if (member_id := _text(entry.get("memberId"))) is not None
        )


@dataclass(frozen=True, slots=True)
class Node:
    """One of ``GET /gov/service/nodes``."""

    node_id: str
    status: str | None
    """``Pending``, ``Trusted``, ``Retired``."""
    fields: Mapping[str, Any] = field(default_factory=dict, compare=False)
    """The whole object as CCF sent it."""

    @staticmethod
    def parse_list(response: CCFResponse) -> tuple[Node, ...] | None:
        values = _values(response)
        if values is None:
            return None
        return tuple(
            Node(node_id, _word(entry.get("status")), entry)
            for entry in values
            if (node_id := _text(entry.get("nodeId"))) is not None
        )


@dataclass(frozen=True, slots=True)
class PreviousIdentity:
    """``GET /node/service/previous_identity``: the identity (PEM text, as CCF compares it) a recovered service
    recovered from; ``pem`` None when the service says it is not a recovery of a previous service."""

    pem: str | None

    NOT_A_RECOVERY = "This service is not a recovery of a previous service."

    @classmethod
    def parse(cls, response: CCFResponse) -> PreviousIdentity | None:
        body = _object(response.body)
        pem = _text(body.get("previous_service_identity")) if body is not None else None
        return None if pem is None else cls(pem)

    @classmethod
    def of(cls, answer: Answer[PreviousIdentity]) -> PreviousIdentity | None:
        """What the answer says: the identity, none (CCF's 404 saying so), or None when it does not say (an older
        CCF without the endpoint, an error)."""
        if answer.value is not None:
            return answer.value
        if answer.status == 404 and answer.error_message == cls.NOT_A_RECOVERY:
            return cls(None)
        return None


@dataclass(frozen=True, slots=True)
class NodeState:
    """``GET /node/state``."""

    state: str | None
    """``PartOfNetwork``, ``ReadingPrivateLedger``, ..."""

    @classmethod
    def parse(cls, response: CCFResponse) -> NodeState:
        body = _object(response.body)
        return cls(_word(body.get("state")) if body is not None else None)


@dataclass(frozen=True, slots=True)
class Proposal:
    """A Proposal object: ``GET /gov/members/proposals/{id}``, one of the list, or the answer to a proposal, a ballot
    or a withdrawal."""

    proposal_id: str | None
    """64 lowercase hex; None when CCF sent anything else."""
    proposer_id: str | None
    state: str | None
    """``Open``, ``Accepted``, ``Withdrawn``, ``Rejected``, ``Failed``, ``Dropped``."""
    fields: Mapping[str, Any]
    """The whole object as CCF sent it."""

    @classmethod
    def from_object(cls, body: Mapping[str, Any]) -> Proposal:
        pid = _text(body.get("proposalId"))
        return cls(
            proposal_id=pid if is_ccf_id(pid) else None,
            proposer_id=_text(body.get("proposerId")),
            state=_word(body.get("proposalState")),
            fields=body,
        )

    @classmethod
    def parse(cls, response: CCFResponse) -> Proposal | None:
        body = _object(response.body)
        return None if body is None else cls.from_object(body)

    @classmethod
    def parse_list(cls, response: CCFResponse) -> tuple[Proposal, ...] | None:
        values = _values(response)
        return None if values is None else tuple(cls.from_object(entry) for entry in values)


def _values(response: CCFResponse) -> list[dict[str, Any]] | None:
    """The objects of a ``{"value": [...]}`` list answer (entries that are not objects left out)."""
    body = _object(response.body)
    values = body.get("value") if body is not None else None
    return [v for v in values if isinstance(v, dict)] if isinstance(values, list) else None


@dataclass(frozen=True, slots=True)
class ServiceTransition:
    """A ``transition_service_to_open`` action of a recovery: from the previous service identity to the next (PEM)."""

    previous: str
    next: str


@dataclass(frozen=True, slots=True)
class ProposalActions:
    """``GET /gov/members/proposals/{id}/actions``: the proposal's body exactly as it was proposed.

    ``raw`` is kept as is: the policy judges a ballot by the actions it parses from these bytes, as it parses a
    proposal before signing it."""

    raw: bytes

    @classmethod
    def parse(cls, response: CCFResponse) -> ProposalActions:
        return cls(response.raw)

    def _proposed(self) -> dict[str, Any] | None:
        """The body as a JSON object, or None when it is not one."""
        try:
            return _object(json.loads(self.raw))
        except (ValueError, RecursionError):  # nested deeper than Python parses: not JSON to us, never a 500
            return None

    def listed(self) -> object:
        """For a member to review: the ``actions`` as proposed, or the body as text when it is not a JSON object."""
        body = self._proposed()
        return body.get("actions") if body is not None else self.raw.decode("utf-8", "replace")

    def transitions(self) -> tuple[ServiceTransition, ...]:
        """Every ``transition_service_to_open`` that names both a previous and a next service identity."""
        body = self._proposed()
        actions = body.get("actions") if body is not None else None
        found = []
        for action in actions if isinstance(actions, list) else []:
            if not isinstance(action, dict) or action.get("name") != TRANSITION_ACTION:
                continue
            args = _object(action.get("args"))
            previous = _text(args.get("previous_service_identity")) if args is not None else None
            following = _text(args.get("next_service_identity")) if args is not None else None
            if previous is not None and following is not None:
                found.append(ServiceTransition(previous, following))
        return tuple(found)


@dataclass(frozen=True, slots=True)
class Ballot:
    """``GET /gov/members/proposals/{id}/ballots/{memberId}``: the ballot's script (CCF sends it as text)."""

    script: str

    @classmethod
    def parse(cls, response: CCFResponse) -> Ballot:
        return cls(response.raw.decode("utf-8", "replace"))


@dataclass(frozen=True, slots=True)
class StateDigest:
    """The answer to ``:update``; the ``:ack`` signs that answer's bytes (``Answer.raw``) as they came."""

    member_id: str | None
    digest: str

    @classmethod
    def parse(cls, response: CCFResponse) -> StateDigest | None:
        body = _object(response.body)
        digest = _text(body.get("stateDigest")) if body is not None else None
        if body is None or digest is None:
            return None
        return cls(_text(body.get("memberId")), digest)


@dataclass(frozen=True, slots=True)
class EncryptedShare:
    """``GET /gov/recovery/encrypted-shares/{memberId}``: the member's share, encrypted to its encryption key."""

    ciphertext: bytes

    @classmethod
    def parse(cls, response: CCFResponse) -> EncryptedShare | None:
        body = _object(response.body)
        encoded = _text(body.get("encryptedShare")) if body is not None else None
        if encoded is None:
            return None
        try:
            return cls(base64.b64decode(encoded, validate=True))
        except (ValueError, binascii.Error):
            return None


@dataclass(frozen=True, slots=True)
class RecoverySubmission:
    """The answer to ``:recover``: ``"2/3 recovery shares successfully submitted"``, and the counts."""

    message: str
    submitted_count: int | None
    recovery_threshold: int | None

    @classmethod
    def parse(cls, response: CCFResponse) -> RecoverySubmission:
        body = _object(response.body) or {}
        return cls(
            message=str(body.get("message", "")),
            submitted_count=_count(body.get("submittedCount")),
            recovery_threshold=_count(body.get("recoveryThreshold")),
        )


def _nothing(_: CCFResponse) -> None:
    return None


def presented_certificate(status: int, body: object) -> bytes | None:
    """The service certificate in a ``GET /node/network`` answer, as plain PEM; None unless it names exactly one.

    Only that one certificate is ever a candidate: a bundle would smuggle trust anchors past the fingerprint a member
    checks (``certs.single_certificate_pem``)."""
    found = _object(body)
    pem = pem_bytes(found.get("service_certificate")) if found is not None and status == 200 else None
    return single_certificate_pem(pem) if pem is not None else None


# --- the Protocol and its HTTP implementation ------------------------------------------------------------------------


class GovernanceAPI(Protocol):
    """**Protocol:** CCF's governance API of one service, over one connection trusting ``trusted_pems``.

    Reads take ``max_attempts`` (lower than configured: a probe tries once). Signed messages (``cose``) are sent as
    the opaque bytes they are, resent unchanged when the network or CCF asks for a retry. Raises what ``CCFClient``
    raises (``CCFTrustError``, ``CCFAnswerRefusedError``, ``CCFTimeoutError``, ``CCFUnavailableError``); CCF's own
    refusals are answers.
    """

    @property
    def config(self) -> ServiceConfig: ...

    @property
    def trusted_pems(self) -> tuple[bytes, ...]:
        """The service identities this connection's TLS accepts, the pinned one first."""
        ...

    async def service_info(self, *, max_attempts: int | None = None) -> Answer[ServiceInfo]: ...

    async def members(self) -> Answer[tuple[Member, ...]]: ...

    async def member(self, member_id: str, *, max_attempts: int | None = None) -> Answer[Member]: ...

    async def nodes(self) -> Answer[tuple[Node, ...]]: ...

    async def previous_service_identity(self) -> Answer[PreviousIdentity]: ...

    async def node_state(self, *, max_attempts: int | None = None) -> Answer[NodeState]: ...

    async def proposals(self, *, max_attempts: int | None = None) -> Answer[tuple[Proposal, ...]]: ...

    async def proposal(self, proposal_id: str) -> Answer[Proposal]: ...

    async def proposal_actions(
        self, proposal_id: str, *, max_attempts: int | None = None
    ) -> Answer[ProposalActions]: ...

    async def ballot(self, proposal_id: str, member_id: str) -> Answer[Ballot]: ...

    async def create_proposal(self, cose: bytes) -> Answer[Proposal]: ...

    async def submit_ballot(self, proposal_id: str, member_id: str, cose: bytes) -> Answer[Proposal]: ...

    async def withdraw_proposal(self, proposal_id: str, cose: bytes) -> Answer[Proposal]: ...

    async def update_state_digest(self, member_id: str, cose: bytes) -> Answer[StateDigest]: ...

    async def ack_state_digest(self, member_id: str, cose: bytes) -> Answer[None]: ...

    async def encrypted_share(self, member_id: str) -> Answer[EncryptedShare]: ...

    async def submit_recovery_share(self, member_id: str, cose: bytes) -> Answer[RecoverySubmission]: ...

    async def aclose(self) -> None: ...


class Transport(Protocol):
    """**Protocol:** what ``CCFGovernanceClient`` needs of ``CCFClient``: the seam between CCF's paths and shapes
    (here) and pinned TLS, retries and capped answers (``ccf.client``)."""

    @property
    def config(self) -> ServiceConfig: ...

    @property
    def trusted_pems(self) -> tuple[bytes, ...]: ...

    async def get(self, path: str, *, gov: bool = True, max_attempts: int | None = None) -> CCFResponse: ...

    async def post_cose(self, path: str, cose: bytes) -> CCFResponse: ...

    async def aclose(self) -> None: ...


class CCFGovernanceClient:
    """``GovernanceAPI`` over a ``Transport`` (a ``CCFClient``: pinned TLS, retries, capped answers) and CCF's
    paths."""

    def __init__(self, http: Transport) -> None:
        self.http = http

    @property
    def config(self) -> ServiceConfig:
        return self.http.config

    @property
    def trusted_pems(self) -> tuple[bytes, ...]:
        return self.http.trusted_pems

    async def _get(
        self,
        path: str,
        parse: Callable[[CCFResponse], T | None],
        *,
        gov: bool = True,
        max_attempts: int | None = None,
    ) -> Answer[T]:
        return Answer.parse(await self.http.get(path, gov=gov, max_attempts=max_attempts), parse)

    async def _post(self, path: str, cose: bytes, parse: Callable[[CCFResponse], T | None]) -> Answer[T]:
        return Answer.parse(await self.http.post_cose(path, cose), parse)

    async def service_info(self, *, max_attempts: int | None = None) -> Answer[ServiceInfo]:
        return await self._get(Paths.SERVICE_INFO, ServiceInfo.parse, max_attempts=max_attempts)

    async def members(self) -> Answer[tuple[Member, ...]]:
        return await self._get(Paths.MEMBERS, Member.parse_list)

    async def member(self, member_id: str, *, max_attempts: int | None = None) -> Answer[Member]:
        return await self._get(
            _path(Paths.MEMBER, member_id=member_id), Member.parse_one(member_id), max_attempts=max_attempts
        )

    async def nodes(self) -> Answer[tuple[Node, ...]]:
        return await self._get(Paths.NODES, Node.parse_list)

    async def previous_service_identity(self) -> Answer[PreviousIdentity]:
        return await self._get(Paths.PREVIOUS_IDENTITY, PreviousIdentity.parse, gov=False)

    async def node_state(self, *, max_attempts: int | None = None) -> Answer[NodeState]:
        return await self._get(Paths.NODE_STATE, NodeState.parse, gov=False, max_attempts=max_attempts)

    async def proposals(self, *, max_attempts: int | None = None) -> Answer[tuple[Proposal, ...]]:
        return await self._get(Paths.PROPOSALS, Proposal.parse_list, max_attempts=max_attempts)

    async def proposal(self, proposal_id: str) -> Answer[Proposal]:
        return await self._get(_path(Paths.PROPOSAL, proposal_id=proposal_id), Proposal.parse)

    async def proposal_actions(self, proposal_id: str, *, max_attempts: int | None = None) -> Answer[ProposalActions]:
        return await self._get(
            _path(Paths.PROPOSAL_ACTIONS, proposal_id=proposal_id), ProposalActions.parse, max_attempts=max_attempts
        )

    async def ballot(self, proposal_id: str, member_id: str) -> Answer[Ballot]:
        return await self._get(_path(Paths.BALLOT, proposal_id=proposal_id, member_id=member_id), Ballot.parse)

    async def create_proposal(self, cose: bytes) -> Answer[Proposal]:
        return await self._post(Paths.CREATE_PROPOSAL, cose, Proposal.parse)

    async def submit_ballot(self, proposal_id: str, member_id: str, cose: bytes) -> Answer[Proposal]:
        return await self._post(
            _path(Paths.SUBMIT_BALLOT, proposal_id=proposal_id, member_id=member_id), cose, Proposal.parse
        )

    async def withdraw_proposal(self, proposal_id: str, cose: bytes) -> Answer[Proposal]:
        return await self._post(_path(Paths.WITHDRAW, proposal_id=proposal_id), cose, Proposal.parse)

    async def update_state_digest(self, member_id: str, cose: bytes) -> Answer[StateDigest]:
        return await self._post(_path(Paths.UPDATE_STATE_DIGEST, member_id=member_id), cose, StateDigest.parse)

    async def ack_state_digest(self, member_id: str, cose: bytes) -> Answer[None]:
        return await self._post(_path(Paths.ACK_STATE_DIGEST, member_id=member_id), cose, _nothing)

    async def encrypted_share(self, member_id: str) -> Answer[EncryptedShare]:
        return await self._get(_path(Paths.ENCRYPTED_SHARE, member_id=member_id), EncryptedShare.parse)

    async def submit_recovery_share(self, member_id: str, cose: bytes) -> Answer[RecoverySubmission]:
        return await self._post(_path(Paths.RECOVER, member_id=member_id), cose, RecoverySubmission.parse)

    async def aclose(self) -> None:
        await self.http.aclose()


# --- connectors ---------------------------------------------------------------------------------------------------


class Connector(Protocol):
    """**Protocol:** how ``CCFConnections`` reaches services: the identities their configuration trusts, what an
    endpoint claims to be, and a ``GovernanceAPI`` trusting given identities."""

    async def configured_identity(self, config: ServiceConfig) -> bytes:
        """The configured service certificate: its file, or fetched once from ``identity_url``."""
        ...

    async def accepted_identities(self, config: ServiceConfig) -> tuple[bytes, ...]:
        """``accepted_service_certificates``, read."""
        ...

    async def presented_identity(self, config: ServiceConfig) -> bytes:
        """The service certificate the endpoint claims, over TLS that verifies nothing: a candidate, never trusted
        as such (``CCFUnavailableError`` when it claims none)."""
        ...

    def connect(self, config: ServiceConfig, trusted: Sequence[bytes]) -> GovernanceAPI:
        """A client whose TLS trusts ``trusted`` and nothing else; the first is the pinned identity. No I/O yet."""
        ...


class HttpConnector:
    """The real ``Connector``: files, HTTPS, ``CCFClient``. One per configuration generation."""

    def __init__(self) -> None:
        self._fetched: dict[str, bytes] = {}
        """Service certificates fetched from ``identity_url``, by service: once for the configuration (a client
        rebuilt after a recovery, or an adoption, does not ask the identity endpoint again); a reload fetches anew."""

    async def configured_identity(self, config: ServiceConfig) -> bytes:
        if config.service_certificate is not None:
            return await configured_service_certificate(config)
        pem = self._fetched.get(config.name)
        if pem is None:
            pem = self._fetched[config.name] = await configured_service_certificate(config)
        return pem

    async def accepted_identities(self, config: ServiceConfig) -> tuple[bytes, ...]:
        where = f"services.{config.name}.accepted_service_certificates"
        return tuple(_read_cert(path, where) for path in config.accepted_service_certificates)

    async def presented_identity(self, config: ServiceConfig) -> bytes:
        """``GET /node/network``: only that GET is sent, and the caller must then check that the endpoint proves
        possession (a connection pinned to the candidate) and that governance approved it."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE  # a candidate only; verified by a pinned connection next
        url = config.url + Paths.NODE_NETWORK
        try:
            status, data = await get_json(config, ctx, url, f"service {config.name!r}: GET {Paths.NODE_NETWORK}")
        except (CCFTrustError, CCFTimeoutError, CCFUnavailableError) as exc:
            raise CCFUnavailableError(f"cannot read the service identity from {url}: {exc.message}") from None
        except ValueError:
            raise CCFUnavailableError(f"cannot read the service identity from {url}: not JSON") from None
        pem = presented_certificate(status, data)
        if pem is None:
            raise CCFUnavailableError(f"{url} answered {status} without a service_certificate that is one certificate")
        return pem

    def connect(self, config: ServiceConfig, trusted: Sequence[bytes]) -> CCFGovernanceClient:
        pinned, *others = trusted
        return CCFGovernanceClient(CCFClient(config, pinned, also_trusted=others))
