"""Azure Managed CCF: the service certificate fetched once from an identity endpoint, then pinned."""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme
from aiohttp import web

from signing_agent.ccf.connections import CCFConnections
from signing_agent.config import ServiceConfig
from signing_agent.errors import CCFTrustError, CCFUnavailableError
from tests.support.pki import make_member
from tests.support.sandbox_proc import SandboxProcess, sandbox


@pytest.fixture
def ledger(workdir: Path) -> Iterator[SandboxProcess]:
    with sandbox(workdir / "sandbox", [make_member("m0").write(workdir)[1]]) as sb:
        yield sb


async def identity_endpoint(folder: Path, certificate: bytes) -> tuple[web.AppRunner, str, Path]:
    """An HTTPS identity service (its own CA, like the public Azure one) answering ``ledgerTlsCertificate``."""
    ca = trustme.CA()
    served: list[str] = []

    async def identity(request: web.Request) -> web.Response:
        served.append(request.path)
        return web.json_response({"ledgerId": "myledger", "ledgerTlsCertificate": certificate.decode()})

    app = web.Application()
    app.router.add_get("/ledgerIdentity/myledger", identity)
    runner = web.AppRunner(app)
    await runner.setup()
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(ctx)
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ctx)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    bundle = folder / "identity-ca.pem"
    ca.cert_pem.write_to_path(str(bundle))
    return runner, f"https://127.0.0.1:{port}/ledgerIdentity/myledger", bundle


async def test_the_identity_is_fetched_once_and_pinned(ledger: SandboxProcess, workdir: Path) -> None:
    runner, url, bundle = await identity_endpoint(workdir, ledger.service_cert.read_bytes())
    try:
        config = ServiceConfig(name="mccf", url=ledger.url, identity_url=url, identity_ca_bundle=bundle)
        ccf = CCFConnections({"mccf": config})
        try:
            client = await ccf.client("mccf")
            info = await client.service_info()
            assert info.status == 200
            assert info.value is not None
            assert info.value.status == "Open"
            assert client.trusted_pems == (ledger.service_cert.read_bytes(),)
        finally:
            await ccf.aclose()
    finally:
        await runner.cleanup()


async def test_an_identity_that_is_not_the_service_s_is_refused_before_sending(
    ledger: SandboxProcess, workdir: Path
) -> None:
    other = make_member("not-the-service").cert_pem
    runner, url, bundle = await identity_endpoint(workdir, other)
    try:
        ccf = CCFConnections({"mccf": ServiceConfig(name="mccf", url=ledger.url, identity_url=url,
                                                    identity_ca_bundle=bundle, max_attempts=2)})  # fmt: skip
        try:
            client = await ccf.client("mccf")
            ledger.clear_requests()
            with pytest.raises(CCFTrustError):
                await client.service_info()
            assert ledger.requests() == []
        finally:
            await ccf.aclose()
    finally:
        await runner.cleanup()


async def test_an_untrusted_identity_endpoint_is_an_error(ledger: SandboxProcess, workdir: Path) -> None:
    runner, url, _ = await identity_endpoint(workdir, ledger.service_cert.read_bytes())
    try:
        # No identity_ca_bundle: the system CAs do not know the test CA.
        with pytest.raises(CCFUnavailableError, match="cannot fetch the service identity"):
            await CCFConnections({"mccf": ServiceConfig(name="mccf", url=ledger.url, identity_url=url,
                                                        connect_timeout=2)}).client("mccf")  # fmt: skip
    finally:
        await runner.cleanup()
