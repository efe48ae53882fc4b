"""A small synchronous client for the agent's Unix-socket API, used by the CLI (and usable by scripts).

Standard library only (``http.client`` over ``AF_UNIX``), so client commands start fast and need no event loop.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SOCKET_ENV = "SIGNING_AGENT_SOCK"


class AgentUnreachableError(Exception):
    """The agent's socket cannot be reached."""


class AgentNoAnswerError(AgentUnreachableError):
    """The agent took the request but sent no (complete) answer within the client's ``timeout``."""


@dataclass
class AgentRequestError(Exception):
    """The agent answered with an error body ``{"error": {"code", "message", "retryable"}}`` (or CCF's, relayed).

    ``retryable``: the agent says the same request may succeed later (see ``signing_agent.errors``);
    ``retry_after``: its ``Retry-After``, in seconds, when it knows when.
    """

    status: int
    code: str
    message: str
    body: Any = None
    from_ccf: bool = False
    retryable: bool = False
    retry_after: float | None = None

    def __str__(self) -> str:
        origin = "CCF: " if self.from_ccf else ""
        return f"{origin}{self.code} ({self.status}): {self.message}"


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._unix_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._unix_path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body) if self.body else None


class AgentClient:
    def __init__(self, socket_path: str | os.PathLike[str], *, timeout: float = 120.0) -> None:
        self.socket_path = str(socket_path)
        self.timeout = timeout

    def request(self, method: str, path: str, body: Any = None, *, headers: dict[str, str] | None = None) -> Response:
        conn = _UnixHTTPConnection(self.socket_path, self.timeout)
        try:
            data = None if body is None else json.dumps(body).encode("utf-8")
            hdrs = {"Content-Type": "application/json"} if data is not None else {}
            hdrs.update(headers or {})
            try:
                conn.request(method, path, body=data, headers=hdrs)
                resp = conn.getresponse()
                raw = resp.read()
            except (FileNotFoundError, ConnectionRefusedError) as exc:
                raise AgentUnreachableError(
                    f"no agent is listening on {self.socket_path} ({exc.strerror}); "
                    f"start one with 'signing-agent serve' or set {SOCKET_ENV}"
                ) from None
            except PermissionError:
                raise AgentUnreachableError(f"permission denied on {self.socket_path}") from None
            except TimeoutError:
                raise AgentNoAnswerError(
                    f"the agent on {self.socket_path} did not answer within {self.timeout:g} s"
                ) from None
            except (OSError, http.client.HTTPException) as exc:
                raise AgentUnreachableError(f"talking to the agent on {self.socket_path} failed: {exc}") from None
            return Response(status=resp.status, headers={k.lower(): v for k, v in resp.getheaders()}, body=raw)
        finally:
            conn.close()

    def call(self, method: str, path: str, body: Any = None) -> Response:
        """A request whose non-2xx answer raises ``AgentRequestError``."""
        resp = self.request(method, path, body)
        if resp.status >= 300:
            try:
                parsed = resp.json()
            except ValueError:
                parsed = None
            err = parsed.get("error") if isinstance(parsed, dict) else None
            from_ccf = resp.headers.get("x-relayed-from") == "ccf"
            retry_after = _seconds(resp.headers.get("retry-after"))
            if isinstance(err, dict):
                retryable = err.get("retryable") is True and not from_ccf
                code, message = str(err.get("code")), str(err.get("message"))
                raise AgentRequestError(resp.status, code, message, parsed, from_ccf, retryable, retry_after)
            text = resp.body.decode("utf-8", "replace")[:500]
            raise AgentRequestError(resp.status, "HTTPError", text, parsed, from_ccf, False, retry_after)
        return resp

    def health(self) -> Any:
        return self.call("GET", "/v1/health").json()

    def identities(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self.call("GET", "/v1/identities").json()["identities"]
        return result

    def sign(
        self,
        identity: str,
        msg_type: str,
        payload: bytes = b"",
        *,
        created_at: int | None = None,
        proposal_id: str | None = None,
    ) -> bytes:
        body = _sign_body(identity, msg_type, payload, created_at, proposal_id)
        return self.call("POST", "/v1/sign", body).body

    def explain(
        self,
        identity: str,
        msg_type: str,
        payload: bytes = b"",
        *,
        created_at: int | None = None,
        proposal_id: str | None = None,
        service: str | None = None,
    ) -> dict[str, Any]:
        """What ``sign`` would sign and the policy's decision; nothing is signed."""
        body = _sign_body(identity, msg_type, payload, created_at, proposal_id)
        if service is not None:
            body["service"] = service
        result: dict[str, Any] = self.call("POST", "/v1/explain", body).json()
        return result


def _seconds(retry_after: str | None) -> float | None:
    """A ``Retry-After`` in seconds (the agent sends whole seconds; an HTTP date is not used by it)."""
    if retry_after is None or not retry_after.strip().isdigit():
        return None
    return float(retry_after)


def _sign_body(
    identity: str, msg_type: str, payload: bytes, created_at: int | None, proposal_id: str | None
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "identity": identity,
        "msg_type": msg_type,
        "payload_base64": base64.b64encode(payload).decode("ascii"),
    }
    if created_at is not None:
        body["created_at"] = created_at
    if proposal_id is not None:
        body["proposal_id"] = proposal_id
    return body


def default_socket(config_socket: Path | None = None) -> Path:
    """``$SIGNING_AGENT_SOCK``, else the config's socket, else the system default."""
    env = os.environ.get(SOCKET_ENV)
    if env:
        return Path(env)
    if config_socket is not None:
        return config_socket
    from signing_agent.config import DEFAULT_SOCKET

    return DEFAULT_SOCKET
