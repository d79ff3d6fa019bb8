"""The certificate files of the ``tls`` section (SPEC "TLS at the edge").

``TlsConfig`` (schema.py) holds the listener's settings. Here, ``inspect_pair`` reads one
certificate and its key with the ``cryptography`` package and says what is wrong with
them in words a config error can carry (unreadable, not PEM, key not matching);
``check_certificates`` names each problem by its key path, ``tls.certificates[0].key:
...``, makes an expired certificate an error and one that expires within
``EXPIRY_WARNING`` a warning. The proxy's certificate store reads files through the same
functions, so ``bgproxy check`` and a reload judge a file alike.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from .schema import CertificateConfig, TlsConfig

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
