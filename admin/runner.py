"""``bgproxy serve``: wire the data plane, the store and the admin API, and run them.

This is the composition root: the only place that knows every layer.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import ipaddress
import logging
import os
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aiohttp import web

from admin.api import build_admin_app
from admin.control import ControlPlane, ServiceControl
from admin.fleet import connect_store, open_store
from admin.gates import Gates
from admin.hooks import Hooks
from admin.metrics import add_metrics_route, build_registry
from admin.rollback import RollbackController
from admin.rollout import RolloutDriver
from admin.rollout_api import add_rollout_routes
from admin.view import ControlRuntime, ProxyView
from config import Config, ConfigError, ServiceConfig, load_config
from config.tls import warnings as tls_warnings
from proxy.edge import Edge, bind
from proxy.health import HealthChecker
from proxy.listener import ClientConnection
from proxy.observability import Observer, build_observer
from proxy.otel import OtelUnavailable
from proxy.server import ProxyServer
from proxy.state import Event, Listener, RoutingState, StateStore, StoreUnavailable

if TYPE_CHECKING:  # ACME's imports (acme, requests, OpenSSL) load only when it is configured
    from proxy.acme import AcmeManager, Timing

log = logging.getLogger("bgproxy")


class StartupError(Exception):
    """A reason ``serve`` cannot start; printed as one line, exit code attached."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def admin_token(config: Config, environ: dict[str, str] | None = None) -> str | None:
    env = os.environ if environ is None else environ
    name = config.admin.token_env
    token = env.get(name, "") if name else ""
    if not token and not _is_loopback(config.admin.listen.host):
        raise StartupError(
            f"admin.listen: {config.admin.listen} is not loopback and no token is set "
            f"(set ${name or 'BGPROXY_ADMIN_TOKEN'} or listen on 127.0.0.1)",
            code=2,
        )
    return token or None


@dataclass
class Running:
    """A started proxy: what tests and the demo need to reach it."""

    view: ProxyView  # the server, or in a supervisor (--workers) its ControlRuntime
    control: ControlPlane
    runner: web.AppRunner | None  # None in a worker: its supervisor serves the admin API
    admin: bool = True
    safety: contextlib.AsyncExitStack = field(default_factory=contextlib.AsyncExitStack)
    # Per service: its store's context, and its gates and rollback watch.
    stores: dict[str, contextlib.AsyncExitStack] = field(default_factory=dict)
    watches: dict[str, contextlib.AsyncExitStack] = field(default_factory=dict)
    health: HealthChecker | None = None
    acme: AcmeManager | None = None
    observer: Observer | None = None
    logged: set[Any] = field(default_factory=set)  # services whose events are logged

    @property
    def server(self) -> ProxyServer:
        """The data plane; a supervisor has none (its workers serve)."""
        assert isinstance(self.view, ProxyServer), "no data plane in this process"
        return self.view

    @property
    def proxy_address(self) -> tuple[str, int]:
        return self.server.addresses[0]

    @property
    def tls_address(self) -> tuple[str, int]:
        """The HTTPS listener's address (``tls.listen``)."""
        edge = self.server.edge
        assert edge is not None and edge.tls_listener is not None, "no TLS listener"
        addr = edge.tls_listener.sock.getsockname()
        return addr[0], addr[1]

    @property
    def admin_address(self) -> tuple[str, int]:
        assert self.runner is not None, "no admin API in this process"
        site = next(iter(self.runner.sites))
        addr = site._server.sockets[0].getsockname()  # type: ignore[union-attr]
        return addr[0], addr[1]


