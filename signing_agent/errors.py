"""The agent's error tree. A leaf module: it imports nothing from the package.

Every error carries a stable machine ``code`` (used in API error bodies, audit records and the CLI), the HTTP
status the API maps it to, whether a retry may help, and ``diagnostics()``: the message plus an actionable hint.
Vendor exceptions (``pkcs11.exceptions.*``, ``azure.core.exceptions.*``, ``aiohttp.ClientError``) never cross
an adapter boundary: adapters wrap them with ``raise XError(...) from exc``.

::

    AgentError                         code              status
    ├─ ConfigError                     ConfigError       500
    │  └─ IdentityError                IdentityError     500   key and certificate disagree, bad cert
    ├─ RequestError                    InvalidRequest    400   the client's fault
    │  ├─ InvalidRequestError          InvalidRequest    400
    │  ├─ UnknownIdentityError         UnknownIdentity   404
    │  ├─ UnknownServiceError          UnknownService    404
    │  ├─ ConflictError                Conflict          409   e.g. a ballot for a proposal that is not Open
    │  ├─ PolicyDeniedError            PolicyDenied      403
    │  └─ TooManyRequestsError         TooManyRequests   429   retryable: a peer's denials over its budget
    ├─ BackendError                    BackendError      500
    │  ├─ BackendUnavailableError      BackendUnavailable 503  retryable: session or token lost, vault down
    │  ├─ KeyNotFoundError             KeyNotFound       500
    │  ├─ UnsupportedOperationError    UnsupportedOperation 500  e.g. a token without RSA-OAEP-SHA256
    │  └─ SigningFailedError           SigningFailed     500   includes a signature that does not verify
    ├─ CCFError                        CCFError          502
    │  ├─ CCFUnavailableError          CCFUnavailable    502   retryable: connection failed, 503/429
    │  ├─ CCFTimeoutError              CCFTimeout        504   retryable
    │  ├─ CCFTrustError                CCFTrustError     502   the service certificate is not the pinned one
    │  └─ CCFAnswerRefusedError        CCFAnswerRefused  502   a redirect, or an answer over max_response_bytes
    ├─ AuditError                      AuditUnavailable  503   fail closed: nothing is signed
    └─ ShuttingDownError               ShuttingDown      503   retryable: the agent is draining

CCF's own errors are not agent errors: they are answers, relayed with CCF's status and body. The API adds codes
of its own for HTTP-level failures: ``NotFound`` (404, no such route), ``MethodNotAllowed`` (405),
``PayloadTooLarge`` (413), ``RequestTimeout`` (408, a body that does not arrive in time) and
``TooManyConnections`` (503, a connection over agent.max_connections or max_connections_per_uid, closed at once).
"""

from __future__ import annotations

from typing import ClassVar


class AgentError(Exception):
    """Base of every error the agent raises on purpose."""

    code: ClassVar[str] = "InternalError"
    http_status: ClassVar[int] = 500
    retryable: ClassVar[bool] = False

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def diagnostics(self) -> str:
        """The message, and what to do about it when we know."""
        if self.hint:
            return f"{self.message}\n  hint: {self.hint}"
        return self.message


class ConfigError(AgentError):
    """The configuration is invalid. Messages name the dotted key, e.g. ``identities.m0.signing_key.path``."""

    code = "ConfigError"


class IdentityError(ConfigError):
    """An identity cannot be used: unreadable certificate, wrong key type, key that does not match."""

    code = "IdentityError"


class RequestError(AgentError):
    """The request is at fault (4xx)."""

    code = "InvalidRequest"
    http_status = 400


class InvalidRequestError(RequestError):
    code = "InvalidRequest"


class UnknownIdentityError(RequestError):
    code = "UnknownIdentity"
    http_status = 404


class UnknownServiceError(RequestError):
    code = "UnknownService"
    http_status = 404


class ConflictError(RequestError):
    code = "Conflict"
    http_status = 409


class PolicyDeniedError(RequestError):
    code = "PolicyDenied"
    http_status = 403


class TooManyRequestsError(RequestError):
    """A peer used up its budget of denied or malformed requests; ``retry_after`` seconds until one is back."""

    code = "TooManyRequests"
    http_status = 429
    retryable = True

    def __init__(self, message: str, *, retry_after: float, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.retry_after = retry_after


class BackendError(AgentError):
    """A key store failed."""

    code = "BackendError"


class BackendUnavailableError(BackendError):
    """The key store cannot be reached now (lost session, token removed, vault down). A retry may work."""

    code = "BackendUnavailable"
    http_status = 503
    retryable = True


class KeyNotFoundError(BackendError):
    code = "KeyNotFound"


class UnsupportedOperationError(BackendError):
    """The key store cannot do what is asked (e.g. RSA-OAEP with SHA-256 on SoftHSM2 2.6)."""

    code = "UnsupportedOperation"


class SigningFailedError(BackendError):
    """The key store answered, but with no usable signature (or one that does not verify)."""

    code = "SigningFailed"


class CCFError(AgentError):
    """Talking to a CCF service failed."""

    code = "CCFError"
    http_status = 502


class CCFUnavailableError(CCFError):
    code = "CCFUnavailable"
    http_status = 502
    retryable = True


class CCFTimeoutError(CCFError):
    code = "CCFTimeout"
    http_status = 504
    retryable = True


class CCFTrustError(CCFError):
    """The service did not present the pinned service certificate. Nothing was sent."""

    code = "CCFTrustError"


class CCFAnswerRefusedError(CCFError):
    """The service answered with something the agent will not use: a redirect (never followed: it leads away from
    the pinned service), or a body over ``max_response_bytes`` (abandoned unread). Not retried: the request was
    delivered once, and asking again would get the same answer."""

    code = "CCFAnswerRefused"


class AuditError(AgentError):
    """The audit record could not be written. Fail closed: nothing is signed or forwarded."""

    code = "AuditUnavailable"
    http_status = 503


class ShuttingDownError(AgentError):
    """The agent is draining in-flight requests before it exits; try again (another instance may take over)."""

    code = "ShuttingDown"
    http_status = 503
    retryable = True
