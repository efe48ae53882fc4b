"""``CCFClient``: governance requests to one CCF service over TLS pinned to its service certificate.

One keep-alive aiohttp session per service. The TLS context trusts the service certificate and nothing else: never
the system CAs, never unverified. CCF nodes present a certificate endorsed by the service identity, so pinning the
service certificate as the only CA is exactly how CCF's own clients work.

A signed message is sent as opaque bytes. On a connection failure, a timeout, or a 503/429 (honouring Retry-After)
the *identical* bytes are sent again with bounded, jittered exponential backoff; nothing here ever re-signs. Whether
a resend is safe is CCF's business: it answers a byte-identical proposal with ProposalReplay, a repeated ballot with
200, a repeated ack with 204 (see ../shared/ccf-governance.md §6), and the governance layer interprets that.

Must not import: ``signing_agent.cose``, key-store backends. aiohttp exceptions never leave this module.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import random
import ssl
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from signing_agent.config import ServiceConfig
from signing_agent.errors import CCFTimeoutError, CCFTrustError, CCFUnavailableError, ConfigError
from signing_agent.metrics import METRICS, Metrics

_logger = logging.getLogger(__name__)

RETRY_STATUSES = frozenset({429, 503})
MAX_RETRY_AFTER = 30.0
TX_HEADER = "x-ms-ccf-transaction-id"


@dataclass(frozen=True, slots=True)
class CCFResponse:
    """What CCF answered: status, body (JSON when it said so, else bytes), transaction id."""

    status: int
    body: Any
    raw: bytes
    content_type: str
    transaction_id: str | None
    attempts: int = 1
    headers: Mapping[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    @property
    def error_code(self) -> str | None:
        """CCF's OData error code, e.g. ``ProposalReplay``."""
        if isinstance(self.body, dict) and isinstance(self.body.get("error"), dict):
            code = self.body["error"].get("code")
            return code if isinstance(code, str) else None
        return None

    @property
    def error_message(self) -> str:
        if isinstance(self.body, dict) and isinstance(self.body.get("error"), dict):
            return str(self.body["error"].get("message", ""))
        return ""


def pinned_ssl_context(service_cert_pem: bytes) -> ssl.SSLContext:
    """A client TLS context whose only trust anchors are the service certificate(s) (one PEM, or a bundle)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_verify_locations(cadata=service_cert_pem.decode("ascii"))
    except (ssl.SSLError, UnicodeDecodeError, ValueError) as exc:
        raise ConfigError(f"the service certificate is not a PEM certificate: {exc}") from None
    return ctx


def retry_after_seconds(value: str | None) -> float | None:
    """``Retry-After`` as seconds (delta-seconds or an HTTP date), capped."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        seconds = when.timestamp() - time.time()
    return max(0.0, min(seconds, MAX_RETRY_AFTER))


