"""``CCFConnections``: the clients of the configured CCF services, built here and nowhere else, and what each trusts.

Two kinds of trust per service. The pinned identity (the configured ``service_certificate``, or one approved after
a recovery: ``pin``) and ``accepted_service_certificates`` are trusted for everything. An identity adopted
*provisionally* after a recovery (``trust_provisionally``) is trusted only by the clients asked for with
``provisional=True``: reads and ballots, so that members can review and vote the transition through the agent;
never proposals, withdrawals, acks or recovery shares. ``probe`` is a short-lived client pinned to a candidate
identity alone, to check what an endpoint claims before any trust is given.

One client per service and kind of trust, kept for the life of a configuration generation; a change of trust
rebuilds it on its next use, and requests already under way finish on the old one.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Mapping

from signing_agent.ccf.api import Connector, GovernanceAPI, HttpConnector
from signing_agent.config import ServiceConfig
from signing_agent.errors import UnknownServiceError


class CCFConnections:
    """The configured CCF services, by name, and one trusted client each (see the module docstring)."""

    def __init__(self, services: Mapping[str, ServiceConfig], connector: Connector | None = None) -> None:
        self.services = dict(services)
        self.connector: Connector = connector if connector is not None else HttpConnector()
        self._clients: dict[str, GovernanceAPI] = {}
        self._provisional_clients: dict[str, GovernanceAPI] = {}
        self._pinned: dict[str, bytes] = {}
        self._provisional: dict[str, bytes] = {}
        self._closing: set[asyncio.Task[None]] = set()
        self._lock = asyncio.Lock()

    def config(self, service: str) -> ServiceConfig:
        """The configuration of ``service``; ``UnknownServiceError`` when there is none."""
        cfg = self.services.get(service)
        if cfg is None:
            known = ", ".join(sorted(self.services)) or "none"
            raise UnknownServiceError(f"unknown service {service!r} (configured: {known})")
        return cfg

    def pin(self, service: str, pem: bytes) -> None:
        """Pin ``pem`` instead of the configured service certificate (an identity approved after a recovery).

        The service's clients are rebuilt on their next use; the old ones are closed, which cuts a request still
        under way on them (it fails, as on a network error, and is audited so).
        """
        self._pinned[service] = pem
        self._close_later(self._clients.pop(service, None))
        self._close_later(self._provisional_clients.pop(service, None))

    def trust_provisionally(self, service: str, pem: bytes | None) -> None:
        """Also trust ``pem`` for reads and ballots (``client(service, provisional=True)``); None: stop."""
        if pem is None:
            self._provisional.pop(service, None)
        else:
            self._provisional[service] = pem
        self._close_later(self._provisional_clients.pop(service, None))

    def provisional_identity(self, service: str) -> bytes | None:
        return self._provisional.get(service)

    def _close_later(self, old: GovernanceAPI | None) -> None:
        if old is not None:
            task = asyncio.get_running_loop().create_task(old.aclose())
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    async def open_pinned(self) -> None:
        """Open the clients whose service certificate is a file now, so a bad path fails at start-up."""
        for name, cfg in self.services.items():
            if cfg.service_certificate is not None:
                await self.client(name)

    async def client(self, service: str, *, provisional: bool = False) -> GovernanceAPI:
        """The service's client, pinned to its trusted identities; ``provisional`` (reads and ballots only): also
        to an identity adopted provisionally after a recovery, if there is one."""
        cfg = self.config(service)
        async with self._lock:
            client = self._clients.get(service)
            if client is None:
                pinned = self._pinned.get(service)
                if pinned is None:
                    pinned = await self.connector.configured_identity(cfg)
                accepted = await self.connector.accepted_identities(cfg)
                client = self._clients[service] = self.connector.connect(cfg, (pinned, *accepted))
            extra = self._provisional.get(service) if provisional else None
            if extra is None:
                return client
            wider = self._provisional_clients.get(service)
            if wider is None:
                wider = self.connector.connect(cfg, (*client.trusted_pems, extra))
                self._provisional_clients[service] = wider
            return wider

    async def configured_identity(self, service: str) -> bytes:
        """The service certificate the configuration pins (its file, or fetched from ``identity_url``)."""
        return await self.connector.configured_identity(self.config(service))

    async def presented_identity(self, service: str) -> bytes:
        """What the endpoint claims to be: a candidate, never trusted as such."""
        return await self.connector.presented_identity(self.config(service))

    @contextlib.asynccontextmanager
    async def probe(self, service: str, candidate: bytes) -> AsyncIterator[GovernanceAPI]:
        """A client trusting ``candidate`` alone, closed on exit: to check what an endpoint claims to be."""
        client = self.connector.connect(self.config(service), (candidate,))
        try:
            yield client
        finally:
            await client.aclose()

    async def aclose(self) -> None:
        for client in (*self._clients.values(), *self._provisional_clients.values()):
            await client.aclose()
        self._clients.clear()
        self._provisional_clients.clear()
        if self._closing:
            await asyncio.gather(*self._closing)
