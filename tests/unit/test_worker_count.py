"""How many crypto workers the daemon runs by default: the cores it may use, a container's CPU quota included."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from signing_agent.config import parse_config
from signing_agent.daemon import crypto_workers_of
from signing_agent.workers import pool
from signing_agent.workers.pool import cgroup_cpu_limit, default_workers


def test_cgroup_v2_quota(tmp_path: Path) -> None:
    (tmp_path / "cpu.max").write_text("250000 100000\n")
    assert cgroup_cpu_limit(tmp_path) == 2
    (tmp_path / "cpu.max").write_text("50000 100000\n")  # half a CPU: still one whole CPU, never zero
    assert cgroup_cpu_limit(tmp_path) == 1
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert cgroup_cpu_limit(tmp_path) is None


def test_cgroup_v1_quota(tmp_path: Path) -> None:
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("300000\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert cgroup_cpu_limit(tmp_path) == 3
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert cgroup_cpu_limit(tmp_path) is None


def test_no_cgroup_files_and_garbage_mean_no_quota(tmp_path: Path) -> None:
    assert cgroup_cpu_limit(tmp_path) is None
    (tmp_path / "cpu.max").write_text("lots\n")
    assert cgroup_cpu_limit(tmp_path) is None
    (tmp_path / "cpu.max").write_text("100000 0\n")
    assert cgroup_cpu_limit(tmp_path) is None


@pytest.mark.parametrize(
    ("cores", "quota", "workers"),
    [(1, None, 0), (2, None, 1), (3, None, 2), (16, None, 4), (16, 1, 0), (16, 2, 1), (16, 3, 2)],
)
def test_default_workers(monkeypatch: pytest.MonkeyPatch, cores: int, quota: int | None, workers: int) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: set(range(cores)))
    monkeypatch.setattr(pool, "cgroup_cpu_limit", lambda: quota)
    assert default_workers() == workers


def test_the_configured_count_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: set(range(4)))
    monkeypatch.setattr(pool, "cgroup_cpu_limit", lambda: None)
    identities = {"m0": {"certificate": "c.pem", "signing_key": {"backend": "file", "path": "k.pem"}}}
    assert crypto_workers_of(parse_config({"identities": identities}, path=Path("/x/agent.toml"))) == 3
    configured = parse_config({"agent": {"crypto_workers": 0}, "identities": identities}, path=Path("/x/agent.toml"))
    assert crypto_workers_of(configured) == 0