class CCFClient:
    """Talks to one CCF service. Create with ``CCFClient.open(config)``; close with ``aclose()``."""

    def __init__(
        self,
        config: ServiceConfig,
        service_cert_pem: bytes,
        *,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        rng: Callable[[], float] = random.random,
        metrics: Metrics | None = None,
        also_trusted: Sequence[bytes] = (),
    ) -> None:
        self.config = config
        self._metrics = metrics or METRICS
        self.service_cert_pem = service_cert_pem
        """The pinned service identity (the configured one, or one adopted after a recovery)."""
        self.trusted_pems: tuple[bytes, ...] = (service_cert_pem, *also_trusted)
        """Every service identity this client's TLS accepts: the pinned one and the accepted list."""
        self._sleep = sleep
        self._rng = rng
        self._ssl = pinned_ssl_context(b"\n".join(p.strip() for p in self.trusted_pems) + b"\n")
        self._session: aiohttp.ClientSession | None = None

    @classmethod
    async def open(cls, config: ServiceConfig, *, pinned: bytes | None = None) -> CCFClient:
        """Pin the configured service certificate (or ``pinned``, an identity adopted after a recovery that
        replaces it), or fetch it once from ``identity_url`` (Azure Managed CCF); plus every certificate in
        ``accepted_service_certificates``. ``service_cert_pem`` stays the one pinned identity."""
        if pinned is not None:
            pem = pinned
        else:
            pem = await configured_service_certificate(config)
        accepted = [_read_cert(path, f"services.{config.name}.accepted_service_certificates") for path in
                    config.accepted_service_certificates]  # fmt: skip
        return cls(config, pem, also_trusted=accepted)

    def _session_or_new(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            timeout = aiohttp.ClientTimeout(total=self.config.request_timeout, sock_connect=self.config.connect_timeout)
            connector = aiohttp.TCPConnector(ssl=self._ssl, limit=64, keepalive_timeout=60)
            self._session = aiohttp.ClientSession(
                connector=connector, timeout=timeout, headers={"User-Agent": "signing-agent"}
            )
        return self._session

    def url(self, path: str) -> str:
        return self.config.url + path

    def _backoff(self, attempt: int) -> float:
        base = min(self.config.backoff_max, self.config.backoff_initial * 2.0 ** (attempt - 1))
        return base * (0.5 + self._rng() / 2)

    async def request(
        self,
        method: str,
        path: str,
        *,
        body: bytes | None = None,
        content_type: str | None = None,
        gov: bool = True,
        max_attempts: int | None = None,
    ) -> CCFResponse:
        """Send ``body`` (the same bytes on every attempt) and return CCF's answer, retrying what is retryable.

        ``gov`` adds ``?api-version=``. Raises ``CCFTrustError`` (never retried: the peer is not the pinned service),
        ``CCFTimeoutError`` or ``CCFUnavailableError`` when every attempt failed. ``max_attempts`` lowers the
        configured number (health checks make one attempt).
        """
        attempts = min(max_attempts or self.config.max_attempts, self.config.max_attempts)
        service = self.config.name
        params = {"api-version": self.config.api_version} if gov else {}
        headers = {"Content-Type": content_type} if content_type else {}
        last_problem = "no attempt made"
        timed_out = False
        for attempt in range(1, attempts + 1):
            delay: float | None = None
            outcome = "unreachable"
            started = time.monotonic()
            try:
                session = self._session_or_new()
                async with session.request(method, self.url(path), params=params, data=body, headers=headers) as resp:
                    outcome = str(resp.status)
                    raw = await resp.read()
                    result = _response(resp, raw, attempt)
            except aiohttp.ClientConnectorCertificateError as exc:
                outcome = "untrusted"
                raise CCFTrustError(
                    f"{self.config.url} did not present a certificate endorsed by the pinned service certificate of "
                    f"service {self.config.name!r}; nothing was sent ({exc.certificate_error})",
                    hint="if the service was recovered it has a new identity: update service_certificate deliberately",
                ) from None
            except aiohttp.ClientSSLError as exc:
                outcome = "untrusted"
                raise CCFTrustError(f"TLS with {self.config.url} failed; nothing was sent: {exc}") from None
            except TimeoutError:
                outcome = "timeout"
                timed_out, last_problem = True, f"no answer within {self.config.request_timeout:g} s"
            except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as exc:
                timed_out, last_problem = False, _describe(exc)
            else:
                if result.status not in RETRY_STATUSES:
                    return result
                timed_out = False
                last_problem = f"CCF answered {result.status} {result.error_code or ''}".strip()
                delay = retry_after_seconds(resp.headers.get("Retry-After"))
                if attempt == attempts:
                    # Out of attempts: CCF's own answer is the most useful thing to relay.
                    return result
            finally:
                self._metrics.ccf_seconds.labels(service).observe(time.monotonic() - started)
                self._metrics.ccf_responses.labels(service, outcome).inc()
            if attempt < attempts:
                self._metrics.ccf_retries.labels(service).inc()
                wait = delay if delay is not None else self._backoff(attempt)
                _logger.warning(
                    "%s %s to service %s: %s; resending the same bytes in %.2f s (attempt %d of %d)",
                    method,
                    path,
                    self.config.name,
                    last_problem,
                    wait,
                    attempt + 1,
                    attempts,
                )
                await self._sleep(wait)
        message = f"service {self.config.name!r} at {self.config.url}: {last_problem} (after {attempts} attempts)"
        if timed_out:
            raise CCFTimeoutError(message)
        raise CCFUnavailableError(message)

    async def get(self, path: str, *, gov: bool = True, max_attempts: int | None = None) -> CCFResponse:
        return await self.request("GET", path, gov=gov, max_attempts=max_attempts)

    async def post_cose(self, path: str, cose: bytes) -> CCFResponse:
        return await self.request("POST", path, body=cose, content_type="application/cose")

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def _describe(exc: BaseException) -> str:
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "the connection closed before an answer (the request may have been processed)"
    if isinstance(exc, aiohttp.ClientConnectorError):
        return f"cannot connect: {exc.os_error.strerror or exc.os_error}"
    return f"{type(exc).__name__}: {exc}"


def _response(resp: aiohttp.ClientResponse, raw: bytes, attempt: int) -> CCFResponse:
    content_type = resp.headers.get("Content-Type", "").split(";")[0].strip().lower()
    body: Any = raw
    if content_type == "application/json" and raw:
        try:
            body = json.loads(raw)
        except ValueError:
            body = raw
    elif content_type.startswith("text/"):
        body = raw.decode("utf-8", "replace")
    return CCFResponse(
        status=resp.status,
        body=body,
        raw=raw,
        content_type=content_type,
        transaction_id=resp.headers.get(TX_HEADER),
        attempts=attempt,
        headers={k.lower(): v for k, v in resp.headers.items()},
    )


async def fetch_identity_certificate(config: ServiceConfig) -> bytes:
    """Azure Managed CCF: ``GET identity_url`` → ``.ledgerTlsCertificate``, fetched once and then pinned.

    The identity service itself is a public Azure endpoint, trusted through the system CAs (or
    ``identity_ca_bundle``). The certificate is fetched when the agent first talks to the service, and pinned for
    the life of the process.
    """
    url = config.identity_url
    if url is None:  # pragma: no cover -- config guarantees one of the two
        raise ConfigError(f"services.{config.name}: neither service_certificate nor identity_url is set")
    timeout = aiohttp.ClientTimeout(total=config.request_timeout, sock_connect=config.connect_timeout)
    bundle = config.identity_ca_bundle
    try:
        trust = ssl.create_default_context(cafile=str(bundle) if bundle is not None else None)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"services.{config.name}.identity_ca_bundle: cannot load {bundle}: {exc}") from None
    try:
        async with (
            aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(ssl=trust)) as session,
            session.get(url) as resp,
        ):
            data = await resp.json(content_type=None)
            if resp.status != 200:
                raise CCFUnavailableError(f"identity endpoint {url} answered {resp.status}")
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        raise CCFUnavailableError(f"cannot fetch the service identity from {url}: {exc}") from None
    pem = data.get("ledgerTlsCertificate") if isinstance(data, dict) else None
    if not isinstance(pem, str) or "BEGIN CERTIFICATE" not in pem:
        raise CCFUnavailableError(f"identity endpoint {url} returned no ledgerTlsCertificate")
    return pem.encode("ascii")


