"""A TLS endpoint that only shakes hands: for tests of what an endpoint presents, trusted or not.

It presents a certificate for 127.0.0.1 issued by its own trustme CA (the "service identity" a client may pin), as a
CCF node does, completes or fails the handshake, and hangs up; it never speaks HTTP. Blocking sockets in a thread, on
purpose: Python 3.11's asyncio leaves the accepted socket of a failed server-side TLS handshake unclosed (a
ResourceWarning at some later garbage collection, in whichever test runs then), and these tests fail handshakes.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import trustme


@dataclass
class TLSEndpoint:
    url: str
    ca: trustme.CA
    service_cert: Path
    """The CA's certificate as a PEM file: the identity a client pins."""
    handshakes: list[bool] = field(default_factory=list)
    """Each handshake the endpoint saw, and whether it completed."""


@contextlib.contextmanager
def tls_endpoint(folder: Path) -> Iterator[TLSEndpoint]:
    ca = trustme.CA()
    cert = folder / f"tls-endpoint-ca-{id(ca)}.pem"
    ca.cert_pem.write_to_path(str(cert))
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(ctx)
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.1)
    endpoint = TLSEndpoint(f"https://127.0.0.1:{listener.getsockname()[1]}", ca, cert)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(5)
                try:
                    tls = ctx.wrap_socket(conn, server_side=True)
                except OSError:  # ssl.SSLError included: the client refused what it was shown
                    endpoint.handshakes.append(False)
                    continue
                with tls, contextlib.suppress(OSError):
                    endpoint.handshakes.append(True)
                    tls.recv(1)  # until the client hangs up

    thread = threading.Thread(target=serve, name="tls-endpoint", daemon=True)
    thread.start()
    try:
        yield endpoint
    finally:
        stop.set()
        thread.join(10)
        listener.close()
