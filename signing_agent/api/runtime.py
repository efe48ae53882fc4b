"""What the API serves with: the current configuration generation, swapped atomically on reload.

Owns the ``Runtime`` holder, the per-generation ``InFlight`` counters, and the accessors handlers use. A request
pins the generation that is current when it arrives (``peer_middleware``) and uses only that one until it ends, so a
reload never mixes an old identity with a new policy; the daemon closes an old generation once its requests drained.

Must not import ``signing_agent.api.app`` (which imports this module).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from signing_agent.audit import Auditor
from signing_agent.denials import DenialThrottle
from signing_agent.errors import AgentError
from signing_agent.governance import Governance
from signing_agent.health import HealthChecker
from signing_agent.metrics import Metrics
from signing_agent.recovery import RecoveryMember
from signing_agent.signer import Signer


class InFlight:
    """Counts requests being handled, so shutdown can wait for them while their connections stay open."""

    def __init__(self) -> None:
        self._count = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self.draining = False

    def enter(self) -> None:
        self._count += 1
        self._idle.clear()

    def exit(self) -> None:
        self._count -= 1
        if self._count == 0:
            self._idle.set()

    @property
    def count(self) -> int:
        return self._count

    async def drain(self, limit: float) -> bool:
        """Refuse new requests and wait for the current ones. False if some were still running at the timeout."""
        self.draining = True
        try:
            async with asyncio.timeout(limit):
                await self._idle.wait()
        except TimeoutError:
            return False
        return True


@dataclass(eq=False)
class Generation:
    """One loaded configuration: the services built from it and the requests still using them."""

    number: int
    signer: Signer
    governance: Governance
    health: HealthChecker
    recovery: RecoveryMember
    in_flight: InFlight = field(default_factory=InFlight)
    failed: Mapping[str, AgentError] = field(default_factory=dict)
    """The identities that failed their self-test (``--allow-degraded``), and why."""


@dataclass(frozen=True, slots=True)
class ReloadResult:
    """One configuration reload (SIGHUP or ``POST /v1/reload``): whether the new configuration now serves, the
    generation serving after it, when (seconds since the epoch), and why the new configuration was refused."""

    reloaded: bool
    generation: int
    at: float
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"reloaded": self.reloaded, "generation": self.generation, "at": self.at, "error": self.error}


class Runtime:
    """Holds the current ``Generation``; ``swap`` replaces it in one step (no await in between).

    Also holds what outlives a reload: the peers' budget of denials (``denials``), which each generation's service
    charges, so reloading the configuration never hands a flooding peer a fresh budget; the process's ``auditor``;
    and the ``metrics``. The daemon sets ``reload`` (run a reload and return its result; None: nothing to reload
    with, as in tests) and ``last_reload``, which health reports.
    """

    def __init__(self, first: Generation, *, denials: DenialThrottle, auditor: Auditor, metrics: Metrics) -> None:
        self.denials = denials
        self.auditor = auditor
        self.metrics = metrics
        self.reload: Callable[[], Awaitable[ReloadResult]] | None = None
        self.last_reload: ReloadResult | None = None
        self._current = self._adopt(first)

    @property
    def current(self) -> Generation:
        return self._current

    def _adopt(self, gen: Generation) -> Generation:
        if gen.signer.denials is not self.denials or gen.signer.auditor is not self.auditor:
            raise ValueError(f"generation {gen.number} was built with another denial budget or auditor")
        return gen

    def swap(self, new: Generation) -> Generation:
        """Make ``new`` current for requests that arrive from now on; returns the old one to drain and close."""
        old, self._current = self._current, self._adopt(new)
        return old


RUNTIME = web.AppKey("runtime", Runtime)
GENERATION = web.RequestKey("generation", Generation)


def generation_of(request: web.Request) -> Generation:
    """The generation this request pinned on arrival (the current one before the middleware ran)."""
    gen = request.get(GENERATION)
    return gen if gen is not None else request.app[RUNTIME].current


def signer_of(request: web.Request) -> Signer:
    return generation_of(request).signer


def recovery_of(request: web.Request) -> RecoveryMember:
    return generation_of(request).recovery


def governance_of(request: web.Request) -> Governance:
    return generation_of(request).governance