def _read_cert(path: Path, where: str) -> bytes:
    try:
        pem = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read {path}: {exc.strerror}") from None
    if b"BEGIN CERTIFICATE" not in pem:
        raise ConfigError(f"{where}: {path} is not a PEM certificate")
    return pem


async def configured_service_certificate(config: ServiceConfig) -> bytes:
    """The service certificate the configuration pins: its file, or fetched once from ``identity_url``."""
    if config.service_certificate is not None:
        return _read_cert(config.service_certificate, f"services.{config.name}.service_certificate")
    return await fetch_identity_certificate(config)


async def fetch_presented_service_certificate(config: ServiceConfig) -> bytes:
    """The service certificate the endpoint *claims* (``GET /node/network`` over TLS that verifies nothing).

    Only a candidate: nothing is sent but this GET, and the caller must then verify that the endpoint proves
    possession (a TLS connection pinned to the candidate) and that governance approved it. Never trust the answer
    as such.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # a candidate only; verified by a pinned connection next
    timeout = aiohttp.ClientTimeout(total=config.request_timeout, sock_connect=config.connect_timeout)
    url = config.url + "/node/network"
    try:
        async with (
            aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(ssl=ctx)) as session,
            session.get(url) as resp,
        ):
            data = await resp.json(content_type=None)
            status = resp.status
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        raise CCFUnavailableError(f"cannot read the service identity from {url}: {type(exc).__name__}") from None
    pem = data.get("service_certificate") if isinstance(data, dict) and status == 200 else None
    if not isinstance(pem, str) or "BEGIN CERTIFICATE" not in pem:
        raise CCFUnavailableError(f"{url} answered {status} without a service_certificate")
    return pem.encode("ascii")
