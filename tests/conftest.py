from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.agent import private_dir


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--run-slow",
        action="store_true",
        help="give budgeted tests (fuzzing) their large budget; by default they run a small one (make test-slow)",
    )


@pytest.fixture(scope="session")
def run_slow(request: pytest.FixtureRequest) -> bool:
    return bool(request.config.getoption("--run-slow"))


@pytest.fixture(autouse=True)
def _clean_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests never see the developer's agent, nor the defaults of the developer's own client config."""
    for name in (
        "SIGNING_AGENT_SOCK",
        "SIGNING_AGENT_CONFIG",
        "SIGNING_AGENT_LOGLEVEL",
        "SIGNING_AGENT_IDENTITY",
        "SIGNING_AGENT_SERVICE",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", "/nonexistent/signing-agent-tests")


@pytest.fixture
def workdir() -> Iterator[Path]:
    """A private folder with a short path (Unix sockets), removed afterwards."""
    with private_dir() as path:
        yield path
