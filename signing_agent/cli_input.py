"""Files the CLI reads on the user's behalf (a payload, a proposal, a ballot, a certificate for a workflow): bounded.

A path given on the command line may be ``/dev/zero``, a runaway pipe or a file far larger than anything the agent
takes; read whole, it would exhaust the client's memory. So every such file is read to ``MAX_INPUT_BYTES`` at most,
and a larger one is an ``InvalidRequestError`` (exit 2) that names the option. A pipe (``<(...)``, ``-`` for stdin)
is read as a file is. Imports the standard library and ``errors`` only: client commands must start fast.
"""

from __future__ import annotations

import sys

from signing_agent.errors import InvalidRequestError

MAX_INPUT_BYTES = 64 * 1024 * 1024
"""Far above what the agent takes (``agent.max_request_bytes``, 8 MiB by default), far below what would exhaust the
client's memory."""


def read_input(path: str, what: str) -> bytes:
    """The bytes of ``path`` (``-``: stdin), at most ``MAX_INPUT_BYTES``, else an error that names ``what``."""
    try:
        if path == "-":
            data = sys.stdin.buffer.read(MAX_INPUT_BYTES + 1)
        else:
            with open(path, "rb") as f:
                data = f.read(MAX_INPUT_BYTES + 1)
    except OSError as exc:
        raise InvalidRequestError(f"{what}: cannot read {path}: {exc.strerror}") from None
    if len(data) > MAX_INPUT_BYTES:
        raise InvalidRequestError(f"{what}: {path} is larger than {MAX_INPUT_BYTES >> 20} MiB; not read further")
    return data


def read_input_text(path: str, what: str) -> str:
    """``read_input`` as UTF-8 text; anything else is an error that names ``what``."""
    data = read_input(path, what)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidRequestError(f"{what}: cannot read {path}: not UTF-8 text (byte {exc.start})") from None
