"""An in-memory CCF behind the typed governance client's Protocols, for fast unit tests of governance, recovery and
health (the real client against the sandbox and hostile services is in the component and e2e tiers).

``FakeCCF`` is the ``Connector``: it holds ``FakeService`` objects by name and hands out ``FakeGovernanceAPI``
connections (the ``GovernanceAPI``) that trust given identities, exactly as ``HttpConnector`` would. A connection
whose trusted identities do not include the one the service presents raises ``CCFTrustError`` on every call, as a
pinned TLS connection would. A service keeps the state the agent reads and writes (info, members, proposals with
their actions and ballots, state digests, encrypted shares, submitted shares) and answers like CCF does (see
../shared/ccf-governance.md §5), with answers parsed by the same code as the real client's. Tests can queue an
answer or an exception for the next call of an operation (``FakeService.answer_next``/``fail_next``), and read the
operations asked for (``calls``) and the signed messages received (``received``).

Signatures are not verified (the sandbox does that): a signed message is decoded for its payload and its kid.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from signing_agent.backends.keystores import KeyStores
from signing_agent.ccf.api import (
    Answer,
    Ballot,
    EncryptedShare,
    Member,
    Node,
    NodeState,
    Paths,
    PreviousIdentity,
    Proposal,
    ProposalActions,
    RecoverySubmission,
    ServiceInfo,
    StateDigest,
)
from signing_agent.ccf.client import CCFResponse
from signing_agent.config import FileKeyConfig, IdentityConfig, ServiceConfig
from signing_agent.cose.sign1 import HEADER_KID, DecodedSign1, decode
from signing_agent.errors import CCFTrustError, CCFUnavailableError
from signing_agent.governance import Governance
from signing_agent.identity import Identity, open_identity
from tests.support.fakes import MemoryAuditSink, memory_auditor, signing_service
from tests.support.pki import Member as PkiMember
from tests.support.pki import make_member, make_rsa_key, pem_private

T = TypeVar("T")

Reply = CCFResponse | Exception


def _error(status: int, code: str, message: str) -> tuple[int, Any]:
    return status, {"error": {"code": code, "message": message}}


@dataclass
class FakeService:
    """One CCF service: what it presents (``identity``, a PEM) and the state the agent reads and writes."""

    name: str
    identity: bytes
    status: str = "Open"
    recovery_count: int = 0
    creation_txid: str = "2.1"
    node_state: str = "PartOfNetwork"
    members: dict[str, dict[str, Any]] = field(default_factory=dict)
    proposals: dict[str, dict[str, Any]] = field(default_factory=dict)
    actions: dict[str, bytes] = field(default_factory=dict)
    ballots: dict[tuple[str, str], str] = field(default_factory=dict)
    digests: dict[str, str] = field(default_factory=dict)
    encrypted_shares: dict[str, str] = field(default_factory=dict)
    """Member id -> the encryptedShare CCF serves (base64)."""
    shares: dict[str, bytes] = field(default_factory=dict)
    """Member id -> the payload of its :recover (the agent's signed ``{"share": ...}``)."""
    recovery_threshold: int = 1
    nodes: dict[str, dict[str, Any]] = field(default_factory=lambda: {"n0": {"nodeId": "n0", "status": "Trusted"}})
    previous_identity: bytes | None = None
    """What ``/node/service/previous_identity`` reports: the identity the service recovered from."""
    calls: list[str] = field(default_factory=list)
    received: list[tuple[str, DecodedSign1]] = field(default_factory=list)
    _queued: dict[str, list[Reply]] = field(default_factory=dict)
    _tx: int = 10

    # -- set-up and scripting --

    def add_member(self, member_id: str, status: str = "Active", **fields: Any) -> None:
        self.members[member_id] = {"memberId": member_id, "status": status, **fields}

    def add_proposal(self, proposal_id: str, actions: Any, *, proposer: str = "p" * 64, state: str = "Open") -> None:
        self.proposals[proposal_id] = {
            "proposalId": proposal_id,
            "proposerId": proposer,
            "proposalState": state,
            "ballotCount": 0,
        }
        self.actions[proposal_id] = actions if isinstance(actions, bytes) else json.dumps({"actions": actions}).encode()

    def answer_next(
        self, operation: str, status: int, body: Any = None, *, attempts: int = 1, tx: str | None = None
    ) -> None:
        """The next call of ``operation`` (a ``GovernanceAPI`` method name) answers this instead of the state
        (``body`` as for ``_response``)."""
        self._queued.setdefault(operation, []).append(_response(status, body, attempts=attempts, tx=tx))

    def fail_next(self, operation: str, error: Exception) -> None:
        """The next call of ``operation`` raises ``error`` (no answer came)."""
        self._queued.setdefault(operation, []).append(error)

    # -- the service --

    def answer(self, operation: str, request: str, handle: Callable[[], tuple[int, Any]]) -> CCFResponse:
        self.calls.append(operation)
        queued = self._queued.get(operation)
        if queued:
            reply = queued.pop(0)
            if isinstance(reply, Exception):
                raise reply
            return dataclasses.replace(reply, request=request)
        status, body = handle()
        self._tx += 1
        return dataclasses.replace(
            _response(status, body, tx=f"2.{self._tx}" if status < 400 else None), request=request
        )

    def info(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "certificate": self.identity.decode(),
            "recoveryCount": self.recovery_count,
            "creationTransactionId": self.creation_txid,
            "configuration": {"recoveryThreshold": self.recovery_threshold, "maximumNodeCertificateValidityDays": 365},
        }

    def signed(self, operation: str, cose: bytes) -> tuple[str, bytes]:
        message = decode(cose)
        self.received.append((operation, message))
        kid = message.headers.get(HEADER_KID)
        return kid.decode() if isinstance(kid, bytes) else "", message.payload

    def create_proposal(self, cose: bytes) -> tuple[int, Any]:
        member, payload = self.signed("create_proposal", cose)
        pid = hashlib.sha256(cose).hexdigest()
        if pid in self.proposals:
            return _error(400, "ProposalReplay", f"Proposal submission replay, already exists as proposal {pid}")
        self.add_proposal(pid, payload, proposer=member)
        return 200, self.proposals[pid]

    def submit_ballot(self, proposal_id: str, member_id: str, cose: bytes) -> tuple[int, Any]:
        _, payload = self.signed("submit_ballot", cose)
        proposal = self.proposals.get(proposal_id)
        if proposal is None:
            return _error(404, "ProposalNotFound", f"Could not find proposal {proposal_id}.")
        if proposal["proposalState"] != "Open":
            return _error(
                400,
                "ProposalNotOpen",
                f"Proposal {proposal_id} is currently in state "
                f"{proposal['proposalState']} - only Open proposals can receive votes",
            )
        self.ballots[(proposal_id, member_id)] = json.loads(payload)["ballot"]
        proposal["ballotCount"] = sum(1 for pid, _ in self.ballots if pid == proposal_id)
        return 200, proposal

    def withdraw(self, proposal_id: str, cose: bytes) -> tuple[int, Any]:
        self.signed("withdraw_proposal", cose)
        proposal = self.proposals.get(proposal_id)
        if proposal is None:
            return 204, None
        proposal["proposalState"] = "Withdrawn"
        return 200, proposal

    def update(self, member_id: str, cose: bytes) -> tuple[int, Any]:
        self.signed("update_state_digest", cose)
        digest = self.digests.setdefault(member_id, hashlib.sha256(member_id.encode()).hexdigest())
        return 200, {"memberId": member_id, "stateDigest": digest}

    def ack(self, member_id: str, cose: bytes) -> tuple[int, Any]:
        _, payload = self.signed("ack_state_digest", cose)
        if json.loads(payload).get("stateDigest") != self.digests.get(member_id):
            return _error(400, "StateDigestMismatch", "Submitted state digest is not valid.")
        self.members[member_id]["status"] = "Active"
        return 204, None

    def recover(self, member_id: str, cose: bytes) -> tuple[int, Any]:
        _, payload = self.signed("submit_recovery_share", cose)
        if self.status != "WaitingForRecoveryShares":
            return _error(403, "ServiceNotWaitingForRecoveryShares", "Service is not waiting for recovery shares.")
        self.shares[member_id] = payload
        count = len(self.shares)
        message = f"{count}/{self.recovery_threshold} recovery shares successfully submitted"
        if count >= self.recovery_threshold:
            message += "\nEnd of recovery procedure initiated"
            self.status = "Open"
        return 200, {"message": message, "submittedCount": count, "recoveryThreshold": self.recovery_threshold}


def _response(
    status: int, body: Any, *, attempts: int = 1, headers: dict[str, str] | None = None, tx: str | None
) -> CCFResponse:
    """An answer as ``CCFClient`` hands it over: ``body`` None (empty), bytes (sent as JSON, parsed when it is),
    str (sent as text/javascript, as CCF sends a ballot) or a JSON value."""
    content_type = "application/json"
    parsed: Any
    if body is None:
        raw, parsed, content_type = b"", b"", ""
    elif isinstance(body, bytes):
        raw = body
        try:
            parsed = json.loads(body)
        except ValueError:
            parsed = body
    elif isinstance(body, str):
        raw, parsed, content_type = body.encode(), body, "text/javascript"
    else:
        raw, parsed = json.dumps(body).encode(), body
    return CCFResponse(
        status=status,
        body=parsed,
        raw=raw,
        content_type=content_type,
        transaction_id=tx,
        attempts=attempts,
        headers=headers or {},
    )


class FakeGovernanceAPI:
    """A ``GovernanceAPI`` connection to a ``FakeService`` that trusts ``trusted`` (PEMs)."""

    def __init__(self, service: FakeService, config: ServiceConfig, trusted: Sequence[bytes]) -> None:
        self.service = service
        self._config = config
        self._trusted = tuple(trusted)
        self.closed = False

    @property
    def config(self) -> ServiceConfig:
        return self._config

    @property
    def trusted_pems(self) -> tuple[bytes, ...]:
        return self._trusted

    def _call(
        self,
        operation: str,
        request: str,
        parse: Callable[[CCFResponse], T | None],
        handle: Callable[[], tuple[int, Any]],
    ) -> Answer[T]:
        if self.service.identity.strip() not in {p.strip() for p in self._trusted}:
            raise CCFTrustError(
                f"{self._config.url} did not present a certificate endorsed by the pinned service certificate of "
                f"service {self._config.name!r}; nothing was sent (fake)"
            )
        return Answer.parse(self.service.answer(operation, request, handle), parse)

    async def service_info(self, *, max_attempts: int | None = None) -> Answer[ServiceInfo]:
        return self._call(
            "service_info", f"GET {Paths.SERVICE_INFO}", ServiceInfo.parse, lambda: (200, self.service.info())
        )

    async def members(self) -> Answer[tuple[Member, ...]]:
        return self._call(
            "members",
            f"GET {Paths.MEMBERS}",
            Member.parse_list,
            lambda: (200, {"value": list(self.service.members.values())}),
        )

    async def member(self, member_id: str, *, max_attempts: int | None = None) -> Answer[Member]:
        def handle() -> tuple[int, Any]:
            found = self.service.members.get(member_id)
            return (200, found) if found else _error(404, "ResourceNotFound", f"Member {member_id} does not exist.")

        return self._call(
            "member", f"GET {Paths.MEMBER.format(member_id=member_id)}", Member.parse_one(member_id), handle
        )

    async def nodes(self) -> Answer[tuple[Node, ...]]:
        return self._call(
            "nodes",
            f"GET {Paths.NODES}",
            Node.parse_list,
            lambda: (200, {"value": list(self.service.nodes.values())}),
        )

    async def previous_service_identity(self) -> Answer[PreviousIdentity]:
        def handle() -> tuple[int, Any]:
            found = self.service.previous_identity
            if found is None:
                return _error(404, "ResourceNotFound", PreviousIdentity.NOT_A_RECOVERY)
            return 200, {"previous_service_identity": found.decode()}

        return self._call("previous_service_identity", f"GET {Paths.PREVIOUS_IDENTITY}", PreviousIdentity.parse, handle)

    async def node_state(self, *, max_attempts: int | None = None) -> Answer[NodeState]:
        return self._call(
            "node_state",
            f"GET {Paths.NODE_STATE}",
            NodeState.parse,
            lambda: (200, {"node_id": "n0", "state": self.service.node_state}),
        )

    async def proposals(self, *, max_attempts: int | None = None) -> Answer[tuple[Proposal, ...]]:
        return self._call(
            "proposals",
            f"GET {Paths.PROPOSALS}",
            Proposal.parse_list,
            lambda: (200, {"value": list(self.service.proposals.values())}),
        )

    async def proposal(self, proposal_id: str) -> Answer[Proposal]:
        def handle() -> tuple[int, Any]:
            found = self.service.proposals.get(proposal_id)
            return (200, found) if found else _error(404, "ProposalNotFound", f"Could not find proposal {proposal_id}.")

        return self._call("proposal", f"GET {Paths.PROPOSAL.format(proposal_id=proposal_id)}", Proposal.parse, handle)

    async def proposal_actions(self, proposal_id: str, *, max_attempts: int | None = None) -> Answer[ProposalActions]:
        def handle() -> tuple[int, Any]:
            found = self.service.actions.get(proposal_id)
            if found is None:
                return _error(404, "ProposalNotFound", f"Could not find proposal {proposal_id}.")
            return 200, found

        return self._call(
            "proposal_actions",
            f"GET {Paths.PROPOSAL_ACTIONS.format(proposal_id=proposal_id)}",
            ProposalActions.parse,
            handle,
        )

    async def ballot(self, proposal_id: str, member_id: str) -> Answer[Ballot]:
        def handle() -> tuple[int, Any]:
            found = self.service.ballots.get((proposal_id, member_id))
            if found is None:
                return _error(404, "VoteNotFound", f"Member {member_id} has not voted for proposal {proposal_id}.")
            return 200, found

        return self._call(
            "ballot", f"GET {Paths.BALLOT.format(proposal_id=proposal_id, member_id=member_id)}", Ballot.parse, handle
        )

    async def create_proposal(self, cose: bytes) -> Answer[Proposal]:
        return self._call(
            "create_proposal",
            f"POST {Paths.CREATE_PROPOSAL}",
            Proposal.parse,
            lambda: self.service.create_proposal(cose),
        )

    async def submit_ballot(self, proposal_id: str, member_id: str, cose: bytes) -> Answer[Proposal]:
        return self._call(
            "submit_ballot",
            f"POST {Paths.SUBMIT_BALLOT.format(proposal_id=proposal_id, member_id=member_id)}",
            Proposal.parse,
            lambda: self.service.submit_ballot(proposal_id, member_id, cose),
        )

    async def withdraw_proposal(self, proposal_id: str, cose: bytes) -> Answer[Proposal]:
        return self._call(
            "withdraw_proposal",
            f"POST {Paths.WITHDRAW.format(proposal_id=proposal_id)}",
            Proposal.parse,
            lambda: self.service.withdraw(proposal_id, cose),
        )

    async def update_state_digest(self, member_id: str, cose: bytes) -> Answer[StateDigest]:
        return self._call(
            "update_state_digest",
            f"POST {Paths.UPDATE_STATE_DIGEST.format(member_id=member_id)}",
            StateDigest.parse,
            lambda: self.service.update(member_id, cose),
        )

    async def ack_state_digest(self, member_id: str, cose: bytes) -> Answer[None]:
        return self._call(
            "ack_state_digest",
            f"POST {Paths.ACK_STATE_DIGEST.format(member_id=member_id)}",
            lambda _: None,
            lambda: self.service.ack(member_id, cose),
        )

    async def encrypted_share(self, member_id: str) -> Answer[EncryptedShare]:
        def handle() -> tuple[int, Any]:
            found = self.service.encrypted_shares.get(member_id)
            if found is None:
                return _error(404, "ResourceNotFound", f"Recovery share not found for member {member_id}.")
            return 200, {"memberId": member_id, "encryptedShare": found}

        return self._call(
            "encrypted_share", f"GET {Paths.ENCRYPTED_SHARE.format(member_id=member_id)}", EncryptedShare.parse, handle
        )

    async def submit_recovery_share(self, member_id: str, cose: bytes) -> Answer[RecoverySubmission]:
        return self._call(
            "submit_recovery_share",
            f"POST {Paths.RECOVER.format(member_id=member_id)}",
            RecoverySubmission.parse,
            lambda: self.service.recover(member_id, cose),
        )

    async def aclose(self) -> None:
        self.closed = True


class FakeCCF:
    """The ``Connector`` to in-memory services: ``add`` them, then give ``Governance(..., connector=fake)``."""

    def __init__(self) -> None:
        self.services: dict[str, FakeService] = {}
        self.configured: dict[str, bytes] = {}
        """The service certificate each configuration pins (default: the identity the service presents)."""
        self.accepted: dict[str, tuple[bytes, ...]] = {}
        self.connections: list[FakeGovernanceAPI] = []

    def add(self, name: str, identity: bytes | None = None, **state: Any) -> FakeService:
        service = FakeService(name, identity or make_member(f"{name}-service").cert_pem, **state)
        self.services[name] = service
        self.configured[name] = service.identity
        return service

    def config(self, name: str, **settings: Any) -> ServiceConfig:
        return ServiceConfig(name=name, url=f"https://{name}.ccf.test", **settings)

    async def configured_identity(self, config: ServiceConfig) -> bytes:
        return self.configured[config.name]

    async def accepted_identities(self, config: ServiceConfig) -> tuple[bytes, ...]:
        return self.accepted.get(config.name, ())

    async def presented_identity(self, config: ServiceConfig) -> bytes:
        service = self.services.get(config.name)
        if service is None:
            raise CCFUnavailableError(f"{config.url}: cannot connect (fake)")
        return service.identity

    def connect(self, config: ServiceConfig, trusted: Sequence[bytes]) -> FakeGovernanceAPI:
        connection = FakeGovernanceAPI(self.services[config.name], config, trusted)
        self.connections.append(connection)
        return connection


# --- identities for the signer --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FileIdentity:
    member: PkiMember
    identity: Identity
    encryption_key: Any = None
    """The RSA private key (cryptography) of its encryption key, when it has one."""

    @property
    def member_id(self) -> str:
        return self.member.member_id

    def encrypt_share(self, share: bytes) -> str:
        """``share`` as CCF serves it to this member: RSA-OAEP-SHA256 to its encryption key, base64."""
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import padding

        oaep = padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)
        return base64.b64encode(self.encryption_key.public_key().encrypt(share, oaep)).decode()


