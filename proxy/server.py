"""The data-plane runtime: listeners, connections, the upstream connection pool, the
coarse clock and sweeper, and the services (proxy/service.py) with their per-color state.

The admin side reads the services (``status``) and writes routing state only through
each service's ``StateStore``.
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
from proxy.catalog import build_services, service_table
from proxy.hosts import ServiceTable
from proxy.http1 import assert_c_parser
from proxy.phases import IDLE
from proxy.service import Service
from proxy.settings import Settings, build_settings
from proxy.state import StateStore
from proxy.tasks import Tasks
from proxy.upstream import ConnectionPool

if TYPE_CHECKING:
    from proxy.interfaces import Connection

log = logging.getLogger("bgproxy.server")


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
    # Compiled as a C type (server.pxd).
    def __init__(self, config: Config, stores: dict[str, StateStore]) -> None:
        assert_c_parser()
        self.loop = asyncio.get_running_loop()
        self.config = config
        self.settings: Settings = build_settings(config)
        self.cpool = ConnectionPool(config.timeouts.connect, config.timeouts.upstream_keepalive)
        self.connections: set[Connection] = set()
        self.now = self.loop.time()  # coarse clock, advanced by the sweeper
        self.stopping = False
        self.started_at = time.time()
        self._servers: list[asyncio.Server] = []
        self._tasks = Tasks()
        self._tick = _sweep_tick(config)
        self._bad_requests: Counter[int] = Counter()
        self._bad_logged_at = 0.0
        self.services: dict[str, Service] = {}
        # Access log, request IDs, tracing (proxy/observability.py): None while all are off.
        self.observer: Any = None
        self.table = ServiceTable((), None)
        # The edge features (proxy/edge.py: TLS, PROXY protocol, redirect), when configured;
        # set by the composition root, read by the admin API and an ACME component.
        self.edge: Any = None
        # None: this process decides its targets' health. A worker follows its
        # supervisor's checks instead, and sends its connect failures there through this
        # callable, ``(service, upstream, kind)`` (proxy/health.py).
        self.send_connect_failure: Any = None
        self.apply_config(config, stores)

    # -- tasks ----------------------------------------------------------------------------

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        """A named task the server holds a reference to and cancels on stop."""
        return self._tasks.spawn(coro, name)

    # -- listening ------------------------------------------------------------------------

    async def start(
        self, protocol: Callable[[ProxyServer], object] | None, sock: socket.socket | None = None
    ) -> None:
        """Start accepting connections served by ``protocol(self)`` (the listener's
        ``ClientConnection``, passed in by the composition root: the server never imports
        the request path), on ``sock`` if given (workers share one), else on ``listen``.
        With ``protocol`` None, the listeners are the edge's (``adopt``): only the
        sweeper starts."""
        _untrack_transports(self.loop)
        if protocol is None:
            self.spawn(self._sweeper(), name="sweeper")
            return
        # The class itself as the factory: a lambda would add a Python call per connection.
        factory = cast("Callable[[], asyncio.Protocol]", functools.partial(protocol, self))
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

    def adopt(self, listener: Any) -> None:
        """A listener started elsewhere (proxy/edge.py), closed with the others; it has
        ``close()``, ``wait_closed()`` and ``sockets`` like an ``asyncio.Server``."""
        self._servers.append(listener)

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
            for svc in self.services.values():
                svc.traffic.sample(now)

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
        """Until no request is in flight and no tunnel is open in any service (an event set
        by the services' counters, not a poll)."""
        while any(svc.busy() for svc in self.services.values()):
            idle = asyncio.Event()
            for svc in self.services.values():
                svc.idle = idle
            await idle.wait()

    async def shutdown(self, timeout: float) -> None:
        """Graceful stop: no new connections, requests finish, WebSockets told and closed."""
        await self.stop_accepting()
        for svc in self.services.values():
            svc.drain.shutdown_websockets(svc.store.snapshot().active)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self.wait_idle()

    async def close(self) -> None:
        """Stop everything now: listeners, client and upstream connections, tasks."""
        await self.stop_accepting()
        for svc in self.services.values():
            svc.drain.close()
        for conn in list(self.connections):
            conn.abort()
        self.cpool.close_all()
        await self._tasks.cancel_all()
        for srv in self._servers:
            await srv.wait_closed()
        self._servers.clear()

    # -- reload ---------------------------------------------------------------------------

    def apply_config(self, config: Config, stores: dict[str, StateStore] | None = None) -> None:
        """Swap services (proxy/catalog.py), pools, timeouts and the rest; the routing
        state, counters and connections of every kept service stay. A new service needs
        its store in ``stores``; a removed one's requests in flight finish on the objects
        they hold."""
        services, gone = build_services(self, self.services, config, stores)
        self.config = config
        self.settings = build_settings(config)
        self.services = services
        self.table = service_table(config, services)
        self.cpool.connect_timeout = config.timeouts.connect
        self.cpool.keepalive = config.timeouts.upstream_keepalive
        still = {u for svc in services.values() for u in svc.urls()}
        self.cpool.close_idle(gone - still)
        self._tick = _sweep_tick(config)

    # -- counters (called from the request path: keep them trivial) ------------------------

    def note_bad_request(self, status: int) -> None:
        self._bad_requests[status] += 1

    def _log_bad_requests(self, now: float) -> None:
        # A flood of bad requests costs one log line per period, never one per request.
        if self._bad_requests and now - self._bad_logged_at >= 10.0:
            summary = ", ".join(f"{n}x {code}" for code, n in sorted(self._bad_requests.items()))
            log.warning("rejected client requests in the last period: %s", summary)
            self._bad_requests.clear()
            self._bad_logged_at = now
