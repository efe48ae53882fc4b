"""Recovery configuration and the pure helpers of ``signing_agent.recovery``: names checked against identities and
services, defaults, the state file (0600, atomic, never a share) and the scrubbing of CCF's messages."""

from __future__ import annotations

import asyncio
import base64
import json
import stat
from pathlib import Path
from typing import Any

import pytest

from signing_agent.config import load_config, parse_config
from signing_agent.errors import ConfigError
from signing_agent.recovery import RecoveryKey, RecoveryStateStore, scrub

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
    with pytest.raises(ConfigError, match="not a recovery state file"):
        asyncio.run(RecoveryStateStore(path).load())
