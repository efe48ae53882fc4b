"""Secret files (PEM keys, PIN files) are accepted only when private to the agent's user, checked as opened."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from signing_agent.backends import _secrets
from signing_agent.backends._secrets import check_secret_file, read_secret_file, secret_env, take_secret_env
from signing_agent.backends.file import FileSigningKey
from signing_agent.backends.keystores import secret_env_names
from signing_agent.config import parse_config
from signing_agent.errors import ConfigError
from tests.support.pki import make_member
from tests.support.prereq import missing


def secret(tmp_path: Path, mode: int = 0o600) -> Path:
    path = tmp_path / "secret"
    path.write_bytes(b"1234\n")
    path.chmod(mode)
    return path


def test_a_private_file_is_read(tmp_path: Path) -> None:
    path = secret(tmp_path)
    check_secret_file(path, "pin_file")
    assert read_secret_file(path, "pin_file") == b"1234\n"


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660, 0o644])
def test_group_or_other_access_is_refused_with_the_fix(tmp_path: Path, mode: int) -> None:
    path = secret(tmp_path, mode)
    for call in (check_secret_file, read_secret_file):
        with pytest.raises(ConfigError, match=f"mode {mode:04o} lets group or others") as info:
            call(path, "pin_file")
        assert f"chmod 600 {path}" in info.value.diagnostics()
        assert "1234" not in info.value.diagnostics()


def test_not_a_regular_file_or_missing(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not a regular file"):
        check_secret_file(tmp_path, "pin_file")
    with pytest.raises(ConfigError, match="No such file"):
        read_secret_file(tmp_path / "nope", "pin_file")


@pytest.mark.timeout(10)
def test_a_fifo_is_refused_at_once_not_waited_on(tmp_path: Path) -> None:
    """A FIFO at a secret file's path (nobody writing it) held ``open`` for ever: start-up or a reload hung instead of
    refusing the file, as the trust files already refuse one."""
    fifo = tmp_path / "pin"
    os.mkfifo(fifo, 0o600)
    with pytest.raises(ConfigError, match="not a regular file"):
        read_secret_file(fifo, "pin_file")


def test_a_file_owned_by_another_user_is_refused(tmp_path: Path) -> None:
    if os.getuid() != 0:
        missing("changing a file's owner needs root")
    path = secret(tmp_path)
    os.chown(path, 65534, -1)
    with pytest.raises(ConfigError, match="owned by uid 65534"):
        read_secret_file(path, "pin_file")


def test_the_file_backend_uses_the_same_rule(tmp_path: Path) -> None:
    key, _ = make_member().write(tmp_path)
    key.chmod(0o644)
    with pytest.raises(ConfigError, match=r"identities\.m0\.signing_key\.path: .* lets group or others"):
        FileSigningKey(key, name="identities.m0.signing_key")
    key.chmod(0o600)
    FileSigningKey(key, name="identities.m0.signing_key")


def test_a_secret_variable_leaves_the_environment_once_read_and_is_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_secrets, "_TAKEN", {})
    monkeypatch.setenv("SA_UNIT_PIN", "4321")
    take_secret_env(["SA_UNIT_PIN", "SA_UNIT_UNSET"])
    assert "SA_UNIT_PIN" not in os.environ
    assert secret_env("SA_UNIT_PIN") == "4321"  # a reload or a re-login reads it again
    assert secret_env("SA_UNIT_UNSET") is None
    monkeypatch.setenv("SA_UNIT_PIN", "8765")  # set again in this process (the keys command's PIN prompt)
    assert secret_env("SA_UNIT_PIN") == "8765"
    assert "SA_UNIT_PIN" not in os.environ


def test_every_secret_variable_of_the_configuration_is_found(tmp_path: Path) -> None:
    vault = {"backend": "azure-keyvault", "vault_url": "https://v.vault.azure.net", "key_name": "k"}
    token = {"backend": "pkcs11", "module": "/usr/lib/softhsm/libsofthsm2.so", "token_label": "t", "key_label": "k"}
    config = parse_config(
        {
            "identities": {
                "a": {"certificate": "a.pem", "signing_key": {**token, "pin_env": "PIN_A"},
                      "encryption_key": {**vault, "credential": "client-secret", "client_secret_env": "SECRET_A"}},
                "b": {"certificate": "b.pem", "signing_key": {**token, "pin_file": "pin"}},
                "c": {"certificate": "c.pem", "signing_key": vault},
            }
        },
        path=tmp_path / "agent.toml",
    )  # fmt: skip
    assert secret_env_names(config) == {"PIN_A", "SECRET_A"}
