"""The agent's error tree. A leaf module: it imports nothing from the package.

Every error carries a stable machine ``code`` (used in API error bodies, audit records and the CLI), the HTTP
status the API maps it to, whether a retry may help (``retryable``), and ``diagnostics()``: the message plus an
actionable hint. Vendor exceptions (``pkcs11.exceptions.*``, ``azure.core.exceptions.*``, ``aiohttp.ClientError``)
never cross an adapter boundary: adapters wrap them with ``raise XError(...) from exc``.

::

    AgentError                         code              status
    ├─ ConfigError                     ConfigError       500
    │  ├─ IdentityError                IdentityError     500   key and certificate disagree, bad cert
    │  └─ PinRejectedError             PinRejected       500   the token refused the PIN (incorrect, bad length,
    │                                                          expired or locked): never retried, can lock a token
    ├─ RequestError                    InvalidRequest    400   the client's fault
    │  ├─ InvalidRequestError          InvalidRequest    400
    │  ├─ UnknownIdentityError         UnknownIdentity   404
    │  ├─ UnknownServiceError          UnknownService    404
    │  ├─ ConflictError                Conflict          409   e.g. a ballot for a proposal that is not Open
    │  ├─ PolicyDeniedError            PolicyDenied      403
    │  └─ TooManyRequestsError         TooManyRequests   429   retryable, Retry-After: a peer's denials over its budget
    ├─ BackendError                    BackendError      500
    │  ├─ BackendUnavailableError      BackendUnavailable 503  retryable: session or token lost, vault down
    │  │                                                       (Retry-After when the vault said when)
    │  ├─ KeyNotFoundError             KeyNotFound       500
    │  ├─ UnsupportedOperationError    UnsupportedOperation 500  e.g. a token without RSA-OAEP-SHA256
    │  └─ SigningFailedError           SigningFailed     500   includes a signature that does not verify
    ├─ CCFError                        CCFError          502
    │  ├─ CCFUnavailableError          CCFUnavailable    502   retryable: connection failed, 503/429
    │  ├─ CCFTimeoutError              CCFTimeout        504   retryable
    │  ├─ CCFTrustError                CCFTrustError     502   the service certificate is not the pinned one
    │  └─ CCFAnswerRefusedError        CCFAnswerRefused  502   a redirect, or an answer over max_response_bytes
    ├─ AgentTimeoutError               AgentTimeout      504   retryable: the request outlived agent.request_timeout;
    │                                                          the message names what it was waiting for
    ├─ AuditError                      AuditUnavailable  503   fail closed: nothing is signed
    └─ ShuttingDownError               ShuttingDown      503   retryable: the agent is draining

``retryable`` means that the same request, sent again later, may succeed: the condition is transient (a lost
session, a draining agent, a throttle). It is in every API error body (``"retryable": true``), so tools can decide
without a table of codes; ``retry_after`` (seconds), when the agent knows when to retry, becomes a ``Retry-After``
header. A retryable error says nothing about side effects: after a timeout, a submission to CCF may have been
recorded, so read the proposals before sending it again.

CCF's own errors are not agent errors: they are answers, relayed with CCF's status and body. The API adds codes
of its own for HTTP-level failures: ``NotFound`` (404, no such route), ``MethodNotAllowed`` (405),
``PayloadTooLarge`` (413), ``RequestTimeout`` (408, a body that does not arrive in time) and
``TooManyConnections`` (503, retryable, a connection over agent.max_connections or max_connections_per_uid, closed
at once).
"""

from __future__ import annotations

TYPE_CHECKING = False  # not typing's: importing typing costs every client command 2 ms
if TYPE_CHECKING:
    from typing import ClassVar


class AgentError(Exception):
    """Base of every error the agent raises on purpose."""

    code: ClassVar[str] = "InternalError"
    http_status: ClassVar[int] = 500
    retryable: ClassVar[bool] = False

    def __init__(self, message: str, *, hint: str | None = None, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.retry_after = retry_after
        """Seconds after which a retry may succeed, when the agent knows (the API's ``Retry-After``)."""

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if "code" in cls.__dict__:  # a class that names its own code; of two with one code, the later (a leaf)
            _BY_CODE[cls.code] = cls

    def diagnostics(self) -> str:
        """The message, and what to do about it when we know."""
        if self.hint:
            return f"{self.message}\n  hint: {self.hint}"
        return self.message


_BY_CODE: dict[str, type[AgentError]] = {AgentError.code: AgentError}


def error_class(code: str) -> type[AgentError] | None:
    """The error class of an API error ``code`` (as a client reads it), or None for a code that is not an agent
    error's (the HTTP layer's own, such as ``NotFound``, or one from a newer agent)."""
    return _BY_CODE.get(code)


class ConfigError(AgentError):
    """The configuration is invalid. Messages name the dotted key, e.g. ``identities.m0.signing_key.path``."""

    code = "ConfigError"


class IdentityError(ConfigError):
    """An identity cannot be used: unreadable certificate, wrong key type, key that does not match."""

    code = "IdentityError"


class PinRejectedError(ConfigError):
    """A token refused the configured PIN: incorrect, of a length it does not take, expired or locked.

    Never retried by the agent (each wrong attempt counts towards locking the token) until the operator fixes the
    PIN source and reloads. Its message names the PIN source, never the PIN.
    """

    code = "PinRejected"


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

    retry_after: float

    def __init__(self, message: str, *, retry_after: float, hint: str | None = None) -> None:
        super().__init__(message, hint=hint, retry_after=retry_after)


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


class AgentTimeoutError(AgentError):
    """A request outlived ``agent.request_timeout``. The message names what it was waiting for when the deadline
    hit (the key store, a CCF service and path, the audit log, the request body), so a slow CCF is not mistaken for
    an unreachable key store."""

    code = "AgentTimeout"
    http_status = 504
    retryable = True


class AuditError(AgentError):
    """The audit record could not be written. Fail closed: nothing is signed or forwarded."""

    code = "AuditUnavailable"
    http_status = 503


class ShuttingDownError(AgentError):
    """The agent is draining in-flight requests before it exits; try again (another instance may take over)."""

    code = "ShuttingDown"
    http_status = 503
    retryable = True
