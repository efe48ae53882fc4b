"""Recovery shares and the trust rules after a disaster recovery (see ``recovery.service`` for the parts).

``signing_agent.recovery`` exports what the rest of the agent uses; the parts are ``store``, ``trust``, ``shares``,
``watcher`` and ``service``.
"""

from signing_agent.recovery.member import RecoveryMember
from signing_agent.recovery.shares import MAX_DECRYPTION_FAILURES, ShareResult, ShareSubmitter, scrub
from signing_agent.recovery.store import MAX_STATE_BYTES, STATE_VERSION, RecoveryKey, RecoveryStateStore
from signing_agent.recovery.trust import ServiceTrust
from signing_agent.recovery.watcher import WAITING, Recovering, RecoveryWatcher

__all__ = [
    "MAX_DECRYPTION_FAILURES",
    "MAX_STATE_BYTES",
    "STATE_VERSION",
    "WAITING",
    "Recovering",
    "RecoveryKey",
    "RecoveryMember",
    "RecoveryStateStore",
    "RecoveryWatcher",
    "ServiceTrust",
    "ShareResult",
    "ShareSubmitter",
    "scrub",
]
