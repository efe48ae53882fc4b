"""Recovery shares: fetch a member's encrypted share, decrypt it in the key store, sign it, submit it to ``:recover``.

Two ways in: ``RecoveryService.submit_share`` on request (the API and ``signing-agent recovery submit-share``), and a
``RecoveryWatcher`` per configured (service, identity) that polls the service and submits the share once per recovery
(a recovery is keyed by the service's ``recoveryCount`` and ``creationTransactionId``, remembered in a small state
file so that a restart never submits again).

The share is secret. Its plaintext and base64 live in local bytearrays for the few statements between decryption and
signing, and are zeroed afterwards; they never reach a log line, an audit record, an exception message, the state file
or metrics. The signed COSE message necessarily carries it (that is the protocol), so it goes to the service and
nowhere else: audit records hold its SHA-256 only. The daemon disables core dumps (``daemon.harden_process``).

Only ciphertexts fetched from a configured service over pinned TLS are ever decrypted, and the agent exposes no
generic decryption API: that is what makes the opt-in ``oaep = "host"`` PKCS#11 mode (raw RSA in the token, OAEP
decoded on the host, a potential padding oracle) acceptable. Keep it that way. On top of that, decryption for an
identity is suspended after ``MAX_DECRYPTION_FAILURES`` failures until the next reload: a padding-oracle attack needs
thousands of failing queries.

Trust after a disaster recovery (the service comes back with a new identity): see the README's "Recovery" section.
A share is fetched, decrypted and submitted only over TLS pinned to an identity the operator decided: the pinned
certificate, ``accepted_service_certificates``, or (``accept_transition_to = true``) a new identity a member approved
through this agent: its fingerprint, announced out of band, and this agent's own accepting ballot on the
``transition_service_to_open`` proposal that names it (``RecoveryService.approve_identity``). An identity the rule
adopts on the endpoint's word alone (``RecoveryService.adopt_by_proposal``) is trusted provisionally: reads and
ballots, never a share.

The state file holds that trust, so it must be the agent's own: it is opened without following symlinks, in a
folder owned by the agent's uid (or root) that no group or other may write, and refused unless it is a regular file
of the agent's uid with mode 0600 at most (``RecoveryStateStore``).

Must not import aiohttp or the API (the API and the daemon call in).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import errno
import json
import logging
import os
import random
import re
import secrets
import stat
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from signing_agent.audit import (
    Auditor,
    Denied,
    IdentityAdopted,
    IdentityApproved,
    RecoveryStateRefused,
    Share,
    ShareFailed,
    ShareSubmitted,
    Subject,
)
from signing_agent.backends.base import Priority
from signing_agent.ccf.api import Answer, GovernanceAPI, RecoverySubmission, ServiceInfo
from signing_agent.certs import certificate_der, der_sha256
from signing_agent.config import RecoveryConfig, ServiceConfig
from signing_agent.context import RequestContext, bound, current_request
from signing_agent.cose.governance import MsgType, check_proposal_id
from signing_agent.errors import (
    AgentError,
    BackendError,
    BackendUnavailableError,
    CCFError,
    CCFTrustError,
    CCFUnavailableError,
    ConfigError,
    ConflictError,
    InvalidRequestError,
    PolicyDeniedError,
    UnsupportedOperationError,
)
from signing_agent.files import fsync_folder
from signing_agent.governance import GovernanceService, Relay
from signing_agent.metrics import METRICS, Metrics
from signing_agent.policy import ACCEPT_BALLOT
from signing_agent.retry import Backoff
from signing_agent.service import SignedMessage, SigningService, SignRequest

_logger = logging.getLogger(__name__)

T = TypeVar("T")

WAITING = "WaitingForRecoveryShares"
MAX_DECRYPTION_FAILURES = 3
STATE_VERSION = 1
MAX_STATE_BYTES = 1 << 20

# A well-formed stand-in for the policy pre-check (the real payload does not exist before decryption).
_POLICY_PROBE = b'{"share":"AAAA"}'
# The state file's records of service identities: approved for shares (pinned), or adopted provisionally.
_APPROVED = "approved_identity"
_ADOPTED = "adopted_identity"
# Anything in a CCF message that could be a share in base64, urlsafe base64 or hex is cut out before it is kept.
_SECRET_LIKE = re.compile(r"[A-Za-z0-9+/=_-]{40,}")


def _fingerprint(pem: bytes) -> str:
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
        "sha256": _fingerprint(candidate),
        "previous_sha256": der_sha256(previous),
        "configured_sha256": _fingerprint(configured),
        "proposal_id": proposal_id,
    }


def scrub(text: str, limit: int = 300) -> str:
    """CCF's message as safe to keep: anything long and base64/hex-like removed, and cut to ``limit``."""
    return _SECRET_LIKE.sub("[redacted]", text)[:limit]


