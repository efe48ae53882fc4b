"""Fixtures the component tests share: the Key Vault double, and a governance client of a module's sandbox."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from signing_agent.sandbox.server import SandboxServer
from tests.doubles.keyvault import RunningKeyVault, managed_identity_env, running_keyvault
from tests.support.sandbox_client import GovClient


@pytest.fixture
async def kv(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[RunningKeyVault]:
    """The Key Vault double, with the managed-identity environment the real Azure SDK reads pointed at it."""
    async with running_keyvault(tmp_path / "kv") as running:
        managed_identity_env(monkeypatch, running)
        yield running


@pytest.fixture
async def gov(sandbox: SandboxServer) -> AsyncIterator[GovClient]:
    """A governance client of the module's ``sandbox`` fixture, trusting its service certificate."""
    connector = aiohttp.TCPConnector(ssl=sandbox.client_ssl_context())
    async with aiohttp.ClientSession(connector=connector) as session:
        yield GovClient(sandbox.url, session)
