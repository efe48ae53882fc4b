"""A Microsoft Entra ID token endpoint double: the v2.0 client-credentials grant as azure-identity calls it.

Not a mock: an aiohttp app (served over HTTPS by ``tests.doubles.keyvault.running_keyvault``, on its own port, with
the vault's test CA) that does what Entra ID does with the three ways an app proves who it is, so that the agent's
real ``ClientSecretCredential``, ``CertificateCredential``, ``WorkloadIdentityCredential`` (and
``DefaultAzureCredential`` picking one of them from the environment) can be tested, and can fail:

- ``client_secret``: compared with the secret registered for the app;
- ``client_assertion`` signed by the app's certificate (azure-identity sends PS256 with an ``x5t#S256`` header): the
  thumbprint must name the registered certificate, the signature must verify with its key, ``aud`` must be this
  token endpoint's URL, ``iss`` and ``sub`` the client id, and ``nbf``/``exp`` must hold now;
- ``client_assertion`` that is a federated token (workload identity: the Kubernetes service account token in
  ``AZURE_FEDERATED_TOKEN_FILE``): signed by the registered issuer's key (RS256), with the federated credential's
  ``iss``, ``sub`` and ``aud`` (``api://AzureADTokenExchange``), not expired.

Route (as azure-identity's async ``AadClient`` builds it from ``AZURE_AUTHORITY_HOST``, no discovery):
``POST {authority}/{tenant}/oauth2/v2.0/token`` with a form body ``grant_type=client_credentials``, ``client_id``,
``scope`` (``<resource>/.default``) and the proof. A token it issues is one the vault double accepts for that
resource. Errors are Entra ID's JSON (``error``, ``error_description`` starting with the ``AADSTS`` code,
``error_codes``...). Unauthenticated control routes for subprocess tests: ``PUT /_double/apps/{client_id}`` (a JSON
registration, see ``registration_from_json``) and ``GET /_double/grants``.

The sync credentials (MSAL) first fetch OIDC metadata and do instance discovery; the agent uses only the async
ones, so those routes are not served.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hmac
import json
import secrets
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

JWT_BEARER = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
FEDERATED_AUDIENCE = "api://AzureADTokenExchange"
CLOCK_SKEW = 300


def _b64url_decode(text: str) -> bytes:
    # azure-identity pads its client assertions ('='); standard JWTs do not.
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@dataclass(frozen=True)
class FederatedCredential:
    """A federated identity credential on an app: tokens from ``issuer`` for ``subject`` are accepted."""

    issuer: str
    subject: str
    issuer_key: rsa.RSAPublicKey
    """The issuer's signing key (Entra ID reads it from the issuer's OIDC JWKS)."""
    audience: str = FEDERATED_AUDIENCE


@dataclass
class AppRegistration:
    client_id: str
    secret: str | None = None
    certificate: x509.Certificate | None = None
    federated: FederatedCredential | None = None


@dataclass(frozen=True)
class Grant:
    """One token request as the double judged it."""

    client_id: str
    method: str
    """``client_secret``, ``client_certificate``, ``federated`` or ``none``."""
    ok: bool
    error: str
    """The AADSTS code of a refusal, or ""."""
    scope: str


@dataclass(frozen=True)
class Jwt:
    """A compact JWS, split: what a checker needs to verify it."""

    header: dict[str, Any]
    payload: dict[str, Any]
    signing_input: bytes
    signature: bytes


class TokenError(Exception):
    """Answered as Entra ID's error JSON."""

    def __init__(self, status: int, error: str, code: int, description: str) -> None:
        super().__init__(description)
        self.status, self.error, self.code, self.description = status, error, code, description


@dataclass
class FederatedIssuer:
    """A test OIDC issuer (a Kubernetes cluster's service account issuer): signs federated tokens with RS256."""

    url: str = "https://oidc.cluster.test/issuer"
    key: rsa.RSAPrivateKey = field(
        default_factory=lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048)
    )

    def token(self, subject: str, *, audience: str = FEDERATED_AUDIENCE, lifetime: int = 3600) -> str:
        now = int(time.time())
        header = {"alg": "RS256", "typ": "JWT", "kid": "test"}
        payload = {"iss": self.url, "sub": subject, "aud": [audience], "iat": now, "nbf": now, "exp": now + lifetime}
        signing_input = f"{_b64url(json.dumps(header).encode())}.{_b64url(json.dumps(payload).encode())}"
        signature = self.key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
        return f"{signing_input}.{_b64url(signature)}"

    def credential(self, subject: str) -> FederatedCredential:
        return FederatedCredential(self.url, subject, self.key.public_key())


