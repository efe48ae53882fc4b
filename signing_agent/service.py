"""The signing use case: validate -> prepare -> sign the digest in the key store -> verify -> finish.

Every signature is verified against the identity's certificate before the message leaves the agent, so a key store
that signs with the wrong key, or returns a malformed signature, can never put a bad message on the wire.
This module knows nothing of HTTP; the API and the CLI reach the key stores only through it.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from signing_agent.algorithms import verify_digest
from signing_agent.backends.base import Priority
from signing_agent.cose.governance import (
    GovernanceRequest,
    MsgType,
    PayloadSummary,
    prepare_governance,
    summarise_payload,
)
from signing_agent.cose.sign1 import finish
from signing_agent.errors import UnknownIdentityError
from signing_agent.identity import Identity

_logger = logging.getLogger(__name__)

_HIGH_PRIORITY = frozenset({MsgType.RECOVERY_SHARE, MsgType.ACK, MsgType.STATE_DIGEST})


@dataclass(frozen=True, slots=True)
class SignedMessage:
    """A signed governance message and the facts about it that audit and clients need (never a secret)."""

    identity: str
    member_id: str
    msg_type: MsgType
    created_at: int
    proposal_id: str | None
    cose: bytes
    summary: PayloadSummary

    @property
    def cose_sha256(self) -> str:
        return hashlib.sha256(self.cose).hexdigest()


class SigningService:
    """Signs governance messages for the configured identities."""

    def __init__(self, identities: Mapping[str, Identity], *, clock: Callable[[], float] = time.time) -> None:
        self._identities = dict(identities)
        self._clock = clock

    @property
    def identities(self) -> Mapping[str, Identity]:
        return self._identities

    def identity(self, name: str) -> Identity:
        try:
            return self._identities[name]
        except KeyError:
            known = ", ".join(sorted(self._identities)) or "none"
            raise UnknownIdentityError(f"unknown identity {name!r} (configured: {known})") from None

    def now(self) -> int:
        return int(self._clock())

    async def sign(
        self,
        identity: str,
        msg_type: MsgType,
        payload: bytes,
        *,
        created_at: int | None = None,
        proposal_id: str | None = None,
    ) -> SignedMessage:
        """Sign one governance message. ``created_at`` defaults to now (integer seconds, UTC)."""
        ident = self.identity(identity)
        request = GovernanceRequest(
            msg_type=msg_type,
            created_at=self.now() if created_at is None else created_at,
            payload=payload,
            proposal_id=proposal_id,
        )
        summary = summarise_payload(msg_type, payload)
        tbs = prepare_governance(ident.alg, ident.member_id, request)
        priority = Priority.HIGH if msg_type in _HIGH_PRIORITY else Priority.NORMAL
        signature = await ident.signing_key.sign_digest(ident.alg, tbs.digest, priority=priority)
        verify_digest(ident.public_key, ident.alg, tbs.digest, signature)
        message = SignedMessage(
            identity=ident.name,
            member_id=ident.member_id,
            msg_type=msg_type,
            created_at=request.created_at,
            proposal_id=proposal_id,
            cose=finish(tbs, signature),
            summary=summary,
        )
        _logger.info(
            "signed %s for %s (member %s, payload sha256 %s)",
            msg_type,
            ident.name,
            ident.member_id[:12],
            summary.sha256[:16],
        )
        return message

    async def aclose(self) -> None:
        for ident in self._identities.values():
            await ident.signing_key.aclose()
            if ident.decryption_key is not None:
                await ident.decryption_key.aclose()