@contextlib.asynccontextmanager
async def running(
    config: Config,
    *,
    stores: dict[str, StateStore] | None = None,
    sock: socket.socket | None = None,
    tls_sock: socket.socket | None = None,
    admin: bool = True,
    data_plane: bool = True,
    health_checks: bool = True,
    before_serving: Callable[[ProxyServer], None] | None = None,
    acme_timing: Timing | None = None,
) -> AsyncIterator[Running]:
    """Start the proxy and its admin API; on exit stop both, at once.

    The admin API comes up first so that ``/readyz`` answers 503 while a Redis store is
    awaited; the data plane starts once a routing state is loaded. A worker passes the
    ``stores`` its supervisor feeds, its listening ``sock`` and ``admin=False``; a
    supervisor runs the admin API with ``data_plane=False`` on a ``ControlRuntime``
    instead of a server (its workers serve) and checks health for them: a worker passes
    ``health_checks=False``, and in ``before_serving`` (called with the server once its
    services exist, before it accepts a connection) applies its supervisor's health
    results.
    """
    token = admin_token(config) if admin else None
    async with contextlib.AsyncExitStack() as stack:
        store_stacks: dict[str, contextlib.AsyncExitStack] = {}
        stack.push_async_callback(_close_all, store_stacks)
        if stores is None:
            stores = {
                svc.name: await _open_store(store_stacks, config, svc) for svc in config.services
            }
        # Closed after the server (the stack unwinds in reverse): the last requests' lines
        # and spans still go out.
        observer = _observer(config, data_plane)
        stack.push_async_callback(observer.close)
        active = observer if observer.active else None
        server: ProxyServer | None = None
        view: ProxyView
        if data_plane:
            view = server = ProxyServer(config, stores)
            server.observer = active
        else:
            view = ControlRuntime(config, stores, active)
        control = ControlPlane(view, token)
        control.observer = observer
        runner = None
        if admin:
            app = build_admin_app(control, config.limits.admin_max_body_bytes)
            add_rollout_routes(app, control)
            add_metrics_route(app, build_registry(control))
            runner = web.AppRunner(app, access_log=None, handle_signals=False)
            await runner.setup()
            stack.push_async_callback(runner.cleanup)
            listen = config.admin.listen
            try:
                await web.TCPSite(runner, listen.host, listen.port, reuse_address=True).start()
            except OSError as exc:
                raise StartupError(
                    f"admin.listen: cannot listen on {listen}: {exc.strerror}"
                ) from exc
        stack.push_async_callback(view.close)
        try:
            for store in stores.values():
                await connect_store(store, config)
        except StoreUnavailable as exc:
            raise StartupError(f"state.redis_url: {exc}") from exc
        if server is not None:
            if before_serving is not None:
                before_serving(server)
            await _start_listeners(server, config, sock, tls_sock)
        # Health checks, gates and the rollback watch: closed first, in reverse, on exit.
        safety = contextlib.AsyncExitStack()
        checker = None
        if health_checks:
            checker = await safety.enter_async_context(HealthChecker(view))
        run = Running(
            view, control, runner, admin, safety, store_stacks, health=checker,
            observer=observer,
        )  # fmt: skip
        log_events(run)
        safety.push_async_callback(_close_all, run.watches)
        if admin:  # a worker's supervisor gates and watches, on the sum of its workers' traffic
            for svc_control in control.services.values():
                await watch_service(run, svc_control)
        if admin and server is not None and config.tls.acme.enabled:
            run.acme = await safety.enter_async_context(start_acme(server, config, acme_timing))
            control.acme = run.acme
        control.ready = True
        try:
            yield run
        finally:
            control.ready = False
            await safety.aclose()


async def _start_listeners(
    server: ProxyServer,
    config: Config,
    sock: socket.socket | None,
    tls_sock: socket.socket | None,
) -> None:
    """The plain listener, and with ``tls.listen`` or ``proxy_protocol`` the edge's.
    Without either, the plain one is uvloop's own server making ``ClientConnection``."""
    if config.tls.listen is None and not config.proxy_protocol:
        try:
            await server.start(ClientConnection, sock)
        except OSError as exc:
            raise StartupError(f"listen: cannot listen on {config.listen}: {exc.strerror}") from exc
        return
    edge = server.edge = Edge(server, config)
    for line in tls_warnings(config.tls):
        log.warning("%s", line)
    if config.proxy_protocol:
        try:
            edge.listen(sock or bind(config.listen), tls=False)
        except OSError as exc:
            raise StartupError(f"listen: cannot listen on {config.listen}: {exc.strerror}") from exc
        await server.start(None)
    else:
        try:
            await server.start(edge.plain_factory(), sock)
        except OSError as exc:
            raise StartupError(f"listen: cannot listen on {config.listen}: {exc.strerror}") from exc
    if config.tls.listen is not None:
        try:
            edge.listen(tls_sock or bind(config.tls.listen), tls=True)
        except OSError as exc:
            raise StartupError(
                f"tls.listen: cannot listen on {config.tls.listen}: {exc.strerror}"
            ) from exc


def _observer(config: Config, data_plane: bool) -> Observer:
    try:
        observer = build_observer(config, data_plane)
    except OtelUnavailable as exc:
        raise StartupError(f"tracing.otlp_endpoint: {exc}", code=2) from exc
    access = observer.access
    if access is not None and access.sink.error is not None:
        raise StartupError(f"access_log.destination: {access.sink.error}")
    return observer


def log_events(run: Running) -> None:
    """Control-plane events as log lines: every accepted change (switch, weights,
    rollback, rollout step...) and drain end where the state is decided (this process
    has the admin API), each handoff batch where the WebSockets are (it serves)."""
    observer = run.observer
    if observer is None:
        return
    # Only services still served: a removed one must be free to go (its store with it).
    run.logged &= {control.service for control in run.control.services.values()}
    for name, control in run.control.services.items():
        service = control.service
        if service in run.logged:
            continue
        run.logged.add(service)
        note = _noter(observer, name)
        if run.admin:
            service.store.add_listener(_event_listener(note))
            service.drain.on_done = note
        if run.view.observer is not None or not run.admin:
            service.drain.on_handoff = note


def _event_listener(note: Callable[[dict[str, Any]], None]) -> Listener:
    def listener(old: RoutingState, new: RoutingState, event: Event | None) -> None:
        if event is not None:  # None: a re-read or re-seed, no change of anyone's making
            note(event.to_dict())

    return listener


def _noter(observer: Observer, service: str) -> Callable[[dict[str, Any]], None]:
    def note(fields: dict[str, Any]) -> None:
        observer.event({"service": service, **fields})

    return note


def start_acme(
    server: ProxyServer, config: Config, timing: Timing | None = None
) -> AcmeManager:
    """The ACME manager for ``tls.acme``, its storage chosen by ``state.backend``. It
    installs into the TLS listener's certificate store, whose ``http01`` tokens the plain
    listener answers (``tls.acme`` needs ``tls.listen``, so the edge exists)."""
    from proxy.acme import AcmeManager
    from proxy.acme_storage import AcmeStorage, FileStorage, RedisStorage

    acme = config.tls.acme
    storage: AcmeStorage
    if config.state.backend == "redis":
        storage = RedisStorage(config.state.redis_url, config.state.key_prefix)
    else:
        storage = FileStorage(acme.storage)
    assert server.edge is not None
    return AcmeManager(acme, config.acme_domains(), server.edge.certs, storage, timing)


async def watch_service(run: Running, control: ServiceControl) -> None:
    """Gates, hooks, the rollback watch and the rollout driver of one service, closed with
    the process (or when a reload removes the service). Only a process with the admin API
    runs them: with ``--workers``, the supervisor drives and the workers follow."""
    stack = contextlib.AsyncExitStack()
    control.gates = await stack.enter_async_context(Gates(control.service))
    service = control.service
    control.hooks = await stack.enter_async_context(
        Hooks(control.name, lambda: service.config.hooks)
    )
    control.rollback = await stack.enter_async_context(RollbackController(control))
    control.rollout = await stack.enter_async_context(RolloutDriver(control))
    # Starting them awaits: a reload right behind this one may have removed the service
    # meanwhile, or started it again. Keep only the current control's watch, never two.
    if run.control.services.get(control.name) is not control:
        await stack.aclose()
        return
    old = run.watches.pop(control.name, None)
    run.watches[control.name] = stack
    if old is not None:
        await old.aclose()


async def _open_store(
    stacks: dict[str, contextlib.AsyncExitStack], config: Config, service: ServiceConfig
) -> StateStore:
    """``service``'s store, kept open until the service is removed or the process ends."""
    stack = stacks[service.name] = contextlib.AsyncExitStack()
    store: StateStore = await stack.enter_async_context(open_store(config, service))
    return store


async def _close_all(stacks: dict[str, contextlib.AsyncExitStack]) -> None:
    for name in list(stacks):
        await stacks.pop(name).aclose()


async def graceful_stop(run: Running, timeout: float) -> None:
    """SIGTERM: not ready at once, stop accepting, let in-flight requests finish."""
    run.control.ready = False
    await run.server.shutdown(timeout)


def reload_config(run: Running, path: str) -> bool:
    try:
        config = load_config(path)
    except ConfigError as exc:
        log.error("reload rejected, keeping the running config:\n%s", exc)
        return False
    if run.view.edge is not None:
        run.view.edge.reload(config)  # certificates: a bad file keeps the ones in use
    elif config.tls.listen is not None or config.proxy_protocol:
        log.warning("tls.listen and proxy_protocol apply at the next start, not on reload")
    for line in tls_warnings(config.tls):
        log.warning("%s", line)
    added = {svc.name for svc in config.services} - set(run.view.services)
    if not added:
        run.view.apply_config(config)
        asyncio.get_running_loop().create_task(_follow_services(run), name="reload")
    else:  # a new service needs its store opened and loaded first
        asyncio.get_running_loop().create_task(_add_services(run, config, added), name="reload")
    log.info("reloaded %s", path)
    return True


async def _add_services(run: Running, config: Config, names: set[str]) -> None:
    stores: dict[str, StateStore] = {}
    try:
        for svc in config.services:
            if svc.name in names:
                stores[svc.name] = await _open_store(run.stores, config, svc)
                await connect_store(stores[svc.name], config)
    except StoreUnavailable as exc:
        log.error("reload: new services %s not started: %s", ", ".join(sorted(names)), exc)
        return
    run.view.apply_config(config, stores)
    await _follow_services(run)


async def _follow_services(run: Running) -> None:
    """After a reload: controls for new services, watches started and ended to match."""
    added = run.control.sync_services()
    log_events(run)
    if run.admin:
        for control in added:
            await watch_service(run, control)
    # A removed service's requests in flight hold its objects and finish; its watch and
    # its store (with Redis: connections, heartbeat, instance records) end now. Each
    # leaves ``run`` once it has ended, so what ``run`` lists is what is still live.
    for stacks in (run.watches, run.stores):
        for name in [n for n in stacks if n not in run.control.services]:
            await stacks[name].aclose()
            stacks.pop(name, None)  # a reload overlapping this one may have gone first


def settle_heap() -> None:
    """Freeze what start-up built (config, imported modules, the admin app) out of the
    garbage collector: it lives as long as the process, and every full collection would
    walk it all. Measured under connection churn (wrk, a new connection per request):
    full collections stalled every connection for 27-34 ms, twice in 8 s; frozen, they
    take about 1 ms."""
    gc.freeze()


def run_loop(coro: object) -> int:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency; kept for odd platforms
        return asyncio.run(coro)  # type: ignore[arg-type]
    return uvloop.run(coro)  # type: ignore[arg-type]
