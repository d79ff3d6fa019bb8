"""The data-plane runtime: listener, pools, per-color counters and the coarse sweeper.

``ProxyServer`` owns everything the request path touches. The admin side reads it
(``status``) and writes routing state only through the ``StateStore``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import logging
import socket
import time
import weakref
from collections import Counter
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, cast

from config import Config
from proxy.drain import DrainController
from proxy.errors import UpstreamError
from proxy.health import record_result
from proxy.http1 import assert_c_parser
from proxy.phases import IDLE
from proxy.pools import Pool, StatsRegistry, Upstream, build_pools
from proxy.settings import Settings, build_settings
from proxy.state import COLORS, Color, StateStore
from proxy.stats import Traffic
from proxy.upstream import ConnectionPool

if TYPE_CHECKING:
    from proxy.exchange import Exchange
    from proxy.listener import ClientConnection

log = logging.getLogger("bgproxy.server")


def pool_targets(config: Config) -> dict[Color, list[tuple[str, str, int]]]:
    return {
        Color.BLUE: [(t.url, t.host, t.port) for t in config.upstreams.blue.targets],
        Color.GREEN: [(t.url, t.host, t.port) for t in config.upstreams.green.targets],
    }


def _sweep_tick(config: Config) -> float:
    t = config.timeouts
    shortest = min(t.request_header, t.idle, t.upstream_response, t.upstream_keepalive)
    return max(0.02, min(1.0, shortest / 4))


class _NoTransportMap(weakref.WeakValueDictionary):  # type: ignore[type-arg]
    """Stands in for uvloop's map of transports by fd: it keeps nothing."""

    def __setitem__(self, key: object, value: object) -> None:
        pass


def _untrack_transports(loop: asyncio.AbstractEventLoop) -> None:
    """uvloop files every new transport in a WeakValueDictionary keyed by fd, only so that
    ``add_reader()`` on a transport's own fd can be refused. That dictionary's Python-level
    ``__setitem__`` and its weakref callback cost about 8k instructions per connection,
    some 13% of the proxy's user time with a new connection per request. Nothing here adds
    readers to transport fds, so the map is made to keep nothing. On any other loop, or a
    uvloop built differently, nothing matches and nothing changes."""
    if not type(loop).__module__.startswith("uvloop"):
        return
    maps = [o for o in gc.get_referents(loop) if type(o) is weakref.WeakValueDictionary]
    if len(maps) == 1:  # what it holds already stays, weakly, as before
        maps[0].__class__ = _NoTransportMap


