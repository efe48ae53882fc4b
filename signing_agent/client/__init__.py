"""A client library for the agent's socket API, for tools and scripts: the one the CLI uses.

::

    from signing_agent.client import AgentClient

    agent = AgentClient()                    # the socket as the CLI finds it ($SIGNING_AGENT_SOCK, [client], default)
    member = agent.resolve_identity()        # the agent's only identity (or $SIGNING_AGENT_IDENTITY's)
    signed = agent.sign(member, "proposal", b'{"actions": []}')
    proposal = agent.propose("default", member, {"actions": [...]})
    agent.vote("default", member, proposal.proposal_id)          # the canonical accepting ballot

``AgentClient`` blocks (one connection per call, standard library only); ``AsyncAgentClient`` (from
``signing_agent.client.aio``, or this package) has the same methods as coroutines. Every route of the API has a
method, and each returns a typed result (``signing_agent.client.results``). An error answer raises a typed error:
the agent's own class (``except signing_agent.errors.PolicyDeniedError``) that is also an ``AgentRequestError``
(status, code, message, retryable, retry_after); CCF's refusals raise ``CCFRefusedError``; no agent on the socket,
``AgentUnreachableError`` (see ``signing_agent.client.errors``).

Importing this package imports neither asyncio nor the agent's own modules (config, policy, cose): client
commands start fast.
"""

from __future__ import annotations

from signing_agent.client._calls import unique_prefix
from signing_agent.client._http import Response
from signing_agent.client.errors import (
    AgentNoAnswerError,
    AgentRequestError,
    AgentUnreachableError,
    CCFRefusedError,
    WaitTimeoutError,
)
from signing_agent.client.results import (
    Activation,
    Explanation,
    Health,
    HealthCheck,
    Identity,
    IdentityApproval,
    MemberStatus,
    Proposal,
    RecoveryStatus,
    RecoveryWatcher,
    ReloadOutcome,
    Service,
    ServiceStatus,
    ShareSubmission,
    Signed,
    iso_utc,
)
from signing_agent.client.sync import AgentClient
from signing_agent.client_config import SOCKET_ENV, ClientSettings, client_settings
from signing_agent.names import ACCEPT_BALLOT, REJECT_BALLOT

TYPE_CHECKING = False  # not typing's: importing typing costs every client command 2 ms
if TYPE_CHECKING:
    from signing_agent.client.aio import AsyncAgentClient

__all__ = [
    "ACCEPT_BALLOT",
    "REJECT_BALLOT",
    "SOCKET_ENV",
    "Activation",
    "AgentClient",
    "AgentNoAnswerError",
    "AgentRequestError",
    "AgentUnreachableError",
    "AsyncAgentClient",
    "CCFRefusedError",
    "ClientSettings",
    "Explanation",
    "Health",
    "HealthCheck",
    "Identity",
    "IdentityApproval",
    "MemberStatus",
    "Proposal",
    "RecoveryStatus",
    "RecoveryWatcher",
    "ReloadOutcome",
    "Response",
    "Service",
    "ServiceStatus",
    "ShareSubmission",
    "Signed",
    "WaitTimeoutError",
    "client_settings",
    "iso_utc",
    "unique_prefix",
]


def __getattr__(name: str) -> object:
    if name == "AsyncAgentClient":  # imported on first use: it brings asyncio
        from signing_agent.client.aio import AsyncAgentClient

        return AsyncAgentClient
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
