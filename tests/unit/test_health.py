"""Health checks against an in-memory CCF: each service's node state and each identity's membership, cached."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from signing_agent.backends.keystores import KeyStores
from signing_agent.errors import CCFUnavailableError
from signing_agent.governance import Governance
from signing_agent.health import HealthChecker
from tests.support.fake_ccf import FakeCCF, FakeService, file_identity
from tests.support.fakes import signing_service


@dataclass
class World:
    service: FakeService
    checker: HealthChecker
    clock: list[float]
    m0_member_id: str


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    ccf = FakeCCF()
    service = ccf.add("prod", node_state="PartOfNetwork")
    m0 = await file_identity(tmp_path, "m0")
    m1 = await file_identity(tmp_path, "m1")
    service.add_member(m0.member_id, "Accepted")
    signer = signing_service({"m0": m0.identity, "m1": m1.identity})
    gov = Governance(signer, {"prod": ccf.config("prod")}, auditor=signer.auditor, connector=ccf)
    now = [0.0]
    checker = HealthChecker(signer, gov, stores=KeyStores(), cache_seconds=15.0, clock=lambda: now[0])
    yield World(service, checker, now, m0.member_id)
    await gov.aclose()


async def test_a_reachable_service_reports_its_node_state_and_each_identity_s_membership(world: World) -> None:
    report = await world.checker.check()
    assert report["status"] == "ok"
    (svc,) = report["services"]
    assert (svc["name"], svc["url"], svc["status"]) == ("prod", "https://prod.ccf.test", "ok")
    assert svc["node_state"] == "PartOfNetwork"
    assert svc["members"] == {"m0": "Accepted", "m1": "NotAMember"}
    assert [i["status"] for i in report["identities"]] == ["ok", "ok"]


async def test_an_error_answer_makes_the_service_unavailable_and_says_which(world: World) -> None:
    world.service.answer_next("node_state", 503, {"error": {"code": "ServiceUnavailable", "message": "busy"}})
    report = await world.checker.check()
    assert report["status"] == "degraded"
    (svc,) = report["services"]
    assert (svc["status"], svc["error"]) == ("unavailable", "GET /node/state answered 503")


async def test_no_answer_makes_the_service_unavailable_with_the_reason(world: World) -> None:
    world.service.fail_next("node_state", CCFUnavailableError("cannot connect: Connection refused"))
    (svc,) = (await world.checker.check())["services"]
    assert (svc["status"], svc["error"]) == ("unavailable", "cannot connect: Connection refused")


async def test_a_member_whose_status_cannot_be_read_is_unknown(world: World) -> None:
    world.service.answer_next("member", 500, {"error": {"code": "InternalError", "message": "x"}})
    (svc,) = (await world.checker.check())["services"]
    assert svc["status"] == "ok"
    assert svc["members"] == {"m0": None, "m1": "NotAMember"}


async def test_results_are_cached_for_cache_seconds(world: World) -> None:
    await world.checker.check()
    calls = len(world.service.calls)
    await world.checker.check()
    assert len(world.service.calls) == calls
    world.clock[0] += 16.0
    await world.checker.check()
    assert len(world.service.calls) == 2 * calls
