"""What a CCF service's endpoint presents in a TLS handshake, and whether the agent's trust accepts it: the check
behind ``check-config`` and the start-up log of ``serve``.

Only a handshake: no request is sent, so an endpoint that is not the pinned service learns nothing but that someone
connected. The pinned handshake is the one the agent's clients make (``client.pinned_ssl_context``: the trusted
service identities as the only anchors, the host name checked); when it refuses, a second handshake that verifies
nothing reads the certificate the endpoint presented, to name it. A CCF node presents a certificate issued by the
service identity, so the identity that endorses it is found among the trusted ones by its signature.

Must not import aiohttp (a handshake needs none of it) or ``signing_agent.cose``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.exceptions import InvalidSignature

from signing_agent.ccf.client import pinned_ssl_context
from signing_agent.config import ServiceConfig
from signing_agent.errors import CCFTimeoutError, CCFUnavailableError


@dataclass(frozen=True, slots=True)
class Presented:
    """What the endpoint presented, and what the pinned handshake made of it."""

    certificate: x509.Certificate | None
    """Its TLS certificate (a CCF node's); None when TLS failed before one was seen."""
    trusted: bool
    """Whether the pinned handshake accepted it: what the agent's clients will do."""
    endorsed_by: x509.Certificate | None
    """The trusted service identity that issued it (or is it), when one did directly."""
    refusal: str | None = None
    """Why the pinned handshake refused it."""


def endorsing(certificate: x509.Certificate, identities: Sequence[x509.Certificate]) -> x509.Certificate | None:
    """The identity among ``identities`` that is ``certificate`` or issued it (its signature verifies), or None."""
    for identity in identities:
        if identity == certificate:
            return identity
        try:
            certificate.verify_directly_issued_by(identity)
        except (ValueError, TypeError, InvalidSignature):
            continue
        return identity
    return None


def load_identities(pems: Sequence[bytes]) -> list[x509.Certificate]:
    """Every certificate in ``pems`` (each a PEM certificate or a bundle), in order; what is not one is left out."""
    found: list[x509.Certificate] = []
    for pem in pems:
        with contextlib.suppress(ValueError):
            found += x509.load_pem_x509_certificates(pem)
    return found


async def _peer_certificate(config: ServiceConfig, ctx: ssl.SSLContext) -> x509.Certificate | None:
    """Connect to the service's host and port, complete a TLS handshake with ``ctx``, and hang up at once."""
    url = urlsplit(config.url)
    host, port = url.hostname or "", url.port or 443
    try:
        async with asyncio.timeout(config.connect_timeout):
            _, writer = await asyncio.open_connection(host, port, ssl=ctx, server_hostname=host)
    except TimeoutError:
        raise CCFTimeoutError(f"no TLS handshake within {config.connect_timeout:g} s (connect_timeout)") from None
    except ssl.SSLError:
        raise
    except OSError as exc:
        # asyncio's "Connect call failed (...)" hides the errno's own words; a resolver error has a negative errno.
        reason = os.strerror(exc.errno) if exc.errno and exc.errno > 0 else (exc.strerror or str(exc))
        raise CCFUnavailableError(f"cannot connect to {host}:{port}: {reason}") from None
    try:
        ssl_object = writer.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
    finally:
        writer.transport.abort()  # nothing to say, and no close_notify to wait for
        await asyncio.sleep(0)  # the abort closes the socket on the loop's next round: let it, before returning
    return x509.load_der_x509_certificate(der) if der else None


async def handshake(config: ServiceConfig, trusted: Sequence[bytes]) -> Presented:
    """What ``config``'s endpoint presents, checked against the ``trusted`` service identities (PEMs) as the agent's
    clients check it. ``CCFUnavailableError`` or ``CCFTimeoutError`` when no handshake could be made."""
    anchors = load_identities(trusted)
    try:
        leaf = await _peer_certificate(config, pinned_ssl_context(b"\n".join(p.strip() for p in trusted) + b"\n"))
    except ssl.SSLCertVerificationError as exc:
        refusal = exc.verify_message or str(exc)
    except ssl.SSLError as exc:
        return Presented(None, trusted=False, endorsed_by=None, refusal=f"TLS failed: {exc.reason or exc}")
    else:
        return Presented(leaf, trusted=True, endorsed_by=endorsing(leaf, anchors) if leaf else None)
    unverified = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    unverified.minimum_version = ssl.TLSVersion.TLSv1_2
    unverified.check_hostname = False
    unverified.verify_mode = ssl.CERT_NONE  # only to name what the endpoint presented; nothing is sent
    try:
        leaf = await _peer_certificate(config, unverified)
    except ssl.SSLError:
        leaf = None
    return Presented(leaf, trusted=False, endorsed_by=endorsing(leaf, anchors) if leaf else None, refusal=refusal)
