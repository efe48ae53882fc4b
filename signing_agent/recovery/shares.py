"""Recovery shares: fetch a member's encrypted share, decrypt it in the key store, sign it, submit it to ``:recover``.

The policy is asked first, before anything is fetched or decrypted: may the caller have this identity's recovery
share submitted to this CCF service (``Action.recovery_share``)? The signature of the real share then goes through
the normal sign path (``Signer.sign``), which asks again and audits it.

The share is secret. Its plaintext and base64 live in local bytearrays for the few statements between decryption and
signing, and are zeroed afterwards; they never reach a log line, an audit record, an exception message, the state file
or metrics. The signed COSE message necessarily carries it (that is the protocol), so it goes to the CCF service and
nowhere else: audit records hold its SHA-256 only. Core dumps are off (``harden_process``).

Only ciphertexts fetched from a configured CCF service over TLS pinned to an identity trusted for shares
(``recovery.trust``) are ever decrypted here (the one other decryption is the start-up self-test of an encryption
key, of a random message the agent encrypted itself: ``identity``), and the agent exposes no generic decryption
API: that is what makes the opt-in ``oaep = "host"`` PKCS#11 mode (raw RSA in the token, OAEP decoded on the host, a
potential padding oracle) acceptable. Keep it that way. On top of that, decryption for an identity is suspended after
``MAX_DECRYPTION_FAILURES`` failures until the next reload: a padding-oracle attack needs thousands of failing queries.

Must not import aiohttp or the API.
"""

from __future__ import annotations

import base64
import logging
import re
import time
from dataclasses import dataclass, field
from typing import Any

from signing_agent.audit import Auditor, Share, ShareFailed, ShareSubmitted, Subject
from signing_agent.backends.base import Priority
from signing_agent.ccf.api import Answer, RecoverySubmission
from signing_agent.context import RequestContext, current_request
from signing_agent.cose.governance import MsgType
from signing_agent.errors import (
    AgentError,
    BackendError,
    BackendUnavailableError,
    CCFError,
    InvalidRequestError,
    UnsupportedOperationError,
)
from signing_agent.governance import Governance, Relay
from signing_agent.metrics import Metrics
from signing_agent.policy import Action
from signing_agent.recovery.store import RecoveryKey
from signing_agent.recovery.trust import ServiceTrust
from signing_agent.signer import SignedMessage, Signer, SignRequest

_logger = logging.getLogger("signing_agent.recovery")

MAX_DECRYPTION_FAILURES = 3

# Anything in a CCF message that could be a share in base64, urlsafe base64 or hex is cut out before it is kept.
_SECRET_LIKE = re.compile(r"[A-Za-z0-9+/=_-]{40,}")


def scrub(text: str, limit: int = 300) -> str:
    """CCF's message as safe to keep: anything long and base64/hex-like removed, and cut to ``limit``."""
    return _SECRET_LIKE.sub("[redacted]", text)[:limit]


@dataclass(frozen=True, slots=True)
class ShareResult:
    """What a submission did: CCF's answer to relay, and the facts the watcher needs."""

    relay: Relay
    submitted: bool
    key: RecoveryKey
    ccf_error: str | None = None
    skipped: bool = False
    """The share for this recovery had already been submitted (unattended mode only); nothing was sent."""


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


class ShareSubmitter:
    """Submits the recovery shares of the identities of one configuration generation, one at a time per (CCF
    service, identity), reading only from identities ``trust`` decided for shares."""

    def __init__(
        self,
        signer: Signer,
        governance: Governance,
        trust: ServiceTrust,
        *,
        auditor: Auditor,
        metrics: Metrics,
    ) -> None:
        self.signer = signer
        self.governance = governance
        self.trust = trust
        self.auditor = auditor
        self._metrics = metrics
        self._stats = _Stats()

    async def submit_share(self, service: str, identity: str, *, unattended: bool = False) -> ShareResult:
        """Fetch, decrypt (in the key store), sign and submit ``identity``'s share to the CCF service ``service`` for
        the current caller; CCF's answer is relayed.

        ``unattended`` (the watcher): skip when the share for the service's current recovery was submitted already.
        """
        ident = self.signer.identity(identity)
        self.governance.ccf.config(service)  # an unknown service is refused before anything else
        if ident.decryption_key is None:
            raise InvalidRequestError(
                f"identity {identity!r} has no encryption_key: it cannot decrypt a recovery share",
                hint=f"configure [identities.{identity}.encryption_key]",
            )
        # Decide before any key is used: a caller the policy refuses never makes the key store decrypt.
        await self.signer.precheck(Action.recovery_share(identity, service))
        async with self.trust.store(service).share_lock(identity):
            return await self._submit_locked(service, identity, unattended=unattended)

    async def _submit_locked(self, service: str, identity: str, *, unattended: bool) -> ShareResult:
        ident = self.signer.identity(identity)
        store = self.trust.store(service)
        data = await store.load()  # a refused state file stops every submission, before anything is fetched
        # From here on, every request goes only to an identity trusted for shares (the pinned one, a listed one, or
        # one this agent's own accepting ballot approved): the service info, the encrypted share and :recover.
        info = await self.trust.service_info(service, for_share=True)
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
        enc = await self.trust.share_read(service, lambda api: api.encrypted_share(mid))
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
        """The only place the agent decrypts: a ciphertext fetched from a configured CCF service over pinned TLS."""
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
