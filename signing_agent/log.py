"""Logging set-up: JSON lines to stderr for journald, readable text on a TTY. Only the package logger is configured.

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
from typing import TextIO

from signing_agent import context

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}


_NO_REQUEST = "-"
TEXT_FORMAT = "%(asctime)s %(levelname)-7s %(name)s [%(request_id)s]: %(message)s"


class RequestIdFilter(logging.Filter):
    """Adds ``request_id`` to every record: the current request's (``signing_agent.context``), or ``-`` outside
    one. On the handlers, so every logger routed through them gets it."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not isinstance(getattr(record, "request_id", None), str):
            record.request_id = context.request_id() or _NO_REQUEST
        return True


class JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
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
    handler.setFormatter(JSONFormatter() if json_lines else logging.Formatter(TEXT_FORMAT))
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


class ClientErrorFilter(logging.Filter):
    """Turns aiohttp's "Error handling request" for a malformed client request into a one-line warning."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None and type(exc).__module__.startswith("aiohttp"):
            record.msg, record.args = "malformed request from a client: %s", (" ".join(str(exc).split())[:200],)
            record.exc_info, record.exc_text = None, None
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


def set_level(level: str) -> None:
    """Change the package logger's level (a configuration reload)."""
    logging.getLogger("signing_agent").setLevel(_LEVELS.get(level, logging.INFO))
