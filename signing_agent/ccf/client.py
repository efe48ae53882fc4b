"""``CCFClient``: governance requests to one CCF service over TLS pinned to its service certificate.

One keep-alive aiohttp session per service. The TLS context trusts the service certificate and nothing else: never
the system CAs, never unverified. CCF nodes present a certificate endorsed by the service identity, so pinning the
service certificate as the only CA is exactly how CCF's own clients work.

A signed message is sent as opaque bytes. On a connection failure, a timeout, or a 503/429 (honouring Retry-After)
the *identical* bytes are sent again with bounded, jittered exponential backoff, within ``total_timeout`` (the
agent's one ``RetryPolicy``, ``signing_agent.retry``); nothing here ever re-signs. CCF's paths and the shapes of its
answers are ``ccf.api``'s; this module moves bytes.

The pinned connection has no exits and no unbounded answers, in every request to a service or identity endpoint:
a redirect is never followed (it would carry signed messages and shares away from the pinned service, even to plain
``http://``) and is an error naming its Location; an answer body is read incrementally and abandoned, its
connection aborted, past ``max_response_bytes``. Neither is retried. Every attempt is bounded in time as a whole
(``request_timeout``, body included) and between two reads (``read_timeout``), and every request, retries and
waits included, by ``total_timeout``. Whether
a resend is safe is CCF's business: it answers a byte-identical proposal with ProposalReplay, a repeated ballot with
200, a repeated ack with 204 (see ../shared/ccf-governance.md §6), and the governance layer interprets that.

Must not import: ``signing_agent.cose``, key-store backends. aiohttp exceptions never leave this module: they are
mapped in one place, ``map_aiohttp_exceptions``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import ssl
import time
from collections.abc import AsyncIterable, Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from signing_agent.config import ServiceConfig, read_trusted_file, read_trusted_pem
from signing_agent.errors import (
    CCFAnswerRefusedError,
    CCFTimeoutError,
    CCFTrustError,
    CCFUnavailableError,
    ConfigError,
)
from signing_agent.metrics import METRICS, Metrics
from signing_agent.retry import Backoff, GiveUp, RetryPolicy, retry_after_seconds
from signing_agent.waits import waiting_for

_logger = logging.getLogger(__name__)

RETRY_STATUSES = frozenset({429, 503})
MAX_RETRY_AFTER = 30.0
"""A ``Retry-After`` over this is not waited for: the service's own answer (its 503 or 429) is relayed at once."""
TX_HEADER = "x-ms-ccf-transaction-id"
READ_CHUNK = 64 * 1024
_MAX_LOCATION_CHARS = 300
MIN_ATTEMPT_SECONDS = 1.0
"""No attempt is started with less than this left of ``total_timeout``: it could only time out."""


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
    """With lower-case names."""
    request: str = ""
    """What was asked, for messages: ``GET /node/state`` (no query)."""

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    @property
    def error_code(self) -> str | None:
        """CCF's OData error code, e.g. ``ProposalReplay``; one that is no short printable word (an endpoint may send
        megabytes, or line breaks) is cut and escaped (``short_text``): it goes into log lines and messages."""
        if isinstance(self.body, dict) and isinstance(self.body.get("error"), dict):
            code = self.body["error"].get("code")
            return short_text(code) if isinstance(code, str) else None
        return None

    @property
    def error_message(self) -> str:
        if isinstance(self.body, dict) and isinstance(self.body.get("error"), dict):
            return str(self.body["error"].get("message", ""))
        return ""

    def json_object(self) -> dict[str, Any] | None:
        """The body when it is a JSON object, else None."""
        return self.body if isinstance(self.body, dict) else None


MAX_WORD_CHARS = 64
"""The longest word (an error code, a proposal state) from an answer that the agent repeats as it came."""


def short_text(text: str) -> str:
    """A word from an answer as the agent may repeat it in a log line or a message: as it came when it is at most
    ``MAX_WORD_CHARS`` printable characters (every code and state CCF sends), else its first ones escaped and its
    length."""
    if len(text) <= MAX_WORD_CHARS and text.isprintable():
        return text
    return f"{text[:MAX_WORD_CHARS]!a}...[{len(text)} chars]"