@dataclass(frozen=True, slots=True)
class RecoveryKey:
    """Which recovery a share belongs to."""

    recovery_count: int | None
    creation_txid: str | None

    def as_dict(self) -> dict[str, Any]:
        return {"recoveryCount": self.recovery_count, "creationTransactionId": self.creation_txid}

    def matches(self, record: Mapping[str, Any] | None) -> bool:
        return (
            record is not None
            and record.get("recoveryCount") == self.recovery_count
            and record.get("creationTransactionId") == self.creation_txid
        )


# --- the state file -----------------------------------------------------------------------------------------------


class RecoveryStateStore:
    """One JSON file per service (mode 0600, replaced atomically): submitted recoveries per identity, and the service
    identities adopted (provisionally) or approved after a recovery. Never a share. One store object per file per
    process (``for_path``).

    The file decides where shares may go, so only the agent's own is used: the folder is opened without following a
    symlink and must belong to the agent's uid or root and be writable by no group or other; the file is opened
    without following a symlink and must be a regular file of the agent's uid, mode 0600 at most. Anything else is
    refused with a ``ConfigError`` on every read and write (nothing from it is used, nothing is written over it, its
    mode is never changed), until an operator moves it aside.
    """

    _stores: dict[Path, RecoveryStateStore] = {}  # noqa: RUF012 -- a process-wide registry, on purpose

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = asyncio.Lock()
        self._data: dict[str, Any] | None = None

    @classmethod
    def for_path(cls, path: Path) -> RecoveryStateStore:
        store = cls._stores.get(path)
        if store is None:
            store = cls._stores[path] = cls(path)
        return store

    @staticmethod
    def _refused(path: Path, why: str) -> ConfigError:
        return ConfigError(
            f"recovery.state_dir: refused {path}: {why}",
            hint="the agent writes its recovery state itself (mode 0600, its own uid, in a folder only it may "
            "write); if you did not put this there, investigate, then move it aside",
        )

    def _open_folder(self, folder: Path) -> int:
        """The state folder as an fd, checked (``FileNotFoundError`` when it does not exist)."""
        try:
            fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                raise self._refused(folder, "not a folder (a symbolic link?)") from None
            raise
        st = os.fstat(fd)
        why = None
        if st.st_uid not in (os.geteuid(), 0):
            why = f"the folder is owned by uid {st.st_uid}, not by the agent's uid {os.geteuid()} or root"
        elif st.st_mode & 0o022:
            why = f"the folder's mode {stat.S_IMODE(st.st_mode):04o} lets group or others write in it"
        if why is not None:
            os.close(fd)
            raise self._refused(folder, why)
        return fd

    def _read_sync(self) -> dict[str, Any]:
        empty: dict[str, Any] = {"version": STATE_VERSION, "submissions": {}}
        try:
            folder = self._open_folder(self.path.parent)
        except FileNotFoundError:
            return empty
        except OSError as exc:
            raise ConfigError(f"recovery.state_dir: cannot read {self.path}: {exc.strerror}") from None
        try:
            raw = self._read_file(folder, self.path)
        except OSError as exc:
            raise ConfigError(f"recovery.state_dir: cannot read {self.path}: {exc.strerror}") from None
        if raw is None:
            return empty
        try:
            data = json.loads(raw)
        except (ValueError, RecursionError):
            raise ConfigError(f"recovery.state_dir: {self.path} is not JSON; move it aside") from None
        if not isinstance(data, dict) or not isinstance(data.get("submissions"), dict):
            raise ConfigError(f"recovery.state_dir: {self.path} is not a recovery state file; move it aside")
        return data

    def _read_file(self, folder: int, path: Path) -> bytes | None:
        """The file's content, checked on the opened file (None when there is none); closes ``folder``."""
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC  # NONBLOCK: a planted FIFO cannot hang us
        try:
            fd = os.open(path.name, flags, dir_fd=folder)
        except FileNotFoundError:
            return None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise self._refused(path, "it is a symbolic link") from None
            raise
        finally:
            os.close(folder)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise self._refused(path, "not a regular file")
            if st.st_uid != os.geteuid():
                raise self._refused(path, f"owned by uid {st.st_uid}, not by the agent's uid {os.geteuid()}")
            if stat.S_IMODE(st.st_mode) & ~0o600:
                raise self._refused(path, f"mode {stat.S_IMODE(st.st_mode):04o} is wider than 0600")
            chunks = []
            size = 0
            while chunk := os.read(fd, 65536):
                size += len(chunk)
                if size > MAX_STATE_BYTES:
                    raise self._refused(path, f"larger than {MAX_STATE_BYTES} bytes")
                chunks.append(chunk)
            return b"".join(chunks)
        finally:
            os.close(fd)

    def _write_sync(self, data: Mapping[str, Any]) -> None:
        name = self.path.name
        tmp = f".{name}.{secrets.token_hex(4)}.tmp"
        encoded = json.dumps(data, sort_keys=True, indent=1).encode() + b"\n"
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        folder = self._open_folder(self.path.parent)
        try:
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            fd = os.open(tmp, flags, 0o600, dir_fd=folder)
            try:
                view = memoryview(encoded)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
            try:
                os.replace(tmp, name, src_dir_fd=folder, dst_dir_fd=folder)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp, dir_fd=folder)
                raise
            fsync_folder(folder)
        finally:
            os.close(folder)

    async def load(self) -> dict[str, Any]:
        async with self._lock:
            if self._data is None:
                self._data = await asyncio.to_thread(self._read_sync)
            copy: dict[str, Any] = json.loads(json.dumps(self._data))
            return copy

    async def update(self, change: Callable[[dict[str, Any]], None]) -> None:
        async with self._lock:
            data = self._data if self._data is not None else await asyncio.to_thread(self._read_sync)
            data = json.loads(json.dumps(data))
            change(data)
            try:
                await asyncio.to_thread(self._write_sync, data)
            except OSError as exc:
                raise ConfigError(f"recovery.state_dir: cannot write {self.path}: {exc.strerror}") from None
            self._data = data


