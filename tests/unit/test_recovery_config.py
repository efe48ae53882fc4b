"""Recovery configuration and the pure helpers of ``signing_agent.recovery``: names checked against identities and
services, defaults, the state file (0600, atomic, never a share; only the agent's own is used) and the scrubbing of
CCF's messages."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest

from signing_agent.config import load_config, parse_config
from signing_agent.errors import ConfigError
from signing_agent.recovery import RecoveryKey, RecoveryStateStore, scrub
from tests.support.prereq import missing

ROOT = Path(__file__).resolve().parents[2]


def config(service: dict[str, Any] | None = None, recovery: dict[str, Any] | None = None, *, enc: bool = True) -> Any:
    m0: dict[str, Any] = {"certificate": "c.pem", "signing_key": {"backend": "file", "path": "k.pem"}}
    if enc:
        m0["encryption_key"] = {"backend": "file", "path": "e.pem"}
    data: dict[str, Any] = {
        "agent": {"socket": "/tmp/x/a.sock"},
        "identities": {"m0": m0},
        "services": {"default": {"url": "https://ccf", "service_certificate": "s.pem", **(service or {})}},
    }
    if recovery is not None:
        data["recovery"] = recovery
    return data


def test_the_example_enables_nothing_but_documents_every_recovery_key() -> None:
    cfg = load_config(ROOT / "config.example.toml")
    assert cfg.recovery.enabled is False
    assert cfg.recovery.state_dir == Path("/var/lib/signing-agent")
    svc = cfg.services["default"]
    assert svc.recovery_identities == ("member0",)
    assert svc.accept_transition_to is False
    assert svc.accepted_service_certificates == ()


def test_defaults_and_relative_paths(tmp_path: Path) -> None:
    cfg = parse_config(
        config(
            {
                "recovery_identities": ["m0"],
                "accepted_service_certificates": ["next.pem"],
                "accept_transition_to": True,
            },
            {"enabled": True, "poll_interval": 0.5, "state_dir": "state"},
        ),
        path=tmp_path / "agent.toml",
    )
    assert cfg.recovery.enabled
    assert cfg.recovery.poll_interval == 0.5
    assert cfg.recovery.state_dir == tmp_path / "state"
    svc = cfg.services["default"]
    assert svc.accepted_service_certificates == (tmp_path / "next.pem",)
    assert svc.accept_transition_to is True
    # Without [recovery], the state lives beside the audit log.
    plain = parse_config(config(), path=tmp_path / "agent.toml")
    assert plain.recovery.enabled is False
    assert plain.recovery.state_dir == Path("/tmp/x")


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (config({"recovery_identities": ["m1"]}), "services.default.recovery_identities: no identity named 'm1'"),
        (config({"recovery_identities": ["m0"]}, enc=False), "identity 'm0' has no encryption_key"),
        (config(recovery={"enabeld": True}), "recovery.enabeld"),
        (config(recovery={"poll_interval": 0}), "recovery.poll_interval: must be greater than 0"),
        (config(recovery={"poll_interval": 10.0, "max_backoff": 5.0}), "recovery.max_backoff: must be at least"),
        (config({"accept_transition_to": "yes"}), "services.default.accept_transition_to: expected true or false"),
        (config({"accepted_service_certificates": "a.pem"}), "accepted_service_certificates: expected a list"),
    ],
)
def test_mistakes_name_the_key(data: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    assert message in info.value.message


def test_scrub_removes_anything_that_could_be_a_share() -> None:
    share = bytes(range(44))
    for form in (base64.b64encode(share).decode(), base64.urlsafe_b64encode(share).decode(), share.hex()):
        kept = scrub(f"Failed to decode base64 recovery share {form}: bad")
        assert form not in kept
        assert kept.startswith("Failed to decode base64 recovery share [redacted]")
    assert scrub("1/2 recovery shares successfully submitted") == "1/2 recovery shares successfully submitted"


def test_state_file_is_0600_replaced_atomically_and_keyed_by_recovery(tmp_path: Path) -> None:
    path = tmp_path / "state" / "recovery-default.json"
    store = RecoveryStateStore(path)
    key = RecoveryKey(2, "2.41")

    def record(data: dict[str, Any]) -> None:
        data["submissions"]["m0"] = {**key.as_dict(), "submittedAt": 1}

    asyncio.run(store.update(record))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert [p.name for p in path.parent.iterdir()] == ["recovery-default.json"]  # no temporary file left
    saved = json.loads(path.read_text())["submissions"]["m0"]
    assert key.matches(saved)
    assert not RecoveryKey(3, "2.41").matches(saved)
    assert not RecoveryKey(2, "3.7").matches(saved)
    again = asyncio.run(RecoveryStateStore(path).load())
    assert again["submissions"]["m0"]["recoveryCount"] == 2


def test_a_state_file_that_is_not_ours_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "recovery-default.json"
    path.write_text("[1, 2]")
    path.chmod(0o600)
    with pytest.raises(ConfigError, match="not a recovery state file"):
        asyncio.run(RecoveryStateStore(path).load())


def _planted(tmp_path: Path, mode: int = 0o600) -> Path:
    folder = tmp_path / "state"
    folder.mkdir(mode=0o700)
    path = folder / "recovery-default.json"
    path.write_text('{"version": 1, "submissions": {}}')
    path.chmod(mode)
    return path


def _refused_and_untouched(path: Path, reason: str) -> None:
    """Reading and writing both refuse the file, and leave it (and its mode and owner) as it was."""
    before = path.lstat()
    store = RecoveryStateStore(path)
    with pytest.raises(ConfigError, match=reason):
        asyncio.run(store.load())
    with pytest.raises(ConfigError, match=reason):
        asyncio.run(store.update(lambda data: data.update(x=1)))
    after = path.lstat()
    assert (after.st_ino, after.st_mode, after.st_uid, after.st_mtime_ns) == (
        before.st_ino,
        before.st_mode,
        before.st_uid,
        before.st_mtime_ns,
    )


def test_a_state_file_wider_than_0600_is_refused(tmp_path: Path) -> None:
    _refused_and_untouched(_planted(tmp_path, 0o644), "mode 0644 is wider than 0600")
    (tmp_path / "x").mkdir()
    _refused_and_untouched(_planted(tmp_path / "x", 0o700), "mode 0700 is wider than 0600")


def test_a_state_file_of_another_uid_is_refused(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        missing("chown to another uid needs root")
    path = _planted(tmp_path)
    os.chown(path, 65534, 65534)
    _refused_and_untouched(path, "owned by uid 65534")


def test_a_state_file_that_is_a_symlink_or_a_fifo_is_refused(tmp_path: Path) -> None:
    path = _planted(tmp_path)
    target = tmp_path / "elsewhere.json"
    path.rename(target)
    path.symlink_to(target)
    _refused_and_untouched(path, "symbolic link")
    path.unlink()
    os.mkfifo(path, 0o600)  # opening it must not wait for a writer
    _refused_and_untouched(path, "not a regular file")


def test_a_state_folder_that_others_may_write_or_a_symlink_is_refused(tmp_path: Path) -> None:
    path = _planted(tmp_path)
    path.parent.chmod(0o770)
    _refused_and_untouched(path, "lets group or others write")
    path.parent.chmod(0o700)
    link = tmp_path / "linked"
    link.symlink_to(path.parent)
    with pytest.raises(ConfigError, match="not a folder"):
        asyncio.run(RecoveryStateStore(link / path.name).load())
    with pytest.raises(ConfigError, match="not a folder"):
        asyncio.run(RecoveryStateStore(link / "recovery-other.json").update(lambda data: None))
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]
