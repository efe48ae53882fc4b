"""An Azure Key Vault double that the real Azure SDK accepts, plus an App Service managed-identity token
endpoint.

Not a mock: an aiohttp HTTPS server (trustme CA, certificate for 127.0.0.1) at the root path of its port, with
Key Vault's challenge-based auth exactly as ``azure-keyvault-keys``' ``AsyncChallengeAuthPolicy`` expects it,
real crypto (``cryptography``) behind ``GET``/``create``/``import`` and
``sign``/``verify``/``encrypt``/``decrypt``/``wrapkey``/``unwrapkey``, Key Vault's error JSON, several
versions per key (rotation, AutoRenew drift), a request log, an operation counter, in-flight accounting, and
scriptable faults (429 with or without ``Retry-After``, 5xx, delays).

Tokens come from the second server, a managed-identity endpoint in the App Service style (``GET
$IDENTITY_ENDPOINT?api-version=2019-08-01&resource=...`` with header ``X-IDENTITY-HEADER: $IDENTITY_HEADER``),
which is what azure-identity's ``ManagedIdentityCredential`` (and so ``DefaultAzureCredential``) uses when
``IDENTITY_ENDPOINT`` and ``IDENTITY_HEADER`` are set. The vault accepts only tokens that endpoint issued, for
the resource the vault's own challenge names. So the agent under test needs no test-only credential code.

Challenge trick: the vault answers 401 with ``resource="https://<Host minus its first label>"``, e.g.
``https://0.0.1:PORT`` for ``127.0.0.1:PORT``. The SDK checks that the scope's host is a dot-suffix of the
request's host, and ``127.0.0.1:PORT`` ends with ``.0.0.1:PORT``, so no ``verify_challenge_resource=False`` is
needed.

In-process use: ``async with running_keyvault(tmp_path) as kv: ...`` and ``managed_identity_env(monkeypatch,
kv)``. Standalone (for a daemon running as a subprocess)::

    python -m tests.doubles.keyvault --port 0 --cert-out /tmp/kv-ca.pem --key m0=P-384 --key m0-enc=RSA-2048

prints one JSON line (vault_url, ca_bundle, env, keys, authority_host) and serves until SIGINT/SIGTERM.
Unauthenticated control routes for such tests: ``GET /_double/requests`` (also every ``create`` body), ``POST
/_double/faults`` (a JSON ``Fault``), ``PUT /_double/keys/{name}`` (PEM private key body: import as a new version),
``POST /_double/keys/{name}/rotate``, ``POST /_double/keys/{name}/delete`` (soft delete).

Key creation (``POST /keys/{name}/create``) checks the body as the service does, including what the vault's tier
offers (``--tier``/``tier=``: a Standard vault has no ``EC-HSM``/``RSA-HSM``, a Managed HSM only those).

The other credentials (client secret, client certificate, workload identity) get their tokens from a third server,
the Entra ID token endpoint double (``tests/doubles/entra_id.py``) at ``authority_host``: point
``AZURE_AUTHORITY_HOST`` at it and trust the CA (``SSL_CERT_FILE`` for azure-identity's aiohttp transport).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import contextlib
import dataclasses
import json
import secrets
import signal
import ssl
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pytest
import trustme
from aiohttp import web
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import (
    Prehashed,
    decode_dss_signature,
    encode_dss_signature,
)

from tests.doubles.entra_id import EntraIdDouble

TENANT_ID = "72f988bf-86f1-41af-91ab-2d7cd011db47"

_CURVES: dict[str, tuple[ec.EllipticCurve, int]] = {
    "P-256": (ec.SECP256R1(), 32),
    "P-384": (ec.SECP384R1(), 48),
    "P-521": (ec.SECP521R1(), 66),
}
_CURVE_BY_OID_NAME = {"secp256r1": "P-256", "secp384r1": "P-384", "secp521r1": "P-521"}
_EC_ALGS: dict[str, tuple[str, hashes.HashAlgorithm]] = {
    "ES256": ("P-256", hashes.SHA256()),
    "ES384": ("P-384", hashes.SHA384()),
    "ES512": ("P-521", hashes.SHA512()),
}
_RSA_HASHES: dict[str, hashes.HashAlgorithm] = {
    "256": hashes.SHA256(),
    "384": hashes.SHA384(),
    "512": hashes.SHA512(),
}
_KEY_TYPES = frozenset({"EC", "EC-HSM", "RSA", "RSA-HSM"})
"""What the double creates (``oct``/``oct-HSM`` exist only on Managed HSM, and the agent has no use for them)."""
_EC_KEY_OPS = frozenset({"sign", "verify"})
_RSA_KEY_OPS = frozenset({"encrypt", "decrypt", "sign", "verify", "wrapKey", "unwrapKey"})
_RSA_SIZES = (2048, 3072, 4096)
VaultTier = Literal["standard", "premium", "managedhsm"]
"""Standard vaults make software keys only, Premium both, Managed HSM only ``-HSM`` ones."""
_OPS = {
    "sign": "sign",
    "verify": "verify",
    "encrypt": "encrypt",
    "decrypt": "decrypt",
    "wrapkey": "wrapKey",
    "unwrapkey": "unwrapKey",
}

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


def b64url(data: bytes) -> str:
    """Base64url without padding, as Key Vault writes every binary field."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _int_bytes(value: int, size: int | None = None) -> bytes:
    return value.to_bytes(size or max(1, (value.bit_length() + 7) // 8), "big")


class VaultError(Exception):
    """Answered as Key Vault's error JSON."""

    def __init__(self, status: int, code: str, message: str, *, inner: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.inner = inner


@dataclass
class KeyVersion:
    name: str
    version: str
    private_key: PrivateKey
    key_ops: list[str]
    hsm: bool = False
    enabled: bool = True
    created: int = field(default_factory=lambda: int(time.time()))

    def jwk(self, base_url: str) -> dict[str, Any]:
        kid = f"{base_url}/keys/{self.name}/{self.version}"
        pub = self.private_key.public_key()
        if isinstance(pub, ec.EllipticCurvePublicKey):
            crv = _CURVE_BY_OID_NAME[pub.curve.name]
            size = _CURVES[crv][1]
            nums = pub.public_numbers()
            return {
                "kid": kid,
                "kty": "EC-HSM" if self.hsm else "EC",
                "key_ops": self.key_ops,
                "crv": crv,
                "x": b64url(_int_bytes(nums.x, size)),
                "y": b64url(_int_bytes(nums.y, size)),
            }
        rnums = pub.public_numbers()
        return {
            "kid": kid,
            "kty": "RSA-HSM" if self.hsm else "RSA",
            "key_ops": self.key_ops,
            "n": b64url(_int_bytes(rnums.n)),
            "e": b64url(_int_bytes(rnums.e)),
        }

    def bundle(self, base_url: str) -> dict[str, Any]:
        return {
            "key": self.jwk(base_url),
            "attributes": {
                "enabled": self.enabled,
                "created": self.created,
                "updated": self.created,
                "exportable": False,
                "recoveryLevel": "Recoverable+Purgeable",
                "recoverableDays": 90,
            },
            "tags": {},
        }


@dataclass
class Fault:
    """One scripted misbehaviour for the next ``count`` authenticated requests whose op is in ``ops`` (all if
    empty)."""

    status: int | None = 429
    """The status to answer instead of doing the work; None to only delay and then do the work."""
    retry_after: str | None = None
    """The ``Retry-After`` header value (seconds), or None for no header."""
    delay: float = 0.0
    """Seconds to wait before answering (a timeout when longer than the client's)."""
    count: int = 1
    ops: frozenset[str] = frozenset()
    code: str = "Throttled"


@dataclass(frozen=True)
class RequestRecord:
    method: str
    path: str
    op: str
    """``get``, ``create``, ``import``, ``sign``, ``verify``, ``encrypt``, ``decrypt``, ``wrapkey``,
    ``unwrapkey``."""
    status: int
    authorized: bool
    started: float
    ended: float
    body_size: int


def _new_version() -> str:
    return secrets.token_hex(16)


class ManagedIdentityEndpoint:
    """An App Service style managed-identity token endpoint (api-version 2019-08-01).

    ``fail_with = (status, body)`` makes every token request fail; ``tokens`` maps issued tokens to their
    resource.
    """

    path = "/msi/token"

    def __init__(self, *, header_secret: str | None = None, lifetime: int = 3600) -> None:
        self.header_secret = header_secret or secrets.token_urlsafe(16)
        self.lifetime = lifetime
        self.tokens: dict[str, str] = {}
        self.requests: list[dict[str, str]] = []
        self.fail_with: tuple[int, dict[str, Any]] | None = None
        self.app = web.Application()
        self.app.router.add_get(self.path, self._token)

    def issue(self, resource: str) -> str:
        """A token for ``resource``, also usable directly (e.g. by a fake credential in a benchmark)."""
        token = secrets.token_urlsafe(32)
        self.tokens[token] = resource
        return token

    async def _token(self, request: web.Request) -> web.Response:
        self.requests.append(dict(request.query))
        if request.headers.get("X-IDENTITY-HEADER") != self.header_secret:
            return web.json_response(
                {"error": "unauthorized", "error_description": "X-IDENTITY-HEADER is missing or wrong"},
                status=401,
            )
        if self.fail_with is not None:
            status, body = self.fail_with
            return web.json_response(body, status=status)
        if request.query.get("api-version") != "2019-08-01":
            return web.json_response({"error": "invalid_request", "error_description": "api-version"}, status=400)
        resource = request.query.get("resource", "")
        if not resource:
            return web.json_response({"error": "invalid_request", "error_description": "resource"}, status=400)
        token = self.issue(resource)
        return web.json_response(
            {
                "access_token": token,
                "expires_on": str(int(time.time()) + self.lifetime),
                "resource": resource,
                "token_type": "Bearer",
                "client_id": request.query.get("client_id", "00000000-0000-0000-0000-00000000c11e"),
            }
        )


class KeyVaultDouble:
    """The vault: keys, crypto, challenge auth, the request log and fault injection. ``app`` is the aiohttp
    app."""

    def __init__(
        self, tokens: ManagedIdentityEndpoint, *, tenant_id: str = TENANT_ID, tier: VaultTier = "premium"
    ) -> None:
        self.token_endpoint = tokens
        self.tenant_id = tenant_id
        self.tier = tier
        self.base_url = ""  # set when the server is bound
        self.keys: dict[str, list[KeyVersion]] = {}
        self.deleted: dict[str, list[KeyVersion]] = {}
        """Soft-deleted keys: their names cannot be reused until purged (409 on create)."""
        self.created: list[dict[str, Any]] = []
        """Every ``create`` request body, with the key's name under ``name``."""
        self.downgrade_hsm = False
        """Misbehave: make a software key when asked for an HSM one (a client must notice)."""
        self.jwk_overrides: dict[str, Any] = {}
        """Misbehave: fields that replace the JWK's in every ``GET`` answer (a ``kid`` on another host or version, a
        point off its curve)."""
        self.requests: list[RequestRecord] = []
        self.operations: collections.Counter[str] = collections.Counter()
        """Authenticated requests per op (what Key Vault bills and throttles)."""
        self.faults: list[Fault] = []
        self.latency = 0.0
        """Seconds added to every authenticated operation (for benchmarks: a vault is not on localhost)."""
        self.in_flight = 0
        self.max_in_flight = 0
        self.app = web.Application(middlewares=[self._middleware])
        r = self.app.router
        r.add_get("/_double/requests", self._ctl_requests)
        r.add_post("/_double/faults", self._ctl_faults)
        r.add_put("/_double/keys/{name}", self._ctl_import)
        r.add_post("/_double/keys/{name}/rotate", self._ctl_rotate)
        r.add_post("/_double/keys/{name}/delete", self._ctl_delete)
        r.add_get("/keys/{name}", self._get_key)
        r.add_get("/keys/{name}/{version:[^/]*}", self._get_key)
        r.add_post("/keys/{name}/create", self._create_key)
        r.add_put("/keys/{name}", self._import_key)
        r.add_post("/keys/{name}/{version:[^/]*}/{op}", self._key_op)

    # ----- in-process control -----

    def add_key(
        self,
        name: str,
        key: PrivateKey | str = "P-384",
        *,
        key_ops: list[str] | None = None,
        hsm: bool = False,
        enabled: bool = True,
    ) -> KeyVersion:
        """Add a new version of ``name`` (the latest from now on): a given private key or a fresh ``P-256``/
        ``P-384``/``P-521``/``RSA-2048``/``RSA-3072`` one."""
        if isinstance(key, str):
            if key in _CURVES:
                key = ec.generate_private_key(_CURVES[key][0])
            elif key.startswith("RSA-"):
                key = rsa.generate_private_key(public_exponent=65537, key_size=int(key[4:]))
            else:
                raise ValueError(f"unknown key kind {key!r}")
        if key_ops is None:
            key_ops = (
                ["sign", "verify"]
                if isinstance(key, ec.EllipticCurvePrivateKey)
                else ["encrypt", "decrypt", "wrapKey", "unwrapKey", "sign", "verify"]
            )
        kv = KeyVersion(name, _new_version(), key, list(key_ops), hsm=hsm, enabled=enabled)
        self.keys.setdefault(name, []).append(kv)
        return kv

    def rotate(self, name: str) -> KeyVersion:
        """A new version with fresh key material of the same kind (what a rotation policy does)."""
        old = self.latest(name)
        pk = old.private_key
        kind = _CURVE_BY_OID_NAME[pk.curve.name] if isinstance(pk, ec.EllipticCurvePrivateKey) else f"RSA-{pk.key_size}"
        return self.add_key(name, kind, key_ops=old.key_ops, hsm=old.hsm)

    def latest(self, name: str) -> KeyVersion:
        return self.keys[name][-1]

    def soft_delete(self, name: str) -> None:
        """Delete ``name`` the way a vault with soft delete does: gone for GET, its name still taken."""
        self.deleted[name] = self.keys.pop(name)

    def kid(self, kv: KeyVersion) -> str:
        return f"{self.base_url}/keys/{kv.name}/{kv.version}"

    def inject(self, fault: Fault | None = None, /, **kwargs: Any) -> Fault:
        """Queue a fault (``inject(status=429, retry_after="1", count=2, ops=frozenset({"sign"}))``)."""
        f = fault or Fault(**kwargs)
        self.faults.append(f)
        return f

    def clear_log(self) -> None:
        self.requests.clear()
        self.operations.clear()
        self.max_in_flight = self.in_flight

    def requests_for(self, op: str, *, authorized: bool | None = True) -> list[RequestRecord]:
        return [r for r in self.requests if r.op == op and (authorized is None or r.authorized == authorized)]

    # ----- auth, logging, faults -----

    def _resource(self, request: web.Request) -> str:
        host = request.headers.get("Host", request.host)
        _, _, parent = host.partition(".")
        return f"https://{parent or host}"

    def _challenge(self, request: web.Request) -> str:
        authority = f"https://login.microsoftonline.com/{self.tenant_id}"
        return f'Bearer authorization="{authority}", resource="{self._resource(request)}"'

    def _authorized(self, request: web.Request) -> bool:
        auth = request.headers.get("Authorization", "")
        if not auth.startswith("Bearer "):
            return False
        resource = self.token_endpoint.tokens.get(auth[len("Bearer ") :])
        return resource is not None and resource.rstrip("/") == self._resource(request)

    @staticmethod
    def _op(request: web.Request) -> str:
        parts = request.path.strip("/").split("/")
        if parts[0] == "_double":
            return "control"
        if request.method == "GET":
            return "get"
        if request.method == "PUT":
            return "import"
        return parts[-1].lower() if parts else "?"

    def _take_fault(self, op: str) -> Fault | None:
        for f in self.faults:
            if not f.ops or op in f.ops:
                f.count -= 1
                if f.count <= 0:
                    self.faults.remove(f)
                return f
        return None

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        started = time.monotonic()
        op = self._op(request)
        if op == "control":
            resp: web.StreamResponse = await handler(request)
            return resp
        authorized = self._authorized(request)
        body = await request.read()
        if not authorized:
            # Checked before the body is looked at: the SDK's first request to a vault has no body and no
            # token.
            resp = web.json_response(
                {
                    "error": {
                        "code": "Unauthorized",
                        "message": "AKV10000: Request is missing a Bearer or PoP token.",
                    }
                },
                status=401,
                headers={
                    "WWW-Authenticate": self._challenge(request),
                },
            )
            self._log(request, op, resp.status, False, started, len(body))
            return resp
        self.operations[op] += 1
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.latency:
                await asyncio.sleep(self.latency)
            fault = self._take_fault(op)
            if fault is not None and fault.delay:
                await asyncio.sleep(fault.delay)
            if fault is not None and fault.status is not None:
                headers = {"Retry-After": fault.retry_after} if fault.retry_after is not None else {}
                resp = web.json_response(
                    {"error": {"code": fault.code, "message": f"injected {fault.status}"}},
                    status=fault.status,
                    headers=headers,
                )
            elif request.query.get("api-version") is None:
                resp = _error(VaultError(400, "BadParameter", "The api-version query parameter is required."))
            else:
                try:
                    resp = await handler(request)
                except VaultError as exc:
                    resp = _error(exc)
        finally:
            self.in_flight -= 1
        self._log(request, op, resp.status, True, started, len(body))
        return resp

    def _log(self, request: web.Request, op: str, status: int, authorized: bool, started: float, size: int) -> None:
        self.requests.append(
            RequestRecord(request.method, request.path, op, status, authorized, started, time.monotonic(), size)
        )

    # ----- REST surface -----

    def _find(self, name: str, version: str) -> KeyVersion:
        versions = self.keys.get(name)
        if not versions:
            raise VaultError(404, "KeyNotFound", f"A key with (name/id) {name} was not found in this key vault.")
        if not version:
            return versions[-1]
        for kv in versions:
            if kv.version == version:
                return kv
        raise VaultError(404, "KeyNotFound", f"A key with (name/id) {name}/{version} was not found in this key vault.")

    async def _get_key(self, request: web.Request) -> web.Response:
        kv = self._find(request.match_info["name"], request.match_info.get("version", ""))
        bundle = kv.bundle(self.base_url)
        bundle["key"].update(self.jwk_overrides)
        return web.json_response(bundle)

    async def _create_key(self, request: web.Request) -> web.Response:
        """``POST /keys/{name}/create``: Key Vault's ``KeyCreateParameters`` checked as the service does (the
        kty the vault's tier offers, curve, size, key_ops, ``exportable`` only with a release policy); the
        body is kept in ``created`` for tests."""
        body = await _json(request)
        name = request.match_info["name"]
        self.created.append({"name": name, **body})
        if name in self.deleted:
            raise VaultError(
                409,
                "Conflict",
                f"Key {name} is currently in a deleted but recoverable state, and its name cannot be reused; in "
                "this state, the key can only be recovered or purged.",
            )
        kty = str(body.get("kty", ""))
        hsm = kty.endswith("-HSM")
        if kty not in _KEY_TYPES:
            raise VaultError(400, "BadParameter", f"Invalid kty value: {kty}", inner="KeyTypeNotSupported")
        if hsm and self.tier == "standard":
            # The service's words (azure-sdk-for-net#6551, MicrosoftDocs/azure-docs#63888), as a 403: Az PowerShell
            # reports this refusal as "Forbidden" (MicrosoftDocs/azure-docs#34948), so not as a bad parameter.
            raise VaultError(403, "Forbidden", "Hardware key operation not allowed on standard vault")
        if not hsm and self.tier == "managedhsm":
            raise VaultError(400, "BadParameter", f"Invalid kty value: {kty}", inner="KeyTypeNotSupported")
        if kty.startswith("EC"):
            kind = str(body.get("crv", "P-256"))  # the service's default curve
            if kind not in _CURVES:
                raise VaultError(400, "BadParameter", f"Invalid crv value: {kind}")
            if "key_size" in body:
                raise VaultError(400, "BadParameter", "key_size is not valid for an EC key")
            allowed_ops = _EC_KEY_OPS
        else:
            size = body.get("key_size", 2048)
            if size not in _RSA_SIZES:
                raise VaultError(400, "BadParameter", f"Invalid key size: {size}. Valid sizes: 2048, 3072, 4096")
            kind = f"RSA-{size}"
            allowed_ops = _RSA_KEY_OPS
        key_ops = body.get("key_ops")
        if key_ops is not None and (
            not isinstance(key_ops, list) or not key_ops or any(op not in allowed_ops for op in key_ops)
        ):
            raise VaultError(400, "BadParameter", f"Invalid key_ops for kty {kty}: {key_ops}")
        attributes = body.get("attributes") or {}
        if attributes.get("exportable") is True and not body.get("release_policy"):
            raise VaultError(400, "BadParameter", "An exportable key needs a release policy")
        kv = self.add_key(
            name,
            kind,
            key_ops=list(key_ops) if key_ops is not None else sorted(allowed_ops),
            hsm=hsm and not self.downgrade_hsm,
            enabled=bool(attributes.get("enabled", True)),
        )
        return web.json_response(kv.bundle(self.base_url))

    async def _import_key(self, request: web.Request) -> web.Response:
        body = await _json(request)
        jwk = body.get("key") or {}
        try:
            key = _private_key_from_jwk(jwk)
        except (KeyError, ValueError) as exc:
            raise VaultError(400, "BadParameter", f"invalid JWK: {exc}") from None
        kv = self.add_key(
            request.match_info["name"],
            key,
            key_ops=jwk.get("key_ops"),
            hsm=bool(body.get("Hsm", False)),
            enabled=bool(body.get("attributes", {}).get("enabled", True)),
        )
        return web.json_response(kv.bundle(self.base_url))

    async def _key_op(self, request: web.Request) -> web.Response:
        op = request.match_info["op"].lower()
        if op not in _OPS:
            raise VaultError(400, "BadParameter", f"unknown operation {op!r}")
        kv = self._find(request.match_info["name"], request.match_info["version"])
        if not kv.enabled:
            raise VaultError(403, "Forbidden", f"Operation {_OPS[op]} is not allowed on a disabled key.")
        if _OPS[op] not in kv.key_ops:
            raise VaultError(403, "Forbidden", f"Operation {_OPS[op]} is not permitted on this key.")
        body = await _json(request)
        alg = str(body.get("alg", ""))
        try:
            value = b64url_decode(str(body["value"]))
        except (KeyError, ValueError):
            raise VaultError(400, "BadParameter", "value must be base64url") from None
        kid = self.kid(kv)
        pk = kv.private_key
        if op == "sign":
            return web.json_response({"kid": kid, "value": b64url(_sign(pk, alg, value))})
        if op == "verify":
            digest = b64url_decode(str(body.get("digest", "")))
            return web.json_response({"value": _verify(pk, alg, digest, value)})
        if not isinstance(pk, rsa.RSAPrivateKey):
            raise VaultError(400, "BadParameter", f"{op} needs an RSA key")
        pad = _rsa_padding(alg)
        try:
            encrypting = op in ("encrypt", "wrapkey")
            out = pk.public_key().encrypt(value, pad) if encrypting else pk.decrypt(value, pad)
        except ValueError:
            raise VaultError(400, "BadParameter", "The parameter is incorrect.") from None
        return web.json_response({"kid": kid, "value": b64url(out)})

    # ----- control routes (no auth: test harness only) -----

    async def _ctl_requests(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "requests": [dataclasses.asdict(r) for r in self.requests],
                "operations": dict(self.operations),
                "max_in_flight": self.max_in_flight,
                "created": self.created,
            }
        )

    async def _ctl_faults(self, request: web.Request) -> web.Response:
        body = await request.json()
        body["ops"] = frozenset(body.get("ops", ()))
        self.inject(Fault(**body))
        return web.json_response({"queued": len(self.faults)})

    async def _ctl_import(self, request: web.Request) -> web.Response:
        key = serialization.load_pem_private_key(await request.read(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
            return web.json_response({"error": "EC or RSA only"}, status=400)
        kv = self.add_key(request.match_info["name"], key)
        return web.json_response({"kid": self.kid(kv)})

    async def _ctl_rotate(self, request: web.Request) -> web.Response:
        kv = self.rotate(request.match_info["name"])
        return web.json_response({"kid": self.kid(kv)})

    async def _ctl_delete(self, request: web.Request) -> web.Response:
        self.soft_delete(request.match_info["name"])
        return web.json_response({})


def _error(exc: VaultError) -> web.Response:
    error: dict[str, Any] = {"code": exc.code, "message": exc.message}
    if exc.inner is not None:
        error["innererror"] = {"code": exc.inner}
    return web.json_response({"error": error}, status=exc.status)


async def _json(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except ValueError:
        raise VaultError(400, "BadParameter", "the request body is not JSON") from None
    if not isinstance(body, dict):
        raise VaultError(400, "BadParameter", "the request body must be a JSON object")
    return body


def _rsa_padding(alg: str) -> padding.AsymmetricPadding:
    if alg == "RSA-OAEP-256":
        return padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)
    if alg == "RSA-OAEP":
        return padding.OAEP(mgf=padding.MGF1(hashes.SHA1()), algorithm=hashes.SHA1(), label=None)  # noqa: S303
    if alg == "RSA1_5":
        return padding.PKCS1v15()
    raise VaultError(400, "BadParameter", f"unsupported algorithm {alg!r}")


def _sign_params(
    pk: PrivateKey, alg: str, digest: bytes
) -> tuple[hashes.HashAlgorithm, padding.AsymmetricPadding | None]:
    if isinstance(pk, ec.EllipticCurvePrivateKey):
        if alg not in _EC_ALGS:
            raise VaultError(400, "BadParameter", f"algorithm {alg!r} is not valid for an EC key")
        crv, h = _EC_ALGS[alg]
        if _CURVE_BY_OID_NAME[pk.curve.name] != crv:
            raise VaultError(400, "BadParameter", f"{alg} does not match the key's curve")
        pad = None
    elif alg[:2] in ("RS", "PS") and alg[2:] in _RSA_HASHES:
        h = _RSA_HASHES[alg[2:]]
        pad = padding.PKCS1v15() if alg.startswith("RS") else padding.PSS(padding.MGF1(h), h.digest_size)
    else:
        raise VaultError(400, "BadParameter", f"algorithm {alg!r} is not valid for an RSA key")
    if len(digest) != h.digest_size:
        raise VaultError(400, "BadParameter", f"{alg} needs a {h.digest_size}-byte digest, got {len(digest)}")
    return h, pad


def _sign(pk: PrivateKey, alg: str, digest: bytes) -> bytes:
    h, pad = _sign_params(pk, alg, digest)
    if isinstance(pk, ec.EllipticCurvePrivateKey):
        r, s = decode_dss_signature(pk.sign(digest, ec.ECDSA(Prehashed(h))))
        size = _CURVES[_CURVE_BY_OID_NAME[pk.curve.name]][1]
        return _int_bytes(r, size) + _int_bytes(s, size)
    if pad is None:  # pragma: no cover -- _sign_params returns a padding for RSA
        raise VaultError(500, "InternalError", "no padding")
    return pk.sign(digest, pad, Prehashed(h))


def _verify(pk: PrivateKey, alg: str, digest: bytes, signature: bytes) -> bool:
    h, pad = _sign_params(pk, alg, digest)
    try:
        if isinstance(pk, ec.EllipticCurvePrivateKey):
            n = len(signature) // 2
            der = encode_dss_signature(int.from_bytes(signature[:n], "big"), int.from_bytes(signature[n:], "big"))
            pk.public_key().verify(der, digest, ec.ECDSA(Prehashed(h)))
        elif pad is not None:
            pk.public_key().verify(signature, digest, pad, Prehashed(h))
    except InvalidSignature:
        return False
    return True


def _private_key_from_jwk(jwk: dict[str, Any]) -> PrivateKey:
    def num(name: str) -> int:
        return int.from_bytes(b64url_decode(str(jwk[name])), "big")

    kty = str(jwk.get("kty", ""))
    if kty.startswith("EC"):
        curve = _CURVES[str(jwk["crv"])][0]
        pub = ec.EllipticCurvePublicNumbers(num("x"), num("y"), curve)
        return ec.EllipticCurvePrivateNumbers(num("d"), pub).private_key()
    if kty.startswith("RSA"):
        rpub = rsa.RSAPublicNumbers(num("e"), num("n"))
        return rsa.RSAPrivateNumbers(num("p"), num("q"), num("d"), num("dp"), num("dq"), num("qi"), rpub).private_key()
    raise ValueError(f"unsupported kty {kty!r}")


# ----- running it -----


@dataclass
class RunningKeyVault:
    """A started vault double and its token endpoint."""

    vault: KeyVaultDouble
    token_endpoint: ManagedIdentityEndpoint
    vault_url: str
    """``https://127.0.0.1:PORT`` (no trailing slash), the ``vault_url`` to configure."""
    ca_bundle: Path
    """PEM of the CA that signed the vault's certificate: ``ca_bundle`` in the agent's config."""
    identity_endpoint: str
    ca: trustme.CA
    entra: EntraIdDouble
    """Entra ID's token endpoint (client secret, client certificate, federated token), for the other credentials."""

    @property
    def authority_host(self) -> str:
        """``https://127.0.0.1:PORT``: what ``AZURE_AUTHORITY_HOST`` must say for azure-identity to use ``entra``."""
        return self.entra.base_url

    @property
    def env(self) -> dict[str, str]:
        """The environment that makes azure-identity's ManagedIdentityCredential use our token endpoint."""
        return {
            "IDENTITY_ENDPOINT": self.identity_endpoint,
            "IDENTITY_HEADER": self.token_endpoint.header_secret,
        }

    def kid(self, name: str) -> str:
        return self.vault.kid(self.vault.latest(name))


# Variables that would send azure-identity elsewhere than our token endpoint (or make DefaultAzureCredential
# pick another credential first). ``managed_identity_env`` clears them.
OTHER_AZURE_ENV = (
    "IDENTITY_SERVER_THUMBPRINT",
    "IMDS_ENDPOINT",
    "MSI_ENDPOINT",
    "MSI_SECRET",
    "AZURE_CLIENT_ID",
    "AZURE_TENANT_ID",
    "AZURE_CLIENT_SECRET",
    "AZURE_CLIENT_CERTIFICATE_PATH",
    "AZURE_FEDERATED_TOKEN_FILE",
    "AZURE_USERNAME",
    "AZURE_PASSWORD",
    "AZURE_AUTHORITY_HOST",
    "AZURE_POD_IDENTITY_AUTHORITY_HOST",
    "AZURE_TOKEN_CREDENTIALS",
)


@contextlib.asynccontextmanager
async def running_keyvault(
    folder: Path,
    *,
    port: int = 0,
    token_port: int = 0,
    tenant_id: str = TENANT_ID,
    header_secret: str | None = None,
    tier: VaultTier = "premium",
) -> AsyncIterator[RunningKeyVault]:
    """Start the HTTPS vault, the HTTP managed-identity endpoint and the HTTPS Entra ID token endpoint on
    127.0.0.1; write the CA to ``folder/keyvault-ca.pem``."""
    ca, server_ctx, ca_path = await asyncio.to_thread(_make_pki, folder)
    tokens = ManagedIdentityEndpoint(header_secret=header_secret)
    vault = KeyVaultDouble(tokens, tenant_id=tenant_id, tier=tier)
    entra = EntraIdDouble(tokens.issue, tenant_id=tenant_id)
    runners = [web.AppRunner(app.app, access_log=None) for app in (tokens, vault, entra)]
    token_runner, vault_runner, entra_runner = runners
    for runner in runners:
        await runner.setup()
    try:
        await web.TCPSite(token_runner, "127.0.0.1", token_port).start()
        await web.TCPSite(vault_runner, "127.0.0.1", port, ssl_context=server_ctx).start()
        await web.TCPSite(entra_runner, "127.0.0.1", 0, ssl_context=server_ctx).start()
        vault.base_url = f"https://127.0.0.1:{_bound_port(vault_runner)}"
        entra.base_url = f"https://127.0.0.1:{_bound_port(entra_runner)}"
        yield RunningKeyVault(
            vault=vault,
            token_endpoint=tokens,
            vault_url=vault.base_url,
            ca_bundle=ca_path,
            identity_endpoint=f"http://127.0.0.1:{_bound_port(token_runner)}{tokens.path}",
            ca=ca,
            entra=entra,
        )
    finally:
        for runner in reversed(runners):
            await runner.cleanup()


def _make_pki(folder: Path) -> tuple[trustme.CA, ssl.SSLContext, Path]:
    ca = trustme.CA()
    server_cert = ca.issue_cert("127.0.0.1", "localhost")
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_cert.configure_cert(server_ctx)
    folder.mkdir(parents=True, exist_ok=True)
    ca_path = folder / "keyvault-ca.pem"
    ca.cert_pem.write_to_path(str(ca_path))
    return ca, server_ctx, ca_path


def _bound_port(runner: web.AppRunner) -> int:
    server = runner.addresses[0]
    return int(server[1])


def managed_identity_env(monkeypatch: pytest.MonkeyPatch, kv: RunningKeyVault) -> None:
    """Point azure-identity's managed-identity flow (App Service style) at the double's token endpoint."""
    for name in OTHER_AZURE_ENV:
        monkeypatch.delenv(name, raising=False)
    for name, value in kv.env.items():
        monkeypatch.setenv(name, value)


# ----- standalone -----


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tests.doubles.keyvault", description=__doc__.split("\n")[0])
    p.add_argument("--port", type=int, default=0, help="vault HTTPS port (0: any free port)")
    p.add_argument("--token-port", type=int, default=0, help="managed-identity endpoint HTTP port")
    p.add_argument("--cert-out", type=Path, required=True, help="where to write the CA certificate (PEM)")
    p.add_argument("--identity-header", default=None, help="the IDENTITY_HEADER secret (default: random)")
    p.add_argument("--tier", choices=("standard", "premium", "managedhsm"), default="premium",
                   help="which key types the vault creates (standard: no -HSM; managedhsm: only -HSM)")  # fmt: skip
    p.add_argument(
        "--key",
        action="append",
        default=[],
        metavar="NAME=KIND|PEMFILE",
        help="seed a key: KIND is P-256, P-384, P-521, RSA-2048...; or a PEM private key file to import",
    )
    return p.parse_args(argv)


def _seed_keys(specs: list[str]) -> list[tuple[str, PrivateKey | str]]:
    """``NAME=KIND`` or ``NAME=PEMFILE`` -> what ``add_key`` takes (files are read before the loop starts)."""
    seeds: list[tuple[str, PrivateKey | str]] = []
    for spec in specs:
        name, _, kind = spec.partition("=")
        source: PrivateKey | str = kind or "P-384"
        if kind and Path(kind).is_file():
            loaded = serialization.load_pem_private_key(Path(kind).read_bytes(), password=None)
            if not isinstance(loaded, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
                raise SystemExit(f"{kind}: EC or RSA private keys only")
            source = loaded
        seeds.append((name, source))
    return seeds


async def _serve(args: argparse.Namespace, seeds: list[tuple[str, PrivateKey | str]]) -> None:
    async with running_keyvault(
        args.cert_out.parent,
        port=args.port,
        token_port=args.token_port,
        header_secret=args.identity_header,
        tier=args.tier,
    ) as kv:
        if kv.ca_bundle != args.cert_out:
            await asyncio.to_thread(kv.ca_bundle.replace, args.cert_out)
            kv.ca_bundle = args.cert_out
        keys = {name: kv.vault.kid(kv.vault.add_key(name, source)) for name, source in seeds}
        info = {
            "vault_url": kv.vault_url,
            "ca_bundle": str(kv.ca_bundle),
            "env": kv.env,
            "keys": keys,
            "authority_host": kv.authority_host,
        }
        sys.stdout.write(json.dumps(info) + "\n")  # the harness reads this line
        sys.stdout.flush()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    asyncio.run(_serve(args, _seed_keys(args.key)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
