"""Configuration: the example loads, unknown keys and wrong types are errors naming the dotted key."""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path
from typing import Any

import pytest

from signing_agent.config import (
    BACKEND_KINDS,
    MSG_TYPES,
    AgentSection,
    AuditConfig,
    AzureKeyVaultKeyConfig,
    FileKeyConfig,
    KeyVaultConfig,
    PKCS11KeyConfig,
    PolicyConfig,
    PolicyRuleConfig,
    RecoveryConfig,
    ServiceConfig,
    _Table,
    load_config,
    msg_type_name,
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
    assert config.agent.max_created_at_skew == 300
    assert config.identities["m0"].certificate == tmp_path / "c.pem"


def test_every_default_is_the_dataclass_default(tmp_path: Path) -> None:
    """The parser states no default of its own: a table that leaves every key out reads as its dataclass built with
    only the required fields."""
    data: dict[str, Any] = {
        "agent": {},
        "identities": {
            "p": {"certificate": "c.pem", "signing_key": {"backend": "pkcs11", "module": "/m.so", "key_label": "k"}},
            "a": {
                "certificate": "c.pem",
                "signing_key": {"backend": "azure-keyvault", "vault_url": "https://v", "key_name": "k"},
            },
        },
        "services": {"s": {"url": "https://x", "service_certificate": "s.pem"}},
        "audit": {},
        "policy": {"rules": [{"uids": [0]}]},
        "keyvault": {},
        "recovery": {},
    }
    config = parse_config(data, path=tmp_path / "agent.toml")
    assert config.agent == AgentSection()
    assert config.identities["p"].signing_key == PKCS11KeyConfig(module=Path("/m.so"), key_label="k")
    assert config.identities["a"].signing_key == AzureKeyVaultKeyConfig(vault_url="https://v", key_name="k")
    assert config.services["s"] == ServiceConfig(name="s", url="https://x", service_certificate=tmp_path / "s.pem")
    assert config.audit == AuditConfig(path=AgentSection().socket.parent / "audit.jsonl")
    assert config.policy == PolicyConfig(rules=(PolicyRuleConfig(name="rule0", uids=(0,)),))
    assert config.keyvault == KeyVaultConfig()
    assert config.recovery == RecoveryConfig(state_dir=config.audit.path.parent)
    # Leaving the optional tables out altogether changes nothing.
    bare = parse_config({key: data[key] for key in ("identities", "services")}, path=tmp_path / "agent.toml")
    assert (bare.agent, bare.audit, bare.keyvault, bare.recovery) == (
        config.agent,
        config.audit,
        config.keyvault,
        config.recovery,
    )
    assert bare.policy == PolicyConfig()


@dataclasses.dataclass(frozen=True)
class _Schema:
    count: int
    timeout: float = 2.5
    label: str | None = None
    names: tuple[str, ...] = ("a",)


def test_an_absent_key_takes_its_default_from_the_schema() -> None:
    table = _Table({"count": 3}, "x", Path("/etc"), _Schema)
    assert table.get_int("count") == 3
    assert table.get_number("timeout") == 2.5
    assert table.get_opt_str("label") is None
    assert table.get_str_tuple("names") == ("a",)
    with pytest.raises(ConfigError, match=r"^x\.count: required key is missing$"):
        _Table({}, "x", Path("/etc"), _Schema).get_int("count")
    # A key the schema has no field for has no default either.
    with pytest.raises(ConfigError, match=r"^x\.other: required key is missing$"):
        table.get_number("other")
    assert table.get_opt_path("other") is None


def test_service_answers_are_bounded_by_default() -> None:
    data = {**minimal(), "services": {"s": {"url": "https://x", "service_certificate": "s.pem"}}}
    svc = parse_config(data, path=Path("/etc/x/agent.toml")).services["s"]
    assert (svc.max_response_bytes, svc.read_timeout, svc.request_timeout, svc.total_timeout) == (4 << 20, 10, 30, 45)
    example = load_config(ROOT / "config.example.toml").services["default"]
    assert (example.max_response_bytes, example.read_timeout, example.total_timeout) == (4 << 20, 10, 45)


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
        (minimal(max_created_at_skew=-1), "agent.max_created_at_skew: must be at least 0"),
        (minimal(max_created_at_skew=1.5), "agent.max_created_at_skew: expected an integer"),
        (minimal(crypto_workers=-1), "agent.crypto_workers: must be at least 0"),
        (minimal(crypto_workers=65), "agent.crypto_workers: at most 64"),
        (minimal(crypto_workers="auto"), "agent.crypto_workers: expected an integer"),
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
        ({"services": {"s": {"url": "https://u:pw@x:8000"}}}, "services.s.url: must not hold a user name"),
        ({"services": {"s": {"url": "https://x:8000/?a=b"}}}, "services.s.url: must not have a query"),
        ({"services": {"s": {"url": "https://x:8000#top"}}}, "services.s.url: must not have a query"),
        ({"services": {"s": {"url": "https://x:99999"}}}, "services.s.url: the port must be a number"),
        ({"services": {"s": {"url": "https://:8000"}}}, "services.s.url: names no host"),
        (
            {"services": {"s": {"url": "https://x", "identity_url": "https://id@x/ledgerIdentity/s"}}},
            "services.s.identity_url: must not hold a user name",
        ),
        (
            {"services": {"s": {"url": "https://x", "service_certificate": "s.pem", "api_version": "1"}}},
            "not one of",
        ),
        (
            {"services": {"s": {"url": "https://x", "service_certificate": "s", "max_response_bytes": 100}}},
            "services.s.max_response_bytes: must be at least 4096",
        ),
        (
            {"services": {"s": {"url": "https://x", "service_certificate": "s", "read_timeout": 0}}},
            "services.s.read_timeout: must be greater than 0",
        ),
        (
            {"services": {"s": {"url": "https://x", "service_certificate": "s", "total_timeout": -1}}},
            "services.s.total_timeout: must be greater than 0",
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


# ----- PKCS#11 key selection: fields and an RFC 7512 uri, checked once, here -----


def pkcs11_key(**table: Any) -> PKCS11KeyConfig:
    data = {"identities": {"m0": {"certificate": "c", "signing_key": {"backend": "pkcs11", **table}}}}
    key = parse_config(data, path=Path("/etc/x/agent.toml")).identities["m0"].signing_key
    assert isinstance(key, PKCS11KeyConfig)
    return key


def test_a_pkcs11_uri_fills_in_the_key_fields() -> None:
    uri = "pkcs11:token=t%20one;object=member0;id=%01%a2;type=private?module-path=/usr/lib/p11.so&pin-source=file:/p"
    assert pkcs11_key(uri=uri) == PKCS11KeyConfig(
        module=Path("/usr/lib/p11.so"),
        token_label="t one",
        key_label="member0",
        key_id=b"\x01\xa2",
        pin_file=Path("/p"),
    )
    # A field may say the same as the uri, or what the uri leaves out.
    both = pkcs11_key(uri="pkcs11:object=k", module="lib/p11.so", token_label="t", key_label="k", pin_env="PIN")
    assert both == PKCS11KeyConfig(module=Path("/etc/x/lib/p11.so"), token_label="t", key_label="k", pin_env="PIN")


@pytest.mark.parametrize(
    ("table", "message"),
    [
        (
            {"uri": "pkcs11:token=b;object=k", "module": "/m", "token_label": "a"},
            r"\.token_label: disagrees with the uri's token",
        ),
        ({"uri": "pkcs11:object=b", "module": "/m", "key_label": "a"}, r"\.key_label: disagrees with the uri's object"),
        ({"uri": "pkcs11:id=%02", "module": "/m", "key_id": "01"}, r"\.key_id: disagrees with the uri's id"),
        ({"uri": "pkcs11:object=k?module-path=/b", "module": "/a"}, r"\.module: disagrees with the uri's module-path"),
        (
            {"uri": "pkcs11:object=k?pin-source=/b", "module": "/m", "pin_file": "/a"},
            r"\.pin_file: disagrees with the uri's pin-source",
        ),
        (
            {"uri": "pkcs11:object=k?pin-source=/b", "module": "/m", "pin_env": "P"},
            r"\.pin_env: the uri has a pin-source",
        ),
        ({"module": "/m", "key_label": "k", "pin_file": "/p", "pin_env": "P"}, r"\.pin_file: give pin_file or pin_env"),
        (
            {"uri": "pkcs11:object=x?pin-value=1234", "module": "/m"},
            r"\.uri: pkcs11 URI: pin-value is refused",
        ),
        ({"uri": "pkcs11:object=k;type=cert", "module": "/m"}, r"\.uri: type=cert cannot sign or decrypt"),
        ({"uri": "pkcs11:object=k?module-name=softhsm2"}, r"\.uri: module-name is not supported"),
        ({"uri": "pkcs11:object=k"}, r"\.module: required \(or module-path in the uri\)"),
        ({"key_label": "k"}, r"\.module: required"),
        ({"uri": "pkcs11:token=t?module-path=/m"}, r"\.key_label: name the key by key_label, key_id, or object=/id="),
    ],
)
def test_pkcs11_key_rules(table: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=rf"^identities\.m0\.signing_key{message}"):
        pkcs11_key(**table)


def test_message_types_and_key_stores_are_named_once() -> None:
    """The policy's message types are COSE's, in the same order; every key store has its config class."""
    from signing_agent.cose.governance import MsgType

    assert tuple(m.value for m in MsgType) == MSG_TYPES
    assert [msg_type_name(m) for m in MsgType] == list(MSG_TYPES)
    with pytest.raises(ValueError, match="'vote' is not a governance message type"):
        msg_type_name("vote")
    classes = (FileKeyConfig, PKCS11KeyConfig, AzureKeyVaultKeyConfig)
    assert (
        tuple(next(f.default for f in dataclasses.fields(c) if f.name == "backend") for c in classes) == BACKEND_KINDS
    )


def test_example_is_valid_toml_with_no_inline_secrets() -> None:
    text = (ROOT / "config.example.toml").read_text()
    tomllib.loads(text)
    assert "pin =" not in text
    assert "client_secret =" not in text


# ----- [keyvault] -----


def test_keyvault_defaults_are_the_backend_defaults() -> None:
    from signing_agent.backends.azure_keyvault import AzureKeyVaultSettings, ThrottleSettings

    config = parse_config(minimal(), path=Path("/etc/x/agent.toml"))
    assert config.keyvault == KeyVaultConfig()
    throttle, settings = ThrottleSettings(), AzureKeyVaultSettings()
    assert (config.keyvault.max_concurrency, config.keyvault.rate_per_second, config.keyvault.burst) == (
        throttle.max_concurrency,
        throttle.rate_per_second,
        throttle.burst,
    )
    assert (config.keyvault.max_attempts, config.keyvault.total_timeout) == (
        settings.max_attempts,
        settings.total_timeout,
    )


def test_the_example_documents_every_keyvault_key_at_its_default() -> None:
    text = (ROOT / "config.example.toml").read_text()
    table = tomllib.loads(text)["keyvault"]
    assert set(table) == {f.name for f in dataclasses.fields(KeyVaultConfig)}
    assert load_config(ROOT / "config.example.toml").keyvault == KeyVaultConfig()


def test_keyvault_table_is_parsed() -> None:
    data = minimal()
    data["keyvault"] = {
        "max_concurrency": 4,
        "rate_per_second": 20,
        "burst": 8,
        "max_attempts": 2,
        "total_timeout": 7.5,
    }
    kv = parse_config(data, path=Path("/etc/x/agent.toml")).keyvault
    assert kv == KeyVaultConfig(max_concurrency=4, rate_per_second=20.0, burst=8, max_attempts=2, total_timeout=7.5)
    assert isinstance(kv.rate_per_second, float)
    data["keyvault"] = {"max_attempts": 1}
    assert parse_config(data, path=Path("/etc/x/agent.toml")).keyvault == KeyVaultConfig(max_attempts=1)


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"max_concurency": 4}, r"unknown configuration key: keyvault\.max_concurency"),
        ({"retry_after_max": 4}, r"keyvault\.retry_after_max"),
        ({"max_concurrency": 0}, r"keyvault\.max_concurrency: must be at least 1, got 0"),
        ({"max_concurrency": 257}, r"keyvault\.max_concurrency: must be at most 256, got 257"),
        ({"max_concurrency": 4.0}, r"keyvault\.max_concurrency: expected an integer"),
        ({"rate_per_second": 0}, r"keyvault\.rate_per_second: must be greater than 0"),
        ({"rate_per_second": -1.5}, r"keyvault\.rate_per_second: must be greater than 0"),
        ({"rate_per_second": "fast"}, r"keyvault\.rate_per_second: expected a number"),
        ({"burst": 0}, r"keyvault\.burst: must be at least 1, got 0"),
        ({"burst": True}, r"keyvault\.burst: expected an integer"),
        ({"max_attempts": 0}, r"keyvault\.max_attempts: must be at least 1, got 0"),
        ({"max_attempts": 11}, r"keyvault\.max_attempts: must be at most 10, got 11"),
        ({"total_timeout": 0}, r"keyvault\.total_timeout: must be greater than 0"),
        ({"total_timeout": 30000}, r"keyvault\.total_timeout: must be at most 300 s, got 30000"),
    ],
)
def test_invalid_keyvault_settings_name_the_key(table: dict[str, Any], message: str) -> None:
    data = minimal()
    data["keyvault"] = table
    with pytest.raises(ConfigError, match=message):
        parse_config(data, path=Path("/etc/x/agent.toml"))


def test_keyvault_must_be_a_table() -> None:
    data = minimal()
    data["keyvault"] = 5
    with pytest.raises(ConfigError, match=r"keyvault: expected a table"):
        parse_config(data, path=Path("/etc/x/agent.toml"))
