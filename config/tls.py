"""The ``tls`` section (SPEC "TLS at the edge"): its classes and its certificate files.

``TlsConfig`` holds the listener's settings, ``AcmeConfig`` automatic certificates
(``schema.Config`` holds a ``TlsConfig``). ``inspect_pair`` reads one certificate and its
key with the ``cryptography`` package and says what is wrong with them in words a config
error can carry (unreadable, not PEM, key not matching);
``check_certificates`` names each problem by its key path, ``tls.certificates[0].key:
...``, makes an expired certificate an error and one that expires within
``EXPIRY_WARNING`` a warning. The proxy's certificate store reads files through the same
functions, so ``bgproxy check`` and a reload judge a file alike.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass

from .errors import Problems
from .values import HostPort, is_ip, valid_host

ACME_CHALLENGES = ("http-01", "tls-alpn-01")


@dataclass(frozen=True, slots=True)
class AcmeConfig:
    """Automatic certificates (RFC 8555); off while ``directory`` is None."""

    directory: str | None = None  # the ACME server's directory URL
    email: str | None = None
    domains: tuple[str, ...] = ()  # empty: every exact host of every service
    challenge: str = "http-01"
    storage: str = "acme/"  # account key, keys and certificates, kept across restarts
    ca_file: str | None = None  # extra CA trusted for the ACME server itself
    renew_before: float = 30 * 86400.0

    def __post_init__(self) -> None:
        p = Problems()
        if self.directory is not None:
            p.check(
                self.directory.startswith("https://") and len(self.directory) > 8,
                "directory",
                f"expected an https:// URL, got {self.directory!r}",
            )
        if self.email is not None:
            local, at, domain = self.email.partition("@")
            ok = bool(local and at and "." in domain) and " " not in self.email
            p.check(ok, "email", f"not an email address: {self.email!r}")
        # Neither challenge can validate a wildcard (RFC 8555 §8.3, RFC 8737 §3): DNS-01 only.
        method = "TLS-ALPN-01" if self.challenge == "tls-alpn-01" else "HTTP-01"
        for i, name in enumerate(self.domains):
            if name.startswith("*"):
                p.check(False, f"domains[{i}]", f"{method} cannot validate a wildcard: {name!r}")
            else:
                ok = valid_host(name) and "." in name.strip(".") and not is_ip(name)
                p.check(ok, f"domains[{i}]", f"not a DNS name: {name!r}")
        p.check(
            self.challenge in ACME_CHALLENGES,
            "challenge",
            f"must be 'http-01' or 'tls-alpn-01', got {self.challenge!r}",
        )
        p.check(bool(self.storage), "storage", "must name a directory")
        p.positive("renew_before", self.renew_before)
        p.raise_if_any()

    @property
    def enabled(self) -> bool:
        return self.directory is not None


MIN_TLS_VERSIONS = ("1.2", "1.3")
# An ALPN protocol id is 1-255 bytes; the ones worth naming are printable.
_ALPN = re.compile(r"[!-~]{1,255}")
# One header value (RFC 6797 directives): printable, no control characters.
_HSTS = re.compile(r"[ -~]+")


@dataclass(frozen=True, slots=True)
class CertificateConfig:
    cert: str  # PEM: the certificate, optionally followed by its chain
    key: str  # PEM: its private key, unencrypted


@dataclass(frozen=True, slots=True)
class TlsConfig:
    acme: AcmeConfig = AcmeConfig()
    listen: HostPort | None = None  # None: no HTTPS listener
    certificates: tuple[CertificateConfig, ...] = ()
    min_version: str = "1.2"
    alpn: tuple[str, ...] = ("http/1.1",)
    redirect_http: bool = False
    hsts: str | None = None  # the Strict-Transport-Security value, e.g. "max-age=31536000"
    handshake_timeout: float = 10.0

    def __post_init__(self) -> None:
        p = Problems()
        p.check(
            self.min_version in MIN_TLS_VERSIONS,
            "min_version",
            f'must be "1.2" or "1.3", got {self.min_version!r}',
        )
        p.check(len(self.alpn) > 0, "alpn", "must list at least one protocol, e.g. http/1.1")
        for i, proto in enumerate(self.alpn):
            p.check(
                _ALPN.fullmatch(proto) is not None, f"alpn[{i}]", f"not a protocol id: {proto!r}"
            )
        if self.hsts is not None:
            ok = _HSTS.fullmatch(self.hsts) is not None and "max-age" in self.hsts.lower()
            p.check(
                ok, "hsts", f'expected a header value like "max-age=31536000", got {self.hsts!r}'
            )
        p.positive("handshake_timeout", self.handshake_timeout)
        if self.listen is not None:
            p.check(
                len(self.certificates) > 0 or self.acme.enabled,
                "certificates",
                "required with tls.listen (unless tls.acme obtains them):"
                " a list of {cert: FILE, key: FILE}",
            )
        p.check(
            not self.acme.enabled or self.listen is not None,
            "acme",
            "needs tls.listen (the HTTPS listener that serves what it obtains)",
        )
        p.check(
            not self.redirect_http or self.listen is not None,
            "redirect_http",
            "needs tls.listen (the HTTPS listener to redirect to)",
        )
        p.raise_if_any()


EXPIRY_WARNING = dt.timedelta(days=14)


@dataclass(frozen=True, slots=True)
class CertInfo:
    """What a certificate file says about itself."""

    names: tuple[str, ...]  # DNS names from subjectAltName (the CN only when there is none)
    not_after: dt.datetime  # aware, UTC


class CertProblem(ValueError):
    """A certificate or key that cannot be served; ``field`` is "cert" or "key"."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def _read(path: str, field: str) -> bytes:
    try:
        with open(path, "rb") as file:
            return file.read()
    except OSError as exc:
        raise CertProblem(field, f"cannot read {path}: {exc.strerror or exc}") from None


