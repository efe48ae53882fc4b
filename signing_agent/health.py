"""Health: can each identity still sign, can the audit log be written, is each CCF service reachable, and what is
each member's status there.

Owns the checks behind ``GET /v1/health`` and ``signing-agent health``. Every check has a short timeout and a
result cache, so a probe every few seconds costs at most one key store signature per identity (a fixed probe
digest, verified against the certificate) and two small GETs per service per ``cache_seconds``. A real signature in
between counts as a passed self-test only through the probe; nothing here reads a payload or a secret.

Must not import aiohttp or the API: it reports plain dicts.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from signing_agent.algorithms import verify_digest
from signing_agent.backends.keystores import KeyStores
from signing_agent.errors import AgentError
from signing_agent.governance import Governance
from signing_agent.identity import Identity
from signing_agent.metrics import METRICS, Metrics
from signing_agent.signer import Signer

_logger = logging.getLogger(__name__)

_PROBE = b"signing-agent health probe"

Check = dict[str, Any]


class HealthChecker:
    """Runs (and caches) the health checks of one configuration generation."""

    def __init__(
        self,
        signer: Signer,
        governance: Governance,
        *,
        stores: KeyStores,
        unavailable: Mapping[str, str] | None = None,
        metrics: Metrics | None = None,
        timeout: float = 3.0,
        cache_seconds: float = 15.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``unavailable`` names identities that failed their self-test at start-up (``--allow-degraded``)."""
        self.signer = signer
        self.governance = governance
        self.stores = stores
        self.unavailable = dict(unavailable or {})
        self.timeout = timeout
        self.cache_seconds = cache_seconds
        self._metrics = metrics or METRICS
        self._clock = clock
        self._cache: dict[str, tuple[float, Check]] = {}
        self._lock = asyncio.Lock()

    async def _cached(self, key: str, run: Callable[[], Awaitable[Check]]) -> Check:
        now = self._clock()
        hit = self._cache.get(key)
        if hit is not None and hit[0] > now:
            return hit[1]
        try:
            async with asyncio.timeout(self.timeout):
                result = await run()
        except TimeoutError:
            result = {"status": "unavailable", "error": f"no answer within {self.timeout:g} s"}
        except AgentError as exc:
            result = {"status": "unavailable", "error": exc.message}
        result["checked_at"] = round(time.time(), 3)
        self._cache[key] = (now + self.cache_seconds, result)
        return result

    async def _identity(self, ident: Identity) -> Check:
        async def probe() -> Check:
            digest = ident.alg.digest(_PROBE + ident.name.encode())
            verify_digest(ident.public_key, ident.alg, digest, await ident.signing_key.sign_digest(ident.alg, digest))
            return {"status": "ok"}

        result = await self._cached(f"identity:{ident.name}", probe)
        self._metrics.identity_up.labels(ident.name).set(1.0 if result["status"] == "ok" else 0.0)
        if result["status"] != "ok":
            _logger.warning("health: identity %s failed its self-test: %s", ident.name, result.get("error"))
        check: Check = {"name": ident.name, "member_id": ident.member_id, "backend": ident.backend, **result}
        return {**check, **self._certificate(ident)}

    def _certificate(self, ident: Identity) -> Check:
        """Not cached (a date comparison): the member certificate's expiry, the identity's warnings (an expiring
        certificate among them), and ``unavailable`` once the certificate has expired, which the agent would refuse
        at start-up."""
        now = datetime.datetime.now(datetime.UTC)
        found: Check = {"warnings": list(ident.current_warnings(now))}
        if ident.validity is not None:
            found["certificate_not_after"] = ident.validity.not_after.isoformat()
        problem = ident.certificate_problem(now)
        if problem is not None:
            found.update(status="unavailable", error=problem)
        return found

    async def _service(self, governance: Governance, name: str) -> Check:
        async def probe() -> Check:
            client = await governance.ccf.client(name)
            node = await client.node_state(max_attempts=1)
            if node.value is None:
                return {"status": "unavailable", "error": f"{node.request} answered {node.status}"}
            result: Check = {"status": "ok"}
            if node.value.state is not None:
                result["node_state"] = node.value.state
            members: dict[str, str | None] = {}
            for ident in self.signer.identities.values():
                got = await client.member(ident.member_id, max_attempts=1)
                if got.value is not None:
                    members[ident.name] = got.value.status
                else:
                    members[ident.name] = "NotAMember" if got.status == 404 else None
            result["members"] = members
            return result

        result = await self._cached(f"service:{name}", probe)
        self._metrics.service_up.labels(name).set(1.0 if result["status"] == "ok" else 0.0)
        url = governance.services[name].url
        return {"name": name, "url": url, **result}

    async def _audit(self) -> Check:
        """Not cached: a few ``stat`` calls. Nothing is signed while the audit log cannot be written, so a failing log
        makes the agent ``degraded`` even with every key store and service up."""
        problem = await self.signer.auditor.problem()
        if problem is None:
            return {"status": "ok"}
        _logger.warning("health: %s", problem)
        return {"status": "unavailable", "error": problem}

    async def check(self) -> dict[str, Any]:
        """The report: ``status`` is ``ok`` when every check passed, else ``degraded``."""
        async with self._lock:  # concurrent probes share one round of checks
            identities = await asyncio.gather(*(self._identity(i) for i in self.signer.identities.values()))
            gov = self.governance
            services = list(await asyncio.gather(*(self._service(gov, n) for n in sorted(gov.services))))
        failed = [
            {"name": name, "status": "unavailable", "error": f"failed its self-test at start-up: {reason}"}
            for name, reason in sorted(self.unavailable.items())
        ]
        all_identities = sorted([*identities, *failed], key=lambda c: str(c["name"]))
        audit = await self._audit()
        registry = self.stores.pkcs11
        tokens = registry.status() if registry is not None else ()
        # A token the backend has found unavailable degrades health at once (it is live state, not a cached probe).
        healthy = all(c["status"] == "ok" for c in [*all_identities, *services, audit]) and all(
            t.available for t in tokens
        )
        report: dict[str, Any] = {
            "status": "ok" if healthy else "degraded",
            "audit": audit,
            "identities": all_identities,
            "services": services,
        }
        if registry is not None:
            report["pkcs11_tokens"] = [
                {
                    "module": t.module,
                    "token_label": t.token_label,
                    "status": "ok" if t.available else "unavailable",
                    "connected": t.connected,
                    "logins": t.logins,
                    "reconnects": t.reconnects,
                    **({"error": t.error, "unavailable_since": t.unavailable_since} if not t.available else {}),
                }
                for t in tokens
            ]
        return report
