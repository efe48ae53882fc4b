"""Benchmark: the azure-keyvault backend against the Key Vault double, and the bare SDK as the baseline.

Prints signatures per second (sequential and concurrent), vault requests per signature after warm-up, and the
latency the backend adds over a bare ``CryptographyClient.sign`` (p50/p99). Both go through the real SDK and
the real ``ManagedIdentityCredential`` against the double's token endpoint; the double runs in the same
process and event loop, so absolute numbers mostly measure this machine's Python. Run: ``.venv/bin/python
bench/bench_keyvault.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import ssl
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from azure.core.pipeline.transport import AioHttpTransport
from azure.identity.aio import ManagedIdentityCredential
from azure.keyvault.keys.aio import KeyClient
from azure.keyvault.keys.crypto import SignatureAlgorithm as AzureSignatureAlgorithm
from azure.keyvault.keys.crypto.aio import CryptographyClient

from signing_agent.algorithms import ES384
from signing_agent.backends.azure_keyvault import (
    AzureKeyVaultRegistry,
    AzureKeyVaultSettings,
    ThrottleSettings,
)
from signing_agent.backends.base import Priority
from signing_agent.config import AzureKeyVaultKeyConfig
from tests.doubles.keyvault import RunningKeyVault, running_keyvault


def _pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


async def _sequential(fn: Callable[[int], Awaitable[object]], n: int) -> list[float]:
    latencies = []
    for i in range(n):
        t0 = time.perf_counter()
        await fn(i)
        latencies.append(time.perf_counter() - t0)
    return latencies


async def _concurrent(fn: Callable[[int], Awaitable[object]], n: int, concurrency: int) -> float:
    sem = asyncio.Semaphore(concurrency)

    async def one(i: int) -> None:
        async with sem:
            await fn(i)

    t0 = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(n)))
    return n / (time.perf_counter() - t0)


def _session(ctx: ssl.SSLContext) -> AioHttpTransport:
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(ssl=ctx), cookie_jar=aiohttp.DummyCookieJar(), auto_decompress=False
    )
    return AioHttpTransport(session=session, session_owner=True)


async def _run(kv: RunningKeyVault, n: int, concurrency: int) -> None:
    os.environ.update(kv.env)
    version = kv.vault.add_key("bench", "P-384")
    digests = [ES384.digest(b"%d" % i) for i in range(max(n, 64))]
    ctx = ssl.create_default_context(cafile=str(kv.ca_bundle))

    credential = ManagedIdentityCredential()
    key_client = KeyClient(kv.vault_url, credential, transport=_session(ctx))
    vault_key = await key_client.get_key("bench", version.version)
    bare = CryptographyClient(vault_key, credential, transport=_session(ctx))
    bare_cv = CryptographyClient(vault_key, credential, connection_verify=str(kv.ca_bundle))

    fast = AzureKeyVaultSettings(throttle=ThrottleSettings(max_concurrency=64, rate_per_second=1e6, burst=10**6))
    reg_fast = AzureKeyVaultRegistry(settings=fast)
    reg_default = AzureKeyVaultRegistry()
    cfg = AzureKeyVaultKeyConfig(
        vault_url=kv.vault_url,
        key_name="bench",
        key_version=version.version,
        credential="managed-identity",
        ca_bundle=kv.ca_bundle,
    )
    key_fast = reg_fast.signing_key(cfg, name="bench.fast")
    key_default = reg_default.signing_key(cfg, name="bench.default")
    try:

        async def sdk(i: int) -> object:
            return await bare.sign(AzureSignatureAlgorithm.es384, digests[i % len(digests)])

        async def sdk_cv(i: int) -> object:
            return await bare_cv.sign(AzureSignatureAlgorithm.es384, digests[i % len(digests)])

        async def backend(i: int) -> object:
            return await key_fast.sign_digest(ES384, digests[i % len(digests)], priority=Priority.NORMAL)

        async def backend_default(i: int) -> object:
            return await key_default.sign_digest(ES384, digests[i % len(digests)])

        await key_fast.describe()
        await key_default.describe()
        for fn in (sdk, sdk_cv, backend, backend_default):  # warm-up: challenge, token, connections
            await _sequential(fn, 10)

        # Requests per signature, after warm-up.
        kv.vault.clear_log()
        await _sequential(backend, n)
        backend_rps = len(kv.vault.requests) / n
        kv.vault.clear_log()
        await _sequential(sdk, n)
        sdk_rps = len(kv.vault.requests) / n

        # Sequential latency, interleaved in blocks so that drift hits both sides alike.
        lat_sdk: list[float] = []
        lat_backend: list[float] = []
        lat_cv: list[float] = []
        block = max(10, n // 5)
        for _ in range(5):
            lat_sdk += await _sequential(sdk, block)
            lat_backend += await _sequential(backend, block)
            lat_cv += await _sequential(sdk_cv, block)

        tput_sdk = await _concurrent(sdk, n, concurrency)
        tput_backend = await _concurrent(backend, n, concurrency)
        tput_default = await _concurrent(backend_default, n, concurrency)

        print(f"Key Vault double, ES384, P-384; n={n} per measurement, concurrency={concurrency} (one process)")
        print(f"vault requests per signature (after warm-up): backend {backend_rps:.2f}, bare SDK {sdk_rps:.2f}")
        print("sequential latency (ms)        p50      p99   sig/s")
        for label, lat in (
            ("bare SDK (shared SSLContext)", lat_sdk),
            ("backend (throttle off)", lat_backend),
            ("bare SDK (connection_verify)", lat_cv),
        ):
            p50, p99 = _pct(lat, 50) * 1e3, _pct(lat, 99) * 1e3
            print(f"  {label:28} {p50:7.2f}  {p99:7.2f}  {1 / statistics.fmean(lat):6.0f}")
        print(
            "latency the backend adds over the bare SDK: p50 "
            f"{(_pct(lat_backend, 50) - _pct(lat_sdk, 50)) * 1e3:+.2f}"
            f" ms, p99 {(_pct(lat_backend, 99) - _pct(lat_sdk, 99)) * 1e3:+.2f} ms "
            "(throttle + retry loop + local verification of every signature)"
        )
        print(f"concurrent throughput (sig/s): bare SDK {tput_sdk:.0f}, backend (throttle off) {tput_backend:.0f}")
        print(
            f"  backend with the default throttle ({reg_default.settings.throttle.rate_per_second:g}/s, "
            "burst "
            f"{reg_default.settings.throttle.burst}, cap {reg_default.settings.throttle.max_concurrency}): "
            f"{tput_default:.0f}"
        )
    finally:
        await reg_fast.aclose()
        await reg_default.aclose()
        await bare.close()
        await bare_cv.close()
        await key_client.close()
        await credential.close()


async def _main(n: int, concurrency: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        async with running_keyvault(Path(tmp)) as kv:
            await _run(kv, n, concurrency)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("-n", type=int, default=300, help="signatures per measurement")
    p.add_argument("-c", "--concurrency", type=int, default=16)
    args = p.parse_args(argv)
    asyncio.run(_main(args.n, args.concurrency))
    return 0


if __name__ == "__main__":
    sys.exit(main())
