"""A hostile CCF endpoint for attack tests: a network attacker standing in front of (or instead of) the real service.

An aiohttp HTTPS server in a thread of the test process. Its TLS certificate comes from a trustme CA of its own, and
that CA is the "service identity" it claims: ``/node/network`` and ``/gov/service/info`` name it, and the node
certificate it presents is endorsed by it, so it passes every check an endpoint can pass by itself. It answers the
governance reads with whatever the attacker wants (a service waiting for recovery shares, a fabricated
``transition_service_to_open`` proposal chaining its identity to the real one, the real service's public encrypted
shares), accepts every POST with a 200, and records every request it gets (method, path, body) for the test to
inspect: a ``:recover`` POST, or a share in any body, means the attack worked.
"""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import ssl
import threading
from dataclasses import dataclass, field
from typing import Any

import trustme
from aiohttp import web


@dataclass(frozen=True)
class Recorded:
    method: str
    path: str
    body: bytes


@dataclass
class HostileCCF:
    """Claims its own identity; fabricates a ``transition_service_to_open`` from ``previous_service_cert`` to it."""

    previous_service_cert: str
    encrypted_shares: dict[str, dict[str, Any]] = field(default_factory=dict)
    """memberId -> the real service's ``/gov/recovery/encrypted-shares/{id}`` answer (public, so easy to relay)."""
    proposal_state: str = "Accepted"
    shown_actions: list[dict[str, Any]] | None = None
    """When set, the proposal's actions as served (else the fabricated transition): the attacker may show one thing
    to the member's review and another to the agent."""
    proposal_id: str = field(default_factory=lambda: secrets.token_hex(32))
    reported_certificate: str | None = None
    """When set, the service identity its service info and ``/node/network`` report, instead of the one its TLS
    presents (a connection made before a recovery, still open to the recovered service)."""
    network_certificate: str | None = None
    """When set, what ``/node/network`` names as the service certificate (e.g. a bundle: another identity's
    certificate, then its own CA), instead of the reported one."""
    transition_to: str | None = None
    """When set, the ``next_service_identity`` of the fabricated transition, instead of its own identity."""
    ca: trustme.CA = field(default_factory=trustme.CA)
    url: str = ""
    _requests: list[Recorded] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _loop: asyncio.AbstractEventLoop | None = None
    _thread: threading.Thread | None = None
    _runner: web.AppRunner | None = None

    @property
    def identity_pem(self) -> str:
        return self.ca.cert_pem.bytes().decode()

    def requests(self) -> list[Recorded]:
        with self._lock:
            return list(self._requests)

    def recover_posts(self) -> list[Recorded]:
        return [r for r in self.requests() if r.method == "POST" and ":recover" in r.path]

    # -- the fabricated answers ---

    def _proposal(self) -> dict[str, Any]:
        return {"proposalId": self.proposal_id, "proposalState": self.proposal_state, "proposerId": "0" * 64,
                "ballotCount": 1, "finalVotes": {}}  # fmt: skip

    def _answer(self, method: str, path: str) -> tuple[int, Any]:
        if method == "POST":
            if ":recover" in path:
                return 200, {"message": "1/1 recovery shares successfully submitted", "submittedCount": 1,
                             "recoveryThreshold": 1}  # fmt: skip
            return 200, self._proposal()
        reported = self.reported_certificate or self.identity_pem
        waiting = {"status": "WaitingForRecoveryShares", "certificate": reported, "recoveryCount": 1,
                   "creationTransactionId": "2.1", "previousServiceIdentityVersion": "1.1"}  # fmt: skip
        proposals = "/gov/members/proposals"
        routes: list[tuple[str, Any]] = [
            (r"/node/network", {"service_status": "WaitingForRecoveryShares", "service_certificate":
                                self.network_certificate or reported, "recovery_count": 1,
                                "current_service_create_txid": "2.1"}),
            (r"/node/state", {"state": "PartOfPublicNetwork"}),
            (r"/gov/service/info", waiting),
            (r"/gov/service/members", {"value": []}),
            (proposals, {"value": [self._proposal()]}),
            (rf"{proposals}/{self.proposal_id}", self._proposal()),
            (rf"{proposals}/{self.proposal_id}/actions", {"actions": self.shown_actions or [{
                "name": "transition_service_to_open", "args": {
                "previous_service_identity": self.previous_service_cert,
                "next_service_identity": self.transition_to or self.identity_pem}}]}),
        ]  # fmt: skip
        for pattern, body in routes:
            if re.fullmatch(pattern, path):
                return 200, body
        member = re.fullmatch(r"/gov/recovery/encrypted-shares/([0-9a-f]{64})", path)
        if member is not None and member.group(1) in self.encrypted_shares:
            return 200, self.encrypted_shares[member.group(1)]
        member = re.fullmatch(r"/gov/service/members/([0-9a-f]{64})", path)
        if member is not None:
            return 200, {"memberId": member.group(1), "status": "Active"}
        return 404, {"error": {"code": "ResourceNotFound", "message": "not here"}}

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        with self._lock:
            self._requests.append(Recorded(request.method, request.path, body))
        status, answer = self._answer(request.method, request.path)
        return web.Response(status=status, body=json.dumps(answer).encode(), content_type="application/json",
                            headers={"x-ms-ccf-transaction-id": "2.99"})  # fmt: skip

    # -- lifecycle ---

    def __enter__(self) -> HostileCCF:
        ready = threading.Event()
        self._loop = asyncio.new_event_loop()

        async def start() -> None:
            app = web.Application()
            app.router.add_route("*", "/{tail:.*}", self._handle)
            self._runner = web.AppRunner(app, access_log=None)
            await self._runner.setup()
            ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            self.ca.issue_cert("127.0.0.1", "localhost").configure_cert(ctx)
            site = web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=ctx)
            await site.start()
            self.url = f"https://127.0.0.1:{self._runner.addresses[0][1]}"

        def run() -> None:
            assert self._loop is not None
            self._loop.run_until_complete(start())
            ready.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, name="hostile-ccf", daemon=True)
        self._thread.start()
        assert ready.wait(20), "the hostile server did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._loop is not None
        assert self._thread is not None
        assert self._runner is not None
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(20)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(20)
        self._loop.close()