# --- the use case -------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ShareResult:
    """What a submission did: CCF's answer to relay, and the facts the watcher needs."""

    relay: Relay
    submitted: bool
    key: RecoveryKey
    ccf_error: str | None = None
    skipped: bool = False
    """The share for this recovery had already been submitted (unattended mode only); nothing was sent."""


def _count(value: object) -> int | None:
    """A count from CCF's answer as the audit log keeps it: an integer, or nothing."""
    return value if isinstance(value, int) and not isinstance(value, bool) else None


@dataclass(frozen=True, slots=True, kw_only=True)
class _ShareAttempt:
    """One share submission, as its audit records describe it: who asked, whose share, for which recovery."""

    request: RequestContext
    subject: Subject
    share: Share

    def failed(
        self,
        *,
        message: str = "",
        ccf_status: int | None = None,
        ccf_error: str | None = None,
        error: str | None = None,
        transaction_id: str | None = None,
        attempts: int | None = None,
    ) -> ShareFailed:
        return ShareFailed(
            request=self.request,
            subject=self.subject,
            share=self.share,
            ccf_status=ccf_status,
            ccf_error=ccf_error,
            error=error,
            ccf_message=scrub(message),
            transaction_id=transaction_id,
            attempts=attempts,
        )

    def submitted(self, resp: Answer[RecoverySubmission]) -> ShareSubmitted:
        """CCF took the share: its status, transaction id and (scrubbed) message, and the recovery's progress."""
        got = resp.value
        return ShareSubmitted(
            request=self.request,
            subject=self.subject,
            share=self.share,
            ccf_status=resp.status,
            transaction_id=resp.transaction_id,
            attempts=resp.attempts,
            ccf_message=scrub(got.message if got is not None else ""),
            submitted_count=got.submitted_count if got is not None else None,
            recovery_threshold=got.recovery_threshold if got is not None else None,
        )


