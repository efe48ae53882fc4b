"""The closed sets of names the configuration, the socket API and the command line share: governance message
types, Azure credentials, log levels, and the canonical ballots.

A leaf that imports nothing (not even ``typing``), so the CLI can offer them as choices (and the client library
send them) without importing ``config``, ``policy`` or ``cose``, which a client command must not pay for. ``config``
types its fields with these ``Literal``s and re-exports them. Each tuple is checked against its ``Literal`` by mypy
(no value outside it) and by a unit test (every value of it); ``cose.governance.MsgType`` has the same values.
"""

from __future__ import annotations

TYPE_CHECKING = False  # not typing's: importing typing costs every client command 2 ms
if TYPE_CHECKING:
    from typing import Literal, TypeGuard

    MsgTypeName = Literal["proposal", "ballot", "withdrawal", "state_digest", "ack", "recovery_share"]
    """The governance message types, as policy rules, the API and the CLI name them."""
    AzureCredential = Literal[
        "default", "managed-identity", "workload-identity", "client-secret", "client-certificate", "azure-cli"
    ]
    LogLevel = Literal["debug", "info", "warning", "error"]
else:
    MsgTypeName = AzureCredential = LogLevel = str  # the Literals are for mypy; each tuple below lists their values

MSG_TYPES: tuple[MsgTypeName, ...] = ("proposal", "ballot", "withdrawal", "state_digest", "ack", "recovery_share")
AZURE_CREDENTIALS: tuple[AzureCredential, ...] = (
    "default", "managed-identity", "workload-identity", "client-secret", "client-certificate", "azure-cli",
)  # fmt: skip
LOG_LEVELS: tuple[LogLevel, ...] = ("debug", "info", "warning", "error")

ACCEPT_BALLOT = "export function vote (proposal, proposerId) { return true }"
"""The canonical accepting ballot: ``signing-agent vote --accept`` sends it, and a policy rule's ``"accept"`` ballot
alias is its SHA-256."""
REJECT_BALLOT = "export function vote (proposal, proposerId) { return false }"
"""The canonical rejecting ballot (``--reject``, the ``"reject"`` alias)."""


_LOWER_HEX = frozenset("0123456789abcdef")


def is_ccf_id(value: object) -> TypeGuard[str]:
    """Whether ``value`` is a CCF proposal or member id, or a SHA-256 as the policy names one: exactly 64 lowercase
    hex digits, nothing around them (not even a final line break, which ``re.match`` with ``$`` lets through)."""
    return isinstance(value, str) and len(value) == 64 and _LOWER_HEX.issuperset(value)
