"""TLS towards https:// upstream targets: the client context of a pool, and why a
handshake failed, in words short enough for a log line and a health status.

A pool's ``tls`` (verify, ca_file, server_name) becomes one ``ssl.SSLContext`` per
build of the pools, shared by the data plane, the health checks and the gates, so all
three trust exactly the same thing. Contexts are cached by their settings: a reload that
keeps them keeps the context (and the CA bundle is not parsed again).
"""

from __future__ import annotations

import logging
import ssl
import time
from dataclasses import dataclass
from typing import Any

from config import UpstreamTlsConfig

log = logging.getLogger("bgproxy.upstream")


@dataclass(frozen=True, slots=True)
class UpstreamTls:
    """What connecting to one https:// target needs, with the key its pooled
    connections are filed under (two pools that trust differently never share one)."""

    context: ssl.SSLContext
    server_hostname: str | None  # None: the target's own host
    key: str


def client_context(cfg: UpstreamTlsConfig) -> ssl.SSLContext:
    """A context as ``ssl.create_default_context`` makes it (TLS 1.2+, hostname and chain
    checks), trusting ``ca_file`` instead of the system store when given."""
    if cfg.verify:
        ctx = ssl.create_default_context(cafile=cfg.ca_file)
    else:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    # HTTP/1.1 is what the upstream connection speaks; an upstream that would pick h2
    # by ALPN must not.
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


class TlsContexts:
    """``UpstreamTls`` by pool settings, kept across rebuilds of the pools."""

    def __init__(self) -> None:
        self._by_cfg: dict[UpstreamTlsConfig, ssl.SSLContext] = {}

    def get(self, url: str, cfg: UpstreamTlsConfig) -> UpstreamTls:
        ctx = self._by_cfg.get(cfg)
        if ctx is None:
            ctx = self._by_cfg[cfg] = client_context(cfg)
        key = f"{url}#verify={cfg.verify},ca={cfg.ca_file},sni={cfg.server_name}"
        return UpstreamTls(ctx, cfg.server_name, key)

    def retain(self, keep: set[UpstreamTlsConfig]) -> None:
        for cfg in list(self._by_cfg):
            if cfg not in keep:
                del self._by_cfg[cfg]


def tls_failure(exc: BaseException) -> str | None:
    """A short reason when ``exc`` (or what caused it) is a TLS failure, else None."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLCertVerificationError):
            return f"certificate rejected: {seen.verify_message or 'verification failed'}"
        if isinstance(seen, ssl.SSLError):
            return f"TLS handshake failed: {seen.reason or 'error'}"
        seen = seen.__cause__ or seen.__context__
    return None


def request_options(tls: UpstreamTls | None) -> dict[str, Any]:
    """aiohttp request keywords that make a health check or a gate probe trust what the
    data plane trusts (empty for an http:// target)."""
    if tls is None:
        return {}
    return {"ssl": tls.context, "server_hostname": tls.server_hostname}


def aiohttp_tls_failure(exc: BaseException) -> str | None:
    """``tls_failure`` for what aiohttp raises: it keeps the ssl error as an attribute."""
    for attr in ("certificate_error", "os_error"):
        inner = getattr(exc, attr, None)
        if isinstance(inner, BaseException):
            reason = tls_failure(inner)
            if reason is not None:
                return reason
    return tls_failure(exc)


class FailureLog:
    """Logs why a target's TLS failed, at most once per ``every`` seconds per target and
    reason: a bad certificate fails every request, and the log must stay readable."""

    def __init__(self, every: float = 30.0) -> None:
        self.every = every
        self._last: dict[tuple[str, str], float] = {}

    def note(self, url: str, reason: str) -> None:
        now = time.monotonic()
        key = (url, reason)
        if now - self._last.get(key, -self.every) >= self.every:
            if len(self._last) > 1024:
                self._last.clear()
            self._last[key] = now
            log.warning("upstream %s: %s", url, reason)