@dataclass
class _Stats:
    decryption_failures: dict[str, int] = field(default_factory=dict)


class RecoveryService:
    """Recovery-share submission for the identities of one configuration generation, and its watchers."""

    def __init__(
        self,
        signer: SigningService,
        governance: GovernanceService,
        config: RecoveryConfig,
        *,
        auditor: Auditor,
        metrics: Metrics | None = None,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self.signer = signer
        self.governance = governance
        self.config = config
        self.auditor = auditor
        self._metrics = metrics or METRICS
        self._rng = rng
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}
        self._adopt_lock = asyncio.Lock()
        self._provisional_proposal: dict[str, str] = {}
        self._stats = _Stats()
        self.watchers: list[RecoveryWatcher] = []
        if config.enabled:
            for svc in governance.services.values():
                for ident in svc.recovery_identities:
                    if ident in signer.identities:
                        self.watchers.append(RecoveryWatcher(self, svc.name, ident))
                    else:  # the identity failed its self-test (--allow-degraded)
                        _logger.error(
                            "recovery watcher for %s on %s not started: identity unavailable", ident, svc.name
                        )

    def store(self, service: str) -> RecoveryStateStore:
        return RecoveryStateStore.for_path(self.config.state_dir / f"recovery-{service}.json")

    def _service(self, service: str) -> ServiceConfig:
        return self.governance.ccf.config(service)

    async def open(self) -> None:
        """Restore the trust kept in the state files (unless the configured certificate changed since): an identity
        approved after an earlier recovery is pinned, one adopted provisionally is trusted for reads and ballots.
        Each restored identity is audited. A state file the agent cannot trust is refused: logged, audited
        (``recovery_state_refused``), nothing restored from it, and recovery for that service stops (its watchers
        and submissions fail with the reason) until an operator moves the file aside."""
        for name in self.governance.services:
            store = self.store(name)
            try:
                data = await store.load()
            except ConfigError as exc:
                _logger.error("service %s: recovery state refused, nothing restored from it: %s", name, exc.message)  # noqa: TRY400
                await self.auditor.record(
                    RecoveryStateRefused(subject=Subject(service=name), path=str(store.path), reason=exc.message)
                )
                continue
            configured: str | None = None
            for key, trust in ((_APPROVED, "approved"), (_ADOPTED, "provisional")):
                record = data.get(key)
                pem = record.get("certificate") if isinstance(record, dict) else None
                if not isinstance(record, dict) or not isinstance(pem, str) or certificate_der(pem) is None:
                    continue
                configured = configured or _fingerprint(await self.governance.ccf.configured_identity(name))
                if record.get("configured_sha256") != configured:
                    _logger.warning(
                        "service %s: the configured service_certificate changed since identity %s was adopted; "
                        "using the configured one",
                        name,
                        _fingerprint(pem.encode())[:16],
                    )
                    continue
                await self._trust(name, pem.encode("ascii"), trust, record, restored_from=store.path)

    async def _trust(
        self, service: str, pem: bytes, trust: str, record: Mapping[str, Any], *, restored_from: Path | None = None
    ) -> None:
        """Put an identity to use (pinned when approved, else provisional) and audit it as ``identity_adopted``."""
        proposal_id = record.get("proposal_id")
        previous = record.get("previous_sha256")
        adopted = IdentityAdopted(
            subject=Subject(service=service, proposal_id=proposal_id if isinstance(proposal_id, str) else None),
            certificate_sha256=_fingerprint(pem),
            previous_sha256=previous if isinstance(previous, str) else None,
            trust=trust,
            restored_from=str(restored_from) if restored_from is not None else None,
        )
        await self.auditor.record(adopted)
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

    # -- trust ---

    async def _decided(self, service: str) -> tuple[GovernanceAPI, set[bytes]]:
        """The client trusted for everything (shares included) and its identities as DER: the pinned one (configured,
        or approved after a recovery) and ``accepted_service_certificates``. Never a provisional identity."""
        client = await self.governance.ccf.client(service)
        return client, {d for d in (certificate_der(p) for p in client.trusted_pems) if d is not None}

    async def _read(self, service: str, read: Callable[[GovernanceAPI], Awaitable[Answer[T]]]) -> Answer[T]:
        """A read that may go to a provisional identity; on a trust failure, the proposal rule may adopt one, once."""
        try:
            return await read(await self.governance.ccf.client(service, provisional=True))
        except CCFTrustError:
            if not self._service(service).accept_transition_to or not await self.adopt_by_proposal(service):
                raise
        return await read(await self.governance.ccf.client(service, provisional=True))

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
                _fingerprint(candidate)[:16],
            )
            return False
        proposal_id, previous = found
        record = _identity_record(await ccf.configured_identity(service), candidate, previous, proposal_id)
        record.update(adopted_at=int(time.time()), trust="provisional")

        def change(data: dict[str, Any]) -> None:
            data[_ADOPTED] = record

        await self.store(service).update(change)
        await self._trust(service, candidate, "provisional", record)
        return True

    @staticmethod
    async def _transition_proposal(
        probe: GovernanceAPI, decided: set[bytes], candidate_der: bytes
    ) -> tuple[str, bytes] | None:
        """The first Open or Accepted proposal that transitions from ``decided`` to the candidate, with the previous
        identity it names (DER)."""
        listed = await probe.proposals(max_attempts=1)
        for proposal in listed.value or ():
            pid = proposal.proposal_id
            if proposal.state not in ("Open", "Accepted") or pid is None:
                continue
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
            presented = _fingerprint(candidate)
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
            data[_APPROVED] = record
            data.pop(_ADOPTED, None)

        await self.store(service).update(change)
        self.governance.ccf.pin(service, candidate)
        self.governance.ccf.trust_provisionally(service, None)
        self._provisional_proposal.pop(service, None)
        _logger.warning(
            "service %s: the new service identity %s (was %s) is approved for recovery shares by %s's accepting "
            "ballot on proposal %s",
            service,
            record["sha256"][:16],
            record["previous_sha256"][:16],
            record["identity"],
            record["proposal_id"],
        )

    # -- submission ---

    async def service_info(self, service: str, *, for_share: bool = False) -> ServiceInfo:
        """The service's info through the trust guard (``for_share``: the share guard); a non-200 answer is a
        ``CCFError``."""
        read = self._share_read if for_share else self._read
        info = await read(service, lambda api: api.service_info())
        if info.value is None:
            raise CCFError(f"service {service!r}: {info.request} answered {info.status}")
        return info.value

    async def _share_read(self, service: str, read: Callable[[GovernanceAPI], Awaitable[Answer[T]]]) -> Answer[T]:
        """A read on the way to a share: only from an identity trusted for shares (never a provisional one)."""
        client, _ = await self._decided(service)
        try:
            return await read(client)
        except CCFTrustError as exc:
            raise await self._untrusted_for_shares(service, exc) from None

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
            f"accepted_service_certificates); its identity {_fingerprint(provisional)[:16]} is trusted "
            f"provisionally only, after transition_service_to_open proposal {proposal_id}: no share was decrypted "
            "or sent",
            hint="a member who has the new service certificate's fingerprint from out of band approves it through this "
            f"agent (signing-agent recovery approve-identity {proposal_id} --sha256 <fingerprint>), which votes "
            "accept on that proposal; or list the certificate in accepted_service_certificates and reload",
        )

    async def submit_share(self, service: str, identity: str, *, unattended: bool = False) -> ShareResult:
        """Fetch, decrypt (in the key store), sign and submit ``identity``'s share for the current caller; CCF's
        answer is relayed.

        ``unattended`` (the watcher): skip when the share for the service's current recovery was submitted already.
        """
        ident = self.signer.identity(identity)
        self._service(service)
        if ident.decryption_key is None:
            raise InvalidRequestError(
                f"identity {identity!r} has no encryption_key: it cannot decrypt a recovery share",
                hint=f"configure [identities.{identity}.encryption_key]",
            )
        # Decide before any key is used: a caller the policy refuses never makes the key store decrypt.
        explained = await self.signer.explain(
            SignRequest(identity=identity, msg_type=MsgType.RECOVERY_SHARE, payload=_POLICY_PROBE, service=service)
        )
        if not explained.decision.allowed:
            self.signer.charge_denial()  # past the peer's budget: 429, and no record
            await self.auditor.record(
                Denied(
                    request=current_request(),
                    subject=Subject(
                        identity=identity,
                        member_id=ident.member_id,
                        msg_type=str(MsgType.RECOVERY_SHARE),
                        service=service,
                    ),
                    rule=explained.decision.rule,
                    reason=explained.decision.reason,
                )
            )
            raise PolicyDeniedError(f"policy: {explained.decision.describe()}")
        lock = self._locks.setdefault((service, identity), asyncio.Lock())
        async with lock:
            return await self._submit_locked(service, identity, unattended=unattended)

    async def _submit_locked(self, service: str, identity: str, *, unattended: bool) -> ShareResult:
        ident = self.signer.identity(identity)
        store = self.store(service)
        data = await store.load()  # a refused state file stops every submission, before anything is fetched
        # From here on, every request goes only to an identity trusted for shares (the pinned one, a listed one, or
        # one this agent's own accepting ballot approved): the service info, the encrypted share and :recover.
        info = await self.service_info(service, for_share=True)
        key = RecoveryKey(info.recovery_count, info.creation_transaction_id)
        if unattended and key.matches(data["submissions"].get(identity)):
            return ShareResult(Relay(status=200, body=None), submitted=False, key=key, skipped=True)
        attempt = _ShareAttempt(
            request=current_request(),
            subject=Subject(identity=identity, member_id=ident.member_id, service=service),
            share=Share(
                recovery_count=key.recovery_count, creation_transaction_id=key.creation_txid, unattended=unattended
            ),
        )
        mid = ident.member_id
        enc = await self._share_read(service, lambda api: api.encrypted_share(mid))
        if not enc.ok:
            await self._failed(
                attempt.failed(ccf_status=enc.status, ccf_error=enc.error_code, message=enc.error_message)
            )
            return ShareResult(Relay.of(enc), submitted=False, key=key, ccf_error=enc.error_code)
        if enc.value is None:
            await self._failed(attempt.failed(error="CCFError", message="malformed encryptedShare"))
            raise CCFError(f"service {service!r} answered an encrypted share that is not base64")
        try:
            signed = await self._decrypt_and_sign(service, identity, enc.value.ciphertext)
            # Not provisional: the client trusts only the identities decided for shares.
            resp = await self.governance.forward(
                service, signed, lambda api, cose: api.submit_recovery_share(mid, cose)
            )
        except AgentError as exc:
            await self._failed(attempt.failed(error=exc.code))
            raise
        del signed
        if not resp.ok:
            await self._failed(
                attempt.failed(
                    ccf_status=resp.status,
                    ccf_error=resp.error_code,
                    message=resp.error_message,
                    transaction_id=resp.transaction_id,
                    attempts=resp.attempts,
                )
            )
            return ShareResult(Relay.of(resp), submitted=False, key=key, ccf_error=resp.error_code)
        submitted = attempt.submitted(resp)
        await self.auditor.record(submitted)
        self._metrics.recovery_shares.labels(service, identity, "submitted").inc()

        def change(data: dict[str, Any]) -> None:
            data["submissions"][identity] = {
                **key.as_dict(),
                "memberId": ident.member_id,
                "submittedAt": int(time.time()),
                "transactionId": resp.transaction_id,
            }

        await store.update(change)
        _logger.info(
            "recovery share of %s submitted to %s (recovery %s): %s",
            identity,
            service,
            key.recovery_count,
            submitted.ccf_message.replace("\n", "; "),
        )
        return ShareResult(Relay.of(resp), submitted=True, key=key)

    async def _failed(self, failed: ShareFailed) -> None:
        await self.auditor.record(failed)
        service, identity = failed.subject.service or "", failed.subject.identity or ""
        self._metrics.recovery_shares.labels(service, identity, "failed").inc()

    async def _decrypt_and_sign(self, service: str, identity: str, ciphertext: bytes) -> SignedMessage:
        """The only place the agent decrypts: a ciphertext fetched from a configured service over pinned TLS."""
        ident = self.signer.identity(identity)
        key = ident.decryption_key
        if key is None:  # pragma: no cover -- checked by submit_share
            raise InvalidRequestError(f"identity {identity!r} has no encryption_key")
        failures = self._stats.decryption_failures.get(identity, 0)
        if failures >= MAX_DECRYPTION_FAILURES:
            raise BackendError(
                f"identity {identity}: decryption of recovery shares is suspended after {failures} failures",
                hint="a service that serves bad ciphertexts may be probing for a padding oracle: investigate, "
                "then reload the agent (SIGHUP)",
            )
        share = bytearray()
        payload = bytearray()
        try:
            try:
                share += await key.decrypt_oaep_sha256(ciphertext, priority=Priority.HIGH)
            except (UnsupportedOperationError, BackendUnavailableError):
                raise  # the token cannot do it, or cannot be reached: messages about the key store, not the data
            except Exception:  # noqa: BLE001 -- every failure gets one message that says nothing about the data
                self._stats.decryption_failures[identity] = failures + 1
                raise BackendError(
                    f"identity {identity}: the recovery share could not be decrypted with its encryption_key"
                ) from None
            payload += b'{"share":"'
            payload += base64.b64encode(share)
            payload += b'"}'
            return await self.signer.sign(
                SignRequest(identity=identity, msg_type=MsgType.RECOVERY_SHARE, payload=bytes(payload), service=service)
            )
        finally:
            share[:] = bytes(len(share))
            payload[:] = bytes(len(payload))
            del share, payload

    # -- watchers ---

    def start_watchers(self) -> None:
        for watcher in self.watchers:
            watcher.start()

    async def stop_watchers(self) -> None:
        await asyncio.gather(*(w.stop() for w in self.watchers))

    def status(self, service: str | None = None) -> list[dict[str, Any]]:
        return [w.status() for w in self.watchers if service is None or w.service == service]


