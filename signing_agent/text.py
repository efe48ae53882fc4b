"""Text from others made safe to show: every character a terminal or a log reader would act on written as its escape.

A leaf that imports nothing: the daemon's log formatter (``log``) and the command line (``cli``) both use it, and a
client command must not import ``logging``.
"""

from __future__ import annotations

TYPE_CHECKING = False  # not typing's: importing typing costs every client command 2 ms
if TYPE_CHECKING:
    from typing import Any, TextIO


def printable(text: str, keep: str = "") -> str:
    """``text`` with each character that is not printable (line breaks, terminal escapes, C1 controls, bidi
    overrides), except those in ``keep``, written as its Python escape (``\\n``, ``\\x1b``, ``\\u202e``)."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() or c in keep else c.encode("unicode_escape").decode("ascii") for c in text)


class PrintableStream:
    """A text stream that writes through ``printable`` (line breaks and tabs kept), for the CLI's stdout and stderr.

    What the CLI prints comes from others: the agent's answers (an impostor may be listening on the socket it was
    pointed at), CCF's error messages and proposals relayed by the agent, records of an audit log under
    verification, a configuration being checked. Unescaped, ``\\x1b]...`` in any of them would retitle, rewrite or
    clear the operator's terminal, or fake a line of output. Everything else (``buffer``, ``isatty``, ``flush``) is
    the wrapped stream's: binary output (``sign``'s COSE_Sign1) goes to its ``buffer`` unchanged, and JSON output is
    ASCII already."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        return self._stream.write(printable(text, keep="\n\t"))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)
