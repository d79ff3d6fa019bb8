"""What the admin side reads of the process it runs in, and the supervisor's own.

``ProxyView`` is all the control plane, the admin API, metrics, the dashboard and the
runner use of the process: its config and services (each with its store, pools,
counters and drain), whether it is stopping, its edge (TLS) and its observer. Two
things implement it:

- ``ProxyServer`` (proxy/server.py), in a process that serves (``bgproxy serve``, and
  each worker with ``--workers``);
- ``ControlRuntime``, here, in a ``--workers`` supervisor, which serves nothing: its
  services (built by ``proxy.catalog`` like the server's) have no listener, client
  connection or upstream connection under them, and their counters are the sums of
  what the workers report (``add_stats``, ``set_counts``, fed by admin/supervisor.py).
  The health checker, the drain and the gates run on it as they would in one process.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any, Protocol

from config import Config
from proxy.catalog import build_services
from proxy.service import Service
from proxy.state import Color, StateStore
from proxy.tasks import Tasks

if TYPE_CHECKING:
    from proxy.edge import Edge
    from proxy.interfaces import Connection
    from proxy.observability import Observer


class ProxyView(Protocol):
    """The process as the admin side sees it: a ``ProxyServer`` or a ``ControlRuntime``."""

    @property
    def config(self) -> Config: ...

    @property
    def services(self) -> dict[str, Service]: ...

    @property
    def stopping(self) -> bool: ...

    @property
    def edge(self) -> Edge | None:
        """The TLS / PROXY protocol listeners this process serves, if any."""

    @property
    def observer(self) -> Observer | None:
        """The data plane's access log and tracing; None while all are off."""

    def apply_config(self, config: Config, stores: dict[str, StateStore] | None = None) -> None:
        """A reload: kept services keep their state and counters; a new one needs its
        store in ``stores``."""

    async def close(self) -> None:
        """Stop everything now (the process is ending)."""


class _NoUpstreamConnections:
    """A supervisor's upstream connection pool: it never connects, so holds none."""

    def close_idle(self, urls: set[str] | None = None) -> None:
        pass


class ControlRuntime:
    """A ``--workers`` supervisor's runtime: its services and config for the admin side
    (``ProxyView``), and the clock and tasks their drains use (``proxy.interfaces.Runtime``);
    its counters are its workers' sums."""

    def __init__(
        self,
        config: Config,
        stores: dict[str, StateStore],
        observer: Observer | None = None,
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self.config = config
        self.observer = observer
        self.stopping = False
        self.edge: Edge | None = None  # the workers terminate TLS; the admin API reads files
        # ``Runtime`` for the services: no connections here, and health is decided here.
        self.connections: tuple[Connection, ...] = ()
        self.cpool = _NoUpstreamConnections()
        self.send_connect_failure = None
        self.services: dict[str, Service] = {}
        self._tasks = Tasks()
        self.apply_config(config, stores)

    @property
    def now(self) -> float:
        return self.loop.time()

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        """A named task (a service's drain) held here and cancelled by ``close``."""
        return self._tasks.spawn(coro, name)

    def apply_config(self, config: Config, stores: dict[str, StateStore] | None = None) -> None:
        self.services, _ = build_services(self, self.services, config, stores)
        self.config = config

    async def close(self) -> None:
        self.stopping = True
        for svc in self.services.values():
            svc.drain.close()
        await self._tasks.cancel_all()

    # -- the workers' reports ----------------------------------------------------------------

    def set_counts(
        self, name: str, in_flight: dict[Color, int], websockets: dict[Color, int]
    ) -> None:
        """``name``'s requests in flight and WebSockets, summed over the live workers: what
        ``/status``, metrics and the drain see."""
        self.services[name].mirror_counts(in_flight, websockets)

    def add_stats(self, name: str, last: dict[tuple[str, ...], Any], stats: dict[str, Any]) -> None:
        """Add what one worker counted for service ``name`` since its last report to the
        service's counters. ``stats`` holds the worker's cumulative counts; ``last``, kept
        per worker process, the ones of its previous report (updated here)."""
        service = self.services[name]

        def delta(key: tuple[str, ...], total: Any) -> Any:
            before = last.get(key, 0)
            last[key] = total
            return total - before

        for c, status, n in stats["responses"]:
            service.add_responses(Color(c), int(status), delta(("r", c, str(status)), n))
        for c, kind, n in stats["upstream_errors"]:
            service.upstream_errors[Color(c), kind] += delta(("u", c, kind), n)
        for c, n in stats["reconnects"].items():
            service.drain.reconnects_sent[Color(c)] += delta(("w", c), n)
        for c, (requests, errors, latency_sum, counts) in stats["traffic"].items():
            t = service.traffic.colors[Color(c)]
            t.requests += delta(("t", c, "requests"), requests)
            t.errors += delta(("t", c, "errors"), errors)
            t.latency_sum += delta(("t", c, "latency_sum"), latency_sum)
            for i, n in enumerate(counts):
                t.counts[i] += delta(("t", c, str(i)), n)
        # No sweeper runs here to take the traffic windows' samples: each report does.
        service.traffic.sample(self.loop.time())
