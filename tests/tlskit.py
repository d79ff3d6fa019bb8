"""A throwaway certificate authority for the TLS tests, made with ``cryptography``.

``TestCA`` issues leaf certificates for any names and validity window, writes them as
PEM files, and gives a client ``ssl.SSLContext`` that trusts only it: real TLS clients
verify what the proxy serves exactly as a browser would, against this root. ``curl``
runs the real curl binary, for tests that want a TLS client that is not Python's.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import shutil
import ssl
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

_NOW = dt.datetime.now(dt.UTC)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _san(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


@dataclass
class Leaf:
    cert: Path
    key: Path
    cert_pem: bytes
    key_pem: bytes
    serial: int


class TestCA:
    __test__ = False  # not a pytest class

    def __init__(self, directory: Path, name: str = "bgproxy test CA") -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(_NOW - dt.timedelta(days=1))
            .not_valid_after(_NOW + dt.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self.key, hashes.SHA256())
        )
        self.pem = self.cert.public_bytes(serialization.Encoding.PEM)
        self.path = directory / "ca.pem"
        self.path.write_bytes(self.pem)

    def issue(
        self,
        *names: str,
        days: float = 90,
        valid_from_days: float = -1,
        file: str | None = None,
    ) -> Leaf:
        """A leaf for ``names`` (DNS names or IP addresses), valid from
        ``valid_from_days`` to ``days`` from now."""
        key = ec.generate_private_key(ec.SECP256R1())
        serial = x509.random_serial_number()
        start = _NOW + dt.timedelta(days=valid_from_days)
        end = _NOW + dt.timedelta(days=days)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(serial)
            .not_valid_before(min(start, end - dt.timedelta(seconds=1)))
            .not_valid_after(end)
            .add_extension(
                x509.SubjectAlternativeName([_san(n) for n in names]), critical=False
            )
            .sign(self.key, hashes.SHA256())
        )
        cert_pem = cert.public_bytes(serialization.Encoding.PEM)
        key_pem = _pem_key(key)
        stem = file or names[0].replace("*", "wildcard")
        cert_path = self.dir / f"{stem}.crt"
        key_path = self.dir / f"{stem}.key"
        cert_path.write_bytes(cert_pem)
        key_path.write_bytes(key_pem)
        return Leaf(cert_path, key_path, cert_pem, key_pem, serial)

    def server_context(self, leaf: Leaf, sni_seen: list[str] | None = None) -> ssl.SSLContext:
        """A server context presenting ``leaf`` (an https upstream); the SNI names clients
        sent go to ``sni_seen``."""
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(leaf.cert, leaf.key)
        if sni_seen is not None:

            def note(sock: ssl.SSLObject, name: str | None, _: ssl.SSLContext) -> None:
                sni_seen.append(name or "")

            ctx.sni_callback = note  # type: ignore[assignment]
        return ctx

    def client_context(self, alpn: tuple[str, ...] = ("http/1.1",)) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cadata=self.pem.decode())
        if alpn:
            ctx.set_alpn_protocols(list(alpn))
        return ctx


def served_serial(der: bytes | None) -> int:
    """The serial number of the certificate a TLS connection was served (its DER)."""
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


CURL = shutil.which("curl")
needs_curl = pytest.mark.skipif(
    CURL is None, reason="curl is not installed (apt-get install -y curl; .ci/run installs it)"
)


async def curl(*args: str) -> tuple[int, str, str]:
    """The real ``curl`` (its own OpenSSL, its own verification): exit code, stdout, stderr.
    A subprocess the event loop awaits, since the proxy under test runs on that loop."""
    assert CURL is not None
    proc = await asyncio.create_subprocess_exec(
        CURL, "-sS", "--max-time", "10", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 15)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()
