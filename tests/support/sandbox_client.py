"""Test helpers for the CCF governance sandbox: sign with CCF's own tooling and talk HTTPS to the sandbox.

``sign()`` uses ``ccf.cose.create_cose_sign1`` (ccf 6.x, pycose), the reference signer. ``raw_cose()`` builds
envelopes by hand (cbor2 + cryptography) for the malformed and mismatched cases the reference tool cannot
make.
"""

from __future__ import annotations

import base64
import itertools
import json
import time
from dataclasses import dataclass
from typing import Any

import aiohttp
import cbor2
from ccf.cose import create_cose_sign1
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from tests.support.pki import Member

API = "api-version=2024-07-01"
YES = "export function vote (proposal, proposerId) { return true }"
NO = "export function vote (proposal, proposerId) { return false }"

_clock = itertools.count(int(time.time()))


def next_created_at() -> int:
    """A strictly increasing created_at, so proposals never collide by accident."""
    return next(_clock)


def sign(
    member: Member,
    msg_type: str | None,
    payload: bytes | dict[str, Any] = b"",
    *,
    created_at: int | None = None,
    proposal_id: str | None = None,
) -> bytes:
    body = json.dumps(payload).encode() if isinstance(payload, dict) else payload
    headers: dict[str, Any] = {"ccf.gov.msg.created_at": next_created_at() if created_at is None else created_at}
    if msg_type is not None:
        headers["ccf.gov.msg.type"] = msg_type
    if proposal_id is not None:
        headers["ccf.gov.msg.proposal_id"] = proposal_id
    result: bytes = create_cose_sign1(body, member.key_pem.decode(), member.cert_pem.decode(), headers)
    return result


_HASHES: dict[int, hashes.HashAlgorithm] = {-7: hashes.SHA256(), -35: hashes.SHA384(), -36: hashes.SHA512()}
_SIZES = {"secp256r1": 32, "secp384r1": 48, "secp521r1": 66}


def raw_cose(
    member: Member,
    header: dict[Any, Any],
    payload: bytes = b"",
    *,
    tag: int | None = 18,
    sign_alg: int = -35,
    der: bool = False,
    items: list[Any] | None = None,
) -> bytes:
    """Hand-built COSE_Sign1 over ``header`` (encoded as given), signed with the hash of ``sign_alg``."""
    protected = cbor2.dumps(header)
    tbs = cbor2.dumps(["Signature1", protected, b"", payload])
    der_sig = member.key.sign(tbs, ec.ECDSA(_HASHES[sign_alg]))
    if der:
        signature = der_sig
    else:
        size = _SIZES[member.key.curve.name]
        r, s = decode_dss_signature(der_sig)
        signature = r.to_bytes(size, "big") + s.to_bytes(size, "big")
    value = items if items is not None else [protected, {}, payload, signature]
    return cbor2.dumps(value if tag is None else cbor2.CBORTag(tag, value))


def gov_header(member: Member, msg_type: str = "proposal", overrides: dict[Any, Any] | None = None) -> dict[Any, Any]:
    alg = {"secp256r1": -7, "secp384r1": -35, "secp521r1": -36}[member.key.curve.name]
    header: dict[Any, Any] = {
        1: alg,
        4: member.member_id.encode(),
        "ccf.gov.msg.type": msg_type,
        "ccf.gov.msg.created_at": next_created_at(),
    }
    header.update(overrides or {})
    return header


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def error(self) -> tuple[str, str]:
        error = self.json["error"]
        return error["code"], error["message"]

    @property
    def auth_reason(self) -> tuple[str, str]:
        """(auth_policy, message) of a 401's single details entry."""
        (detail,) = self.json["error"]["details"]
        assert detail["code"] == "InvalidAuthenticationInfo"
        return detail["auth_policy"], detail["message"]


class GovClient:
    def __init__(self, base_url: str, session: aiohttp.ClientSession) -> None:
        self.base_url = base_url
        self.session = session

    def _url(self, path: str, api: str | None) -> str:
        if api is None:
            return self.base_url + path
        return f"{self.base_url}{path}{'&' if '?' in path else '?'}{api}"

    async def post(
        self,
        path: str,
        body: bytes,
        *,
        content_type: str | None = "application/cose",
        api: str | None = API,
    ) -> Reply:
        headers = {} if content_type is None else {"Content-Type": content_type}
        skip = ["Content-Type"] if content_type is None else []
        async with self.session.post(
            self._url(path, api), data=body, headers=headers, skip_auto_headers=skip
        ) as response:
            return Reply(response.status, dict(response.headers), await response.read())

    async def get(self, path: str, *, api: str | None = API) -> Reply:
        async with self.session.get(self._url(path, api)) as response:
            return Reply(response.status, dict(response.headers), await response.read())

    # -- governance shortcuts ---

    async def propose(self, member: Member, actions: list[dict[str, Any]], **kw: Any) -> Reply:
        return await self.post("/gov/members/proposals:create", sign(member, "proposal", {"actions": actions}, **kw))

    async def vote(self, member: Member, proposal_id: str, ballot: str = YES) -> Reply:
        cose = sign(member, "ballot", {"ballot": ballot}, proposal_id=proposal_id)
        return await self.post(f"/gov/members/proposals/{proposal_id}/ballots/{member.member_id}:submit", cose)

    async def withdraw(self, member: Member, proposal_id: str) -> Reply:
        cose = sign(member, "withdrawal", proposal_id=proposal_id)
        return await self.post(f"/gov/members/proposals/{proposal_id}:withdraw", cose)

    async def pass_proposal(self, proposer: Member, voters: list[Member], actions: list[dict[str, Any]]) -> Reply:
        """Propose, then vote yes with each voter until the proposal leaves Open; the last reply."""
        reply = await self.propose(proposer, actions)
        assert reply.status == 200, reply.body
        proposal_id = reply.json["proposalId"]
        for voter in voters:
            reply = await self.vote(voter, proposal_id)
            if reply.status != 200 or reply.json["proposalState"] != "Open":
                break
        return reply

    async def activate(self, member: Member) -> None:
        """:update then :ack (signing the :update response as-is), as a new member does."""
        base = f"/gov/members/state-digests/{member.member_id}"
        update = await self.post(f"{base}:update", sign(member, "state_digest"))
        assert update.status == 200, update.body
        ack = await self.post(f"{base}:ack", sign(member, "ack", update.body))
        assert ack.status == 204, ack.body

    # -- recovery ---

    async def encrypted_share(self, member_id: str) -> Reply:
        return await self.get(f"/gov/recovery/encrypted-shares/{member_id}")

    async def submit_share(self, member: Member, share: bytes | str, *, url_member_id: str | None = None) -> Reply:
        """POST :recover, signed by ``member``; ``share`` is the plaintext (bytes) or its base64 (str)."""
        value = base64.b64encode(share).decode() if isinstance(share, bytes) else share
        cose = sign(member, "recovery_share", {"share": value})
        return await self.post(f"/gov/recovery/members/{url_member_id or member.member_id}:recover", cose)


OAEP_SHA256 = padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)


def decrypt_share(encryption_key: rsa.RSAPrivateKey, encrypted_share_b64: str) -> bytes:
    """What submit_recovery_share.sh does: base64-decode, then RSA-OAEP-256 decrypt."""
    return encryption_key.decrypt(base64.b64decode(encrypted_share_b64, validate=True), OAEP_SHA256)
