"""CCF governance sandbox: an HTTPS test double of CCF's ``/gov`` API (api-version 2024-07-01).

For tests and ``make demo`` only; the agent daemon never imports it. See :mod:`.server` for the control API.
"""

from __future__ import annotations

from signing_agent.sandbox.faults import FaultRule, Faults, RequestRecord
from signing_agent.sandbox.server import SandboxServer

__all__ = ["FaultRule", "Faults", "RequestRecord", "SandboxServer"]
