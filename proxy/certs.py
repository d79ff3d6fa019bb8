"""The certificates the TLS listener serves, chosen by SNI, swapped without a restart.

A ``CertStore`` holds one ``ssl.SSLContext`` per certificate, all built alike (TLS 1.2+,
Mozilla "intermediate" ciphers, the configured ALPN). A new connection starts on
``store.context`` (the default certificate's, the first configured); during the
handshake, the SNI callback moves it to the context of the certificate whose names
match: an exact name beats a wildcard, and ``*.example.com`` matches exactly one label.
An unknown or absent name keeps the default. A swap replaces the index in one
assignment: handshakes started before it finish on the objects they hold, open
connections keep theirs, and the next handshake sees the new set.

The interface, for the listener, the admin API and an ACME component:

- ``load_files(tls)``: read ``tls.certificates`` (start-up, SIGHUP). All or nothing: a
  bad file raises ``CertError`` and the set in use stays.
- ``install(names, cert_pem, key_pem, source="acme")``: serve a certificate (PEM bytes)
  for ``names`` from the next handshake on; it takes precedence over a file certificate
  for the same name and replaces an earlier install for the same names.
- ``remove(names)``: stop serving an installed certificate.
- ``set_challenge(name, cert_pem, key_pem)`` / ``clear_challenge(name)``: a TLS-ALPN-01
  certificate (RFC 8737), served for ``name`` with ALPN ``acme-tls/1`` only, while set,
  and only to a client that offers ``acme-tls/1`` (§3). Python's SNI callback cannot
  see the client's ALPN offer, so the listener reads it from the ClientHello
  (proxy/clienthello.py) while ``has_challenges``, and starts such a client's handshake
  on ``challenge_context`` instead of ``context``: only that one's SNI callback serves
  challenge certificates.
- ``http01``: ACME HTTP-01 tokens → key authorizations. The plain listener answers
  ``GET /.well-known/acme-challenge/<token>`` from it; set ``serve_http01`` before the
  listener starts so that connections are checked for it.
- ``certificates``: what is served (names, not_after, source, file) for status and
  metrics; ``select(name)``: the certificate a handshake for ``name`` would get.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import ssl
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from config import TlsConfig
from config.tls import CertProblem, check_pair, inspect_pair

log = logging.getLogger("bgproxy.tls")

# Mozilla "intermediate" (v5.7): TLS 1.2 suites; TLS 1.3 suites are OpenSSL's defaults.
INTERMEDIATE_CIPHERS = ":".join(
    (
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        "ECDHE-RSA-CHACHA20-POLY1305",
        "DHE-RSA-AES128-GCM-SHA256",
        "DHE-RSA-AES256-GCM-SHA384",
        "DHE-RSA-CHACHA20-POLY1305",
    )
)
ACME_TLS_ALPN = "acme-tls/1"
_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


class CertError(Exception):
    """A certificate that cannot be served; the message names the file or key path."""


@dataclass(frozen=True, eq=False)
class Certificate:
    names: tuple[str, ...]
    not_after: dt.datetime
    source: str  # "file" or "acme" (whatever installed it)
    file: str | None  # the certificate's path, for a file certificate
    context: ssl.SSLContext
    pem: tuple[bytes, bytes] | None = field(
        default=None, repr=False
    )  # installed: re-made on reload

    def to_dict(self) -> dict[str, object]:
        return {
            "names": list(self.names),
            "not_after": self.not_after.isoformat(),
            "source": self.source,
            "file": self.file,
        }


@dataclass(frozen=True)
class _Index:
    """One immutable generation of what is served: swapped whole."""

    default: Certificate | None
    exact: dict[str, Certificate]
    wildcard: dict[str, Certificate]  # "example.com" for "*.example.com"
    files: tuple[Certificate, ...]
    installed: tuple[Certificate, ...]


def _index(files: tuple[Certificate, ...], installed: tuple[Certificate, ...]) -> _Index:
    exact: dict[str, Certificate] = {}
    wildcard: dict[str, Certificate] = {}
    # Installed certificates first (they win), then files in order (the first one wins).
    for cert in (*installed, *files):
        for name in cert.names:
            if name.startswith("*."):
                wildcard.setdefault(name[2:], cert)
            else:
                exact.setdefault(name, cert)
    default = files[0] if files else (installed[0] if installed else None)
    return _Index(default, exact, wildcard, files, installed)


class CertStore:
    def __init__(self, tls: TlsConfig) -> None:
        self._tls = tls
        self._index = _index((), ())
        self._challenges: dict[str, ssl.SSLContext] = {}
        self.http01: dict[str, str] = {}
        self.serve_http01 = False
        # The context every handshake starts on: settings only, no certificate of its
        # own until one is loaded; the SNI callback moves each connection to its
        # certificate's context (the default one when no name matches).
        self._start = self._new_context(tls)
        self._start_acme = self._new_context(tls, (ACME_TLS_ALPN,), self._sni_acme)

    # -- what the listener reads ------------------------------------------------------------

    @property
    def context(self) -> ssl.SSLContext:
        """The context a new connection's handshake starts on."""
        return self._start

    @property
    def challenge_context(self) -> ssl.SSLContext:
        """The context to start on for a client that offers ALPN ``acme-tls/1``."""
        return self._start_acme

    @property
    def has_challenges(self) -> bool:
        return bool(self._challenges)

    @property
    def certificates(self) -> list[Certificate]:
        index = self._index
        return [*index.files, *index.installed]

    def select(self, server_name: str | None) -> Certificate | None:
        index = self._index
        if server_name:
            name = server_name.rstrip(".").lower()
            cert = index.exact.get(name)
            if cert is not None:
                return cert
            label, dot, parent = name.partition(".")
            if dot and label:
                cert = index.wildcard.get(parent)
                if cert is not None:
                    return cert
        return index.default

    def _sni(self, sslobj: ssl.SSLObject, server_name: str | None, _: ssl.SSLContext) -> None:
        # A server-side SSLObject does not keep the name the client asked for; the
        # connection reads it from here for its access-log lines.
        sslobj.bg_server_name = server_name  # type: ignore[attr-defined]
        cert = self.select(server_name)
        if cert is not None:
            sslobj.context = cert.context
        # No certificate at all: the handshake fails, as it must.

    def _sni_acme(
        self, sslobj: ssl.SSLObject, server_name: str | None, ctx: ssl.SSLContext
    ) -> None:
        # Only handshakes that offered acme-tls/1 start here (see the module doc).
        if server_name:
            challenge = self._challenges.get(server_name.rstrip(".").lower())
            if challenge is not None:
                sslobj.bg_server_name = server_name  # type: ignore[attr-defined]
                sslobj.context = challenge
                return
        self._sni(sslobj, server_name, ctx)

    # -- changing what is served -----------------------------------------------------------------

    def load_files(self, tls: TlsConfig) -> None:
        """Serve ``tls``'s certificate files (and its settings) from the next handshake on.
        A file that cannot be served raises CertError and changes nothing."""
        loaded = []
        for i, cfg in enumerate(tls.certificates):
            try:
                info = inspect_pair(cfg)
                ctx = self._new_context(tls)
                ctx.load_cert_chain(cfg.cert, cfg.key)
            except CertProblem as exc:
                raise CertError(f"tls.certificates[{i}].{exc.field}: {exc}") from None
            except (OSError, ssl.SSLError) as exc:
                raise CertError(f"tls.certificates[{i}]: cannot load {cfg.cert}: {exc}") from None
            loaded.append(Certificate(info.names, info.not_after, "file", cfg.cert, ctx))
        installed = self._index.installed
        if tls != self._tls:
            # New settings (versions, ALPN): installed certificates are rebuilt on them.
            installed = tuple(self._rebuild(c, tls) for c in installed)
            self._tls = tls
            self._start = self._new_context(tls)
            self._start_acme = self._new_context(tls, (ACME_TLS_ALPN,), self._sni_acme)
        self._index = _index(tuple(loaded), installed)

    def install(
        self,
        names: list[str] | tuple[str, ...],
        cert_pem: bytes,
        key_pem: bytes,
        source: str = "acme",
    ) -> Certificate:
        """Serve ``cert_pem`` for ``names`` from the next handshake on (see the module doc)."""
        wanted = tuple(dict.fromkeys(n.lower() for n in names))
        info = check_pair(cert_pem, key_pem, "the certificate", "the key")
        ctx = self._context_from_pem(self._tls, cert_pem, key_pem)
        cert = Certificate(
            wanted or info.names, info.not_after, source, None, ctx, (cert_pem, key_pem)
        )
        kept = tuple(c for c in self._index.installed if set(c.names) != set(cert.names))
        self._index = _index(self._index.files, (*kept, cert))
        log.info("serving a %s certificate for %s until %s", source, ", ".join(cert.names),
                 cert.not_after.isoformat())  # fmt: skip
        return cert

    def remove(self, names: list[str] | tuple[str, ...]) -> None:
        wanted = {n.lower() for n in names}
        kept = tuple(c for c in self._index.installed if set(c.names) != wanted)
        self._index = _index(self._index.files, kept)

    def set_challenge(self, name: str, cert_pem: bytes, key_pem: bytes) -> None:
        ctx = self._context_from_pem(self._tls, cert_pem, key_pem, alpn=(ACME_TLS_ALPN,))
        self._challenges = {**self._challenges, name.lower(): ctx}

    def clear_challenge(self, name: str) -> None:
        self._challenges = {k: v for k, v in self._challenges.items() if k != name.lower()}

    # -- contexts ---------------------------------------------------------------------------------

    def _new_context(
        self,
        tls: TlsConfig,
        alpn: tuple[str, ...] | None = None,
        sni: Callable[[ssl.SSLObject, str | None, ssl.SSLContext], None] | None = None,
    ) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = _VERSIONS[tls.min_version]
        ctx.set_ciphers(INTERMEDIATE_CIPHERS)
        ctx.set_alpn_protocols(list(alpn or tls.alpn))
        ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
        ctx.sni_callback = sni or self._sni
        return ctx

    def _context_from_pem(
        self, tls: TlsConfig, cert_pem: bytes, key_pem: bytes, alpn: tuple[str, ...] | None = None
    ) -> ssl.SSLContext:
        # ssl loads a chain from files only: a private temporary directory, gone at once.
        ctx = self._new_context(tls, alpn)
        with tempfile.TemporaryDirectory(prefix="bgproxy-tls-") as tmp:
            cert_path = os.path.join(tmp, "cert.pem")
            key_path = os.path.join(tmp, "key.pem")
            for path, data in ((cert_path, cert_pem), (key_path, key_pem)):
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "wb") as file:
                    file.write(data)
            try:
                ctx.load_cert_chain(cert_path, key_path)
            except ssl.SSLError as exc:
                raise CertError(f"cannot load the certificate: {exc}") from None
        return ctx

    def _rebuild(self, cert: Certificate, tls: TlsConfig) -> Certificate:
        assert cert.pem is not None
        return replace(cert, context=self._context_from_pem(tls, *cert.pem))
