"""HTTP/1.1 over the agent's Unix socket, in a few lines: one request per connection (``Connection: close``), the
answer read to the end of the stream.

Not ``http.client``: importing it (with ``email`` and ``ssl``) costs a client command more than everything else it
does. The agent is aiohttp on a local socket, so this speaks only what it answers: a status line, headers, and a
body framed by ``Content-Length``, ``Transfer-Encoding: chunked`` or the end of the stream. The framing is shared by
the synchronous client (a blocking socket) and the asynchronous one (asyncio streams).
"""

from __future__ import annotations

import _socket  # socket.py's enum conversions cost a client command 2 ms to import; this is the same socket
import json
import time

from signing_agent import __version__
from signing_agent.client.errors import AgentNoAnswerError, AgentUnreachableError
from signing_agent.record import Record

TYPE_CHECKING = False  # not typing's: importing typing costs every client command 2 ms
if TYPE_CHECKING:
    from typing import Any


SOCKET_HINT = "start one with 'signing-agent serve' or set SIGNING_AGENT_SOCK"
MAX_HEAD_BYTES = 64 * 1024
MAX_ANSWER_BYTES = 64 * 1024 * 1024
"""The most a client reads of one answer, head and body. The agent's own answers are far smaller (CCF's are cut at
each service's ``max_response_bytes``, 4 MiB by default); without a cap, whatever listens on the socket (an impostor
on a path another user controls, a socket swapped under ``$SIGNING_AGENT_SOCK``) could stream until the client runs
out of memory, well within the timeout."""


class Response(Record):
    """An answer of the agent: its status, its headers (names in lower case) and its body."""

    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body) if self.body else None


def encode_request(method: str, path: str, body: Any, headers: dict[str, str] | None) -> bytes:
    """The request's bytes: ``body`` (any JSON value, or None for none) as JSON."""
    data = b"" if body is None else json.dumps(body).encode("utf-8")
    head = {"Host": "localhost", "User-Agent": f"signing-agent/{__version__}", "Connection": "close"}
    if body is not None:
        head["Content-Type"] = "application/json"
    if body is not None or method in ("POST", "PUT", "PATCH"):
        head["Content-Length"] = str(len(data))
    head.update(headers or {})
    lines = [f"{method} {path} HTTP/1.1", *(f"{k}: {v}" for k, v in head.items()), "", ""]
    return "\r\n".join(lines).encode("latin-1") + data


class MalformedAnswerError(ValueError):
    """The bytes on the socket are no HTTP answer."""


def decode_response(raw: bytes) -> Response:
    """Parse a whole answer (the stream read to its end)."""
    head, sep, rest = raw.partition(b"\r\n\r\n")
    if not sep:
        raise MalformedAnswerError(
            "the answer ended before its headers did" if raw else "the agent closed the connection"
        )
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    parts = status_line.split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
        raise MalformedAnswerError(f"not an HTTP answer: {status_line[:80]!r}")
    headers: dict[str, str] = {}
    for line in header_lines:
        name, colon, value = line.partition(":")
        if colon:
            headers[name.strip().lower()] = value.strip()
    if "chunked" in headers.get("transfer-encoding", "").lower():
        body = _dechunk(rest)
    elif headers.get("content-length", "").isdigit():
        length = int(headers["content-length"])
        if len(rest) < length:
            raise MalformedAnswerError(f"the answer ended after {len(rest)} of its {length} bytes")
        body = rest[:length]
    else:
        body = rest
    return Response(status=int(parts[1]), headers=headers, body=body)


def _dechunk(data: bytes) -> bytes:
    out = bytearray()
    while True:
        size_line, sep, data = data.partition(b"\r\n")
        try:
            size = int(size_line.split(b";", 1)[0], 16)
        except ValueError:
            raise MalformedAnswerError("a malformed chunk") from None
        if not sep or len(data) < size:
            raise MalformedAnswerError("the answer ended inside a chunk")
        if size == 0:
            return bytes(out)
        out += data[:size]
        data = data[size + 2 :]


def unreachable(path: str, exc: OSError) -> AgentUnreachableError:
    """What a failure to connect means for the user."""
    if isinstance(exc, FileNotFoundError | ConnectionRefusedError):
        return AgentUnreachableError(f"no agent is listening on {path} ({exc.strerror}); {SOCKET_HINT}")
    if isinstance(exc, PermissionError):
        return AgentUnreachableError(f"permission denied on {path}")
    return talk_failed(path, exc)


def talk_failed(path: str, exc: OSError | ValueError) -> AgentUnreachableError:
    return AgentUnreachableError(f"talking to the agent on {path} failed: {getattr(exc, 'strerror', None) or exc}")


def too_large(path: str) -> AgentUnreachableError:
    return AgentUnreachableError(
        f"the answer of the agent on {path} is larger than {MAX_ANSWER_BYTES >> 20} MiB; not read further "
        "(is that socket really the agent's?)"
    )


def no_answer(path: str, timeout: float) -> AgentNoAnswerError:
    return AgentNoAnswerError(f"the agent on {path} did not answer within {timeout:g} s")


def exchange(path: str, request: bytes, timeout: float) -> Response:
    """Send ``request`` on a new connection to ``path`` and read the whole answer within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        try:
            sock.connect(path)
        except TimeoutError:
            raise no_answer(path, timeout) from None
        except OSError as exc:
            raise unreachable(path, exc) from None
        try:
            sock.sendall(request)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the agent may have answered (a 413, a 503) and closed before reading all of it: read that
        except TimeoutError:
            raise no_answer(path, timeout) from None
        except OSError as exc:
            raise unreachable(path, exc) from None
        chunks: list[bytes] = []
        size = 0
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise no_answer(path, timeout)
            sock.settimeout(left)
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                raise no_answer(path, timeout) from None
            except OSError as exc:
                if chunks:
                    break  # a reset after the answer: keep what came
                raise talk_failed(path, exc) from None
            if not chunk:
                break
            size += len(chunk)
            if size > MAX_ANSWER_BYTES:
                raise too_large(path)
            chunks.append(chunk)
    finally:
        sock.close()
    try:
        return decode_response(b"".join(chunks))
    except MalformedAnswerError as exc:
        raise talk_failed(path, exc) from None
