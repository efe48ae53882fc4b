"""``signing-agent init``: a minimal configuration the agent takes as it is."""

from __future__ import annotations

import argparse
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from signing_agent.cli_init import add_arguments, render
from signing_agent.config import PKCS11KeyConfig, parse_config
from signing_agent.errors import ConfigError
from tests.support.agent import cli_env


def args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(list(argv))


SOFTHSM = ("--module", "/usr/lib/softhsm/libsofthsm2.so", "--token-label", "members", "--pin-file", "token.pin")
SERVICE = ("--service-url", "https://127.0.0.1:8000", "--service-certificate", "service_cert.pem")


def test_a_key_store_one_identity_one_service_and_nothing_else(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # the files named are relative to where init runs: they are written so
    text = render(args(*SOFTHSM, *SERVICE), tmp_path)
    data = tomllib.loads(text)
    assert set(data) == {"agent", "audit", "identities", "services"}
    assert list(data["identities"]) == ["member0"]
    assert list(data["services"]) == ["default"]
    config = parse_config(data, path=tmp_path / "agent.toml")
    key = config.identities["member0"].signing_key
    assert isinstance(key, PKCS11KeyConfig)
    assert (key.token_label, key.key_label, key.pin_file) == ("members", "member0", tmp_path / "token.pin")
    assert key.init_params is None
    assert config.identities["member0"].certificate == tmp_path / "member0_cert.pem"
    assert config.services["default"].service_certificate == tmp_path / "service_cert.pem"
    assert config.audit.path == tmp_path / "audit.jsonl"
    for absent in ("azure", "vault", "init_params", "policy", "keyvault", "recovery"):
        assert absent not in text


def test_what_is_asked_for_is_added(tmp_path: Path) -> None:
    nss = render(args(*SOFTHSM, "--init-params", "configdir='sql:/x'", "--policy", "--identity", "m1"), tmp_path)
    config = parse_config(tomllib.loads(nss), path=tmp_path / "agent.toml")
    assert [rule.name for rule in config.policy.rules] == ["operators"]
    assert list(config.identities) == ["m1"]
    assert "services" not in tomllib.loads(nss)  # no --service-url: no service yet
    vault = render(
        args("--backend", "azure-keyvault", "--vault-url", "https://v.vault.azure.net", "--credential", "azure-cli"),
        tmp_path,
    )
    assert 'backend = "azure-keyvault"' in vault
    parse_config(tomllib.loads(vault), path=tmp_path / "agent.toml")
    outside = render(args("--backend", "file", "--key", "/keys/m0.pem", "--socket", "/run/x/agent.sock"), tmp_path)
    assert 'path = "/keys/m0.pem"' in outside  # outside the config's folder: absolute
    assert 'socket = "/run/x/agent.sock"' in outside


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ((), "--module: required for --backend pkcs11"),
        (("--backend", "azure-keyvault"), "--vault-url: required"),
        (("--backend", "file"), "--key: required"),
        ((*SOFTHSM, "--service-url", "https://x:1"), "--service-certificate"),
        ((*SOFTHSM, "--identity", "no spaces"), "--identity 'no spaces'"),
        ((*SOFTHSM, *SERVICE[:1], "http://plain:80", *SERVICE[2:]), None),
    ],
)
def test_what_the_agent_would_refuse_is_refused_now(tmp_path: Path, argv: tuple[str, ...], message: str | None) -> None:
    with pytest.raises(ConfigError) as refused:
        parse_config(tomllib.loads(render(args(*argv), tmp_path)), path=tmp_path / "agent.toml")
    if message is not None:
        assert message in refused.value.message


def test_init_writes_a_new_file_and_never_overwrites_one(tmp_path: Path) -> None:
    out = tmp_path / "agent.toml"
    command = [sys.executable, "-m", "signing_agent", "init", *SOFTHSM, *SERVICE, "--out", str(out)]
    run = subprocess.run(command, env=cli_env(), capture_output=True, text=True, timeout=30, check=False)
    assert run.returncode == 0, run.stderr
    assert f"check it with 'signing-agent check-config --config {out}'" in run.stderr
    parse_config(tomllib.loads(out.read_text()), path=out)
    again = subprocess.run(command, env=cli_env(), capture_output=True, text=True, timeout=30, check=False)
    assert again.returncode == 2
    assert "already exists; refusing to overwrite it" in again.stderr
    printed = subprocess.run(
        [sys.executable, "-m", "signing_agent", "init", *SOFTHSM],
        env=cli_env({"SIGNING_AGENT_SOCK": str(tmp_path / "a.sock")}), cwd=tmp_path,
        capture_output=True, text=True, timeout=30, check=True,
    )  # fmt: skip
    assert 'socket = "a.sock"' in printed.stdout  # where $SIGNING_AGENT_SOCK says clients look
