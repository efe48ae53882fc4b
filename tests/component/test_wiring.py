"""The one wiring (``daemon.open_audit``, ``open_resources``, ``open_generation``, ``Generations``) with real file keys
and a real audit log: what opens closes, in reverse, also when opening fails half-way; what outlives a generation is
shared by the next."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from signing_agent.audit import DryRunAuditSink
from signing_agent.config import AgentConfig
from signing_agent.daemon import Generations, open_audit, open_generation, open_resources
from signing_agent.errors import AuditError, ConfigError, IdentityError
from signing_agent.identity import Identity
from signing_agent.metrics import METRICS
from tests.support.agent import agent_config, file_identity
from tests.support.pki import Member, make_member


@pytest.fixture(scope="module")
def members() -> dict[str, Member]:
    return {"m0": make_member("m0"), "m1": make_member("m1")}


def config_for(workdir: Path, members: dict[str, Member], **extra: dict[str, Any]) -> AgentConfig:
    tables: dict[str, Any] = {"agent": {"socket": workdir / "run" / "agent.sock"}}
    for name, member in members.items():
        key, cert = member.write(workdir / "keys")
        tables.update(file_identity(name, cert, key))
    tables.update(extra)
    return agent_config(workdir, tables)


@pytest.fixture
def closed(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names of the identities closed, in order."""
    names: list[str] = []
    real = Identity.aclose

    async def spy(self: Identity) -> None:
        names.append(self.name)
        await real(self)

    monkeypatch.setattr(Identity, "aclose", spy)
    return names


@contextlib.asynccontextmanager
async def dry_resources(config: AgentConfig) -> AsyncIterator[Any]:
    async with open_resources(config, DryRunAuditSink(), metrics=METRICS) as resources:
        yield resources


async def test_a_generation_closes_what_it_opened_in_reverse(
    workdir: Path, members: dict[str, Member], closed: list[str]
) -> None:
    config = config_for(workdir, members)
    async with dry_resources(config) as resources, open_generation(config, resources) as gen:
        assert sorted(gen.signer.identities) == ["m0", "m1"]
        assert gen.recovery.governance is gen.governance
        assert closed == []
    assert closed == ["m1", "m0"]


async def test_a_generation_that_fails_half_way_closes_what_it_had_opened(
    workdir: Path, members: dict[str, Member], closed: list[str]
) -> None:
    bad = workdir / "not-a-cert.pem"
    bad.write_text("not a certificate")
    service = {"url": "https://127.0.0.1:1", "service_certificate": bad}
    config = config_for(workdir, members, **{"services.prod": service})
    async with dry_resources(config) as resources:
        with pytest.raises(ConfigError, match="not a PEM certificate"):
            async with open_generation(config, resources):
                pytest.fail("a bad service certificate must stop the generation")  # pragma: no cover
    assert closed == ["m1", "m0"]  # the identities were self-tested and open, then closed again


async def test_generations_share_the_process_budgets_and_close_one_at_a_time(
    workdir: Path, members: dict[str, Member], closed: list[str]
) -> None:
    config = config_for(workdir, members)
    async with dry_resources(config) as resources:
        generations = Generations(resources, allow_degraded=False)
        first = await generations.open(config, number=1)
        second = await generations.open(config, number=2)
        # A reload refills nobody's budget: the rate-limit buckets and the denial budget are the process's.
        assert second.signer.policy.limiter is first.signer.policy.limiter is resources.limiter
        assert second.signer.denials is first.signer.denials is resources.denials
        assert second.signer.auditor is first.signer.auditor is resources.auditor
        runtime = resources.runtime(first)
        assert runtime.swap(second) is first
        await generations.close(first)
        assert closed == ["m1", "m0"]
        assert second.signer.identity("m0").signing_key is not first.signer.identity("m0").signing_key
        await generations.aclose()
        assert closed == ["m1", "m0", "m1", "m0"]


async def test_a_failed_generation_leaves_nothing_open_in_the_registry(
    workdir: Path, members: dict[str, Member], closed: list[str]
) -> None:
    config = config_for(workdir, {"m0": members["m0"]})
    key0, _ = members["m0"].write(workdir / "keys")
    _, cert1 = members["m1"].write(workdir / "keys")
    (workdir / "next").mkdir()
    mismatched = agent_config(workdir / "next", {"agent": {"socket": workdir / "run" / "agent.sock"},
                                                  **file_identity("m0", cert1, key0)})  # fmt: skip
    async with dry_resources(config) as resources:
        generations = Generations(resources, allow_degraded=False)
        await generations.open(config, number=1)
        with pytest.raises(IdentityError, match="does not match the certificate"):
            await generations.open(mismatched, number=2)
        assert closed == []  # the failed one opened no identity; the first one still serves
        await generations.aclose()
    assert closed == ["m0"]


async def test_the_audit_log_is_locked_for_the_process_and_starts_with_started(
    workdir: Path, members: dict[str, Member]
) -> None:
    config = config_for(workdir, members)
    async with open_audit(config) as sink:
        with pytest.raises(AuditError, match="in use by another signing-agent"):
            async with open_audit(config):
                pytest.fail("a second agent on the same audit log must stop")  # pragma: no cover
        assert await sink.problem() is None
    (started,) = [json.loads(line) for line in config.audit.path.read_text().splitlines()]
    assert (started["event"], started["config"]) == ("started", str(config.path))


async def test_a_configuration_without_identities_opens_with_a_warning(
    workdir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Allowed (an agent for reads), but said: at a reload it is more often a file cut short than a wish."""
    config = config_for(workdir, {})
    with caplog.at_level("WARNING", logger="signing_agent"):
        async with dry_resources(config) as resources, open_generation(config, resources) as gen:
            assert gen.signer.identities == {}
    assert "has no identities: the agent signs nothing" in caplog.text
