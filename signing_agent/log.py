"""Logging set-up: JSON lines to stderr for journald, readable text on a TTY. The package logger is configured; other
libraries' warnings and errors go through the same formatter.

Every line carries the id of the request it was logged for (``RequestIdFilter``, from ``signing_agent.context``):
the API's and the recovery watchers' requests, down to the CCF client and the key stores.

Nothing secret is ever passed to a logger (PINs, tokens, keys, payloads and decrypted shares are kept out at the
call sites); this module adds no redaction magic that would make that look optional.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable
from typing import TextIO

from signing_agent import context
from signing_agent.text import printable

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}

CLIENT_ERROR_LOG_INTERVAL = 60.0
"""At most one "malformed request from a client" line per this many seconds (``ClientErrorFilter``)."""


_NO_REQUEST = "-"
TEXT_FORMAT = "%(asctime)s %(levelname)-7s %(name)s [%(request_id)s]: %(message)s"


class RequestIdFilter(logging.Filter):
    """Adds ``request_id`` to every record: the current request's (``signing_agent.context``), or ``-`` outside
    one. On the handlers, so every logger routed through them gets it."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not isinstance(getattr(record, "request_id", None), str):
            record.request_id = context.request_id() or _NO_REQUEST
        return True


class TextFormatter(logging.Formatter):
    """``TEXT_FORMAT``, one line per message (``text.printable``); a traceback follows on its own lines.

    Log messages quote what callers sent (a request's decoded path, a name they chose): unescaped, ``%0a`` would start
    a log line of the caller's choosing, and ``%1b`` would write escape sequences to the operator's terminal."""

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 -- logging's name
        record.message = printable(record.message)
        return super().formatMessage(record)


class JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": printable(record.getMessage()),
        }
        request_id = getattr(record, "request_id", None)
        if isinstance(request_id, str) and request_id != _NO_REQUEST:
            entry["request_id"] = request_id
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def setup_logging(level: str = "info", *, stream: TextIO | None = None, json_lines: bool | None = None) -> None:
    """Configure the ``signing_agent`` logger. ``json_lines`` defaults to "not a TTY"."""
    stream = stream or sys.stderr
    if json_lines is None:
        json_lines = not stream.isatty()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JSONFormatter() if json_lines else TextFormatter(TEXT_FORMAT))
    handler.addFilter(RequestIdFilter())
    logger = logging.getLogger("signing_agent")
    logger.handlers[:] = [handler]
    logger.setLevel(_LEVELS.get(level, logging.INFO))
    logger.propagate = False
    # aiohttp's server logs a malformed request from a client with a traceback; left unconfigured that goes raw to
    # stderr. Route it through our formatter, as one line without the traceback.
    server = logging.getLogger("aiohttp.server")
    quiet = logging.StreamHandler(stream)
    quiet.setFormatter(handler.formatter)
    quiet.addFilter(ClientErrorFilter())
    quiet.addFilter(RequestIdFilter())
    server.handlers[:] = [quiet]
    server.setLevel(logging.WARNING)
    server.propagate = False
    # Every other library's warnings and errors (the Azure SDK's credential failures, asyncio's "exception was never
    # retrieved") reach the root logger; unconfigured, Python prints them raw to stderr, one unparseable line each in
    # a JSON journal. Through our formatter instead, at WARNING and above only: a library's INFO and DEBUG lines
    # (azure-core's request logging) are not the agent's to print.
    others = logging.StreamHandler(stream)
    others.setFormatter(handler.formatter)
    others.addFilter(RequestIdFilter())
    others.setLevel(logging.WARNING)
    setattr(others, _OURS, True)
    root = logging.getLogger()
    root.handlers[:] = [h for h in root.handlers if not getattr(h, _OURS, False)] + [others]


_OURS = "signing_agent_handler"
"""Marks the root handler ``setup_logging`` added, so a second call replaces it and leaves any other alone."""


class ClientErrorFilter(logging.Filter):
    """Turns aiohttp's "Error handling request" for a malformed client request into a one-line warning, at most one
    per ``interval``.

    aiohttp refuses a request head it cannot parse before any middleware runs, so such requests are never charged to
    the peer's denial budget; any uid that can reach the socket (admitted or not) can send them as fast as it can
    connect. One line per interval, with a count of those held back, keeps that from filling the log.
    """

    def __init__(self, interval: float = CLIENT_ERROR_LOG_INTERVAL, *, clock: Callable[[], float] = time.monotonic):
        super().__init__()
        self.interval = interval
        self._clock = clock
        self._last: float | None = None
        self._held = 0

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is None or not type(exc).__module__.startswith("aiohttp"):
            return True
        now = self._clock()
        if self._last is not None and now - self._last < self.interval:
            self._held += 1
            return False
        detail = " ".join(str(exc).split())[:200]
        if self._held:
            detail += f" ({self._held} more since the last such line)"
        self._last, self._held = now, 0
        record.msg, record.args = "malformed request from a client: %s", (detail,)
        record.exc_info, record.exc_text = None, None
        record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


def set_level(level: str) -> None:
    """Change the package logger's level (a configuration reload)."""
    logging.getLogger("signing_agent").setLevel(_LEVELS.get(level, logging.INFO))