def registration_from_json(client_id: str, body: dict[str, Any]) -> AppRegistration:
    """``{"secret"?, "certificate_pem"?, "federated"?: {"issuer", "subject", "issuer_key_pem", "audience"?}}``."""
    cert = body.get("certificate_pem")
    federated = None
    if fed := body.get("federated"):
        key = serialization.load_pem_public_key(str(fed["issuer_key_pem"]).encode())
        if not isinstance(key, rsa.RSAPublicKey):
            raise ValueError("the federated issuer key must be RSA")
        federated = FederatedCredential(
            str(fed["issuer"]), str(fed["subject"]), key, str(fed.get("audience", FEDERATED_AUDIENCE))
        )
    return AppRegistration(
        client_id,
        secret=body.get("secret"),
        certificate=x509.load_pem_x509_certificate(str(cert).encode()) if cert else None,
        federated=federated,
    )


class EntraIdDouble:
    """The token endpoint. ``issue_token(resource)`` makes a token the vault double accepts for ``resource``."""

    def __init__(self, issue_token: Callable[[str], str], *, tenant_id: str) -> None:
        self.issue_token = issue_token
        self.tenant_id = tenant_id
        self.base_url = ""  # the authority host, set when the server is bound
        self.apps: dict[str, AppRegistration] = {}
        self.grants: list[Grant] = []
        self.app = web.Application()
        self.app.router.add_post("/{tenant}/oauth2/v2.0/token", self._token)
        self.app.router.add_put("/_double/apps/{client_id}", self._ctl_register)
        self.app.router.add_get("/_double/grants", self._ctl_grants)

    def register(self, app: AppRegistration) -> AppRegistration:
        self.apps[app.client_id] = app
        return app

    def token_url(self, tenant: str | None = None) -> str:
        return f"{self.base_url}/{tenant or self.tenant_id}/oauth2/v2.0/token"

    async def _token(self, request: web.Request) -> web.Response:
        form = await request.post()
        data = {k: v for k, v in form.items() if isinstance(v, str)}
        client_id, scope = data.get("client_id", ""), data.get("scope", "")
        try:
            method = self._judge(request.match_info["tenant"], data)
        except TokenError as exc:
            self.grants.append(Grant(client_id, _method(data), False, f"AADSTS{exc.code}", scope))
            return _error(exc)
        self.grants.append(Grant(client_id, method, True, "", scope))
        return web.json_response(
            {
                "token_type": "Bearer",
                "expires_in": 3599,
                "ext_expires_in": 3599,
                "access_token": self.issue_token(scope.removesuffix("/.default")),
            }
        )

    def _judge(self, tenant: str, data: dict[str, str]) -> str:
        """Check a client-credentials request; the proof's method, or ``TokenError``."""
        client_id, scope = data.get("client_id", ""), data.get("scope", "")
        if tenant != self.tenant_id:
            raise TokenError(400, "invalid_request", 90002, f"Tenant '{tenant}' not found.")
        if data.get("grant_type") != "client_credentials":
            raise TokenError(400, "unsupported_grant_type", 70003, "The app requested an unsupported grant type.")
        app = self.apps.get(client_id)
        if app is None:
            raise TokenError(
                400,
                "unauthorized_client",
                700016,
                f"Application with identifier '{client_id}' was not found in the directory.",
            )
        if len(scope.split()) != 1 or not scope.endswith("/.default"):
            raise TokenError(400, "invalid_scope", 1002012, f"The provided value for scope {scope} is not valid.")
        return self._authenticate(app, data, tenant)

    def _authenticate(self, app: AppRegistration, data: dict[str, str], tenant: str) -> str:
        """The proof the request carries, checked; returns the method's name."""
        if "client_secret" in data:
            if app.secret is None or not hmac.compare_digest(data["client_secret"].encode(), app.secret.encode()):
                raise TokenError(
                    401,
                    "invalid_client",
                    7000215,
                    "Invalid client secret provided. Ensure the secret being sent in the request is the client "
                    f"secret value, not the client secret ID, for a secret added to app '{app.client_id}'.",
                )
            return "client_secret"
        assertion = data.get("client_assertion")
        if assertion is None:
            raise TokenError(
                400,
                "invalid_client",
                7000218,
                "The request body must contain the following parameter: 'client_assertion' or 'client_secret'.",
            )
        if data.get("client_assertion_type") != JWT_BEARER:
            raise TokenError(400, "invalid_request", 90014, "client_assertion_type is missing or wrong.")
        jwt = _parse_jwt(assertion)
        if app.federated is not None and jwt.payload.get("iss") == app.federated.issuer:
            _check_federated(app.federated, jwt)
            return "federated"
        _check_certificate_assertion(app, self.token_url(tenant), jwt)
        return "client_certificate"

    async def _ctl_register(self, request: web.Request) -> web.Response:
        app = self.register(registration_from_json(request.match_info["client_id"], await request.json()))
        return web.json_response({"client_id": app.client_id})

    async def _ctl_grants(self, request: web.Request) -> web.Response:
        return web.json_response({"grants": [dataclasses.asdict(g) for g in self.grants]})


def _method(data: dict[str, str]) -> str:
    if "client_secret" in data:
        return "client_secret"
    return "client_assertion" if "client_assertion" in data else "none"