def pinned_ssl_context(service_cert_pem: bytes) -> ssl.SSLContext:
    """A client TLS context whose only trust anchors are the service certificate(s) (one PEM, or a bundle)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_verify_locations(cadata=service_cert_pem.decode("ascii"))
    except (ssl.SSLError, UnicodeDecodeError, ValueError) as exc:
        raise ConfigError(f"the service certificate is not a PEM certificate: {exc}") from None
    return ctx


class AnswerTooLargeError(Exception):
    """An answer body grew past its cap. Internal: ``read_answer`` turns it into ``CCFAnswerRefusedError``."""


async def read_capped(chunks: AsyncIterable[bytes], limit: int) -> bytes:
    """The concatenated ``chunks``, or ``AnswerTooLargeError`` as soon as they add up to more than ``limit`` bytes.

    Nothing past the cap is pulled from ``chunks``: a service answering gigabytes costs at most ``limit`` bytes (and
    one chunk) of memory, never the whole answer.
    """
    body = bytearray()
    async for chunk in chunks:
        if len(body) + len(chunk) > limit:
            raise AnswerTooLargeError
        body += chunk
    return bytes(body)


def client_timeout(config: ServiceConfig, total: float | None = None) -> aiohttp.ClientTimeout:
    """One attempt's time bounds: ``total`` (default ``request_timeout``) for all of it, body included;
    ``connect_timeout`` to connect; ``read_timeout`` of silence between two reads."""
    return aiohttp.ClientTimeout(
        total=config.request_timeout if total is None else total,
        sock_connect=config.connect_timeout,
        sock_read=config.read_timeout,
    )


async def read_answer(resp: aiohttp.ClientResponse, config: ServiceConfig, what: str) -> bytes:
    """The body of ``resp``, which answers ``what`` (e.g. ``service 'x': POST /gov/...``), within the guards.

    A redirect (any 3xx: requests are made with ``allow_redirects=False``) is refused unread, naming its Location.
    A body over ``config.max_response_bytes`` (declared, or counted while reading) is abandoned. Either way, and
    when the read fails or times out, the connection is aborted: never pooled, never read any further.
    """
    if 300 <= resp.status < 400:
        location = resp.headers.get("Location")
        _abandon(resp)
        target = repr(location[:_MAX_LOCATION_CHARS]) if location is not None else "nowhere (no Location header)"
        raise CCFAnswerRefusedError(
            f"{what} answered {resp.status}, a redirect to {target}; the agent never follows a redirect (it would "
            "leave the pinned service), and sent the request only once",
            hint=f"services.{config.name}: point url (or identity_url) at the service itself, not at an address "
            "that redirects",
        )
    limit = config.max_response_bytes
    body: bytes | None = None
    try:
        if resp.content_length is None or resp.content_length <= limit:  # a declared length over the cap: not a byte
            with contextlib.suppress(AnswerTooLargeError):
                body = await read_capped(resp.content.iter_chunked(READ_CHUNK), limit)
    except BaseException:  # a timeout, a broken body, a cancelled request: the rest is not read either
        _abandon(resp)
        raise
    if body is None:
        _abandon(resp)
        raise CCFAnswerRefusedError(
            f"{what} answered {resp.status} with a body over {limit} bytes "
            f"(services.{config.name}.max_response_bytes); the rest of the answer was not read",
            hint=f"if this service really answers that much (a proposal carrying a large set_js_app bundle), raise "
            f"services.{config.name}.max_response_bytes",
        )
    return body


def _abandon(resp: aiohttp.ClientResponse) -> None:
    """Drop the answer's connection at once: an abort, with no TLS close_notify exchange to wait for (the service
    may still be sending), so nothing more is read from it and it never returns to the pool."""
    connection = resp.connection
    transport = connection.transport if connection is not None else None
    if transport is not None:
        transport.abort()
    resp.close()


def retry_policy(config: ServiceConfig) -> RetryPolicy:
    """The service's retry settings as the agent's one ``RetryPolicy``."""
    return RetryPolicy(
        max_attempts=config.max_attempts,
        total_timeout=config.total_timeout,
        backoff=Backoff(config.backoff_initial, config.backoff_max),
        max_retry_after=MAX_RETRY_AFTER,
        min_attempt_seconds=MIN_ATTEMPT_SECONDS,
    )


class CCFClient:
    """Talks to one CCF service, trusting ``service_cert_pem`` and ``also_trusted``. Built by ``ccf.api.HttpConnector``
    (the one place a client is made); close with ``aclose()``."""

    def __init__(
        self,
        config: ServiceConfig,
        service_cert_pem: bytes,
        *,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        rng: Callable[[], float] = random.random,
        clock: Callable[[], float] = time.monotonic,
        metrics: Metrics | None = None,
        also_trusted: Sequence[bytes] = (),
    ) -> None:
        self.config = config
        self._metrics = metrics or METRICS
        self.service_cert_pem = service_cert_pem
        """The pinned service identity (the configured one, or one adopted after a recovery)."""
        self.trusted_pems: tuple[bytes, ...] = (service_cert_pem, *also_trusted)
        """Every service identity this client's TLS accepts: the pinned one and the accepted list."""
        self._retry = retry_policy(config)
        self._sleep = sleep
        self._rng = rng
        self._clock = clock
        self._ssl = pinned_ssl_context(b"\n".join(p.strip() for p in self.trusted_pems) + b"\n")
        self._session: aiohttp.ClientSession | None = None

    def _session_or_new(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(ssl=self._ssl, limit=64, keepalive_timeout=60)
            self._session = aiohttp.ClientSession(
                connector=connector, timeout=client_timeout(self.config), headers={"User-Agent": "signing-agent"}
            )
        return self._session

    def url(self, path: str) -> str:
        return self.config.url + path

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
        ``CCFAnswerRefusedError`` (never retried: a redirect, or an answer over ``max_response_bytes``),
        ``CCFTimeoutError`` or ``CCFUnavailableError`` when every attempt within ``total_timeout`` failed.
        ``max_attempts`` lowers the configured number (health checks make one attempt).
        """
        cfg = self.config
        service = cfg.name
        what = f"service {service!r}: {method} {path}"
        params = {"api-version": cfg.api_version} if gov else {}
        headers = {"Content-Type": content_type} if content_type else {}
        retry = self._retry.start(clock=self._clock, sleep=self._sleep, rng=self._rng, max_attempts=max_attempts)
        while True:
            attempt = retry.next_attempt()
            answer: CCFResponse | None = None
            problem: CCFTimeoutError | CCFUnavailableError | None = None
            outcome = "unreachable"
            started = self._clock()
            limit = retry.attempt_timeout(cfg.request_timeout)
            try:
                with map_aiohttp_exceptions(cfg, limit):
                    async with self._session_or_new().request(
                        method,
                        self.url(path),
                        params=params,
                        data=body,
                        headers=headers,
                        allow_redirects=False,
                        timeout=client_timeout(cfg, limit),
                    ) as resp:
                        outcome = str(resp.status)
                        raw = await read_answer(resp, cfg, what)
                        answer = _response(resp, raw, attempt, f"{method} {path}")
            except CCFTrustError:
                outcome = "untrusted"
                raise
            except CCFTimeoutError as exc:
                outcome, problem = "timeout", exc
            except CCFUnavailableError as exc:
                problem = exc
            finally:
                self._metrics.ccf_seconds.labels(service).observe(self._clock() - started)
                self._metrics.ccf_responses.labels(service, outcome).inc()
            retry_after: float | None = None
            if answer is not None:
                if answer.status not in RETRY_STATUSES:
                    return answer
                problem = CCFUnavailableError(f"CCF answered {answer.status} {answer.error_code or ''}".strip())
                retry_after = retry_after_seconds(answer.headers)
            wait = retry.after_failure(retry_after)
            if isinstance(wait, GiveUp):
                if answer is not None:
                    return answer  # out of attempts or time: CCF's own answer is the most useful thing to relay
                raise _gave_up(cfg, problem, attempt, wait)
            self._metrics.ccf_retries.labels(service).inc()
            _logger.warning(
                "%s %s to service %s: %s; resending the same bytes in %.2f s (attempt %d of %d)",
                method,
                path,
                cfg.name,
                problem.message if problem is not None else "",
                wait,
                attempt + 1,
                retry.max_attempts,
            )
            await retry.sleep(wait)

    async def get(self, path: str, *, gov: bool = True, max_attempts: int | None = None) -> CCFResponse:
        with waiting_for(self._waiting("GET", path)):
            return await self.request("GET", path, gov=gov, max_attempts=max_attempts)

    async def post_cose(self, path: str, cose: bytes) -> CCFResponse:
        with waiting_for(self._waiting("POST", path)):
            return await self.request("POST", path, body=cose, content_type="application/cose")

    def _waiting(self, method: str, path: str) -> str:
        """What a request's deadline names when it expires during this call (``signing_agent.waits``)."""
        return f"CCF service {self.config.name!r}: {method} {path}"

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def _gave_up(
    config: ServiceConfig, problem: CCFTimeoutError | CCFUnavailableError | None, attempts: int, why: GiveUp
) -> CCFTimeoutError | CCFUnavailableError:
    """The error for a request whose every attempt failed without an answer: the last problem, and how many tries."""
    last = problem.message if problem is not None else "no attempt made"
    timed_out = isinstance(problem, CCFTimeoutError)
    if why is GiveUp.DEADLINE:
        timed_out = True
        last += f"; no time left for another attempt within total_timeout ({config.total_timeout:g} s)"
    plural = "" if attempts == 1 else "s"
    message = f"service {config.name!r} at {config.url}: {last} (after {attempts} attempt{plural})"
    return CCFTimeoutError(message) if timed_out else CCFUnavailableError(message)


@contextlib.contextmanager
def map_aiohttp_exceptions(config: ServiceConfig, limit: float, *, endpoint: str | None = None) -> Iterator[None]:
    """aiohttp's exceptions as the agent's (httpx's ``map_httpcore_exceptions``), for one request bounded by
    ``limit`` seconds to ``config``'s service, or to ``endpoint`` (another URL, e.g. an identity endpoint).

    A certificate that the trusted identities do not endorse, or any other TLS failure, is a ``CCFTrustError``
    (nothing was sent); a time bound a ``CCFTimeoutError`` that names its setting; a connection that failed or broke
    a ``CCFUnavailableError``. Nothing else is caught (the agent's own errors pass through), so no aiohttp exception
    leaves this module."""
    try:
        yield
    except aiohttp.ClientConnectorCertificateError as exc:
        if endpoint is not None:
            raise CCFTrustError(
                f"{endpoint} presented a certificate that is not trusted; nothing was sent ({exc.certificate_error})"
            ) from None
        raise CCFTrustError(
            f"{config.url} did not present a certificate endorsed by the pinned service certificate of "
            f"service {config.name!r}; nothing was sent ({exc.certificate_error})",
            hint="if the service was recovered it has a new identity: update service_certificate deliberately",
        ) from None
    except aiohttp.ClientSSLError as exc:
        raise CCFTrustError(f"TLS with {endpoint or config.url} failed; nothing was sent: {exc}") from None
    except TimeoutError as exc:
        raise CCFTimeoutError(_describe_timeout(exc, config, limit)) from None
    except aiohttp.ClientError as exc:  # a connection that failed or broke, a malformed answer
        raise CCFUnavailableError(_describe(exc)) from None


def _describe_timeout(exc: TimeoutError, config: ServiceConfig, limit: float) -> str:
    """Which time bound an attempt hit, named by its setting."""
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return f"cannot connect within {config.connect_timeout:g} s (connect_timeout)"
    if isinstance(exc, aiohttp.SocketTimeoutError):
        return f"the service sent nothing for {config.read_timeout:g} s (read_timeout)"
    if limit < config.request_timeout:
        return f"no complete answer within the {limit:.1f} s left of total_timeout ({config.total_timeout:g} s)"
    return f"no complete answer within {config.request_timeout:g} s (request_timeout)"


def _describe(exc: BaseException) -> str:
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "the connection closed before an answer (the request may have been processed)"
    if isinstance(exc, aiohttp.ClientConnectorError):
        return f"cannot connect: {exc.os_error.strerror or exc.os_error}"
    return f"{type(exc).__name__}: {exc}"


def _response(resp: aiohttp.ClientResponse, raw: bytes, attempt: int, request: str) -> CCFResponse:
    content_type = resp.headers.get("Content-Type", "").split(";")[0].strip().lower()
    body: Any = raw
    if content_type == "application/json" and raw:
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError):  # nested deeper than Python parses: not JSON to us, never a 500
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
        request=request,
    )


