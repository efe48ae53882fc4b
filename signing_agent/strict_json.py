"""JSON read as strictly as CCF reads it, for request bodies and for the payloads the agent signs.

Python's ``json`` accepts what CCF's parsers refuse, and a signed payload CCF refuses is useless, or worse, read
differently by the two sides. Refused here, each with a clear ``InvalidRequestError`` (HTTP 400), never a 500:

- bytes that are not UTF-8;
- ``NaN``, ``Infinity`` and ``-Infinity``, and numbers that overflow to them (``1e999`` would be signed as
  ``Infinity``);
- lone surrogate escapes (``"\\ud800"``): no UTF-8 can carry them, so re-serialising the value would fail;
- integers outside 64 bits (CCF's parsers do not hold more exactly; Python would accept 4,300 digits);
- duplicate keys in an object (which one wins differs between parsers);
- nesting deeper than the interpreter's recursion limit.

Pure: imports nothing from the package but ``errors``.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from signing_agent.errors import InvalidRequestError

INT_MIN = -(2**63)
INT_MAX = 2**64 - 1
_INT_DIGITS = len(str(INT_MAX))
# A \u escape of a surrogate, paired or not: only then can the parsed value hold a lone surrogate.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89abcdefABCDEF]")


class _RefusedError(ValueError):
    """Raised by the parser hooks; ``loads`` turns it into an ``InvalidRequestError``."""


def _refuse_constant(name: str) -> Any:
    raise _RefusedError(f"{name} is not a JSON number")


def _bounded_int(digits: str) -> int:
    if len(digits.lstrip("-")) > _INT_DIGITS:
        raise _RefusedError(f"an integer of {len(digits.lstrip('-'))} digits is outside the 64-bit range CCF reads")
    value = int(digits)
    if not INT_MIN <= value <= INT_MAX:
        raise _RefusedError(f"the integer {digits} is outside the 64-bit range CCF reads")
    return value


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _RefusedError(f"the number {text[:40]} overflows to Infinity")
    return value


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise _RefusedError(f"the key {key[:40]!r} appears twice in one object")
        obj[key] = value
    return obj


def _refuse_lone_surrogates(text: str, value: Any) -> None:
    if not _SURROGATE_ESCAPE.search(text):
        return
    try:
        json.dumps(value, ensure_ascii=False, check_circular=False).encode("utf-8")
    except UnicodeEncodeError:
        raise _RefusedError("it holds a lone surrogate escape (\\ud800-\\udfff without its pair)") from None


def loads(raw: bytes, what: str = "the body") -> Any:
    """Parse ``raw`` strictly; ``what`` names it in the error ("the body", "a proposal payload")."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidRequestError(f"{what} is not UTF-8") from None
    try:
        value = json.loads(
            text,
            parse_constant=_refuse_constant,
            parse_int=_bounded_int,
            parse_float=_finite_float,
            object_pairs_hook=_unique_keys,
        )
        _refuse_lone_surrogates(text, value)
    except _RefusedError as exc:
        raise InvalidRequestError(f"{what} is not acceptable JSON: {exc}") from None
    except json.JSONDecodeError as exc:
        raise InvalidRequestError(f"{what} is not valid JSON: {exc}") from None
    except RecursionError:
        raise InvalidRequestError(f"{what} is nested too deeply") from None
    return value
