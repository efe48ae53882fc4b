"""The unattended recovery watcher: one per configured (CCF service, identity), polling the CCF service and
submitting the identity's share once per recovery.

A recovery is keyed by the CCF service's ``recoveryCount`` and ``creationTransactionId`` (``RecoveryKey``),
remembered in the state file (``recovery.store``), so that a restart never submits again. Each poll is the agent's
own request (``RequestContext.for_agent``): its own caller, and a ``watcher-`` request id no client can forge.

What a watcher needs of the recovery use case is the ``Recovering`` Protocol (``RecoveryMember`` is one), so this
module imports neither the use case nor the key stores.

Must not import aiohttp or the API.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any, Protocol

from signing_agent.ccf.api import ServiceInfo
from signing_agent.config import RecoveryConfig
from signing_agent.context import RequestContext, bound
from signing_agent.errors import AgentError, CCFError, CCFTrustError
from signing_agent.metrics import Metrics
from signing_agent.recovery.shares import ShareResult
from signing_agent.recovery.store import RecoveryKey, RecoveryStateStore
from signing_agent.retry import Backoff

_logger = logging.getLogger("signing_agent.recovery")

WAITING = "WaitingForRecoveryShares"
"""The CCF service status in which it takes recovery shares."""


class Recovering(Protocol):
    """What a watcher asks of the recovery use case."""

    @property
    def config(self) -> RecoveryConfig: ...

    @property
    def metrics(self) -> Metrics: ...

    @property
    def rng(self) -> Callable[[], float]: ...

    def store(self, service: str) -> RecoveryStateStore: ...

    def request_timeout(self, service: str) -> float:
        """How long one request to the CCF service ``service`` may take."""
        ...

    async def service_info(self, service: str) -> ServiceInfo: ...

    async def submit_share(self, service: str, identity: str, *, unattended: bool = False) -> ShareResult: ...


class RecoveryWatcher:
    """Polls one CCF service for one identity and submits its share once per recovery."""

    def __init__(self, recovery: Recovering, service: str, identity: str) -> None:
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
        self.recovery.metrics.set_recovery_state(self.service, self.identity, state)

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
        limit = self.recovery.request_timeout(self.service) + 5.0
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
            delay = poll.delay(failures, self.recovery.rng())
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._stop.wait()

    async def tick(self) -> None:
        """One poll: submit when the CCF service waits for shares and ours for this recovery is not in yet.

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
