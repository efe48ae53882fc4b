"""The crypto workers (``signing_agent.workers``) with real child processes: the pool's fused sign+verify and its
verification, refusals that carry the inline messages, a worker killed with jobs in flight, the inline fallback, a
broken or hostile worker, the frame bounds, and a worker's own handling of jobs (``Worker.run``, in this process).

Every wait on the pool is bounded (``asyncio.timeout``): a lost job must fail the test, never hang it.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import cbor2
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed, decode_dss_signature, encode_dss_signature

from signing_agent.algorithms import ALGORITHMS, ES256, ES384, ES512, SignatureAlgorithm, verify_digest
from signing_agent.backends.file import FileSigningKey
from signing_agent.errors import BackendError, SigningFailedError
from signing_agent.workers import frames
from signing_agent.workers.child import Worker, serve
from signing_agent.workers.hardening import child_environment
from signing_agent.workers.pool import CryptoPool
from tests.support.pki import make_member
from tests.support.procs import core_limit, gone, ignored_signals, private_proc_files

KEYS = {alg.name: ec.generate_private_key(alg.curve()) for alg in ALGORITHMS}
"""One key per algorithm (P-256, P-384, P-521), made once."""

BOUND = 60.0
"""Seconds any wait on the pool may take: generous for a loaded 2-core machine; a lost job fails, never hangs."""


def check_with_cryptography(
    public_key: ec.EllipticCurvePublicKey, alg: SignatureAlgorithm, digest: bytes, raw: bytes
) -> None:
    """Verify a raw ``r||s`` signature with ``cryptography`` alone (not with the agent's conversion)."""
    assert len(raw) == alg.signature_size
    n = alg.field_bytes
    der = encode_dss_signature(int.from_bytes(raw[:n], "big"), int.from_bytes(raw[n:], "big"))
    public_key.verify(der, digest, ec.ECDSA(Prehashed(alg.hash_algorithm())))


def pkcs8(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def spki(key: ec.EllipticCurvePublicKey | rsa.RSAPublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def other_signature(alg: SignatureAlgorithm, digest: bytes) -> bytes:
    """A well-formed signature of ``digest`` by a key that is not ``KEYS[alg.name]``."""
    der = ec.generate_private_key(alg.curve()).sign(digest, ec.ECDSA(Prehashed(alg.hash_algorithm())))
    r, s = decode_dss_signature(der)
    return r.to_bytes(alg.field_bytes, "big") + s.to_bytes(alg.field_bytes, "big")


async def eventually(predicate: Callable[[], bool], what: str) -> None:
    """Poll ``predicate`` until it holds; fail after ``BOUND`` seconds."""
    try:
        async with asyncio.timeout(BOUND):
            while not predicate():  # noqa: ASYNC110 -- the pool's state is plain attributes, with no event to wait on
                await asyncio.sleep(0.05)
    except TimeoutError:
        raise AssertionError(f"timed out waiting for {what}") from None


@pytest.fixture
async def pool() -> AsyncIterator[CryptoPool]:
    pool = CryptoPool(2)
    await pool.start()
    try:
        yield pool
    finally:
        await pool.aclose()


# -- the pool with healthy workers ---------------------------------------------------------------------------------


@pytest.mark.parametrize("alg", ALGORITHMS, ids=lambda a: a.name)
async def test_sign_and_verify_in_the_workers_round_trip(
    pool: CryptoPool, alg: SignatureAlgorithm, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A signature made in a worker verifies with ``cryptography`` against the key's public key, and the pool's own
    verification (also in a worker) accepts it; nothing ran on the event loop's thread."""

    def not_inline(*_: object) -> None:
        raise AssertionError("a job ran inline although the workers are alive")

    monkeypatch.setattr(pool, "_inline", not_inline)
    key = KEYS[alg.name]
    handle = pool.add_key(key)
    digests = [alg.digest(b"message %d" % i) for i in range(20)]
    async with asyncio.timeout(BOUND):
        signatures = await asyncio.gather(*(pool.sign(handle, alg, d) for d in digests))
        await asyncio.gather(
            *(pool.verify(key.public_key(), alg, d, s) for d, s in zip(digests, signatures, strict=True))
        )
    for digest, signature in zip(digests, signatures, strict=True):
        check_with_cryptography(key.public_key(), alg, digest, signature)
    assert pool.alive == 2


@pytest.mark.parametrize("alg", ALGORITHMS, ids=lambda a: a.name)
async def test_a_wrong_signature_is_refused_with_the_inline_message(pool: CryptoPool, alg: SignatureAlgorithm) -> None:
    public = KEYS[alg.name].public_key()
    digest = alg.digest(b"the message")
    wrong = other_signature(alg, digest)
    with pytest.raises(SigningFailedError) as inline:
        verify_digest(public, alg, digest, wrong)
    async with asyncio.timeout(BOUND):
        with pytest.raises(SigningFailedError) as pooled:
            await pool.verify(public, alg, digest, wrong)
        # Another digest than the one signed: refused the same way.
        handle = pool.add_key(KEYS[alg.name])
        good = await pool.sign(handle, alg, digest)
        with pytest.raises(SigningFailedError) as other_digest:
            await pool.verify(public, alg, alg.digest(b"another message"), good)
    assert type(pooled.value) is SigningFailedError
    assert (pooled.value.message, pooled.value.hint) == (inline.value.message, inline.value.hint)
    assert other_digest.value.message == inline.value.message
    assert pool.alive == 2  # a refusal is an answer, not a broken worker


P256_DIGEST = ES256.digest(b"m")
P256_SIGNATURE = other_signature(ES256, P256_DIGEST)


@pytest.mark.parametrize(
    ("public", "signature"),
    [
        pytest.param(KEYS["ES384"].public_key(), P256_SIGNATURE, id="a-P-384-key-for-ES256"),
        pytest.param(KEYS["ES256"].public_key(), P256_SIGNATURE[:-1], id="one-byte-short"),
        pytest.param(KEYS["ES256"].public_key(), P256_SIGNATURE + b"\0", id="one-byte-long"),
        pytest.param(KEYS["ES256"].public_key(), b"", id="empty"),
        pytest.param(KEYS["ES256"].public_key(), ES384.digest(b"m") * 2, id="an-ES384-length"),
    ],
)
async def test_a_wrong_curve_or_signature_length_is_refused_with_the_inline_message(
    pool: CryptoPool, public: ec.EllipticCurvePublicKey, signature: bytes
) -> None:
    with pytest.raises(SigningFailedError) as inline:
        verify_digest(public, ES256, P256_DIGEST, signature)
    async with asyncio.timeout(BOUND):
        with pytest.raises(SigningFailedError) as pooled:
            await pool.verify(public, ES256, P256_DIGEST, signature)
    assert (pooled.value.message, pooled.value.hint) == (inline.value.message, inline.value.hint)


async def test_a_dropped_key_no_longer_signs(pool: CryptoPool) -> None:
    handle = pool.add_key(KEYS["ES256"])
    async with asyncio.timeout(BOUND):
        await pool.sign(handle, ES256, ES256.digest(b"before"))
        pool.drop_key(handle)
        with pytest.raises(BackendError, match="closed"):
            await pool.sign(handle, ES256, ES256.digest(b"after"))
        with pytest.raises(BackendError, match="closed"):
            await pool.sign(12345, ES256, ES256.digest(b"never added"))


async def test_a_bad_job_is_an_error_answer_and_the_worker_lives_on(pool: CryptoPool) -> None:
    before = pool.pids
    handle = pool.add_key(KEYS["ES256"])
    async with asyncio.timeout(BOUND):
        with pytest.raises(BackendError, match="could not do a 'sign' job"):
            await pool.sign(handle, ES256, b"not a 32-byte digest")
        await pool.sign(handle, ES256, ES256.digest(b"still signs"))
    assert pool.pids == before


async def test_workers_ignore_the_signals_of_a_service_stop(pool: CryptoPool) -> None:
    """``systemctl stop`` signals every process of the unit: the workers must outlive it, so the daemon can drain."""
    handle = pool.add_key(KEYS["ES256"])
    async with asyncio.timeout(BOUND):  # two concurrent jobs: one for each worker, so both run their main loop
        await asyncio.gather(*(pool.sign(handle, ES256, ES256.digest(b"%d" % i)) for i in range(2)))
    before = pool.pids
    for pid in before:
        assert {signal.SIGHUP, signal.SIGINT, signal.SIGTERM} <= ignored_signals(pid)
        for signum in (signal.SIGHUP, signal.SIGINT, signal.SIGTERM):
            os.kill(pid, signum)
    async with asyncio.timeout(BOUND):
        await asyncio.gather(*(pool.sign(handle, ES256, ES256.digest(b"%d" % i)) for i in range(20)))
    assert pool.pids == before
    assert not any(gone(pid) for pid in before)


async def test_a_worker_that_holds_keys_can_leave_no_core_dump(pool: CryptoPool) -> None:
    """Each worker turns core dumps off itself (``hardening.harden_process``) before it reads its pipe: a core file
    of a worker would hold the file keys it was handed. Both limits, so the worker cannot raise its soft one again;
    a limit inherited from this process would not do (its hard limit is not 0, as the check below makes sure)."""
    assert core_limit(os.getpid())[1] != "0"
    handle = pool.add_key(KEYS["ES256"])
    async with asyncio.timeout(BOUND):  # one job each: both workers have read their pipe, so both are hardened
        await asyncio.gather(*(pool.sign(handle, ES256, ES256.digest(b"%d" % i)) for i in range(2)))
    assert pool.alive == 2
    for pid in pool.pids:
        assert core_limit(pid) == ("0", "0")


async def test_a_file_key_signs_in_the_pool_and_drops_its_key_there_on_close(
    pool: CryptoPool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``FileSigningKey(pool=...)`` signs with the pool (its ``KeyInfo`` says each signature is verified already), and
    its close takes the key out of the pool."""
    member = make_member("m0", "secp384r1")
    key_path, _ = member.write(tmp_path)
    asked: list[str] = []
    sign = pool.sign

    async def counted(handle: int, alg: SignatureAlgorithm, digest: bytes) -> bytes:
        asked.append(alg.name)
        return await sign(handle, alg, digest)

    monkeypatch.setattr(pool, "sign", counted)
    key = FileSigningKey(key_path, name="identities.m0.signing_key", pool=pool)
    assert (await key.describe()).verifies
    digest = ES384.digest(b"m")
    async with asyncio.timeout(BOUND):
        signature = await key.sign_digest(ES384, digest)
    check_with_cryptography(member.key.public_key(), ES384, digest, signature)
    assert asked == ["ES384"]
    await key.aclose()
    async with asyncio.timeout(BOUND):
        with pytest.raises(BackendError, match="closed"):
            await sign(1, ES384, digest)  # the pool's first handle: the key's


# -- dead workers -----------------------------------------------------------------------------------------------


async def test_a_worker_killed_with_jobs_in_flight_loses_none_and_is_replaced(
    pool: CryptoPool, caplog: pytest.LogCaptureFixture
) -> None:
    key = KEYS["ES256"]
    handle = pool.add_key(key)
    async with asyncio.timeout(BOUND):  # both workers up and holding the key
        await asyncio.gather(*(pool.sign(handle, ES256, ES256.digest(b"warm %d" % i)) for i in range(2)))
    before = pool.pids
    victim = before[0]
    digests = [ES256.digest(b"job %d" % i) for i in range(200)]
    jobs = [asyncio.ensure_future(pool.sign(handle, ES256, d)) for d in digests]
    for _ in range(3):  # the jobs are submitted, then sent: about half of them to the victim
        await asyncio.sleep(0)
    os.kill(victim, signal.SIGKILL)
    async with asyncio.timeout(BOUND):
        signatures = await asyncio.gather(*jobs)
    for digest, signature in zip(digests, signatures, strict=True):
        check_with_cryptography(key.public_key(), ES256, digest, signature)
    await eventually(lambda: pool.alive == pool.size and victim not in pool.pids, "a replacement worker")
    assert set(pool.pids) != set(before)
    assert f"(pid {victim}) exited; starting another" in caplog.text
    async with asyncio.timeout(BOUND):  # the replacement got the key
        await asyncio.gather(*(pool.sign(handle, ES256, d) for d in digests[:20]))


async def test_a_worker_that_holds_jobs_and_answers_none_is_replaced(caplog: pytest.LogCaptureFixture) -> None:
    """A stopped (or stuck) worker is taken for dead after ``stalled_after``: its jobs are done elsewhere."""
    pool = CryptoPool(2, stalled_after=1.0)
    await pool.start()
    try:
        key = KEYS["ES256"]
        handle = pool.add_key(key)
        async with asyncio.timeout(BOUND):
            await asyncio.gather(*(pool.sign(handle, ES256, ES256.digest(b"warm %d" % i)) for i in range(2)))
        victim = pool.pids[0]
        os.kill(victim, signal.SIGSTOP)
        digests = [ES256.digest(b"job %d" % i) for i in range(40)]
        async with asyncio.timeout(BOUND):  # about half wait in the stopped worker's pipe until it is replaced
            signatures = await asyncio.gather(*(pool.sign(handle, ES256, d) for d in digests))
        for digest, signature in zip(digests, signatures, strict=True):
            check_with_cryptography(key.public_key(), ES256, digest, signature)
        assert f"(pid {victim}) answered nothing for 1 s; starting another" in caplog.text
        await eventually(lambda: pool.alive == pool.size and victim not in pool.pids, "a replacement worker")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(victim, signal.SIGCONT)
        await pool.aclose()


async def test_a_job_that_fails_inline_is_that_jobs_error() -> None:
    pool = CryptoPool(1, command=(sys.executable, "-c", "pass"))
    await pool.start()
    try:
        async with asyncio.timeout(BOUND):
            with pytest.raises(BackendError, match=r"could not do a 'verify' job \(ValueError\)"):
                await pool.verify(KEYS["ES256"].public_key(), ES256, b"short", bytes(64))
    finally:
        await pool.aclose()


async def test_with_no_worker_alive_the_jobs_run_inline(caplog: pytest.LogCaptureFixture) -> None:
    """Workers that exit at once: every job still completes, on the event loop's thread, as before workers."""
    pool = CryptoPool(1, command=(sys.executable, "-c", "pass"))
    await pool.start()
    try:
        for alg in ALGORITHMS:
            key = KEYS[alg.name]
            handle = pool.add_key(key)
            digest = alg.digest(b"inline")
            async with asyncio.timeout(BOUND):
                signature = await pool.sign(handle, alg, digest)
                await pool.verify(key.public_key(), alg, digest, signature)
                with pytest.raises(SigningFailedError, match="does not verify"):
                    await pool.verify(key.public_key(), alg, digest, other_signature(alg, digest))
            check_with_cryptography(key.public_key(), alg, digest, signature)
    finally:
        await pool.aclose()
    assert "exited; starting another" in caplog.text


# A worker that answers frames holding only key registrations well, and any frame with a signing or verification
# job with argv[1]'s kind of nonsense.
HOSTILE_WORKER = r"""
import sys, cbor2
kind = sys.argv[1]
stdin, stdout = sys.stdin.buffer, sys.stdout.buffer

def frame(items):
    body = cbor2.dumps(items)
    return len(body).to_bytes(4, "big") + body

while header := stdin.read(4):
    jobs = cbor2.loads(stdin.read(int.from_bytes(header, "big")))
    if not any(job[1] in ("sign", "verify") for job in jobs):
        stdout.write(frame([[job[0], True, True] for job in jobs]))
    elif kind == "truncated-cbor":
        stdout.write(b"\0\0\0\2\x82\x01")
    elif kind == "not-a-list":
        stdout.write(frame({"jobs": "done"}))
    elif kind == "over-the-bound":
        stdout.write((4 * 1024 * 1024 + 1).to_bytes(4, "big"))
    elif kind == "cut-short":
        stdout.write(b"\0\0\0\x64" + b"\0" * 10)
        stdout.flush()
        sys.exit(0)
    elif kind == "no-such-job":
        stdout.write(frame([[10**9, True, b"\0" * 64] for job in jobs]))
    elif kind == "not-a-reply":
        stdout.write(frame([[job[0], True] for job in jobs]))
    elif kind == "foreign-error":
        stdout.write(frame([[job[0], False, ["TooManyRequests", "slow down", None]] for job in jobs]))
    stdout.flush()
"""


async def hostile_pool(kind: str) -> CryptoPool:
    pool = CryptoPool(2, command=(sys.executable, "-c", HOSTILE_WORKER, kind))
    await pool.start()
    return pool


@pytest.mark.parametrize(
    "kind", ["truncated-cbor", "not-a-list", "over-the-bound", "cut-short", "no-such-job", "not-a-reply"]
)
@pytest.mark.parametrize("op", ["sign", "verify"])
async def test_a_worker_answering_nonsense_is_dead_and_a_job_ends_at_most_two(
    kind: str, op: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Each worker answers the job with nonsense: the pool takes it for dead, sends the job once more (to the other
    worker, which does the same), then fails it. Nothing hangs, and no answer is taken from a broken worker."""
    caplog.set_level(logging.WARNING, "signing_agent.workers.pool")
    pool = await hostile_pool(kind)
    try:
        key = KEYS["ES256"]
        handle = pool.add_key(key)
        digest = ES256.digest(b"m")
        job = (
            pool.sign(handle, ES256, digest)
            if op == "sign"
            else pool.verify(key.public_key(), ES256, digest, other_signature(ES256, digest))
        )
        async with asyncio.timeout(BOUND):
            with pytest.raises(BackendError, match=f"a {op} job ended two crypto workers"):
                await job
    finally:
        await pool.aclose()
    assert caplog.text.count("starting another") == 2, caplog.text


async def test_an_error_a_worker_cannot_have_is_a_backend_error() -> None:
    """A worker's error answer names an error class: only a key store's (``BackendError``) is taken as it is. A
    worker's job cannot be throttled, denied by policy or be a configuration error; nor may its answer break the
    pool's reader (``TooManyRequestsError`` needs a ``retry_after``)."""
    pool = await hostile_pool("foreign-error")
    try:
        handle = pool.add_key(KEYS["ES256"])
        async with asyncio.timeout(BOUND):
            with pytest.raises(BackendError, match="slow down") as caught:
                await pool.sign(handle, ES256, ES256.digest(b"m"))
    finally:
        await pool.aclose()
    assert type(caught.value) is BackendError


async def test_aclose_ends_every_worker_and_fails_what_is_left() -> None:
    pool = CryptoPool(2)
    await pool.start()
    key = KEYS["ES384"]
    handle = pool.add_key(key)
    async with asyncio.timeout(BOUND):
        await asyncio.gather(*(pool.sign(handle, ES384, ES384.digest(b"%d" % i)) for i in range(2)))
    pids = pool.pids
    assert len(pids) == 2
    digests = [ES384.digest(b"late %d" % i) for i in range(50)]
    jobs = [asyncio.ensure_future(pool.sign(handle, ES384, d)) for d in digests]
    await asyncio.sleep(0)
    async with asyncio.timeout(BOUND):
        await pool.aclose()
        results = await asyncio.gather(*jobs, return_exceptions=True)
    for digest, result in zip(digests, results, strict=True):
        if isinstance(result, bytes):
            check_with_cryptography(key.public_key(), ES384, digest, result)
        else:
            assert isinstance(result, BackendError), result
            assert "closed" in result.message
    assert all(gone(pid) for pid in pids)
    assert pool.alive == 0


# -- frames -------------------------------------------------------------------------------------------------------


def test_frames_round_trip_within_their_bound() -> None:
    items: list[tuple[object, ...]] = [(1, "sign", 7, "ES256", b"\x01" * 32), (2, "drop", 7)]
    data = frames.encode(items)
    assert frames.body_length(data[: frames.HEADER]) == len(data) - frames.HEADER
    assert frames.decode(data[frames.HEADER :]) == items
    assert frames.body_length(frames.MAX_FRAME.to_bytes(frames.HEADER, "big")) == frames.MAX_FRAME


def test_a_frame_over_the_bound_is_refused_at_both_ends() -> None:
    with pytest.raises(ValueError, match="over"):
        frames.encode([(1, "key", 1, b"\0" * frames.MAX_FRAME)])
    with pytest.raises(ValueError, match="over"):
        frames.body_length((frames.MAX_FRAME + 1).to_bytes(frames.HEADER, "big"))
    with pytest.raises(ValueError, match="over"):
        frames.body_length(b"\xff\xff\xff\xff")


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(cbor2.dumps({"a": 1}), id="a-map"),
        pytest.param(cbor2.dumps([1, 2]), id="not-lists"),
        pytest.param(cbor2.dumps([[]]), id="an-empty-job"),
        pytest.param(b"\x82\x01", id="truncated"),
        pytest.param(b"", id="empty"),
        pytest.param(b"\x81" * 1000 + b"\x80", id="too-deep"),
        pytest.param(b"\xc4\x82\x01\x61a", id="a-decimal-that-is-not"),
        pytest.param(b"\x5f\x01\xff", id="a-broken-byte-string"),
    ],
)
def test_a_frame_that_is_not_a_list_of_jobs_is_a_value_error(body: bytes) -> None:
    """Both ends take a ValueError for a broken peer; any other exception would escape them (the pool's reader
    would die with its worker's jobs unanswered)."""
    with pytest.raises(ValueError, match="crypto worker frame"):
        frames.decode(body)


# -- a worker's own handling of jobs (in this process) -----------------------------------------------------------


def test_a_worker_signs_verifies_and_forgets_keys() -> None:
    worker = Worker()
    key = KEYS["ES512"]
    digest = ES512.digest(b"x")
    assert worker.run((1, "key", 9, pkcs8(key))) == (1, True, True)
    job_id, ok, signature = worker.run((2, "sign", 9, "ES512", digest))
    assert (job_id, ok) == (2, True)
    assert isinstance(signature, bytes)
    check_with_cryptography(key.public_key(), ES512, digest, signature)
    assert worker.run((3, "verify", spki(key.public_key()), "ES512", digest, signature)) == (3, True, True)
    assert worker.run((4, "drop", 9)) == (4, True, True)
    assert worker.run((5, "sign", 9, "ES512", digest))[1] is False


@pytest.mark.parametrize(
    "job",
    [
        pytest.param((1, "frobnicate"), id="unknown-op"),
        pytest.param((1, b"sign", 9, "ES256", b"\0" * 32), id="op-not-a-string"),
        pytest.param((1, "sign", "9", "ES256", b"\0" * 32), id="handle-not-an-int"),
        pytest.param((1, "sign", 9, "ES256", "\0" * 32), id="digest-not-bytes"),
        pytest.param((1, "sign", 9, "ES256"), id="missing-argument"),
        pytest.param((1, "sign", 404, "ES256", b"\0" * 32), id="no-such-key"),
        pytest.param((1, "sign", 9, "ES999", b"\0" * 32), id="unknown-algorithm"),
        pytest.param((1, "sign", 9, "ES256", b"\0" * 31), id="digest-too-short"),
        pytest.param((1, "key", 10, b"not DER"), id="key-not-der"),
        pytest.param((1, "key", 10, "pkcs8"), id="key-not-bytes"),
        pytest.param((1, "verify", b"not DER", "ES256", b"\0" * 32, b"\0" * 64), id="public-key-not-der"),
        pytest.param((1, "verify", "spki", "ES256", b"\0" * 32, b"\0" * 64), id="public-key-not-bytes"),
        pytest.param((1, "drop"), id="drop-without-handle"),
    ],
)
def test_a_bad_job_is_a_backend_error_answer_not_an_exception(job: tuple[object, ...]) -> None:
    worker = Worker()
    assert worker.run((0, "key", 9, pkcs8(KEYS["ES256"])))[1] is True
    job_id, ok, error = worker.run(job)
    assert (job_id, ok) == (1, False)
    assert isinstance(error, list)
    code, message, hint = error
    assert code == "BackendError"
    assert message.startswith("a crypto worker could not do a ")
    assert hint is None


def test_keys_that_are_not_ec_are_refused() -> None:
    worker = Worker()
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    assert worker.run((1, "key", 1, pkcs8(rsa_key)))[1:] == (
        False,
        ["BackendError", "a crypto worker could not do a 'key' job (TypeError)", None],
    )
    assert worker.run((2, "verify", spki(rsa_key.public_key()), "ES256", b"\0" * 32, b"\0" * 64))[1] is False
    assert worker.keys == {}


def test_a_signature_that_does_not_verify_is_a_signing_failed_answer() -> None:
    """The worker checks each signature against the key's public key before it answers: a key that signs with
    another key than the one it was described with (here, a swapped public key) is caught in the worker."""
    worker = Worker()
    key, other = KEYS["ES256"], ec.generate_private_key(ec.SECP256R1())
    assert worker.run((1, "key", 7, pkcs8(key))) == (1, True, True)
    worker.keys[7] = (key, other.public_key())
    digest = ES256.digest(b"x")
    job_id, ok, error = worker.run((2, "sign", 7, "ES256", digest))
    with pytest.raises(SigningFailedError) as inline:
        verify_digest(other.public_key(), ES256, digest, other_signature(ES256, digest))
    assert (job_id, ok) == (2, False)
    assert error == ["SigningFailed", inline.value.message, inline.value.hint]


def test_serve_answers_each_frame_in_order_until_the_pipe_closes() -> None:
    key = KEYS["ES256"]
    digest = ES256.digest(b"served")
    requests = frames.encode([(1, "key", 1, pkcs8(key)), (2, "sign", 1, "ES256", digest)]) + frames.encode(
        [(3, "drop", 1), (4, "sign", 1, "ES256", digest)]
    )
    out = io.BytesIO()
    serve(io.BytesIO(requests), out)
    data = out.getvalue()
    replies = []
    while data:
        length = frames.body_length(data[: frames.HEADER])
        replies.append(frames.decode(data[frames.HEADER : frames.HEADER + length]))
        data = data[frames.HEADER + length :]
    assert [[item[:2] for item in reply] for reply in replies] == [[(1, True), (2, True)], [(3, True), (4, False)]]
    signature = replies[0][1][2]
    assert isinstance(signature, bytes)
    check_with_cryptography(key.public_key(), ES256, digest, signature)


@pytest.mark.parametrize("cut", [1, 3, 4, 5, -1])
def test_serve_refuses_a_truncated_frame(cut: int) -> None:
    request = frames.encode([(1, "drop", 1)])
    with pytest.raises(ValueError, match="truncated"):
        serve(io.BytesIO(request[:cut]), io.BytesIO())


# -- the environment a helper process starts with ----------------------------------------------------------------------


def test_a_helper_process_gets_only_what_python_needs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTHONPATH", "/somewhere")
    monkeypatch.setenv("LC_ALL", "C.UTF-8")
    monkeypatch.setenv("COVERAGE_PROCESS_START", "/x/pyproject.toml")
    monkeypatch.setenv("MEMBER0_PIN", "1234")  # a PIN a reloaded configuration would name: not taken out at start
    monkeypatch.setenv("AZURE_CLIENT_SECRET", "s3cret")
    env = child_environment()
    assert {"PYTHONPATH", "LC_ALL", "COVERAGE_PROCESS_START"} <= env.keys()
    assert "MEMBER0_PIN" not in env
    assert "AZURE_CLIENT_SECRET" not in env


async def test_a_worker_does_not_inherit_the_daemons_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEMBER0_PIN", "1234")
    pool = CryptoPool(1)
    await pool.start()
    try:
        [pid] = pool.pids
        private_proc_files(pid)
        environ = Path(f"/proc/{pid}/environ").read_bytes()
        assert b"MEMBER0_PIN" not in environ
        assert b"1234" not in environ
    finally:
        await pool.aclose()