def _error(exc: TokenError) -> web.Response:
    trace, correlation = str(uuid.uuid4()), str(uuid.uuid4())
    stamp = time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime())
    return web.json_response(
        {
            "error": exc.error,
            "error_description": f"AADSTS{exc.code}: {exc.description} Trace ID: {trace} Correlation ID: "
            f"{correlation} Timestamp: {stamp}",
            "error_codes": [exc.code],
            "timestamp": stamp,
            "trace_id": trace,
            "correlation_id": correlation,
            "error_uri": f"https://login.microsoftonline.com/error?code={exc.code}",
        },
        status=exc.status,
    )


def _parse_jwt(token: str) -> Jwt:
    parts = token.split(".")
    try:
        header, payload = (json.loads(_b64url_decode(p)) for p in parts[:2])
        signature = _b64url_decode(parts[2])
    except (ValueError, IndexError, binascii.Error) as exc:
        raise TokenError(400, "invalid_client", 50027, f"JWT token is invalid or malformed ({exc}).") from None
    if len(parts) != 3 or not isinstance(header, dict) or not isinstance(payload, dict):
        raise TokenError(400, "invalid_client", 50027, "JWT token is invalid or malformed.")
    return Jwt(header, payload, f"{parts[0]}.{parts[1]}".encode(), signature)


def _check_times(payload: dict[str, Any]) -> None:
    now = time.time()
    exp, nbf = payload.get("exp"), payload.get("nbf", 0)
    if not isinstance(exp, int | float) or not isinstance(nbf, int | float):
        raise TokenError(400, "invalid_client", 700024, "The assertion has no valid exp/nbf claims.")
    if exp < now - CLOCK_SKEW or nbf > now + CLOCK_SKEW:
        raise TokenError(400, "invalid_client", 700024, "Client assertion is not within its valid time range.")


def _check_certificate_assertion(app: AppRegistration, audience: str, jwt: Jwt) -> None:
    header, payload = jwt.header, jwt.payload
    cert = app.certificate
    if cert is None:
        raise TokenError(401, "invalid_client", 700027, f"No certificate is registered on app '{app.client_id}'.")
    thumbprints = {
        "x5t#S256": _b64url(cert.fingerprint(hashes.SHA256())),
        "x5t": _b64url(cert.fingerprint(hashes.SHA1())),  # noqa: S303 -- Entra ID's legacy thumbprint header
    }
    named = [h for h in thumbprints if h in header]
    if not named or any(str(header[h]).rstrip("=") != thumbprints[h] for h in named):
        raise TokenError(
            401,
            "invalid_client",
            700027,
            f"The certificate with identifier used to sign the client assertion is not registered on application "
            f"'{app.client_id}'.",
        )
    key = cert.public_key()
    if not isinstance(key, rsa.RSAPublicKey):
        raise TokenError(401, "invalid_client", 700027, "The registered certificate's key is not RSA.")
    pad: padding.AsymmetricPadding
    if header.get("alg") == "PS256":
        pad = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=hashes.SHA256.digest_size)
    elif header.get("alg") == "RS256":
        pad = padding.PKCS1v15()
    else:
        raise TokenError(401, "invalid_client", 700027, f"Unsupported assertion algorithm {header.get('alg')!r}.")
    try:
        key.verify(jwt.signature, jwt.signing_input, pad, hashes.SHA256())
    except InvalidSignature:
        raise TokenError(401, "invalid_client", 700027, "Client assertion contains an invalid signature.") from None
    if payload.get("aud") != audience:
        raise TokenError(
            401, "invalid_client", 700021, f"Client assertion audience claim does not match Realm issuer {audience}."
        )
    if payload.get("iss") != app.client_id or payload.get("sub") != app.client_id:
        raise TokenError(401, "invalid_client", 700023, "Client assertion iss and sub must be the client id.")
    if not payload.get("jti"):
        raise TokenError(401, "invalid_client", 700025, "Client assertion has no jti claim.")
    _check_times(payload)


def _check_federated(fed: FederatedCredential, jwt: Jwt) -> None:
    header, payload = jwt.header, jwt.payload
    if header.get("alg") != "RS256":
        raise TokenError(400, "invalid_client", 50013, f"Unsupported federated token algorithm {header.get('alg')!r}.")
    try:
        fed.issuer_key.verify(jwt.signature, jwt.signing_input, padding.PKCS1v15(), hashes.SHA256())
    except InvalidSignature:
        raise TokenError(400, "invalid_client", 50013, "Assertion failed signature validation.") from None
    audiences = payload.get("aud")
    audiences = [audiences] if isinstance(audiences, str) else audiences
    if payload.get("sub") != fed.subject or not isinstance(audiences, list) or fed.audience not in audiences:
        raise TokenError(
            400,
            "invalid_client",
            70021,
            "No matching federated identity record found for presented assertion. Assertion Issuer: "
            f"'{payload.get('iss')}'. Assertion Subject: '{payload.get('sub')}'. Assertion Audience: "
            f"'{payload.get('aud')}'.",
        )
    _check_times(payload)


def new_client_id() -> str:
    return str(uuid.uuid4())


def new_secret() -> str:
    return secrets.token_urlsafe(30)