class ProxyServer:
    # Compiled as a C type (server.pxd): the request path's counters are C calls.
    def __init__(self, config: Config, store: StateStore) -> None:
        assert_c_parser()
        self.loop = asyncio.get_running_loop()
        self.config = config
        self.settings: Settings = build_settings(config)
        self.store = store
        self.registry = StatsRegistry()
        self.pools: dict[Color, Pool] = build_pools(pool_targets(config), self.registry)
        self.cpool = ConnectionPool(config.timeouts.connect, config.timeouts.upstream_keepalive)
        self.connections: set[ClientConnection] = set()
        self.now = self.loop.time()  # coarse clock, advanced by the sweeper
        self.stopping = False
        self.in_flight: dict[Color, int] = dict.fromkeys(COLORS, 0)
        self.websockets: dict[Color, int] = dict.fromkeys(COLORS, 0)
        # Plain counters; the metrics layer reads them at scrape time.
        # Responses per color and status: a dict per color, no tuple key per request.
        self.status_counts: dict[Color, dict[int, int]] = {c: {} for c in COLORS}
        self.upstream_errors: Counter[tuple[Color, str]] = Counter()
        # Per-color requests/errors/latency for rollback and /status (proxy/stats.py).
        self.traffic = Traffic(self.loop.time())
        self._traffic = self.traffic.colors
        self.started_at = time.time()
        self._servers: list[asyncio.Server] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self._tick = _sweep_tick(config)
        self._idle: asyncio.Event | None = None
        self._bad_requests: Counter[int] = Counter()
        self._bad_logged_at = 0.0
        self._color_idle: dict[Color, asyncio.Event | None] = dict.fromkeys(COLORS)
        self.tunnels: set[Exchange] = set()
        self.drain = DrainController(self)
        store.add_listener(self.drain.on_state_change)

    # -- tasks ----------------------------------------------------------------------------

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        """A named task the server holds a reference to and cancels on stop."""
        task = self.loop.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("task %s failed", task.get_name(), exc_info=task.exception())

    # -- listening ------------------------------------------------------------------------

    async def start(self, sock: socket.socket | None = None) -> None:
        """Start accepting, on ``sock`` if given (workers share one), else on ``listen``."""
        # Imported here: the listener's compiled C type imports this module.
        from proxy.listener import ClientConnection

        _untrack_transports(self.loop)
        # The class itself as the factory: a lambda would add a Python call per connection.
        factory = cast("Callable[[], asyncio.Protocol]", functools.partial(ClientConnection, self))
        if sock is None:
            listen = self.config.listen
            srv = await self.loop.create_server(
                factory,
                listen.host or None,
                listen.port,
                backlog=2048,
                reuse_address=True,
            )
        else:
            srv = await self.loop.create_server(factory, sock=sock, backlog=2048)
        self._servers.append(srv)
        self.spawn(self._sweeper(), name="sweeper")

    @property
    def addresses(self) -> list[tuple[str, int]]:
        out = []
        for srv in self._servers:
            for s in srv.sockets:
                addr = s.getsockname()
                out.append((addr[0], addr[1]))
        return out

    async def _sweeper(self) -> None:
        # One coarse pass over all connections instead of a timer per request.
        while True:
            await asyncio.sleep(self._tick)
            now = self.now = self.loop.time()
            for conn in [c for c in self.connections if 0.0 < c.deadline < now]:
                try:
                    conn.on_deadline()
                except Exception:
                    log.exception("deadline handling failed")
            self.cpool.sweep(time.monotonic())
            self._log_bad_requests(now)
            self.traffic.sample(now)

    async def stop_accepting(self) -> None:
        """Refuse new connections; idle keep-alive ones close, busy ones after their response."""
        self.stopping = True
        for srv in self._servers:
            srv.close()
        for conn in list(self.connections):
            conn.closing = True
            if conn.phase == IDLE:
                conn.close()

    async def wait_idle(self) -> None:
        """Until no request is in flight and no tunnel is open (an event, not a poll)."""
        while any(self.in_flight.values()) or self.tunnels:
            self._idle = asyncio.Event()
            await self._idle.wait()

    async def wait_color_idle(self, color: Color) -> None:
        while self.in_flight[color]:
            ev = self._color_idle[color] = asyncio.Event()
            await ev.wait()

    def end_stragglers(self, color: Color) -> int:
        """Cut the requests still running on ``color`` at its drain deadline; how many."""
        n = 0
        for conn in list(self.connections):
            if conn.active_on(color):
                n += 1
                conn.abort()
        return n

    def close_idle_upstreams(self, color: Color) -> None:
        self.cpool.close_idle({u.url for u in self.pools[color].upstreams})

    async def shutdown(self, timeout: float) -> None:
        """Graceful stop: no new connections, requests finish, WebSockets told and closed."""
        await self.stop_accepting()
        self.drain.shutdown_websockets(self.store.snapshot().active)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self.wait_idle()

    async def close(self) -> None:
        """Stop everything now: listeners, client and upstream connections, tasks."""
        await self.stop_accepting()
        self.drain.close()
        for conn in list(self.connections):
            conn.abort()
        self.cpool.close_all()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            try:
                await task
            except (asyncio.CancelledError, Exception):
                pass
        for srv in self._servers:
            await srv.wait_closed()
        self._servers.clear()

    # -- reload ---------------------------------------------------------------------------

    def apply_config(self, config: Config) -> None:
        """Swap pools, timeouts and the rest; routing state and connections stay."""
        old_urls = {u.url for p in self.pools.values() for u in p.upstreams}
        self.config = config
        self.settings = build_settings(config)
        self.pools = build_pools(pool_targets(config), self.registry)
        new_urls = {u.url for p in self.pools.values() for u in p.upstreams}
        self.cpool.connect_timeout = config.timeouts.connect
        self.cpool.keepalive = config.timeouts.upstream_keepalive
        self.cpool.close_idle(old_urls - new_urls)
        self._tick = _sweep_tick(config)

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
        if self._idle is not None:
            self._idle.set()

    def mirror_counts(self, in_flight: dict[Color, int], websockets: dict[Color, int]) -> None:
        """A supervisor's totals of its workers' counts (it serves nothing itself), so that
        ``/status``, metrics and the drain see the workers' traffic."""
        for color in COLORS:
            self.in_flight[color] = in_flight[color]
            self.websockets[color] = websockets[color]
            if in_flight[color] == 0:
                self._now_idle(color)

    def tunnel_opened(self, conn: Exchange) -> None:
        color = conn.color
        assert color is not None
        self.tunnels.add(conn)
        self.websockets[color] += 1
        self.end_request(color)  # a tunnel is a connection, not a request in flight

    def tunnel_closed(self, conn: Exchange) -> None:
        self.tunnels.discard(conn)
        self.drain.forget(conn)
        if conn.color is not None:
            self.websockets[conn.color] -= 1
        if self._idle is not None:
            self._idle.set()

    def record_response(self, color: Color | None, status: int, latency: float) -> None:
        if color is not None:
            counts = self.status_counts[color]
            counts[status] = counts.get(status, 0) + 1
            traffic = self._traffic[color]
            traffic.record(status, latency)

    @property
    def responses(self) -> Counter[tuple[Color, int]]:
        """Responses by (color, status), for metrics and the workers' reports."""
        return Counter(
            {(c, s): n for c, counts in self.status_counts.items() for s, n in counts.items()}
        )

    def add_responses(self, color: Color, status: int, n: int) -> None:
        counts = self.status_counts[color]
        counts[status] = counts.get(status, 0) + n

    def note_bad_request(self, status: int) -> None:
        self._bad_requests[status] += 1

    def _log_bad_requests(self, now: float) -> None:
        # A flood of bad requests costs one log line per period, never one per request.
        if self._bad_requests and now - self._bad_logged_at >= 10.0:
            summary = ", ".join(f"{n}x {code}" for code, n in sorted(self._bad_requests.items()))
            log.warning("rejected client requests in the last period: %s", summary)
            self._bad_requests.clear()
            self._bad_logged_at = now

    def note_upstream_error(self, color: Color | None, kind: str) -> None:
        if color is not None:
            self.upstream_errors[color, kind] += 1

    def note_connect_failure(self, upstream: Upstream, exc: UpstreamError) -> None:
        self.upstream_errors[upstream.color, exc.kind] += 1
        # Passive marking: a refused connect counts like a failed health check.
        record_result(upstream.stats, False, self.config.health_check, exc.kind)

    # -- status ---------------------------------------------------------------------------

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