def _identity_trust(bundle: Path, service: str) -> ssl.SSLContext:
    """Trust in ``identity_ca_bundle`` only: a file of the agent's own (``config.read_trusted_pem``), as whoever may
    write it decides which endpoint passes for the identity service, and so which service the agent pins."""
    where = f"services.{service}.identity_ca_bundle"
    decides = "which endpoint passes for the identity service, and so which service the agent pins"
    pem = read_trusted_pem(bundle, where, decides)
    try:
        return ssl.create_default_context(cadata=pem)
    except ssl.SSLError as exc:
        raise ConfigError(f"{where}: cannot load {bundle}: {exc}") from None


async def fetch_identity_certificate(config: ServiceConfig) -> bytes:
    """Azure Managed CCF: ``GET identity_url`` → ``.ledgerTlsCertificate``, fetched once and then pinned.

    The identity service itself is a public Azure endpoint, trusted through the system CAs (or
    ``identity_ca_bundle``). The certificate is fetched when the agent first talks to the service, and pinned for
    the life of the process.
    """
    url = config.identity_url
    if url is None:  # pragma: no cover -- config guarantees one of the two
        raise ConfigError(f"services.{config.name}: neither service_certificate nor identity_url is set")
    bundle = config.identity_ca_bundle
    trust = ssl.create_default_context() if bundle is None else _identity_trust(bundle, config.name)
    try:
        status, data = await get_json(config, trust, url, f"identity endpoint {url}")
    except (CCFTrustError, CCFTimeoutError, CCFUnavailableError) as exc:
        raise CCFUnavailableError(f"cannot fetch the service identity from {url}: {exc.message}") from None
    except ValueError as exc:
        raise CCFUnavailableError(f"cannot fetch the service identity from {url}: {exc}") from None
    if status != 200:
        raise CCFUnavailableError(f"identity endpoint {url} answered {status}")
    pem = pem_bytes(data.get("ledgerTlsCertificate") if isinstance(data, dict) else None)
    if pem is None:
        raise CCFUnavailableError(f"identity endpoint {url} returned no ledgerTlsCertificate")
    return pem


