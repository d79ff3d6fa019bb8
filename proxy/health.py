"""Active health checks of every target, and the threshold rule passive marking shares.

Each round GETs ``health_check.path`` on every target of both colors at once (any 2xx
within ``timeout`` passes) and feeds the result to ``record_result``; the request path
feeds connect failures to the same rule (``Service.note_connect_failure``;
``record_result`` lives in ``proxy.pools`` beside the stats it updates). A target
flips after ``healthy_threshold`` / ``unhealthy_threshold`` consecutive results; the
pools skip unhealthy ones. One checker serves every service of the process, each at its
own ``health_check.interval``; each round reads the services, their pools and config
anew, so a reload's services, targets and settings apply from the next round, and
``UpstreamStats`` (kept by URL per service) carry a surviving target's state across it.

With ``--workers`` the supervisor runs the only checker of the process tree and pushes
each service's ``health_report`` to its workers whenever a target flips (listeners of
``HealthChecker``), and whole at a worker's start and after a reload; a worker runs no
checker, sets its pools' stats from the pushes (``apply_health``) and sends its connect
failures to the supervisor to count (``ProxyServer.send_connect_failure``). The checker
reads only the services of what it checks for (``Checked``): the serving process's
``ProxyServer``, or a supervisor's runtime, which serves nothing.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol

import aiohttp

from config import HealthCheckConfig
from proxy.pools import Upstream, record_result
from proxy.tasks import cancel_and_wait
from proxy.upstream_tls import aiohttp_tls_failure, request_options

if TYPE_CHECKING:
    from proxy.service import Service

log = logging.getLogger("bgproxy.health")


class Checked(Protocol):
    """What the checker reads of its process, anew each round (a reload's services)."""

    @property
    def services(self) -> dict[str, Service]: ...


class HealthChecker:
    """The periodic check loop: an async context manager owning its session and task."""

    def __init__(self, server: Checked) -> None:
        self.server = server
        self.rounds = 0
        self._due: dict[str, float] = {}  # service -> loop time of its next round
        self._session: aiohttp.ClientSession | None = None
        self._task: asyncio.Task[None] | None = None
        self._listeners: list[Callable[[Service], None]] = []

    def add_listener(self, listener: Callable[[Service], None]) -> None:
        """Called after a round with each service one of whose targets flipped."""
        self._listeners.append(listener)

    async def __aenter__(self) -> HealthChecker:
        # One session for every check; force_close so each check proves a fresh
        # connection is accepted (what a client request needs), like HAProxy's checks.
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(force_close=True, limit=0),
            auto_decompress=False,
            headers={"User-Agent": "bgproxy-health"},
        )
        self._task = asyncio.get_running_loop().create_task(self._run(), name="health-checks")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await cancel_and_wait(self._task)
        self._task = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            services = self.server.services
            due = [svc for name, svc in services.items() if self._due.get(name, 0.0) <= started]
            try:
                await self.check_all(due)
            except Exception:
                log.exception("health check round failed")
            # Fixed rate, not fixed delay: a slow target does not stretch the period.
            for svc in due:
                self._due[svc.name] = started + svc.config.health_check.interval
            self._due = {name: at for name, at in self._due.items() if name in services}
            wake = min(self._due.values(), default=started + 1.0)
            await asyncio.sleep(max(0.0, wake - loop.time()))

    async def check_all(self, services: list[Service] | None = None) -> None:
        """One round: every target of both colors of ``services`` (all), concurrently."""
        if services is None:
            services = list(self.server.services.values())
        checks = [
            (svc, up, svc.config.health_check)
            for svc in services
            for pool in svc.pools.values()
            for up in pool.upstreams
        ]
        results = await asyncio.gather(*(self._check(up, cfg) for _, up, cfg in checks))
        flipped: dict[str, Service] = {}
        for (svc, up, cfg), error in zip(checks, results, strict=True):
            if record_result(up.stats, error is None, cfg, error):
                flipped[svc.name] = svc
        self.rounds += 1
        for svc in flipped.values():
            for listener in self._listeners:
                try:
                    listener(svc)
                except Exception:
                    log.exception("health listener failed")

    async def _check(self, up: Upstream, cfg: HealthCheckConfig) -> str | None:
        """None when the check passed, else a short reason (never exception text)."""
        assert self._session is not None
        try:
            async with asyncio.timeout(cfg.timeout):
                async with self._session.get(
                    up.url + cfg.path, allow_redirects=False, **request_options(up.tls)
                ) as resp:
                    status = resp.status
        except TimeoutError:
            return "check timed out"
        except aiohttp.ClientSSLError as exc:
            return f"check {aiohttp_tls_failure(exc) or 'TLS handshake failed'}"
        except aiohttp.ClientConnectionError:
            return "check connection failed"
        except aiohttp.ClientError:
            return "check got a bad response"
        if 200 <= status < 300:
            return None
        return f"check answered {status}"


# (color, url, healthy, last_error) per target, as JSON lists on the workers' channel.
HealthReport = list[list[Any]]


def health_report(service: Service) -> HealthReport:
    """What ``service``'s targets' health is here, for processes that follow this one."""
    return [
        [up.color.value, up.url, up.stats.healthy, up.stats.last_error]
        for pool in service.pools.values()
        for up in pool.upstreams
    ]


def apply_health(service: Service, report: HealthReport) -> None:
    """Set ``service``'s pools' stats to a ``health_report`` made elsewhere (a worker
    follows its supervisor's checks); the pools read them as they read a local check's.
    A target the report does not name keeps its state (new: healthy)."""
    by_target = {(str(c), str(url)): (bool(ok), err) for c, url, ok, err in report}
    for pool in service.pools.values():
        for up in pool.upstreams:
            seen = by_target.get((up.color.value, up.url))
            if seen is not None:
                up.stats.healthy, up.stats.last_error = seen
