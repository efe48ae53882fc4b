"""Pure governance state of the CCF sandbox: members, ack records, proposals, ballots, the replay table, recovery.

No I/O and no HTTP here. Every write runs as a transaction (:meth:`GovernanceState._write`): it works on the
live data, and if it raises, the data is restored from a snapshot, so an error response never leaves a
change behind (CCF rolls back the KV on error responses). A successful write advances the transaction id
(``view.seqno``) and the sandbox's stand-in for the Merkle root (a hash chain over the writes), which is
what state digests and proposal ids are derived from.

Recovery (see :mod:`.recovery` for the share cryptography): while the service is Open, every change of the set
of Active recovery members (activation by ack, removal, ``trigger_recovery_shares_refresh``,
``set_recovery_threshold``) issues fresh shares. :meth:`GovernanceState.recover` is the disaster: a new
service identity, status ``Recovering``, node ``PartOfPublicNetwork``; members and the encrypted shares (public
tables in CCF) survive. ``transition_service_to_open`` then moves to ``WaitingForRecoveryShares``, members submit
shares, and at the threshold the node is ``ReadingPrivateLedger`` until :meth:`complete_private_recovery`
(called by the server after a short delay) opens the service and issues new shares.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import copy
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final, Literal, TypeVar

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from signing_agent.sandbox.clock import parse_x509_time
from signing_agent.sandbox.constitution import (
    BALLOT_NOT_SUPPORTED,
    SANDBOX_CONSTITUTION,
    Action,
    evaluate_ballot,
    resolve,
    validate_proposal,
)
from signing_agent.sandbox.cose import GovEnvelope
from signing_agent.sandbox.errors import GovError, internal_error, invalid_input
from signing_agent.sandbox.recovery import (
    Share,
    is_full_key,
    load_encryption_key,
    recover_secret,
    rsa_oaep_wrap,
    sample_secret_and_shares,
)

MemberStatus = Literal["Accepted", "Active"]
ProposalState = Literal["Open", "Accepted", "Withdrawn", "Rejected", "Failed", "Dropped"]
ServiceStatus = Literal["Opening", "Open", "Recovering", "WaitingForRecoveryShares"]
NodeState = Literal["PartOfNetwork", "PartOfPublicNetwork", "ReadingPrivateLedger"]
RecoveryRole = Literal["NonParticipant", "Participant", "Owner"]
NodeStatus = Literal["Pending", "Trusted", "Retired"]
RECOVERY_ROLES: Final[tuple[RecoveryRole, ...]] = ("NonParticipant", "Participant", "Owner")

VIEW: Final = 2
MAX_CREATED_AT: Final = 9_999_999_999
DEFAULT_WINDOW_SIZE: Final = 100
MAX_NODE_CERT_VALIDITY_DAYS: Final = 365

_T = TypeVar("_T")


def member_id_of(cert_pem: str | bytes) -> str:
    """CCF's member id: lowercase hex SHA-256 of the certificate's DER encoding."""
    data = cert_pem.encode() if isinstance(cert_pem, str) else cert_pem
    cert = x509.load_pem_x509_certificate(data)
    return hashlib.sha256(cert.public_bytes(Encoding.DER)).hexdigest()


def node_id_of(node_cert: x509.Certificate) -> str:
    """CCF's node id: hex SHA-256 of the node's public key (DER)."""
    der = node_cert.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()


@dataclass(slots=True)
class Member:
    member_id: str
    cert_pem: str
    status: MemberStatus
    member_data: Any = None
    encryption_pub_key: str | None = None
    recovery_role: str | None = None

    @property
    def role(self) -> RecoveryRole:
        """The effective recovery role: Participant when a key is registered without a role."""
        if self.encryption_pub_key is None:
            return "NonParticipant"
        if self.recovery_role == "Owner":
            return "Owner"
        if self.recovery_role == "NonParticipant":
            return "NonParticipant"
        return "Participant"

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "memberId": self.member_id,
            "status": self.status,
            "memberData": self.member_data,
            "certificate": self.cert_pem,
        }
        if self.encryption_pub_key is not None:
            body["publicEncryptionKey"] = self.encryption_pub_key
        body["recoveryRole"] = self.role
        return body


@dataclass(slots=True)
class Node:
    """A node of ``public:ccf.gov.nodes.info``: Pending until trusted, then Trusted, then Retired."""

    node_id: str
    status: NodeStatus
    cert_pem: str
    node_data: Any = None

    def to_json(self) -> dict[str, Any]:
        return {
            "nodeId": self.node_id,
            "status": self.status,
            "nodeData": self.node_data,
            "certificate": self.cert_pem,
            "retiredCommitted": False,
            "quoteInfo": {"format": "Insecure_Virtual", "quote": "", "endorsements": ""},
            "rpcInterfaces": {},
        }


@dataclass(slots=True)
class AckRecord:
    state_digest: str
    cose_sign1_req: bytes | None = None


@dataclass(slots=True)
class Proposal:
    proposal_id: str
    proposer_id: str
    body: bytes
    actions: list[Action]
    state: ProposalState = "Open"
    ballots: dict[str, str] = field(default_factory=dict)
    final_votes: dict[str, bool] = field(default_factory=dict)
    vote_failures: dict[str, dict[str, str]] = field(default_factory=dict)
    failure: dict[str, str] | None = None

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "proposalId": self.proposal_id,
            "proposerId": self.proposer_id,
            "proposalState": self.state,
            "ballotCount": len(self.ballots),
        }
        if self.state != "Open":
            body["finalVotes"] = dict(self.final_votes)
            body["voteFailures"] = {k: dict(v) for k, v in self.vote_failures.items()}
            if self.failure is not None:
                body["failure"] = dict(self.failure)
        return body


@dataclass(slots=True)
class _Data:
    """Everything a transaction may change (deep-copied as the rollback snapshot)."""

    members: dict[str, Member] = field(default_factory=dict)
    nodes: dict[str, Node] = field(default_factory=dict)
    acks: dict[str, AckRecord] = field(default_factory=dict)
    proposals: dict[str, Proposal] = field(default_factory=dict)
    recent_proposals: dict[str, str] = field(default_factory=dict)
    cose_history: dict[str, bytes] = field(default_factory=dict)
    service_status: ServiceStatus = "Open"
    service_cert_pem: str = ""
    previous_service_cert_pem: str | None = None
    constitution: str = SANDBOX_CONSTITUTION
    window_size: int = DEFAULT_WINDOW_SIZE
    recovery_threshold: int = 1
    recovery_count: int = 0
    service_data: Any = field(default_factory=dict)
    # public:ccf.internal.recovery_shares: member id -> RSA-OAEP ciphertext of its share
    encrypted_shares: dict[str, bytes] = field(default_factory=dict)
    # sandbox-only: the plaintext issued to each member, and the full key they reconstruct
    issued_shares: dict[str, bytes] = field(default_factory=dict)
    recovery_secret: bytes | None = None
    # public:ccf.gov.recovery.submitted_shares (CCF encrypts them under the ledger secret)
    submitted_shares: dict[str, bytes] = field(default_factory=dict)


class GovernanceState:
    """The sandbox's KV store and governance logic. Not thread-safe: use it from one event loop."""

    def __init__(
        self, service_cert_pem: str, *, service_status: ServiceStatus = "Open", recovery_threshold: int = 1
    ) -> None:
        self._data = _Data(
            service_cert_pem=service_cert_pem, service_status=service_status, recovery_threshold=recovery_threshold
        )
        self._seqno = 1
        self._root = hashlib.sha256(b"ccf-sandbox-genesis" + service_cert_pem.encode()).digest()
        self.creation_txid = f"{VIEW}.1"
        self.previous_creation_txid: str | None = None
        self._keys: dict[str, ec.EllipticCurvePublicKey] = {}
        self.node_id = ""
        self.node_state: NodeState = "PartOfNetwork"
        self.recovery_target_seqno: int | None = None

    def set_node_identity(self, node_cert: x509.Certificate) -> None:
        """The sandbox's own node (its id: hex SHA-256 of the node's public key, DER), Trusted."""
        self.node_id = node_id_of(node_cert)
        pem = node_cert.public_bytes(Encoding.PEM).decode()
        self._data.nodes[self.node_id] = Node(self.node_id, "Trusted", pem)

    # -- nodes ---

    def add_node(self, node_cert: x509.Certificate, node_data: Any = None) -> str:
        """A node joins (control API): Pending until a ``transition_node_to_trusted`` proposal is accepted."""
        node_id = node_id_of(node_cert)
        pem = node_cert.public_bytes(Encoding.PEM).decode()

        def tx() -> str:
            if node_id in self._data.nodes:
                raise ValueError(f"node {node_id} is already known")
            self._data.nodes[node_id] = Node(node_id, "Pending", pem, node_data)
            return node_id

        return self._write(f"join:{node_id}", tx)

    def node(self, node_id: str) -> Node | None:
        return self._data.nodes.get(node_id)

    def nodes(self) -> list[Node]:
        return list(self._data.nodes.values())

    # -- transactions ---

    @property
    def seqno(self) -> int:
        return self._seqno

    @property
    def txid(self) -> str:
        return f"{VIEW}.{self._seqno}"

    @property
    def root_hex(self) -> str:
        return self._root.hex()

    def _write(self, description: str, fn: Callable[[], _T]) -> _T:
        snapshot = copy.deepcopy(self._data)
        try:
            result = fn()
        except BaseException:
            self._data = snapshot
            raise
        self._seqno += 1
        self._root = hashlib.sha256(self._root + f"{self._seqno}:{description}".encode()).digest()
        return result

    def transaction_status(self, view: int, seqno: int) -> str:
        if view == VIEW and 1 <= seqno <= self._seqno:
            return "Committed"
        if view < VIEW and seqno <= self._seqno:
            return "Invalid"
        return "Unknown"

    # -- members ---

    def add_member(
        self,
        cert_pem: str | bytes,
        *,
        status: MemberStatus = "Active",
        encryption_pub_key: str | bytes | None = None,
        member_data: Any = None,
        recovery_role: str | None = None,
    ) -> str:
        """Register a member directly (control API / initial members). Returns its member id.

        A member with ``encryption_pub_key`` (RSA public key, PEM) is a recovery member, by default a
        Participant. Adding an Active recovery member to an Open service issues fresh recovery shares, as
        activating one does. Raises ValueError for a bad key, role or status.
        """
        cert = cert_pem.decode() if isinstance(cert_pem, bytes) else cert_pem
        enc = encryption_pub_key.decode() if isinstance(encryption_pub_key, bytes) else encryption_pub_key
        if status not in ("Accepted", "Active"):
            raise ValueError("status must be Accepted or Active")
        if recovery_role is not None and recovery_role not in RECOVERY_ROLES:
            raise ValueError(f"recovery_role must be one of {', '.join(RECOVERY_ROLES)}")
        if enc is not None:
            load_encryption_key(enc)
        elif recovery_role not in (None, "NonParticipant"):
            raise ValueError("recovery_role requires encryption_pub_key")

        def tx() -> str:
            member_id = self._set_member(cert, enc, member_data, recovery_role)
            member = self._data.members[member_id]
            newly_active = member.status != "Active" and status == "Active"
            member.status = status
            if newly_active and member.role != "NonParticipant" and self._data.service_status == "Open":
                try:
                    self._issue_recovery_shares()
                except _ApplyError as exc:
                    raise ValueError(str(exc)) from exc
            return member_id

        return self._write("add_member", tx)

    def member(self, member_id: str) -> Member | None:
        return self._data.members.get(member_id)

    def members(self) -> list[Member]:
        return list(self._data.members.values())

    def active_member_ids(self) -> list[str]:
        return [m.member_id for m in self._data.members.values() if m.status == "Active"]

    def public_key(self, member_id: str) -> ec.EllipticCurvePublicKey | None:
        """The member's EC public key (None for unknown members or non-EC certificates)."""
        member = self._data.members.get(member_id)
        if member is None:
            return None
        key = self._keys.get(member_id)
        if key is None:
            public = x509.load_pem_x509_certificate(member.cert_pem.encode()).public_key()
            if not isinstance(public, ec.EllipticCurvePublicKey):
                return None
            key = self._keys[member_id] = public
        return key

    def _set_member(
        self, cert_pem: str, encryption_pub_key: str | None, member_data: Any, recovery_role: str | None
    ) -> str:
        member_id = member_id_of(cert_pem)
        if member_id in self._data.members:
            return member_id  # CCF's add_member leaves an existing member unchanged
        self._data.members[member_id] = Member(
            member_id=member_id,
            cert_pem=cert_pem,
            status="Accepted",
            member_data=member_data,
            encryption_pub_key=encryption_pub_key,
            recovery_role=recovery_role if encryption_pub_key is not None else None,
        )
        self._data.acks[member_id] = AckRecord(state_digest=self.root_hex)
        return member_id

    # -- service ---

    @property
    def service_status(self) -> ServiceStatus:
        return self._data.service_status

    @property
    def service_cert_pem(self) -> str:
        return self._data.service_cert_pem

    @property
    def constitution(self) -> str:
        return self._data.constitution

    @property
    def window_size(self) -> int:
        return self._data.window_size

    def service_info(self) -> dict[str, Any]:
        d = self._data
        info: dict[str, Any] = {
            "status": d.service_status,
            "certificate": d.service_cert_pem,
            "recoveryCount": d.recovery_count,
            "creationTransactionId": self.creation_txid,
            "serviceData": d.service_data,
            "configuration": {
                "recoveryThreshold": d.recovery_threshold,
                "maximumNodeCertificateValidityDays": MAX_NODE_CERT_VALIDITY_DAYS,
                "maximumServiceCertificateValidityDays": 365,
                "recentCoseProposalsWindowSize": d.window_size,
            },
        }
        if self.previous_creation_txid is not None:
            info["previousServiceCreationTransactionId"] = self.previous_creation_txid
        return info

    @property
    def recovery_count(self) -> int:
        return self._data.recovery_count

    @property
    def recovery_threshold(self) -> int:
        return self._data.recovery_threshold

    @property
    def previous_service_cert_pem(self) -> str | None:
        return self._data.previous_service_cert_pem

    # -- proposals ---

    def proposal(self, proposal_id: str) -> Proposal | None:
        return self._data.proposals.get(proposal_id)

    def proposals(self) -> list[Proposal]:
        return list(self._data.proposals.values())

    def recent_proposal_keys(self) -> list[str]:
        return sorted(self._data.recent_proposals)

    def create_proposal(self, envelope: GovEnvelope, signer: str, raw: bytes) -> Proposal:
        """``proposals:create`` after authentication, in CCF's handler order."""
        proposal_id = hashlib.sha256(self._root + hashlib.sha256(envelope.signature).digest()).hexdigest()

        def tx() -> Proposal:
            actions = validate_proposal(envelope.payload)
            if proposal_id in self._data.proposals:
                raise internal_error("Proposal ID collision.")
            self._check_replay(envelope, proposal_id)
            proposal = Proposal(proposal_id, signer, envelope.payload, actions)
            self._data.proposals[proposal_id] = proposal
            self._data.cose_history[signer] = raw
            self._resolve(proposal)
            return copy.deepcopy(proposal)

        return self._write(f"proposal:{proposal_id}", tx)

    def _check_replay(self, envelope: GovEnvelope, proposal_id: str) -> None:
        if envelope.created_at > MAX_CREATED_AT:
            raise GovError(400, "InvalidCreatedAt", "Header parameter created_at value is too large")
        created_at = f"{envelope.created_at:010d}"
        key = f"{created_at}:{hashlib.sha256(envelope.signature).hexdigest()}"
        recent = self._data.recent_proposals
        if key in recent:
            raise GovError(
                400,
                "ProposalReplay",
                f"Proposal submission replay, already exists as proposal {recent[key]}",
            )
        keys = sorted(recent)
        if keys:
            median = keys[len(keys) // 2].split(":", 1)[0]
            if created_at < median:
                raise GovError(
                    400,
                    "ProposalCreatedTooLongAgo",
                    f"Proposal created too long ago, created_at must be greater than {median}",
                )
        recent[key] = proposal_id
        excess = len(recent) - self._data.window_size
        for old in sorted(recent)[: max(excess, 0)]:
            del recent[old]

    def submit_ballot(
        self, envelope: GovEnvelope, signer: str, url_proposal_id: str, url_member_id: str, raw: bytes
    ) -> Proposal:
        _check_hex_id(url_proposal_id, "proposal")
        if envelope.proposal_id != url_proposal_id:
            raise GovError(400, "InvalidResourceName", "Authenticated proposal id does not match URL")
        _check_hex_id(url_member_id, "member")
        if url_member_id.lower() != signer:
            raise GovError(400, "InvalidResourceName", "Authenticated member id does not match URL")
        proposal_id = url_proposal_id.lower()
        existing = self._data.proposals.get(proposal_id)
        if existing is None:
            raise GovError(404, "ProposalNotFound", f"Could not find proposal {proposal_id}.")
        if existing.state != "Open":
            raise GovError(
                400,
                "ProposalNotOpen",
                f"Proposal {proposal_id} is currently in state {existing.state} - "
                "only Open proposals can receive votes",
            )
        try:
            params = json.loads(envelope.payload)
        except (ValueError, UnicodeDecodeError) as exc:
            raise invalid_input(str(exc)) from exc
        ballot = params.get("ballot") if isinstance(params, dict) else None
        if not isinstance(ballot, str):
            raise invalid_input('Signed request body is not a JSON object containing required string field "ballot"')
        previous = existing.ballots.get(signer)
        if previous is not None:
            if previous == ballot:
                return copy.deepcopy(existing)
            raise GovError(
                400, "VoteAlreadyExists", f"Different ballot already submitted by {signer} for {proposal_id}."
            )

        def tx() -> Proposal:
            proposal = self._data.proposals[proposal_id]
            proposal.ballots[signer] = ballot
            self._data.cose_history[signer] = raw
            self._resolve(proposal)
            return copy.deepcopy(proposal)

        return self._write(f"ballot:{proposal_id}:{signer}", tx)

    def withdraw(self, envelope: GovEnvelope, signer: str, url_proposal_id: str, raw: bytes) -> Proposal | None:
        """``:withdraw``; None means "unknown proposal" (204)."""
        _check_hex_id(url_proposal_id, "proposal")
        if envelope.proposal_id != url_proposal_id:
            raise GovError(400, "InvalidResourceName", "Authenticated proposal id does not match URL")
        proposal_id = url_proposal_id.lower()
        existing = self._data.proposals.get(proposal_id)
        if existing is None:
            return None
        if existing.proposer_id != signer:
            raise GovError(
                403,
                "AuthorizationFailed",
                f"Proposal {proposal_id} can only be withdrawn by proposer {existing.proposer_id}, "
                f"not caller {signer}.",
            )
        if existing.state == "Withdrawn":
            return copy.deepcopy(existing)
        if existing.state != "Open":
            raise GovError(
                400,
                "ProposalNotOpen",
                f"Proposal {proposal_id} is currently in state {existing.state} and cannot be withdrawn.",
            )

        def tx() -> Proposal:
            proposal = self._data.proposals[proposal_id]
            proposal.state = "Withdrawn"
            self._data.cose_history[signer] = raw
            self._drop_other_closed(proposal_id)
            return copy.deepcopy(proposal)

        return self._write(f"withdraw:{proposal_id}", tx)

    def _resolve(self, proposal: Proposal) -> None:
        active = set(self.active_member_ids())
        votes: dict[str, bool] = {}
        failures: dict[str, dict[str, str]] = {}
        for member_id, ballot in proposal.ballots.items():
            if member_id not in active:
                continue
            vote = evaluate_ballot(ballot)
            if vote is None:
                failures[member_id] = {"reason": BALLOT_NOT_SUPPORTED}
            else:
                votes[member_id] = vote
        outcome = resolve(votes, len(active))
        if outcome == "Open":
            return
        proposal.state = outcome
        proposal.final_votes = votes
        proposal.vote_failures = failures
        if outcome == "Accepted":
            for action in proposal.actions:
                try:
                    self._apply(action)
                except _ApplyError as exc:
                    raise internal_error(f"Failed to apply(): Error: {exc}") from exc
        self._drop_other_closed(proposal.proposal_id)

    def _drop_other_closed(self, keep: str) -> None:
        for other in [p for p in self._data.proposals.values() if p.state != "Open" and p.proposal_id != keep]:
            del self._data.proposals[other.proposal_id]

    def _apply(self, action: Action) -> None:
        d = self._data
        args: dict[str, Any] = action.args if isinstance(action.args, dict) else {}
        match action.name:
            case "set_member":
                self._apply_set_member(args)
            case "remove_member":
                member_id = args["member_id"]
                removed = d.members.get(member_id)
                if removed is None:
                    return  # idempotent, as in CCF
                active_recovery = removed.status == "Active" and removed.encryption_pub_key is not None
                if active_recovery:
                    after = self._active_recovery_member_count() - 1
                    if after < d.recovery_threshold:
                        raise _ApplyError(
                            f"Number of active recovery members ({after}) would be less than recovery threshold "
                            f"({d.recovery_threshold})"
                        )
                d.members.pop(member_id, None)
                d.acks.pop(member_id, None)
                d.encrypted_shares.pop(member_id, None)
                d.issued_shares.pop(member_id, None)
                if active_recovery and d.service_status == "Open":
                    self._issue_recovery_shares()  # CCF rekeys the ledger, which issues new shares
            case "set_member_data":
                member = d.members.get(args["member_id"])
                if member is None:
                    raise _ApplyError(f"Member {args['member_id']} does not exist")
                member.member_data = args["member_data"]
            case "transition_service_to_open":
                self._transition_to_open(args)
            case "set_constitution":
                d.constitution = args["constitution"]
            case "set_service_recent_cose_proposals_window_size":
                d.window_size = int(args["proposal_count"])
            case "set_recovery_threshold":
                self._set_recovery_threshold(int(args["recovery_threshold"]))
            case "trigger_recovery_shares_refresh":
                if d.service_status == "Open":
                    self._issue_recovery_shares()
            case "trigger_ledger_rekey":
                if d.service_status != "Open":
                    raise _ApplyError("Could not rekey ledger: the service is not open")
                self._issue_recovery_shares()  # a new ledger secret, so new shares
            case "transition_node_to_trusted":
                self._trust_node(args)
            case "remove_node":
                node = d.nodes.get(args["node_id"])
                if node is None:
                    return
                if node.status == "Pending":
                    del d.nodes[node.node_id]
                else:
                    node.status = "Retired"
            case _:
                raise _ApplyError(f"{action.name}: no such action")

    def _apply_set_member(self, args: dict[str, Any]) -> None:
        """The constitution's ``set_member``: (re-)registers the member, which is then Accepted (an Active member
        proposed again starts over), with a fresh ack record."""
        d = self._data
        cert = args["cert"]
        member_id = member_id_of(cert)
        key = args.get("encryption_pub_key")
        d.members[member_id] = Member(
            member_id=member_id,
            cert_pem=cert,
            status="Accepted",
            member_data=args.get("member_data"),
            encryption_pub_key=key,
            recovery_role=args.get("recovery_role"),
        )
        self._keys.pop(member_id, None)
        d.acks[member_id] = AckRecord(state_digest=self.root_hex)

    def _trust_node(self, args: dict[str, Any]) -> None:
        """The constitution's ``transition_node_to_trusted``: a Pending node becomes Trusted, with a certificate
        endorsed from ``valid_from`` for ``validity_period_days`` (the service's maximum by default)."""
        node = self._data.nodes.get(args["node_id"])
        if node is None:
            raise _ApplyError(f"No such node: {args['node_id']}")
        if node.status != "Pending":
            return
        node.status = "Trusted"
        days = args.get("validity_period_days")
        if days is not None and days > MAX_NODE_CERT_VALIDITY_DAYS:
            raise _ApplyError(f"Validity period {days} is not allowed: max allowed is {MAX_NODE_CERT_VALIDITY_DAYS}")
        try:
            parse_x509_time(args["valid_from"])  # generateEndorsedCertificate reads it
        except ValueError as exc:
            raise _ApplyError(str(exc)) from None

    def _set_recovery_threshold(self, threshold: int) -> None:
        d = self._data
        if threshold == d.recovery_threshold:
            return  # no effect, as in CCF's constitution
        if d.service_status in ("Recovering", "WaitingForRecoveryShares"):
            raise _ApplyError(f"Cannot set recovery threshold if service is {d.service_status}")
        if d.service_status == "Open":
            count = self._active_recovery_member_count()
            if threshold > count:
                raise _ApplyError(
                    f"Cannot set recovery threshold to {threshold}: recovery threshold would be greater than the "
                    f"number of recovery members {count}"
                )
        d.recovery_threshold = threshold
        if d.service_status == "Open":
            self._issue_recovery_shares()

    def _transition_to_open(self, args: dict[str, Any]) -> None:
        """The constitution's ``transition_service_to_open`` and the node's ``transitionServiceToOpen``: service
        identities are compared as PEM text, byte for byte (``ccf::crypto::Pem`` equality)."""
        d = self._data
        previous = args.get("previous_service_identity")
        if d.service_status == "Recovering" and previous is None:
            raise _ApplyError("Opening a recovering network requires both, the previous and the next service identity")
        if d.service_status in ("Open", "WaitingForRecoveryShares"):
            return  # CCF: "Service in state ... is already open", with no effect
        if d.service_status == "Recovering":
            if d.previous_service_cert_pem is None:
                raise _ApplyError(
                    "Recovery with service certificates requires both, a previous service identity written to the "
                    "KV during recovery genesis and a transition_service_to_open proposal that contains previous and "
                    "next service certificates"
                )
            if _pem(previous) != d.previous_service_cert_pem:
                raise _ApplyError(
                    f"Previous service identity does not match.\nActual:\n{d.previous_service_cert_pem}\n"
                    f"In proposal:\n{_pem(previous)}"
                )
        if _pem(args["next_service_identity"]) != d.service_cert_pem:
            raise _ApplyError(
                "Service identity mismatch: the next service identity in the transition_service_to_open proposal "
                f"does not match the current service identity:\nNext:\n{args['next_service_identity']}\n"
                f"Current:\n{d.service_cert_pem}"
            )
        if d.service_status == "Recovering":
            d.submitted_shares.clear()
            d.service_status = "WaitingForRecoveryShares"
        else:  # Opening
            try:
                self._issue_recovery_shares()
            except _ApplyError as exc:
                raise _ApplyError(f"Failed to issue recovery shares: {exc}") from exc
            d.service_status = "Open"

    # -- recovery shares ---

    def _recovery_members(self, role: RecoveryRole) -> list[Member]:
        """Active members with this recovery role, in member id order (CCF iterates a sorted map)."""
        return sorted(
            (m for m in self._data.members.values() if m.status == "Active" and m.role == role),
            key=lambda m: m.member_id,
        )

    def _active_recovery_member_count(self) -> int:
        """The constitution's getActiveRecoveryMembersCount: Active members with an encryption key."""
        return sum(1 for m in self._data.members.values() if m.status == "Active" and m.encryption_pub_key)

    def _issue_recovery_shares(self) -> None:
        """CCF's ShareManager::shuffle_recovery_shares: a fresh secret, split k-of-n over the participants."""
        d = self._data
        participants = self._recovery_members("Participant")
        owners = self._recovery_members("Owner")
        threshold = d.recovery_threshold
        if not participants and not owners:
            raise _ApplyError("There should be at least one active recovery member to issue recovery shares")
        if participants:
            if threshold > len(participants):
                raise _ApplyError(
                    f"Recovery threshold {threshold} should be equal to or less than the number of active recovery "
                    f"members {len(participants)}"
                )
            num_shares = len(participants)
        else:
            if threshold > 1:
                raise _ApplyError(
                    f"Recovery threshold {threshold} cannot be greater than 1 when the consortium consists of only "
                    f"active recovery owner members ({len(owners)})"
                )
            num_shares = 1
        secret, shares = sample_secret_and_shares(num_shares, threshold)
        issued: dict[str, bytes] = {}
        for member, share in zip(participants, shares, strict=False):
            issued[member.member_id] = share.serialise()
        for owner in owners:
            issued[owner.member_id] = secret.serialise()
        keys = {m.member_id: m.encryption_pub_key or "" for m in [*participants, *owners]}
        encrypted = {member_id: rsa_oaep_wrap(keys[member_id], plaintext) for member_id, plaintext in issued.items()}
        d.issued_shares = issued
        d.encrypted_shares = encrypted
        d.recovery_secret = secret.serialise()

    def encrypted_share(self, member_id: str) -> bytes | None:
        return self._data.encrypted_shares.get(member_id)

    def issued_share(self, member_id: str) -> bytes | None:
        """The plaintext share currently issued to ``member_id`` (sandbox only; CCF never stores it)."""
        return self._data.issued_shares.get(member_id)

    def submitted_share_members(self) -> list[str]:
        return sorted(self._data.submitted_shares)

    def recover(self, service_cert_pem: str) -> None:
        """The disaster: the service restarts from its ledger in Recover mode with a new service identity.

        Members (and their Active status), proposals, configuration and the encrypted recovery shares are in
        public tables and survive. Submitted shares are dropped.
        """
        d = self._data
        previous_cert = d.service_cert_pem
        previous_creation = self.creation_txid

        def tx() -> None:
            d.previous_service_cert_pem = previous_cert
            d.service_cert_pem = service_cert_pem
            d.service_status = "Recovering"
            d.recovery_count += 1
            d.submitted_shares.clear()
            for node in d.nodes.values():  # the old network's nodes; the restarted node joins as Trusted
                node.status = "Retired"

        self._write("recovery_genesis", tx)
        self.previous_creation_txid = previous_creation
        self.creation_txid = self.txid
        self.node_state = "PartOfPublicNetwork"
        self.recovery_target_seqno = None

    def submit_recovery_share(
        self, envelope: GovEnvelope, signer: str, url_member_id: str
    ) -> tuple[dict[str, Any], bool]:
        """``:recover`` after authentication, in CCF's handler order. Returns (response body, recovery started).

        As in CCF, a share is stored whatever its bytes; it is checked only when the threshold is reached and the
        shares are combined. A failed combination clears all submitted shares (and that clearing is kept) and is
        a 500 "Failed to initiate private recovery.".
        """
        d = self._data
        if d.service_status != "WaitingForRecoveryShares":
            raise GovError(403, "ServiceNotWaitingForRecoveryShares", "Service is not waiting for recovery shares.")
        if self.node_state == "ReadingPrivateLedger":
            raise GovError(403, "NodeAlreadyRecovering", "Node is already recovering private ledger.")
        _check_hex_id(url_member_id, "member")
        try:
            params = json.loads(envelope.payload)
        except (ValueError, UnicodeDecodeError) as exc:
            raise invalid_input(str(exc)) from exc
        _check_path_signer(url_member_id, signer)
        if not isinstance(params, dict):
            raise invalid_input(
                "[json.exception.type_error.305] cannot use operator[] with a string argument with "
                + _json_type(params)
            )
        share_b64 = params.get("share")
        if not isinstance(share_b64, str):
            raise invalid_input(f"[json.exception.type_error.302] type must be string, but is {_json_type(share_b64)}")
        try:
            raw = base64.b64decode(share_b64, validate=True)
        except binascii.Error as exc:
            raise internal_error(f"Failed to decode base64 recovery share: {exc}") from exc
        threshold = d.recovery_threshold
        full_key = is_full_key(raw)
        submitted = {**d.submitted_shares, signer: raw}
        count = len(submitted)
        message = (
            "Full recovery key successfully submitted"
            if full_key
            else f"{count}/{threshold} recovery shares successfully submitted"
        )
        initiate = count >= threshold or full_key
        if initiate:
            message += "\nEnd of recovery procedure initiated"
            if not self._combines_to_secret(submitted, threshold):
                self._write("clear_submitted_shares", d.submitted_shares.clear)
                raise internal_error("Failed to initiate private recovery.")

        def tx() -> None:
            d.submitted_shares[signer] = raw

        self._write(f"recovery_share:{signer}", tx)
        if initiate:
            self.node_state = "ReadingPrivateLedger"
            self.recovery_target_seqno = self.seqno
        body = {
            "message": message,
            "submittedCount": count,
            "recoveryThreshold": threshold,
            "fullKeySubmitted": full_key,
        }
        return body, initiate

    def _combines_to_secret(self, submitted: dict[str, bytes], threshold: int) -> bool:
        """CCF's combine_from_encrypted_submitted_shares + unwrap: does this set of shares give the secret?"""
        secret = self._data.recovery_secret
        if secret is None:
            return False
        partial: list[Share] = []
        for member_id in sorted(submitted):
            try:
                share = Share.parse(submitted[member_id])
            except ValueError:
                return False  # "Error combining recovery shares: decrypted share of N bytes is not ..."
            if share.x == 0:
                return share.serialise() == secret
            partial.append(share)
        try:
            return recover_secret(partial, threshold).serialise() == secret
        except ValueError:
            return False

    def complete_private_recovery(self) -> bool:
        """End of the private ledger replay: the service is Open again, with new shares. False if not replaying."""
        if self.node_state != "ReadingPrivateLedger":
            return False
        d = self._data

        def tx() -> None:
            d.service_status = "Open"
            d.submitted_shares.clear()
            if self._recovery_members("Participant") or self._recovery_members("Owner"):
                # if the threshold is above the remaining participants, keep the previous shares
                with contextlib.suppress(_ApplyError):
                    self._issue_recovery_shares()

        self._write("private_recovery_complete", tx)
        self.node_state = "PartOfNetwork"
        self.recovery_target_seqno = None
        return True

    # -- state digests ---

    def state_digest(self, member_id: str) -> str | None:
        record = self._data.acks.get(member_id)
        return None if record is None else record.state_digest

    def update_state_digest(self, signer: str, url_member_id: str) -> dict[str, str]:
        _check_path_signer(url_member_id, signer)
        if signer not in self._data.acks:
            raise GovError(403, "AuthorizationFailed", f"No ACK record exists for member {signer}.")
        digest = self.root_hex

        def tx() -> dict[str, str]:
            self._data.acks[signer].state_digest = digest
            return {"memberId": signer, "stateDigest": digest}

        return self._write(f"update:{signer}", tx)

    def ack(self, envelope: GovEnvelope, signer: str, url_member_id: str, raw: bytes) -> None:
        _check_path_signer(url_member_id, signer)
        record = self._data.acks.get(signer)
        if record is None:
            raise GovError(403, "AuthorizationFailed", f"No ACK record exists for member {signer}.")
        try:
            params = json.loads(envelope.payload)
        except (ValueError, UnicodeDecodeError) as exc:
            raise invalid_input(str(exc)) from exc
        submitted = params.get("stateDigest") if isinstance(params, dict) else None
        if not isinstance(submitted, str):
            raise invalid_input(
                'Signed request body is not a JSON object containing required string field "stateDigest"'
            )
        if submitted != record.state_digest:
            raise GovError(
                400,
                "StateDigestMismatch",
                f"Submitted state digest is not valid.\nExpected\n {record.state_digest}\nReceived\n {submitted}",
            )
        member = self._data.members[signer]
        if (
            self._data.service_status in ("Recovering", "WaitingForRecoveryShares")
            and member.status != "Active"
            and member.encryption_pub_key is not None
        ):
            raise invalid_input("Recovery members cannot be activated during recovery.")

        def tx() -> None:
            self._data.acks[signer].cose_sign1_req = raw
            newly_active = member.status != "Active"
            member.status = "Active"
            if newly_active and member.role != "NonParticipant" and self._data.service_status == "Open":
                try:
                    self._issue_recovery_shares()
                except _ApplyError as exc:
                    raise internal_error(str(exc)) from exc

        self._write(f"ack:{signer}", tx)


class _ApplyError(Exception):
    pass


def _pem(value: object) -> str:
    """A PEM as ``ccf::crypto::Pem`` keeps it: the text, without a trailing NUL."""
    return str(value).removesuffix("\0")


def _check_path_signer(url_member_id: str, signer: str) -> None:
    if url_member_id != signer:
        raise GovError(
            400,
            "InvalidAuthenticationInfo",
            f"Member ID from path parameter ({url_member_id}) does not match member ID from body signature ({signer}).",
        )


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    return "array" if isinstance(value, list) else "object"


def _check_hex_id(value: str, kind: str) -> None:
    if len(value) != 64 or any(c not in "0123456789abcdefABCDEF" for c in value):
        raise GovError(400, "InvalidResourceName", f"'{value}' is not a valid hex-encoded {kind} ID")


def check_hex_id(value: str, kind: str) -> str:
    """Validate a path id as CCF's parser does (64 hex, any case) and return it lowercased."""
    _check_hex_id(value, kind)
    return value.lower()
