"""``GET /v1/health`` and ``GET /metrics`` on the real app over a real Unix socket, against the sandbox subprocess,
with faults injected into a key store (a key that starts failing) and into CCF (503s from the sandbox)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import re
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from signing_agent.algorithms import SignatureAlgorithm
from signing_agent.api.app import APISettings, make_app
from signing_agent.api.runtime import Generation, Runtime
from signing_agent.audit import Auditor, FileAuditSink
from signing_agent.backends.base import KeyInfo, Priority, SigningKey
from signing_agent.backends.keystores import KeyStores
from signing_agent.backends.ratelimit import PriorityThrottle, ThrottleSettings
from signing_agent.client import AgentClient
from signing_agent.config import ServiceConfig, parse_config
from signing_agent.daemon import bind_unix_socket
from signing_agent.denials import DenialThrottle
from signing_agent.errors import BackendUnavailableError
from signing_agent.governance import Governance
from signing_agent.health import HealthChecker
from signing_agent.identity import open_identity
from signing_agent.metrics import METRICS, RECOVERY_STATES, Metrics
from signing_agent.policy import default_policy
from signing_agent.recovery import RecoveryMember
from signing_agent.signer import Signer
from tests.support.agent import file_identity
from tests.support.pki import Member, make_member
from tests.support.sandbox_proc import SandboxProcess, sandbox

pytestmark = pytest.mark.slow


class SwitchableKey:
    """A real key that can be told to fail as an unreachable key store would."""

    def __init__(self, inner: SigningKey) -> None:
        self.inner = inner
        self.broken = False

    async def describe(self) -> KeyInfo:
        return await self.inner.describe()

    async def sign_digest(
        self, alg: SignatureAlgorithm, digest: bytes, *, priority: Priority = Priority.NORMAL
    ) -> bytes:
        if self.broken:
            raise BackendUnavailableError("the token is unavailable (injected)")
        return await self.inner.sign_digest(alg, digest, priority=priority)

    async def aclose(self) -> None:
        await self.inner.aclose()


def snapshot(metrics: Metrics) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in metrics.registry.collect()
        for sample in family.samples
    }


@dataclasses.dataclass
class World:
    """The process-wide ``METRICS`` (the CCF clients the governance service opens report there), read as
    changes since the fixture started."""

    sock: Path
    sandbox: SandboxProcess
    metrics: Metrics
    key: SwitchableKey
    baseline: dict[tuple[str, frozenset[tuple[str, str]]], float]

    async def get(self, path: str) -> tuple[int, dict[str, str], bytes]:
        resp = await asyncio.to_thread(AgentClient(self.sock, timeout=20).request, "GET", path)
        return resp.status, resp.headers, resp.body

    async def health(self) -> dict[str, Any]:
        status, _, body = await self.get("/v1/health")
        assert status == 200
        report: dict[str, Any] = json.loads(body)
        return report

    def sample(self, name: str, **labels: str) -> float:
        return self.metrics.value(name, labels)

    def delta(self, name: str, **labels: str) -> float:
        return self.metrics.value(name, labels) - self.baseline.get((name, frozenset(labels.items())), 0.0)


@pytest.fixture(scope="module")
def members() -> dict[str, Member]:
    return {"m0": make_member("m0"), "m1": make_member("m1", "secp256r1")}


@pytest.fixture
def sandbox_proc(workdir: Path, members: dict[str, Member]) -> Iterator[SandboxProcess]:
    with sandbox(workdir / "sandbox", [members["m0"].write(workdir / "keys")[1]]) as sb:  # m1 is not a member
        yield sb


@pytest.fixture
async def world(workdir: Path, members: dict[str, Member], sandbox_proc: SandboxProcess) -> AsyncIterator[World]:
    metrics = METRICS
    baseline = snapshot(metrics)
    tables: dict[str, Any] = {}
    for name, member in members.items():
        key, cert = member.write(workdir / "keys")
        for table, values in file_identity(name, cert, key).items():
            tables.setdefault("identities", {}).setdefault(name, {})
            if table.endswith("signing_key"):
                tables["identities"][name]["signing_key"] = {k: str(v) for k, v in values.items()}
            else:
                tables["identities"][name]["certificate"] = str(values["certificate"])
    config = parse_config(tables, path=workdir / "agent.toml")
    stores = KeyStores(on_sign=metrics.observe_sign)
    identities = {}
    for name, cfg in config.identities.items():
        identities[name] = await open_identity(cfg, stores)
    switchable = SwitchableKey(identities["m1"].signing_key)
    identities["m1"] = dataclasses.replace(identities["m1"], signing_key=switchable)
    sink = await FileAuditSink.open(workdir / "audit" / "audit.jsonl", max_bytes=1 << 20)
    auditor = Auditor(sink, metrics=metrics)
    denials = DenialThrottle(30, 60.0)
    service = Signer(identities, policy=default_policy(os.getuid()), auditor=auditor, denials=denials)
    svc = ServiceConfig(
        name="default",
        url=sandbox_proc.url,
        service_certificate=sandbox_proc.service_cert,
        max_attempts=3,
        backoff_initial=0.01,
        backoff_max=0.05,
        request_timeout=5.0,
    )
    governance = Governance(service, {"default": svc}, auditor=auditor)
    checker = HealthChecker(service, governance, stores=stores, metrics=metrics, timeout=3.0, cache_seconds=0.0)
    recovery = RecoveryMember(service, governance, config.recovery, auditor=auditor, metrics=metrics)
    runtime = Runtime(
        Generation(1, service, governance, checker, recovery), denials=denials, auditor=auditor, metrics=metrics
    )
    app = make_app(runtime, APISettings(max_request_bytes=1 << 20, request_timeout=30.0))
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    path = workdir / "run" / "agent.sock"
    try:
        await web.SockSite(runner, bind_unix_socket(path)).start()
        yield World(path, sandbox_proc, metrics, switchable, baseline)
    finally:
        await runner.cleanup()
        await governance.aclose()
        for ident in identities.values():
            await ident.aclose()
        await stores.aclose()
        await sink.aclose()
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


async def test_health_reports_key_stores_services_and_member_status(world: World) -> None:
    report = await world.health()
    assert report["status"] == "ok"
    assert report["version"]
    idents = {c["name"]: c for c in report["identities"]}
    assert idents["m0"]["status"] == idents["m1"]["status"] == "ok"
    (service,) = report["services"]
    assert service["name"] == "default"
    assert service["status"] == "ok"
    assert service["members"] == {"m0": "Active", "m1": "NotAMember"}
    assert world.sample("signing_agent_identity_up", identity="m1") == 1.0
    assert world.sample("signing_agent_service_up", service="default") == 1.0


async def test_health_and_metrics_reflect_a_failing_key_store_and_an_unavailable_service(world: World) -> None:
    world.key.broken = True
    world.sandbox.fault("status", "^/node/state$", status=503, method="*")
    report = await world.health()
    assert report["status"] == "degraded"
    idents = {c["name"]: c for c in report["identities"]}
    assert idents["m0"]["status"] == "ok"
    assert idents["m1"]["status"] == "unavailable"
    assert "injected" in idents["m1"]["error"]
    (service,) = report["services"]
    assert service["status"] == "unavailable"
    assert "503" in service["error"]
    assert world.sample("signing_agent_identity_up", identity="m1") == 0.0
    assert world.sample("signing_agent_service_up", service="default") == 0.0
    assert world.delta("signing_agent_ccf_responses_total", service="default", code="503") >= 1
    # Health probes make one attempt: no retries were counted for them.
    assert world.delta("signing_agent_ccf_retries_total", service="default") == 0
    # The SwitchableKey sits above the observed file key: an injected failure never reached the key store.
    assert world.delta("signing_agent_sign_failures_total", backend="file") == 0

    # Recovery: the next probe sees both healthy again (cache_seconds=0).
    world.key.broken = False
    world.sandbox.control("DELETE", "/_sandbox/faults")
    assert (await world.health())["status"] == "ok"
    assert world.sample("signing_agent_identity_up", identity="m1") == 1.0


async def test_metrics_count_requests_signatures_and_ccf_retries(world: World) -> None:
    world.sandbox.fault("status", "proposals:create", status=503, count=1, retry_after="0")
    resp = await asyncio.to_thread(
        AgentClient(world.sock, timeout=20).request,
        "POST",
        "/v1/services/default/proposals",
        {"identity": "m0", "proposal": {"actions": [{"name": "set_constitution", "args": {"constitution": "x"}}]}},
    )
    assert resp.status == 200, resp.body
    await world.get("/v1/nothing-here")
    status, headers, body = await world.get("/metrics")
    assert status == 200
    assert headers["content-type"].startswith("text/plain")
    text = body.decode()
    assert world.delta("signing_agent_ccf_retries_total", service="default") == 1
    assert world.delta("signing_agent_ccf_responses_total", service="default", code="503") == 1
    assert world.delta("signing_agent_ccf_responses_total", service="default", code="200") >= 1
    assert world.delta("signing_agent_sign_duration_seconds_count", backend="file") >= 1
    labels = {"route": "/v1/services/{svc}/proposals", "method": "POST", "code": "200"}
    assert world.delta("signing_agent_requests_total", **labels) == 1
    # Unmatched paths share one label value: a client cannot grow the label set.
    assert world.delta("signing_agent_requests_total", route="unmatched", method="GET", code="404") == 1
    assert "/v1/nothing-here" not in text
    assert re.search(r"^signing_agent_audit_write_failures_total \d", text, re.M)


async def test_throttle_waits_are_reported_through_the_callback() -> None:
    waits: list[float] = []
    throttle = PriorityThrottle(ThrottleSettings(max_concurrency=1), on_wait=waits.append)
    await throttle.acquire(Priority.NORMAL)
    assert waits == []  # a free slot is not a wait
    second = asyncio.ensure_future(throttle.acquire(Priority.NORMAL))
    await asyncio.sleep(0.05)
    throttle.release()
    await second
    throttle.release()
    assert len(waits) == 1
    assert waits[0] >= 0.04
    metrics = Metrics()
    metrics.observe_throttle_wait("vault.example", waits[0])
    assert metrics.value("signing_agent_keystore_throttle_wait_seconds_count", {"host": "vault.example"}) == 1


def test_recovery_watcher_state_is_one_series_per_state() -> None:
    metrics = Metrics()
    metrics.set_recovery_state("default", "m0", "watching")
    labels = {"service": "default", "identity": "m0"}
    values = {s: metrics.value("signing_agent_recovery_watcher_state", {**labels, "state": s}) for s in RECOVERY_STATES}
    assert values == {s: (1.0 if s == "watching" else 0.0) for s in RECOVERY_STATES}
    with pytest.raises(ValueError, match="unknown recovery watcher state"):
        metrics.set_recovery_state("default", "m0", "dancing")
