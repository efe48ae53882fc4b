"""RFC 7512 URI parsing and formatting (pure)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from signing_agent.errors import ConfigError
from signing_agent.pkcs11_uri import format_uri, parse_uri, percent_decode, percent_encode


def test_full_uri() -> None:
    uri = parse_uri(
        "pkcs11:token=My%20Token;object=member0;id=%01%02%ff;type=private;serial=42;x-vendor=v"
        "?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-source=file:/etc/agent/pin"
    )
    assert uri.token == "My Token"
    assert uri.object == "member0"
    assert uri.id == b"\x01\x02\xff"
    assert uri.type == "private"
    assert uri.serial == "42"
    assert uri.module_path == Path("/usr/lib/softhsm/libsofthsm2.so")
    assert uri.pin_file == Path("/etc/agent/pin")
    assert uri.other == {"x-vendor": "v"}


def test_minimal_and_pin_source_forms() -> None:
    assert parse_uri("pkcs11:").token is None
    assert parse_uri("pkcs11:object=a;").object == "a"
    assert parse_uri("pkcs11:?pin-source=/run/pin").pin_file == Path("/run/pin")
    assert parse_uri("pkcs11:?pin-source=file:///run/pin").pin_file == Path("/run/pin")
    assert parse_uri("pkcs11:slot-id=7").slot_id == 7
    assert parse_uri("pkcs11:X-Path=a?x-query=b&").other == {"x-path": "a", "x-query": "b"}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("pkcs11:object=a?pin-value=1234", "pin-value is refused"),
        ("pkcs11:pin-value=1234", "pin-value is a query attribute: write it after '\\?'"),
        ("pkcs11:?pin-value=1&pin-value=2", "pin-value is refused"),
        ("file:/x", "must start with 'pkcs11:'"),
        ("pkcs11:object=a;object=b", "appears twice"),
        ("pkcs11:objekt=a", "unknown path attribute"),
        ("pkcs11:?module=x", "unknown query attribute"),
        ("pkcs11:?token=x", "token is a path attribute: write it before '\\?'"),
        ("pkcs11:?module-name=a&module-name=b", "query attribute 'module-name' appears twice"),
        ("pkcs11:?x-v=1&X-V=2", "query attribute 'x-v' appears twice"),
        ("pkcs11:?module-name", "query attribute 'module-name' has no '=value'"),
        ("pkcs11:object=%zz", "two hex digits"),
        ("pkcs11:object=%4", "two hex digits"),
        ("pkcs11:object=%ff", "not UTF-8"),
        ("pkcs11:type=secret", "is not one of"),
        ("pkcs11:slot-id=x", "decimal"),
        # attributes the agent would not match against the module or the slot: refused, never ignored
        ("pkcs11:token=t;library-manufacturer=SoftHSM", "library-manufacturer is not supported"),
        ("pkcs11:token=t;slot-description=x", "slot-description is not supported"),
        ("pkcs11:object", "no '=value'"),
        ("pkcs11:?pin-source=|/bin/cat", "not supported"),
        ("pkcs11:?pin-source=file://host/pin", "local"),
        ("pkcs11:?module-path=lib.so", "absolute"),
        ("pkcs11:object=a#frag", "fragment"),
    ],
)
def test_refused(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        parse_uri(text)
    assert "1234" not in info.value.diagnostics()


def test_format() -> None:
    text = format_uri(
        token="NSS Certificate DB", object="m0", id=b"\x00\xab", type="private", module_path="/usr/lib/x.so"
    )
    assert text == "pkcs11:token=NSS%20Certificate%20DB;object=m0;id=%00%AB;type=private?module-path=/usr/lib/x.so"


@given(token=st.text(), obj=st.text(), key_id=st.binary(), pin=st.text(min_size=1).filter(lambda s: "\0" not in s))
def test_round_trip(token: str, obj: str, key_id: bytes, pin: str) -> None:
    pin_path = "/" + pin
    uri = parse_uri(format_uri(token=token, object=obj, id=key_id, type="private", pin_file=pin_path))
    assert (uri.token, uri.object, uri.id, uri.type) == (token, obj, key_id, "private")
    assert uri.pin_file == Path(pin_path)


@given(st.binary())
def test_percent_round_trip(data: bytes) -> None:
    assert percent_decode(percent_encode(data), what="x") == data
