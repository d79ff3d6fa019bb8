"""ACME TLS-ALPN-01 (RFC 8737) pieces certbot's ``acme`` library lacks (5.x parses the
challenge as an ``UnrecognizedChallenge``): its token, the response to post, and the
self-signed challenge certificate the TLS listener presents for ``acme-tls/1``.

Any instance can make the certificate from the domain and the key authorization alone
(its key is throwaway), so a fleet shares only the key authorization.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Iterator, MutableMapping
from typing import Any, Protocol

from acme import challenges
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID, ObjectIdentifier

TLS_ALPN_01 = "tls-alpn-01"
# id-pe-acmeIdentifier (RFC 8737 §6.1): must be critical, must hold SHA-256(key auth).
ACME_IDENTIFIER = ObjectIdentifier("1.3.6.1.5.5.7.1.31")


class ChallengeStore(Protocol):
    def set_challenge(self, name: str, cert_pem: bytes, key_pem: bytes) -> None: ...

    def clear_challenge(self, name: str) -> None: ...


class AlpnChallenges(MutableMapping[str, str]):
    """Domain -> key authorization, mirrored into the TLS listener as challenge
    certificates: what this process ordered, and (through storage) what others did."""

    def __init__(self, store: ChallengeStore) -> None:
        self._store = store
        self._answers: dict[str, str] = {}

    def __setitem__(self, domain: str, key_authorization: str) -> None:
        if self._answers.get(domain) == key_authorization:
            return  # our own, echoed back by the fleet's channel
        cert_pem, key_pem = challenge_certificate(domain, key_authorization)
        self._store.set_challenge(domain, cert_pem, key_pem)
        self._answers[domain] = key_authorization

    def __delitem__(self, domain: str) -> None:
        del self._answers[domain]
        self._store.clear_challenge(domain)

    def __getitem__(self, domain: str) -> str:
        return self._answers[domain]

    def __iter__(self) -> Iterator[str]:
        return iter(self._answers)

    def __len__(self) -> int:
        return len(self._answers)


class TlsAlpn01Response(challenges.ChallengeResponse):
    """The response to post: ``{}`` (RFC 8555 §7.5.1), like HTTP-01's. Not registered
    in the library's type table: nothing parses it back."""

    typ = TLS_ALPN_01

    def __bool__(self) -> bool:
        # acme's ClientNetwork sends an empty payload (a POST-as-GET, which does not
        # answer) for a falsy object, and a mapping without fields has length 0.
        return True


def challenge_type(chall: Any) -> str | None:
    """The challenge's type, whether or not the library knows it."""
    if isinstance(chall, challenges.UnrecognizedChallenge):
        value = chall.jobj.get("type")
        return value if isinstance(value, str) else None
    return getattr(chall, "typ", None)


def challenge_token(chall: Any) -> str:
    """The token (base64url), as the server sent it."""
    if isinstance(chall, challenges.UnrecognizedChallenge):
        token = chall.jobj.get("token")
        if not isinstance(token, str) or not token:
            raise ValueError("the tls-alpn-01 challenge has no token")
        return token
    token_text: str = chall.encode("token")
    return token_text


def challenge_certificate(domain: str, key_authorization: str) -> tuple[bytes, bytes]:
    """A self-signed certificate (PEM) and key for ``domain`` carrying the
    acmeIdentifier of ``key_authorization`` (RFC 8737 §3)."""
    key = ec.generate_private_key(ec.SECP256R1())
    digest = hashlib.sha256(key_authorization.encode("ascii")).digest()
    now = dt.datetime.now(dt.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, domain)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=7))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(domain)]), critical=False)
        # The extension's value is a DER OCTET STRING of the 32-byte digest.
        .add_extension(
            x509.UnrecognizedExtension(ACME_IDENTIFIER, b"\x04\x20" + digest), critical=True
        )
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem
