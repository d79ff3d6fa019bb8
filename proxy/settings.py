"""The config, precomputed into the bytes and numbers the hot path reads.

Built once per config (start and each reload); a connection reads ``server.settings``
when a request starts, so a reload applies to the next request, never half of one.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass
from functools import lru_cache

from config import Config, ServiceConfig
from proxy.state import COLORS, Color

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class Settings:
    max_header_bytes: int
    max_headers: int
    max_body_bytes: int | None
    max_connections: int
    override_header: bytes  # lowercased
    override_cookie: bytes
    override_token: bytes | None  # None: overrides need no token
    sticky_cookie: bytes
    request_header_timeout: float
    upstream_response_timeout: float
    idle_timeout: float
    connect_timeout: float
    trusted: tuple[IPNetwork, ...]
    # Response header lines per color, built once: the served color; and the sticky
    # cookie's line, ``% bucket``, added to a client's first response under a split.
    color_extra: dict[Color, bytes]
    sticky_set: bytes
    # The plain-head reader declines a request carrying the override header before it
    # knows the service; it can only do so when every service names the same header.
    fast: bool = True

    def is_trusted(self, peer: str) -> bool:
        if not self.trusted:
            return False
        return _trusted(peer, self.trusted)


@lru_cache(maxsize=4096)
def _trusted(peer: str, nets: tuple[IPNetwork, ...]) -> bool:
    try:
        addr = ipaddress.ip_address(peer)
    except ValueError:
        return False
    return any(addr in net for net in nets)


OVERRIDE_TOKEN_HEADER = b"x-bg-override-token"


def build_settings(
    config: Config, service: ServiceConfig | None = None, environ: dict[str, str] | None = None
) -> Settings:
    """The settings of ``service`` (its routing and upstream timeouts over the top-level
    connection limits), or the top-level ones that apply before a request has a service."""
    env = os.environ if environ is None else environ
    routing = (service or config).routing
    per_service = (service or config).timeouts
    token: bytes | None = None
    if routing.override_token_env:
        # A configured but empty/unset token must not open overrides to everyone.
        token = env.get(routing.override_token_env, "").encode() or b"\x00unset"
    t = config.timeouts
    lim = config.limits
    header = routing.response_header
    color_extra = {
        c: (b"%s: %s\r\n" % (header.encode(), c.value.encode())) if header else b""
        for c in COLORS
    }
    return Settings(
        max_header_bytes=lim.max_header_bytes,
        max_headers=lim.max_headers,
        max_body_bytes=lim.max_body_bytes,
        max_connections=lim.max_connections,
        override_header=routing.override_header.lower().encode(),
        override_cookie=routing.override_cookie.encode(),
        override_token=token,
        sticky_cookie=routing.sticky_cookie.encode(),
        request_header_timeout=t.request_header,
        upstream_response_timeout=per_service.upstream_response,
        idle_timeout=t.idle,
        connect_timeout=per_service.connect,
        trusted=tuple(config.trusted_proxies),
        color_extra=color_extra,
        sticky_set=b"Set-Cookie: "
        + routing.sticky_cookie.encode().replace(b"%", b"%%")  # a token may hold '%'
        + b"=%d; Path=/; HttpOnly; SameSite=Lax\r\n",
        fast=len({svc.routing.override_header.lower() for svc in config.services}) <= 1,
    )
