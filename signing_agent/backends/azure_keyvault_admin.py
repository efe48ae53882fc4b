"""Member keys made in Azure Key Vault or Managed HSM: ``signing-agent keys generate --backend azure-keyvault``.

Owns what ``keys generate`` does to a vault (``cli_keys`` parses, prints and writes files). The vault makes a
non-exportable EC member key (and, if asked, an RSA encryption key); the member certificate's TBSCertificate is
built here (``member_cert``) and its digest is signed **by the vault**, so the private key exists nowhere else.
Everything goes through the same code the daemon uses (``azure_keyvault``: credentials, TLS, throttle, error
mapping), so a key made here is described, signed with and checked exactly as the agent will: the certificate's
signature is verified against the vault's public key, and the encryption key decrypts a test message in the vault
before its public key is handed out.
"""

from __future__ import annotations

from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from signing_agent.backends import member_cert
from signing_agent.backends.azure_keyvault import (
    AzureKeyVaultRegistry,
    AzureKeyVaultSettings,
    CreatedKey,
    NewKey,
    check_new_key,
    create_key,
)
from signing_agent.backends.base import Priority, decrypts_round_trip
from signing_agent.config import AzureKeyVaultKeyConfig
from signing_agent.errors import AgentError, BackendError, IdentityError


@dataclass(frozen=True, slots=True)
class GeneratedMember:
    """What ``generate_member`` made: the member key, its certificate and the optional encryption key."""

    signing: CreatedKey
    certificate: x509.Certificate
    encryption: CreatedKey | None


async def generate_member(
    signing: AzureKeyVaultKeyConfig,
    *,
    name: str,
    curve: str,
    common_name: str,
    hsm: bool,
    encryption: AzureKeyVaultKeyConfig | None = None,
    rsa_bits: int = 3072,
    days: int = 365,
    settings: AzureKeyVaultSettings | None = None,
) -> GeneratedMember:
    """Make the member key ``signing.key_name`` and its self-signed certificate, and the RSA encryption key
    ``encryption.key_name`` if given. Both keys must be new names in their vaults. ``name`` is the identity the
    printed configuration will call them by: errors name ``identities.<name>.signing_key``, as the agent will."""
    where = f"identities.{name}"
    registry = AzureKeyVaultRegistry(settings=settings)
    new_member = NewKey(purpose="sign", curve=curve, hsm=hsm)
    new_enc = NewKey(purpose="decrypt", rsa_bits=rsa_bits, hsm=hsm)
    try:
        if encryption is not None:  # both names are free before either key is made
            await check_new_key(registry, encryption, new_enc, where=f"{where}.encryption_key")
        member = await create_key(registry, signing, new_member, where=f"{where}.signing_key")
        certificate = await _certificate(registry, member, f"{where}.signing_key", common_name=common_name, days=days)
        enc = None
        if encryption is not None:
            try:
                enc = await create_key(registry, encryption, new_enc, where=f"{where}.encryption_key")
            except AgentError as exc:
                raise _made_but(member, f"the encryption key was not: {exc.message}", exc.hint) from None
            await _check_decrypts(registry, enc, f"{where}.encryption_key")
    finally:
        await registry.aclose()
    return GeneratedMember(member, certificate, enc)


async def _certificate(
    registry: AzureKeyVaultRegistry, key: CreatedKey, where: str, *, common_name: str, days: int
) -> x509.Certificate:
    public = key.public_key
    if not isinstance(public, ec.EllipticCurvePublicKey):  # pragma: no cover -- create_key checked the type
        raise IdentityError(f"{key.kid} is not an EC key")
    signer = registry.signing_key(key.config, name=where)
    tbs = member_cert.prepare_certificate(public, common_name=common_name, days=days)
    try:
        raw = await signer.sign_digest(tbs.alg, tbs.digest, priority=Priority.HIGH)
    except AgentError as exc:
        raise _made_but(key, f"the vault did not sign its certificate: {exc.message}", exc.hint) from None
    return member_cert.finish_certificate(tbs, raw, signer="Key Vault")


async def _check_decrypts(registry: AzureKeyVaultRegistry, key: CreatedKey, where: str) -> None:
    """Encrypt a random message to the new key's public key here and have the vault decrypt it (RSA-OAEP-256, as
    CCF encrypts recovery shares)."""
    public = key.public_key
    if not isinstance(public, rsa.RSAPublicKey):  # pragma: no cover -- create_key checked the type
        raise IdentityError(f"{key.kid} is not an RSA key")
    decrypter = registry.decryption_key(key.config, name=where)
    try:
        same = await decrypts_round_trip(decrypter, public)
    except AgentError as exc:
        raise _made_but(key, f"the vault did not decrypt a test message: {exc.message}", exc.hint) from None
    if not same:
        raise _made_but(key, "the vault's decryption of a test message came back wrong", None)


def _made_but(key: CreatedKey, what: str, hint: str | None) -> BackendError:
    """A key was made, then a check failed: say so, so that the user removes it before trying again."""
    return BackendError(
        f"created {key.kid}, but {what}",
        hint=(hint + "; " if hint else "") + "delete that key in the vault (or use another name) before trying again",
    )