class RecoveryWatcher:
    """Polls one service for one identity and submits its share once per recovery."""

    def __init__(self, recovery: RecoveryService, service: str, identity: str) -> None:
        self.recovery = recovery
        self.service = service
        self.identity = identity
        self.state = "stopped"
        self.service_status: str | None = None
        self.last_error: str | None = None
        self.last_checked_at: float | None = None
        self.last_submission: dict[str, Any] | None = None
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._set("stopped")

    def _set(self, state: str, error: str | None = None) -> None:
        self.state = state
        self.last_error = error
        self.recovery._metrics.set_recovery_state(self.service, self.identity, state)

    def start(self) -> None:
        if self._task is None:
            self._stop.clear()
            self._task = asyncio.get_running_loop().create_task(self._run(), name=f"recovery:{self.service}")
            self._set("watching")
            _logger.info("recovery watcher for %s on service %s started", self.identity, self.service)

    async def stop(self) -> None:
        """Stop after the current step (a submission under way completes, so its state is recorded)."""
        task, self._task = self._task, None
        if task is None:
            return
        self._stop.set()
        limit = self.recovery.governance.services[self.service].request_timeout + 5.0
        try:
            async with asyncio.timeout(limit):
                await task
        except TimeoutError:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._set("stopped")

    def status(self) -> dict[str, Any]:
        return {
            "service": self.service,
            "identity": self.identity,
            "state": self.state,
            "service_status": self.service_status,
            "last_error": self.last_error,
            "last_checked_at": self.last_checked_at,
            "last_submission": self.last_submission,
        }

    async def _run(self) -> None:
        cfg = self.recovery.config
        poll = Backoff(cfg.poll_interval, cfg.max_backoff, jitter=(0.8, 1.2))  # doubles after each failure
        failures = 0
        reported: str | None = None
        while not self._stop.is_set():
            try:
                await self.tick()
            except AgentError as exc:
                failures += 1
                untrusted = isinstance(exc, CCFTrustError)
                self._set("untrusted" if untrusted else "failed", exc.message)
                if exc.message != reported:
                    _logger.warning("recovery watcher for %s on %s: %s", self.identity, self.service, exc.message)
                    reported = exc.message
            except Exception as exc:
                failures += 1
                self._set("failed", f"internal error: {type(exc).__name__}")
                _logger.exception("recovery watcher for %s on %s failed", self.identity, self.service)
            else:
                failures = 0
                reported = None
            delay = poll.delay(failures, self.recovery._rng())
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._stop.wait()

    async def tick(self) -> None:
        """One poll: submit when the service waits for shares and ours for this recovery is not in yet.

        The poll is the agent's own request: its own caller, and a fresh ``watcher-`` request id (a form no client
        can give) in its log lines and audit records."""
        with bound(RequestContext.for_agent()):
            await self._poll()

    async def _poll(self) -> None:
        # The state first: a refused state file shows as a failed watcher now, not only once a disaster happened.
        data = await self.recovery.store(self.service).load()
        info = await self.recovery.service_info(self.service)
        self.last_checked_at = round(time.time(), 3)
        self.service_status = info.status
        if info.status != WAITING:
            self._set("watching")
            return
        previous = data["submissions"].get(self.identity)
        key = RecoveryKey(info.recovery_count, info.creation_transaction_id)
        if key.matches(previous):
            self.last_submission = previous
            self._set("submitted")
            return
        self._set("recovering")
        result = await self.recovery.submit_share(self.service, self.identity, unattended=True)
        if result.submitted or result.skipped:
            data = await self.recovery.store(self.service).load()
            self.last_submission = data["submissions"].get(self.identity)
            self._set("submitted")
            return
        if result.ccf_error in ("NodeAlreadyRecovering", "ServiceNotWaitingForRecoveryShares"):
            # The threshold was reached without us, or the service moved on: nothing to submit now.
            self._set("watching")
            return
        raise CCFError(
            f"service {self.service!r} refused the recovery share: {result.relay.status} {result.ccf_error or ''}"
        )