def cert_info(pem: bytes, where: str = "the certificate") -> CertInfo:
    """Names and expiry of the first (leaf) certificate in ``pem``."""
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    try:
        cert = x509.load_pem_x509_certificates(pem)[0]
    except ValueError:
        raise CertProblem("cert", f"{where} is not a PEM certificate") from None
    names: list[str] = []
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        names = [n.lower() for n in san.value.get_values_for_type(x509.DNSName)]
    except x509.ExtensionNotFound:
        pass
    if not names:
        names = [
            str(a.value).lower() for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        ]
    return CertInfo(tuple(dict.fromkeys(names)), cert.not_valid_after_utc)


def check_pair(cert_pem: bytes, key_pem: bytes, cert_where: str, key_where: str) -> CertInfo:
    """The certificate's info, once its key is known to be a usable match."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    info = cert_info(cert_pem, cert_where)
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except TypeError:
        raise CertProblem("key", f"{key_where} is encrypted: give an unencrypted key") from None
    except (ValueError, Exception) as exc:  # cryptography raises ValueError or its own
        if "password" in str(exc).lower():
            raise CertProblem("key", f"{key_where} is encrypted: give an unencrypted key") from None
        raise CertProblem("key", f"{key_where} is not a PEM private key") from None
    cert = x509.load_pem_x509_certificates(cert_pem)[0]
    der = serialization.Encoding.DER
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(der, spki) != cert.public_key().public_bytes(der, spki):
        raise CertProblem("key", f"{key_where} does not match the certificate in {cert_where}")
    if not info.names:
        raise CertProblem("cert", f"{cert_where} names no host (no DNS subjectAltName or CN)")
    return info


def inspect_pair(cfg: CertificateConfig) -> CertInfo:
    """Read ``cfg``'s two files and check them; a CertProblem says which one is wrong."""
    return check_pair(_read(cfg.cert, "cert"), _read(cfg.key, "key"), cfg.cert, cfg.key)


def expiry_problem(info: CertInfo, now: dt.datetime | None = None) -> tuple[bool, str] | None:
    """(is_error, message) for a certificate expired or expiring soon; None if neither."""
    now = now or dt.datetime.now(dt.UTC)
    when = info.not_after.strftime("%Y-%m-%d %H:%M UTC")
    if info.not_after <= now:
        return True, f"the certificate expired on {when}"
    if info.not_after - now <= EXPIRY_WARNING:
        days = (info.not_after - now).days
        return False, f"the certificate expires in {days} day{'' if days == 1 else 's'} ({when})"
    return None


def check_certificates(tls: TlsConfig, path: str = "tls") -> tuple[list[str], list[str]]:
    """(errors, warnings) for every certificate file of ``tls``, each with its key path."""
    errors: list[str] = []
    warnings: list[str] = []
    for i, cfg in enumerate(tls.certificates):
        where = f"{path}.certificates[{i}]"
        try:
            info = inspect_pair(cfg)
        except CertProblem as exc:
            errors.append(f"{where}.{exc.field}: {exc}")
            continue
        problem = expiry_problem(info)
        if problem is not None:
            (errors if problem[0] else warnings).append(f"{where}.cert: {problem[1]}")
    return errors, warnings


def parse_min_version(value: object) -> str:
    """ "1.2" or "1.3"; an unquoted 1.2 is a YAML float, taken as meant."""
    if isinstance(value, float) and value in (1.2, 1.3):
        return str(value)
    if isinstance(value, str):
        return value.strip()
    raise ValueError(f'expected "1.2" or "1.3", got {value!r}')


def parse_certificates(
    raw: object, where: str
) -> tuple[tuple[CertificateConfig, ...] | None, list[str]]:
    """The ``certificates`` list: (entries or None, errors each with its key path)."""
    if not isinstance(raw, list):
        return None, [f"{where}: expected a list of {{cert: FILE, key: FILE}}"]
    errors: list[str] = []
    certs = []
    for i, item in enumerate(raw):
        at = f"{where}[{i}]"
        if not isinstance(item, dict):
            errors.append(f"{at}: expected a mapping {{cert: FILE, key: FILE}}")
            continue
        bad = [
            f"{at}.{k}: unknown key (expected one of: cert, key)"
            for k in item
            if k not in ("cert", "key")
        ]
        for key in ("cert", "key"):
            value = item.get(key)
            if not isinstance(value, str) or not value.strip():
                bad.append(f"{at}.{key}: required: the path of a PEM file")
        if bad:
            errors.extend(bad)
        else:
            certs.append(CertificateConfig(cert=item["cert"].strip(), key=item["key"].strip()))
    return (tuple(certs) if not errors else None), errors


def warnings(tls: TlsConfig) -> list[str]:
    """What ``bgproxy check`` and a (re)load say but do not refuse: certificates that
    expire within ``EXPIRY_WARNING``. The files are read again (a few KiB each)."""
    return check_certificates(tls)[1]
