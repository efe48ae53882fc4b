"""A crypto worker: the child process a ``CryptoPool`` runs (``python -m signing_agent.workers.child``).

It reads frames of jobs on stdin and writes one reply frame per request frame on stdout, in order. Jobs:

- ``[id, "key", handle, pkcs8_der]``: hold a private EC key under ``handle`` (a file key the daemon loaded);
- ``[id, "drop", handle]``: forget it;
- ``[id, "sign", handle, alg, digest]``: the raw ``r||s`` signature of ``digest``, verified against the key's
  public key before it is returned (``KeyInfo.verifies``);
- ``[id, "verify", spki_der, alg, digest, signature]``: ``True``, or the error of ``algorithms.verify_digest``.

A failed job answers ``[id, False, [code, message, hint]]`` and the worker goes on; a frame it cannot read ends it (the
daemon restarts it). It ignores SIGINT, SIGTERM and SIGHUP: the daemon decides when it ends, by closing its stdin,
so a ``systemctl stop`` that signals the whole unit never cuts the signatures the daemon is still draining.
"""

from __future__ import annotations

from signing_agent.workers.hardening import child_main, ignore_stop_signals

if __name__ == "__main__":  # before the imports below (tens of milliseconds): a stop signal then cannot end us
    ignore_stop_signals()

import sys
from typing import BinaryIO

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from signing_agent.algorithms import SignatureAlgorithm, der_to_raw, from_name, verify_digest
from signing_agent.errors import AgentError
from signing_agent.workers import frames

_MAX_PUBLIC_KEYS = 256


class Worker:
    """The state of one worker: the private keys it was handed and the public keys it has parsed."""

    def __init__(self) -> None:
        self.keys: dict[int, tuple[ec.EllipticCurvePrivateKey, ec.EllipticCurvePublicKey]] = {}
        self.public_keys: dict[bytes, ec.EllipticCurvePublicKey] = {}

    def run(self, job: tuple[object, ...]) -> tuple[object, ...]:
        job_id, op, args = job[0], job[1], job[2:]
        try:
            return (job_id, True, self._do(op, args))
        except AgentError as exc:
            return (job_id, False, [exc.code, exc.message, exc.hint])
        except Exception as exc:  # noqa: BLE001 -- any job's failure is an answer: the worker serves on
            return (job_id, False, ["BackendError", f"a crypto worker could not do a {op!r} job ({type(exc).__name__})",
                                    None])  # fmt: skip

    def _do(self, op: object, args: tuple[object, ...]) -> object:
        match op, args:
            case "sign", (int() as handle, str() as alg_name, bytes() as digest):
                alg = _alg(alg_name, digest)
                key, public = self.keys[handle]
                signature = der_to_raw(alg, key.sign(digest, ec.ECDSA(Prehashed(alg.hash_algorithm()))))
                verify_digest(public, alg, digest, signature)
                return signature
            case "verify", (bytes() as spki, str() as alg_name, bytes() as digest, bytes() as signature):
                verify_digest(self._public_key(spki), _alg(alg_name, digest), digest, signature)
                return True
            case "key", (int() as handle, bytes() as pkcs8):
                loaded = serialization.load_der_private_key(pkcs8, password=None)
                if not isinstance(loaded, ec.EllipticCurvePrivateKey):
                    raise TypeError("not an EC key")
                self.hold(handle, loaded)
                return True
            case "drop", (int() as handle,):
                self.keys.pop(handle, None)
                return True
        raise ValueError("unknown job")

    def hold(self, handle: int, key: ec.EllipticCurvePrivateKey) -> None:
        self.keys[handle] = (key, key.public_key())

    def _public_key(self, spki: bytes) -> ec.EllipticCurvePublicKey:
        key = self.public_keys.get(spki)
        if key is None:
            loaded = serialization.load_der_public_key(spki)
            if not isinstance(loaded, ec.EllipticCurvePublicKey):
                raise TypeError("not an EC public key")
            if len(self.public_keys) >= _MAX_PUBLIC_KEYS:
                self.public_keys.clear()
            key = self.public_keys[spki] = loaded
        return key


def _alg(name: str, digest: bytes) -> SignatureAlgorithm:
    alg = from_name(name)
    if len(digest) != alg.digest_size:
        raise ValueError("digest size")
    return alg


def _read_exact(stream: BinaryIO, n: int) -> bytes | None:
    data = stream.read(n)
    if not data:
        return None
    if len(data) != n:
        raise ValueError("a truncated frame")
    return data


def serve(rfile: BinaryIO, wfile: BinaryIO) -> None:
    """Answer frames until the daemon closes the pipe."""
    worker = Worker()
    while True:
        header = _read_exact(rfile, frames.HEADER)
        if header is None:
            return
        body = _read_exact(rfile, frames.body_length(header))
        if body is None:
            raise ValueError("a truncated frame")
        wfile.write(frames.encode([worker.run(job) for job in frames.decode(body)]))
        wfile.flush()


def main() -> int:
    return child_main("crypto worker", lambda: serve(sys.stdin.buffer, sys.stdout.buffer))


if __name__ == "__main__":
    sys.exit(main())
