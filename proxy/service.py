"""One service: an app with its own blue and green pools and its own routing state.

Everything that used to be keyed by color alone is keyed by (service, color) through
this object: the routing store, the pools and their health, in-flight and WebSocket
counts, traffic counters, the drain and the WebSocket handoff. The request path reaches
it once per request (``ServiceTable.match``) and then only calls its counters, which are
C calls in the compiled build (service.pxd).

A ``Service`` knows its runtime (the ``ProxyServer``, or in a ``--workers`` supervisor,
which serves nothing, its ``ControlRuntime``) only through the ``Runtime`` protocol
(proxy/interfaces.py): the clock, the task spawner, the connections and the upstream
connection pool. It never imports the server, so the modules form no cycle. Both build
their services with ``proxy.catalog.build_services``.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import TYPE_CHECKING, Any

from config import ServiceConfig
from proxy.drain import DrainController
from proxy.errors import UpstreamError
from proxy.pools import Pool, StatsRegistry, Target, Upstream, build_pools, record_result
from proxy.settings import Settings
from proxy.state import COLORS, Color, StateStore
from proxy.stats import Traffic
from proxy.upstream_tls import TlsContexts

if TYPE_CHECKING:
    from proxy.interfaces import Runtime


def pool_targets(config: ServiceConfig) -> dict[Color, list[Target]]:
    out: dict[Color, list[Target]] = {}
    for color in COLORS:
        pool = config.upstreams.pool(color.value)
        tls = pool.tls
        out[color] = [
            (t.url, t.host, t.port, tls if t.scheme == "https" else None) for t in pool.targets
        ]
    return out


class Service:
    # Compiled as a C type (service.pxd): the request path's counters are C calls.
    def __init__(
        self, runtime: Runtime, config: ServiceConfig, settings: Settings, store: StateStore
    ) -> None:
        self.runtime = runtime
        self.name = config.name
        self.config = config
        self.settings = settings
        self.store = store
        self.registry = StatsRegistry()
        self.tls_contexts = TlsContexts()
        self.pools: dict[Color, Pool] = build_pools(
            pool_targets(config), self.registry, self.tls_contexts
        )
        self.in_flight: dict[Color, int] = dict.fromkeys(COLORS, 0)
        self.websockets: dict[Color, int] = dict.fromkeys(COLORS, 0)
        # Responses per color and status: a dict per color, no tuple key per request.
        self.status_counts: dict[Color, dict[int, int]] = {c: {} for c in COLORS}
        self.upstream_errors: Counter[tuple[Color, str]] = Counter()
        self.traffic = Traffic(runtime.loop.time())
        self._traffic = self.traffic.colors
        self._color_idle: dict[Color, asyncio.Event | None] = dict.fromkeys(COLORS)
        self.idle: asyncio.Event | None = None  # set by the server while it waits for idle
        self.tunnels: set[Any] = set()  # Exchange objects of open tunnels
        self.drain = DrainController(self)
        store.add_listener(self.drain.on_state_change)

    # -- what the drain, health checks and gates use of the runtime ------------------------

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self.runtime.loop

    @property
    def now(self) -> float:
        return self.runtime.now

    def spawn(self, coro: Any, name: str) -> asyncio.Task[Any]:
        return self.runtime.spawn(coro, name=f"{self.name}:{name}")

    # -- reload ---------------------------------------------------------------------------

    def apply_config(self, config: ServiceConfig, settings: Settings) -> set[str]:
        """Swap pools and settings; state, counters and connections stay. Returns the
        target URLs this service no longer has."""
        old_urls = self.urls()
        self.config = config
        self.settings = settings
        self.pools = build_pools(pool_targets(config), self.registry, self.tls_contexts)
        return old_urls - self.urls()

    def urls(self) -> set[str]:
        return {u.url for p in self.pools.values() for u in p.upstreams}

    # -- counters (called from the request path: keep them trivial) ------------------------

    def begin_request(self, color: Color) -> None:
        self.in_flight[color] += 1

    def end_request(self, color: Color) -> None:
        n = self.in_flight[color] = self.in_flight[color] - 1
        if n == 0:
            self._now_idle(color)

    def _now_idle(self, color: Color) -> None:
        ev = self._color_idle[color]
        if ev is not None:
            ev.set()
        if self.idle is not None:
            self.idle.set()

    def record_response(self, color: Color, status: int, latency: float) -> None:
        counts = self.status_counts[color]
        counts[status] = counts.get(status, 0) + 1
        traffic = self._traffic[color]
        traffic.record(status, latency)

    def note_upstream_error(self, color: Color, kind: str) -> None:
        self.upstream_errors[color, kind] += 1

    def note_connect_failure(self, upstream: Upstream, exc: UpstreamError) -> None:
        self.upstream_errors[upstream.color, exc.kind] += 1
        # Passive marking: a refused connect counts like a failed health check, where
        # health is decided (a worker's supervisor counts it and tells every worker).
        send = self.runtime.send_connect_failure
        if send is not None:
            send(self, upstream, exc.kind)
            return
        record_result(upstream.stats, False, self.config.health_check, exc.kind)

    def tunnel_opened(self, conn: Any) -> None:
        color = conn.color
        self.tunnels.add(conn)
        self.websockets[color] += 1
        self.end_request(color)  # a tunnel is a connection, not a request in flight

    def tunnel_closed(self, conn: Any) -> None:
        self.tunnels.discard(conn)
        self.drain.forget(conn)
        if conn.color is not None:
            self.websockets[conn.color] -= 1
        if self.idle is not None:
            self.idle.set()

    # -- drain ----------------------------------------------------------------------------

    async def wait_color_idle(self, color: Color) -> None:
        while self.in_flight[color]:
            ev = self._color_idle[color] = asyncio.Event()
            await ev.wait()

    def busy(self) -> bool:
        return any(self.in_flight.values()) or bool(self.tunnels)

    def end_stragglers(self, color: Color) -> int:
        """Cut the requests still running on ``color`` at its drain deadline; how many."""
        n = 0
        for conn in list(self.runtime.connections):
            if conn.service is self and conn.active_on(color):
                n += 1
                conn.abort()
        return n

    def close_idle_upstreams(self, color: Color) -> None:
        self.runtime.cpool.close_idle({u.url for u in self.pools[color].upstreams})

    # -- for status, metrics and the workers' reports --------------------------------------

    def mirror_counts(self, in_flight: dict[Color, int], websockets: dict[Color, int]) -> None:
        """A supervisor's totals of its workers' counts (it serves nothing itself), so that
        ``/status``, metrics and the drain see the workers' traffic."""
        for color in COLORS:
            self.in_flight[color] = in_flight[color]
            self.websockets[color] = websockets[color]
            if in_flight[color] == 0:
                self._now_idle(color)

    @property
    def responses(self) -> Counter[tuple[Color, int]]:
        """Responses by (color, status), for metrics and the workers' reports."""
        return Counter(
            {(c, s): n for c, counts in self.status_counts.items() for s, n in counts.items()}
        )

    def add_responses(self, color: Color, status: int, n: int) -> None:
        counts = self.status_counts[color]
        counts[status] = counts.get(status, 0) + n

    def colors_status(self) -> dict[str, Any]:
        return {
            color.value: {
                "healthy": pool.healthy,
                "in_flight": self.in_flight[color],
                "websockets": self.websockets[color],
                "targets": [{"url": u.url, "healthy": u.stats.healthy} for u in pool.upstreams],
            }
            for color, pool in self.pools.items()
        }
