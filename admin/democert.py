"""The demo's HTTPS certificate: self-signed, made at start, gone at exit.

One ECDSA P-256 key (milliseconds to make, where RSA would slow the demo's start), a
certificate for ``localhost``, ``127.0.0.1`` and the demo's hosts, written to a private
temporary directory (0700, the key 0600) that is removed when the demo stops. The
certificate is its own issuer, so ``curl --cacert`` with it verifies for real.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import os
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

# Long enough that the proxy's "expires within 14 days" warning never fires in a demo.
VALID_DAYS = 30


@dataclass(frozen=True)
class DemoCert:
    cert: Path
    key: Path


def _write_private(path: Path, data: bytes) -> None:
    # Created 0600 from the start: no window in which another user could read the key.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as file:
        file.write(data)


def make_pem(names: Sequence[str], ips: Sequence[str]) -> tuple[bytes, bytes]:
    """A self-signed certificate and its PKCS#8 key (PEM) for ``names`` and ``ips``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, names[0]),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "bgproxy demo (self-signed)"),
        ]
    )
    now = dt.datetime.now(dt.UTC)
    san: list[x509.GeneralName] = [x509.DNSName(n) for n in names]
    san += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))  # a little clock skew is fine
        .not_valid_after(now + dt.timedelta(days=VALID_DAYS))
        .add_extension(x509.SubjectAlternativeName(san), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


@contextlib.contextmanager
def demo_certificate(
    hosts: Sequence[str], ips: Sequence[str] = ("127.0.0.1", "::1")
) -> Iterator[DemoCert]:
    """Files for ``localhost`` and ``hosts``, removed (directory and all) on exit."""
    cert_pem, key_pem = make_pem(["localhost", *hosts], ips)
    with tempfile.TemporaryDirectory(prefix="bgproxy-demo-") as directory:
        cert = Path(directory) / "demo.crt"
        key = Path(directory) / "demo.key"
        cert.write_bytes(cert_pem)
        _write_private(key, key_pem)
        yield DemoCert(cert, key)
