"""Fault injection rules and the request log of the CCF sandbox.

A rule matches the next ``count`` requests whose method equals ``method`` (or ``"*"``) and whose path
(without the query) matches the ``path`` regex (``re.search``). Kinds:

- ``reset``: close the connection without a response, before processing (nothing reaches the state).
- ``drop_after``: process the request fully (state changes applied), then close the connection without
  sending the response: the "response lost" case.
- ``status``: answer with ``status`` and an OData error body without processing (e.g. 503 +
  ``Retry-After``).
- ``delay``: sleep ``delay`` seconds, then process normally.

The first matching rule with count left wins. The request log records every request outside ``/_sandbox/``.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Final, Literal

FaultKind = Literal["reset", "drop_after", "status", "delay"]
FAULT_KINDS: Final[tuple[FaultKind, ...]] = ("reset", "drop_after", "status", "delay")

_DEFAULT_CODES: Final = {429: "TooManyRequests", 503: "ServiceUnavailable", 500: "InternalError"}


@dataclass(slots=True)
class FaultRule:
    kind: FaultKind
    path: str
    method: str = "*"
    count: int = 1
    status: int = 503
    retry_after: str | None = None
    code: str | None = None
    message: str = "Injected fault (CCF sandbox)"
    delay: float = 0.0
    id: int = 0
    hits: int = 0
    _pattern: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {self.kind!r}; expected one of {', '.join(FAULT_KINDS)}")
        if self.count < 1:
            raise ValueError("count must be at least 1")
        self._pattern = re.compile(self.path)

    def matches(self, method: str, path: str) -> bool:
        return (
            self.hits < self.count and self.method in ("*", method.upper()) and self._pattern.search(path) is not None
        )

    @property
    def error_code(self) -> str:
        return self.code or _DEFAULT_CODES.get(self.status, "InternalError")

    def to_json(self) -> dict[str, Any]:
        body = asdict(self)
        body.pop("_pattern", None)
        return body


@dataclass(frozen=True, slots=True)
class RequestRecord:
    method: str
    path: str
    query: str
    status: int | None
    fault: FaultKind | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class Faults:
    """The pending fault rules (in-process API; the HTTP control API uses it too)."""

    def __init__(self) -> None:
        self._rules: list[FaultRule] = []
        self._ids = itertools.count(1)

    def add(self, rule: FaultRule) -> FaultRule:
        rule.id = next(self._ids)
        self._rules.append(rule)
        return rule

    def reset(self, path: str, *, method: str = "*", count: int = 1) -> FaultRule:
        return self.add(FaultRule("reset", path, method.upper(), count))

    def drop_after(self, path: str, *, method: str = "*", count: int = 1) -> FaultRule:
        return self.add(FaultRule("drop_after", path, method.upper(), count))

    def status(
        self,
        path: str,
        status: int = 503,
        *,
        method: str = "*",
        count: int = 1,
        retry_after: str | None = None,
        code: str | None = None,
        message: str = "Injected fault (CCF sandbox)",
    ) -> FaultRule:
        return self.add(FaultRule("status", path, method.upper(), count, status, retry_after, code, message))

    def delay(self, path: str, seconds: float, *, method: str = "*", count: int = 1) -> FaultRule:
        return self.add(FaultRule("delay", path, method.upper(), count, delay=seconds))

    def clear(self) -> None:
        self._rules.clear()

    def pending(self) -> list[FaultRule]:
        return [rule for rule in self._rules if rule.hits < rule.count]

    def take(self, method: str, path: str) -> FaultRule | None:
        """The first rule matching this request, with one use consumed."""
        for rule in self._rules:
            if rule.matches(method, path):
                rule.hits += 1
                return rule
        return None
