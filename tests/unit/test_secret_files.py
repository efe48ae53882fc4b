"""Secret files (PEM keys, PIN files) are accepted only when private to the agent's user, checked as opened."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from signing_agent.backends._secrets import check_secret_file, read_secret_file
from signing_agent.backends.file import FileSigningKey
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
