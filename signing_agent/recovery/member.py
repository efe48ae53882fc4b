"""The recovery use case for one configuration generation: ``RecoveryMember``, the one entry point the API, the CLI
and the daemon use.

Two ways in: ``RecoveryMember.submit_share`` on request (the API and ``signing-agent recovery submit-share``), and a
``RecoveryWatcher`` per configured (CCF service, identity) that polls the CCF service and submits the share once per
recovery. The work is done by the package's parts, each with one job:

- ``recovery.store``: the state file of each CCF service (submitted recoveries, adopted and approved identities);
- ``recovery.trust``: which identity of a CCF service is trusted for what after a disaster recovery (restore,
  adopt provisionally, approve by the member's fingerprint and this agent's accepting ballot);
- ``recovery.shares``: the policy question, then fetch, decrypt in the key store, sign and submit a share;
- ``recovery.watcher``: the unattended watchers.

Must not import aiohttp or the API (the API and the daemon call in).
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable
from typing import Any

from signing_agent.audit import Auditor
from signing_agent.ccf.api import ServiceInfo
from signing_agent.config import RecoveryConfig
from signing_agent.governance import Governance, Relay
from signing_agent.metrics import METRICS, Metrics
from signing_agent.recovery.shares import ShareResult, ShareSubmitter
from signing_agent.recovery.store import RecoveryStateStore
from signing_agent.recovery.trust import ServiceTrust
from signing_agent.recovery.watcher import RecoveryWatcher
from signing_agent.signer import Signer

_logger = logging.getLogger("signing_agent.recovery")


class RecoveryMember:
    """Recovery-share submission for the identities of one configuration generation, the trust rules after a
    disaster recovery, and the watchers."""

    def __init__(
        self,
        signer: Signer,
        governance: Governance,
        config: RecoveryConfig,
        *,
        auditor: Auditor,
        metrics: Metrics | None = None,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self.config = config
        self.metrics = metrics or METRICS
        self.rng = rng
        self.trust = ServiceTrust(signer, governance, config.state_dir, auditor=auditor)
        self.shares = ShareSubmitter(signer, governance, self.trust, auditor=auditor, metrics=self.metrics)
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

    @property
    def signer(self) -> Signer:
        return self.shares.signer

    @property
    def governance(self) -> Governance:
        return self.shares.governance

    @property
    def auditor(self) -> Auditor:
        return self.shares.auditor

    def store(self, service: str) -> RecoveryStateStore:
        """The state file of the CCF service ``service``."""
        return self.trust.store(service)

    def request_timeout(self, service: str) -> float:
        """How long one request to the CCF service ``service`` may take."""
        return self.governance.services[service].request_timeout

    async def open(self) -> None:
        """Restore the trust kept in the state files (``ServiceTrust.restore``)."""
        await self.trust.restore()

    async def catch_up(self) -> None:
        """Put to use what the generation a reload replaced wrote to the state files since (``ServiceTrust``)."""
        await self.trust.catch_up()

    # -- trust ---

    async def adopt_by_proposal(self, service: str) -> bool:
        """The ``accept_transition_to`` rule, step one (``ServiceTrust.adopt_by_proposal``)."""
        return await self.trust.adopt_by_proposal(service)

    async def approve_identity(self, service: str, identity: str, proposal_id: str, sha256: str) -> Relay:
        """The ``accept_transition_to`` rule, step two (``ServiceTrust.approve_identity``)."""
        return await self.trust.approve_identity(service, identity, proposal_id, sha256)

    async def service_info(self, service: str, *, for_share: bool = False) -> ServiceInfo:
        """The CCF service's info through the trust guard (``ServiceTrust.service_info``)."""
        return await self.trust.service_info(service, for_share=for_share)

    # -- submission ---

    async def submit_share(self, service: str, identity: str, *, unattended: bool = False) -> ShareResult:
        """Fetch, decrypt (in the key store), sign and submit ``identity``'s share to the CCF service ``service``
        for the current caller (``ShareSubmitter.submit_share``)."""
        return await self.shares.submit_share(service, identity, unattended=unattended)

    # -- watchers ---

    def start_watchers(self) -> None:
        for watcher in self.watchers:
            watcher.start()

    async def stop_watchers(self) -> None:
        await asyncio.gather(*(w.stop() for w in self.watchers))

    def status(self, service: str | None = None) -> list[dict[str, Any]]:
        return [w.status() for w in self.watchers if service is None or w.service == service]