async def file_identity(folder: Path, name: str, *, encryption: bool = False) -> FileIdentity:
    """An identity with a file key (and a file RSA encryption key), opened as the daemon opens one."""
    member = make_member(name, "secp256r1")
    key, cert = member.write(folder)
    enc_config = None
    enc_key = None
    if encryption:
        enc_key = make_rsa_key()
        enc_path = folder / f"{name}_enc_privk.pem"
        enc_path.write_bytes(pem_private(enc_key))
        enc_path.chmod(0o600)
        enc_config = FileKeyConfig(path=enc_path)
    config = IdentityConfig(name=name, certificate=cert, signing_key=FileKeyConfig(path=key), encryption_key=enc_config)
    return FileIdentity(member, await open_identity(config, KeyStores()), enc_key)


@dataclass
class FakeWorld:
    """A signing service with identity ``m0`` (an Active member), an in-memory audit log, and governance of the
    fake service ``prod``."""

    ccf: FakeCCF
    service: FakeService
    m0: FileIdentity
    audit: MemoryAuditSink
    gov: Governance

    def events(self) -> list[str]:
        return [r["event"] for r in self.audit.records]

    def record(self, event: str) -> dict[str, Any]:
        """The last audit record of ``event``."""
        return next(r for r in reversed(self.audit.records) if r["event"] == event)


async def fake_world(
    folder: Path, *, encryption: bool = False, state: dict[str, Any] | None = None, **settings: Any
) -> FakeWorld:
    """A ``FakeWorld``: ``state`` sets up the service (``FakeService`` fields), ``settings`` its configuration."""
    ccf = FakeCCF()
    service = ccf.add("prod", **(state or {}))
    m0 = await file_identity(folder, "m0", encryption=encryption)
    service.add_member(m0.member_id)
    audit = MemoryAuditSink()
    auditor = memory_auditor(audit)
    signer = signing_service({"m0": m0.identity}, auditor)
    gov = Governance(signer, {"prod": ccf.config("prod", **settings)}, auditor=auditor, connector=ccf)
    return FakeWorld(ccf, service, m0, audit, gov)
