"""RFC 7512 ``pkcs11:`` URIs: strict parsing and formatting. Pure: no I/O, no vendor imports.

A URI has path attributes separated by ``;`` (which object: ``token``, ``object``, ``id``, ``type``, ...) and
query attributes separated by ``&`` (how to get there: ``module-path``, ``pin-source``). Values are
percent-encoded; ``id`` is raw bytes, everything else is UTF-8 text. ``pin-value`` is refused: a PIN is never
written inline, and ``pin-source`` may only name a file (``file:/path`` or ``/path``). Unknown standard
attributes are refused so a typo cannot widen a key selection, and so are those the agent would not match (the
module's ``library-*`` and the slot's ``slot-description`` and ``slot-manufacturer``): every attribute a URI gives
selects, none is ignored. Vendor attributes (``x-...``) are kept but unused.

Below ``config`` in the layers: the configuration parser reads a key's ``uri`` with it, and the PKCS#11 backend
formats the URIs it logs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from signing_agent.errors import ConfigError

PATH_ATTRIBUTES = frozenset(
    {
        "token",
        "manufacturer",
        "serial",
        "model",
        "library-manufacturer",
        "library-description",
        "library-version",
        "object",
        "type",
        "id",
        "slot-description",
        "slot-manufacturer",
        "slot-id",
    }
)
QUERY_ATTRIBUTES = frozenset({"module-path", "module-name", "pin-source", "pin-value"})
OBJECT_TYPES = frozenset({"public", "private", "cert", "secret-key", "data"})

_UNMATCHED = ("library-manufacturer", "library-description", "library-version", "slot-description", "slot-manufacturer")
"""Standard attributes the agent would not match against the module or slot: refused rather than ignored."""

_PCT = re.compile(rb"%([0-9A-Fa-f]{2})")
# RFC 3986 unreserved characters never need encoding; everything else is percent-encoded by format_uri().
_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")


@dataclass(frozen=True, slots=True)
class PKCS11URI:
    """A parsed ``pkcs11:`` URI. Text attributes are decoded strings; ``id`` is bytes."""

    token: str | None = None
    object: str | None = None
    id: bytes | None = None
    type: str | None = None
    serial: str | None = None
    manufacturer: str | None = None
    model: str | None = None
    slot_id: int | None = None
    module_path: Path | None = None
    module_name: str | None = None
    pin_file: Path | None = None
    other: dict[str, str] = field(default_factory=dict)
    """Any other recognised or vendor (``x-``) attribute, decoded, which this agent does not act on."""


def percent_decode(value: str, *, what: str) -> bytes:
    """Decode ``%XX`` escapes into bytes; a stray ``%`` is an error (RFC 3986 leaves no room for guessing)."""
    raw = value.encode("utf-8")
    out = bytearray()
    i = 0
    while i < len(raw):
        c = raw[i]
        if c == 0x25:  # '%'
            m = _PCT.match(raw, i)
            if m is None:
                raise ConfigError(f"pkcs11 URI: {what}: '%' must be followed by two hex digits")
            out.append(int(m.group(1), 16))
            i += 3
        else:
            out.append(c)
            i += 1
    return bytes(out)


def percent_encode(value: bytes) -> str:
    """Percent-encode every byte outside RFC 3986 ``unreserved``."""
    return "".join(chr(b) if b in _UNRESERVED else f"%{b:02X}" for b in value)


def _text(value: str, *, what: str) -> str:
    try:
        return percent_decode(value, what=what).decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"pkcs11 URI: {what}: not UTF-8 after percent-decoding") from None


_PARTS = {
    # where: (the separator, the attributes it takes, the other part's and where they go)
    "path": (";", PATH_ATTRIBUTES, QUERY_ATTRIBUTES, "a query attribute: write it after '?'"),
    "query": ("&", QUERY_ATTRIBUTES, PATH_ATTRIBUTES, "a path attribute: write it before '?'"),
}


def _pairs(part: str, sep: str, *, where: str) -> list[tuple[str, str]]:
    pairs: list[tuple[str, str]] = []
    if not part:
        return pairs
    for item in part.split(sep):
        if not item:
            continue  # tolerate an empty component such as a trailing ';'
        name, eq, value = item.partition("=")
        if not eq:
            raise ConfigError(f"pkcs11 URI: {where} attribute {name!r} has no '=value'")
        pairs.append((name.lower(), value))
    return pairs


def _attributes(part: str, where: Literal["path", "query"]) -> dict[str, str]:
    """The attributes of the URI's path or query part, by (lowercased) name, values still percent-encoded. Each
    must belong to this part (or be a vendor's ``x-...``) and appear once; ``pin-value`` is refused in the query
    (and, in the path, as a query attribute)."""
    sep, known, elsewhere, misplaced = _PARTS[where]
    values: dict[str, str] = {}
    for name, value in _pairs(part, sep, where=where):
        if name == "pin-value" and where == "query":
            raise ConfigError(
                "pkcs11 URI: pin-value is refused: a PIN is never written inline",
                hint="use pin-source=file:/path/to/pin (mode 0600), or pin_file / pin_env in the config",
            )
        if name in elsewhere:
            raise ConfigError(f"pkcs11 URI: {name} is {misplaced}")
        if name not in known and not name.startswith("x-"):
            raise ConfigError(f"pkcs11 URI: unknown {where} attribute {name!r}")
        if name in values:
            raise ConfigError(f"pkcs11 URI: {where} attribute {name!r} appears twice")
        values[name] = value
    return values


def parse_uri(text: str) -> PKCS11URI:
    """Parse an RFC 7512 URI. Raises ``ConfigError`` that says what is wrong (never a secret)."""
    if not text.lower().startswith("pkcs11:"):
        raise ConfigError("pkcs11 URI: must start with 'pkcs11:'")
    rest = text[len("pkcs11:") :]
    if "#" in rest:
        raise ConfigError("pkcs11 URI: a fragment ('#') is not allowed")
    path, _, query = rest.partition("?")
    values = _attributes(path, "path")
    query_values = _attributes(query, "query")

    other: dict[str, str] = {}
    for name in _UNMATCHED:
        if name in values:
            raise ConfigError(
                f"pkcs11 URI: {name} is not supported: a key's token is selected by token, serial, manufacturer, "
                "model and slot-id; remove it (the module is module-path)"
            )
    for name, value in (*values.items(), *query_values.items()):
        if name.startswith("x-"):
            other[name] = _text(value, what=name)

    obj_type = _text(values["type"], what="type") if "type" in values else None
    if obj_type is not None and obj_type not in OBJECT_TYPES:
        raise ConfigError(f"pkcs11 URI: type={obj_type!r} is not one of {', '.join(sorted(OBJECT_TYPES))}")
    slot_id = None
    if "slot-id" in values:
        slot_text = _text(values["slot-id"], what="slot-id")
        if not slot_text.isdigit():
            raise ConfigError("pkcs11 URI: slot-id must be a decimal number")
        slot_id = int(slot_text)

    pin_file = None
    if "pin-source" in query_values:
        source = _text(query_values["pin-source"], what="pin-source")
        if source.startswith("file:"):
            source = source[len("file:") :]
            if source.startswith("//"):
                # file:///path -> /path (an empty authority); file://host/path is not a local file.
                if not source.startswith("///"):
                    raise ConfigError("pkcs11 URI: pin-source file URLs must be local (file:///path)")
                source = source[2:]
        elif source.startswith("|"):
            raise ConfigError("pkcs11 URI: pin-source commands ('|...') are not supported; name a file")
        if not source:
            raise ConfigError("pkcs11 URI: pin-source is empty")
        pin_file = Path(source)

    module_path = None
    if "module-path" in query_values:
        module_text = _text(query_values["module-path"], what="module-path")
        if not module_text.startswith("/"):
            raise ConfigError("pkcs11 URI: module-path must be an absolute path")
        module_path = Path(module_text)

    return PKCS11URI(
        token=_text(values["token"], what="token") if "token" in values else None,
        object=_text(values["object"], what="object") if "object" in values else None,
        id=percent_decode(values["id"], what="id") if "id" in values else None,
        type=obj_type,
        serial=_text(values["serial"], what="serial") if "serial" in values else None,
        manufacturer=_text(values["manufacturer"], what="manufacturer") if "manufacturer" in values else None,
        model=_text(values["model"], what="model") if "model" in values else None,
        slot_id=slot_id,
        module_path=module_path,
        module_name=_text(query_values["module-name"], what="module-name") if "module-name" in query_values else None,
        pin_file=pin_file,
        other=other,
    )


def format_uri(
    *,
    token: str | None = None,
    serial: str | None = None,
    object: str | None = None,
    id: bytes | None = None,
    type: str | None = None,
    module_path: str | Path | None = None,
    pin_file: str | Path | None = None,
) -> str:
    """A canonical URI for these attributes (safe to log: it never carries a PIN, only where to read one)."""
    path: list[str] = []
    if token is not None:
        path.append("token=" + percent_encode(token.encode("utf-8")))
    if serial is not None:
        path.append("serial=" + percent_encode(serial.encode("utf-8")))
    if object is not None:
        path.append("object=" + percent_encode(object.encode("utf-8")))
    if id is not None:
        path.append("id=" + "".join(f"%{b:02X}" for b in id))
    if type is not None:
        path.append("type=" + percent_encode(type.encode("utf-8")))
    query: list[str] = []
    if module_path is not None:
        query.append("module-path=" + percent_encode(str(module_path).encode("utf-8")).replace("%2F", "/"))
    if pin_file is not None:
        pin_text = percent_encode(str(pin_file).encode("utf-8")).replace("%2F", "/")
        # "file://x" would name a host; a path that starts with "//" needs an empty authority in front.
        query.append("pin-source=file:" + ("//" if pin_text.startswith("//") else "") + pin_text)
    uri = "pkcs11:" + ";".join(path)
    return uri + ("?" + "&".join(query) if query else "")
