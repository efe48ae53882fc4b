"""Fixtures the unit tests of the governance layers share: a socket peer bound, and an in-memory CCF world."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tests.support.fake_ccf import FakeWorld, fake_world
from tests.support.fakes import as_peer


@pytest.fixture
def own_peer() -> Iterator[None]:
    """The test acts for a socket peer (its own uid), as the API's middleware binds one for each request. Modules
    whose every call needs it use ``pytestmark = pytest.mark.usefixtures("own_peer")``."""
    with as_peer(os.getuid()):
        yield


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[FakeWorld]:
    """The agent's governance against one fake CCF service, ``prod``; every connection it opened is closed after."""
    w = await fake_world(tmp_path)
    yield w
    await w.gov.aclose()
    assert all(c.closed for c in w.ccf.connections)