def pem_bytes(text: object) -> bytes | None:
    """A certificate an endpoint sent in a JSON string, as PEM bytes; None unless it is ASCII text that holds
    ``BEGIN CERTIFICATE`` (an endpoint may send anything: a non-ASCII character must not become a 500)."""
    if not isinstance(text, str) or not text.isascii() or "BEGIN CERTIFICATE" not in text:
        return None
    return text.encode("ascii")


async def get_json(config: ServiceConfig, trust: ssl.SSLContext, url: str, what: str) -> tuple[int, Any]:
    """One GET outside the pinned session (an identity endpoint, or what a service claims to be), within the same
    guards: no redirect, a capped body, the service's time bounds, aiohttp's exceptions mapped. Returns the status
    and the body parsed as JSON (None when empty; ``ValueError`` when it is not JSON)."""
    with waiting_for(f"CCF {what}"), map_aiohttp_exceptions(config, config.request_timeout, endpoint=url):
        async with (
            aiohttp.ClientSession(timeout=client_timeout(config), connector=aiohttp.TCPConnector(ssl=trust)) as session,
            session.get(url, allow_redirects=False) as resp,
        ):
            raw = await read_answer(resp, config, what)
    try:
        return resp.status, json.loads(raw) if raw.strip() else None
    except RecursionError:
        raise ValueError(f"{what} answered JSON nested too deeply") from None


def _read_cert(path: Path, where: str) -> bytes:
    """A service certificate the configuration trusts, from a file that must be the agent's own."""
    pem = read_trusted_file(path, where, "which service the agent trusts (and sends recovery shares to)")
    if b"BEGIN CERTIFICATE" not in pem:
        raise ConfigError(f"{where}: {path} is not a PEM certificate")
    return pem


async def configured_service_certificate(config: ServiceConfig) -> bytes:
    """The service certificate the configuration pins: its file, or fetched once from ``identity_url``."""
    if config.service_certificate is not None:
        return _read_cert(config.service_certificate, f"services.{config.name}.service_certificate")
    return await fetch_identity_certificate(config)
