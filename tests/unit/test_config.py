"""Configuration: the example loads, unknown keys and wrong types are errors naming the dotted key."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest

from signing_agent.config import (
    AzureKeyVaultKeyConfig,
    FileKeyConfig,
    PKCS11KeyConfig,
    load_config,
    parse_config,
)
from signing_agent.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]


def minimal(**agent: Any) -> dict[str, Any]:
    return {
        "agent": agent,
        "identities": {"m0": {"certificate": "c.pem", "signing_key": {"backend": "file", "path": "k.pem"}}},
    }


def test_the_example_config_loads_and_resolves_paths() -> None:
    config = load_config(ROOT / "config.example.toml")
    assert set(config.identities) == {"member0", "member1", "dev"}
    m0 = config.identities["member0"]
    assert m0.certificate == ROOT / "member0_cert.pem"
    assert isinstance(m0.signing_key, PKCS11KeyConfig)
    assert m0.signing_key.pin_file == ROOT / "token.pin"
    assert isinstance(config.identities["member1"].signing_key, AzureKeyVaultKeyConfig)
    assert isinstance(config.identities["dev"].signing_key, FileKeyConfig)
    assert config.services["default"].api_version == "2024-07-01"
    assert config.agent.socket == Path("/run/signing-agent/agent.sock")
    assert config.agent.max_request_bytes == 8 * 1024 * 1024


def test_defaults_and_relative_paths(tmp_path: Path) -> None:
    config = parse_config(minimal(socket="run/a.sock"), path=tmp_path / "agent.toml")
    assert config.agent.socket == tmp_path / "run/a.sock"
    assert config.agent.socket_mode == 0o600
    assert config.identities["m0"].certificate == tmp_path / "c.pem"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"agnet": {}}, "unknown configuration key: agnet"),
        (minimal(sokcet="x"), "agent.sokcet"),
        (
            {"identities": {"m0": {"certificate": "c", "signing_key": {"backend": "file", "path": "k", "pth": 1}}}},
            "identities.m0.signing_key.pth",
        ),
        (minimal(max_request_bytes="big"), "agent.max_request_bytes: expected an integer"),
        (minimal(max_request_bytes=True), "agent.max_request_bytes: expected an integer"),
        (minimal(max_request_bytes=10), "at least 1024"),
        (minimal(socket_mode="0666"), "is not allowed"),
        (minimal(socket_mode="rw"), "octal"),
        (minimal(allowed_uids=["root"]), "non-negative integers"),
        (
            {"identities": {"m0": {"signing_key": {"backend": "file", "path": "k"}}}},
            "identities.m0.certificate",
        ),
        ({"identities": {"m0": {"certificate": "c", "signing_key": {"backend": "gpg"}}}}, "is not one of"),
        (
            {
                "identities": {
                    "m0": {
                        "certificate": "c",
                        "signing_key": {"backend": "pkcs11", "module": "m", "key_label": "k", "pin": "1234"},
                    }
                }
            },
            "never written inline",
        ),
        (
            {"identities": {"m0": {"certificate": "c", "signing_key": {"backend": "pkcs11", "module": "m"}}}},
            "key_label",
        ),
        (
            {"identities": {"m0": {"certificate": "c", "signing_key": {"backend": "pkcs11", "uri": "token=x"}}}},
            "pkcs11:",
        ),
        ({"identities": {"bad name": {}}}, "names use letters"),
        ({"services": {"s": {"url": "http://x"}}}, "https://"),
        ({"services": {"s": {"url": "https://x"}}}, "pins"),
        (
            {"services": {"s": {"url": "https://x", "service_certificate": "s.pem", "api_version": "1"}}},
            "not one of",
        ),
    ],
)
def test_invalid_configs_name_the_key(data: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config(data, path=Path("/etc/x/agent.toml"))


def test_pin_is_never_in_the_error(tmp_path: Path) -> None:
    data = {
        "identities": {
            "m0": {
                "certificate": "c",
                "signing_key": {"backend": "pkcs11", "module": "m", "key_label": "k", "pin": "s3cret-pin"},
            }
        }
    }
    with pytest.raises(ConfigError) as info:
        parse_config(data, path=tmp_path / "a.toml")
    assert "s3cret-pin" not in info.value.diagnostics()


def test_unreadable_and_invalid_toml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[agent\nsocket=")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config(bad)
    bad.write_bytes(b"\xff\xfe")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(bad)


def test_key_id_is_hex(tmp_path: Path) -> None:
    data = {
        "identities": {
            "m0": {"certificate": "c", "signing_key": {"backend": "pkcs11", "module": "/m", "key_id": "0a1B"}}
        }
    }
    key = parse_config(data, path=tmp_path / "a.toml").identities["m0"].signing_key
    assert isinstance(key, PKCS11KeyConfig)
    assert key.key_id == b"\x0a\x1b"
    data["identities"]["m0"]["signing_key"]["key_id"] = "zz"  # type: ignore[index]
    with pytest.raises(ConfigError, match="expected hex"):
        parse_config(data, path=tmp_path / "a.toml")


def test_example_is_valid_toml_with_no_inline_secrets() -> None:
    text = (ROOT / "config.example.toml").read_text()
    tomllib.loads(text)
    assert "pin =" not in text
    assert "client_secret =" not in text
