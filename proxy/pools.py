"""Upstream targets, per-color pools and the stats that outlive config reloads.

``Upstream`` is one configured target (immutable). ``UpstreamStats`` is mutable and
keyed by the target URL, kept outside the pool so health and counters survive a reload
that rebuilds the pools (Caddy's Upstream/Host split).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

from config import HealthCheckConfig, UpstreamTlsConfig
from proxy.state import Color
from proxy.upstream_tls import TlsContexts, UpstreamTls

log = logging.getLogger("bgproxy.health")


@dataclass(slots=True)
class UpstreamStats:
    url: str
    healthy: bool = True  # healthy until a check says otherwise: the proxy serves at once
    consecutive_ok: int = 0
    consecutive_fail: int = 0
    last_error: str | None = None


@dataclass(frozen=True, slots=True)
class Upstream:
    url: str
    host: str
    port: int
    color: Color
    stats: UpstreamStats = field(compare=False, hash=False)
    # Precomputed so the hot path never formats it.
    host_header: bytes = field(default=b"", compare=False)
    tls: UpstreamTls | None = field(default=None, compare=False)  # https:// targets
    # Idle connections are filed under it: the url, plus how an https one is verified.
    pool_key: str = field(default="", compare=False)


class Pool:
    """A color's targets, used round-robin among the healthy ones."""

    __slots__ = ("_next", "color", "upstreams")

    def __init__(self, color: Color, upstreams: Iterable[Upstream]) -> None:
        self.color = color
        self.upstreams = tuple(upstreams)
        self._next = 0

    def pick(self, exclude: Upstream | None = None) -> Upstream | None:
        """The next healthy target after the last one picked; None when none is healthy."""
        ups = self.upstreams
        n = len(ups)
        start = self._next
        for i in range(n):
            up = ups[(start + i) % n]
            if up.stats.healthy and up is not exclude:
                self._next = (start + i + 1) % n
                return up
        return None

    @property
    def healthy(self) -> bool:
        return any(u.stats.healthy for u in self.upstreams)


def record_result(
    stats: UpstreamStats, ok: bool, cfg: HealthCheckConfig, error: str | None = None
) -> bool:
    """Count one check result against the thresholds; True when ``stats.healthy`` flipped."""
    if ok:
        stats.consecutive_fail = 0
        stats.consecutive_ok += 1
        if not stats.healthy and stats.consecutive_ok >= cfg.healthy_threshold:
            stats.healthy = True
            stats.last_error = None
            log.warning("target %s is healthy again", stats.url)
            return True
        return False
    stats.consecutive_ok = 0
    stats.consecutive_fail += 1
    if error is not None:
        stats.last_error = error
    if stats.healthy and stats.consecutive_fail >= cfg.unhealthy_threshold:
        stats.healthy = False
        log.warning("target %s is unhealthy (%s), out of rotation", stats.url, stats.last_error)
        return True
    return False


class StatsRegistry:
    """UpstreamStats by URL; a reload reuses the entries of targets it keeps."""

    def __init__(self) -> None:
        self._by_url: dict[tuple[Color, str], UpstreamStats] = {}

    def get(self, color: Color, url: str) -> UpstreamStats:
        key = (color, url)
        stats = self._by_url.get(key)
        if stats is None:
            stats = self._by_url[key] = UpstreamStats(url)
        return stats

    def retain(self, keys: set[tuple[Color, str]]) -> None:
        for key in list(self._by_url):
            if key not in keys:
                del self._by_url[key]


# (url, host, port, tls): tls is the pool's settings for an https:// target, else None.
Target = tuple[str, str, int, UpstreamTlsConfig | None]


def build_pools(
    targets: dict[Color, list[Target]], registry: StatsRegistry, contexts: TlsContexts
) -> dict[Color, Pool]:
    pools: dict[Color, Pool] = {}
    keep: set[tuple[Color, str]] = set()
    keep_tls: set[UpstreamTlsConfig] = set()
    for color, items in targets.items():
        ups = []
        for url, host, port, tls_cfg in items:
            keep.add((color, url))
            default_port = 80 if tls_cfg is None else 443
            hh = (host if port == default_port else f"{host}:{port}").encode()
            tls = None
            if tls_cfg is not None:
                keep_tls.add(tls_cfg)
                tls = contexts.get(url, tls_cfg)
            key = url if tls is None else tls.key
            stats = registry.get(color, url)
            ups.append(Upstream(url, host, port, color, stats, hh, tls, key))
        pools[color] = Pool(color, ups)
    registry.retain(keep)
    contexts.retain(keep_tls)
    return pools
