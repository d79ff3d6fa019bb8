"""``bgproxy serve``: wire the data plane, the store and the admin API, and run them.

This is the composition root: the only place that knows every layer.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass

from aiohttp import web

from admin.api import ControlPlane, build_admin_app
from config import Config, ConfigError, load_config
from proxy.server import ProxyServer
from proxy.state import Color, MemoryStateStore, RoutingState

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

    server: ProxyServer
    control: ControlPlane
    runner: web.AppRunner

    @property
    def proxy_address(self) -> tuple[str, int]:
        return self.server.addresses[0]

    @property
    def admin_address(self) -> tuple[str, int]:
        site = next(iter(self.runner.sites))
        addr = site._server.sockets[0].getsockname()  # type: ignore[union-attr]
        return addr[0], addr[1]


@contextlib.asynccontextmanager
async def running(config: Config) -> AsyncIterator[Running]:
    """Start the proxy and its admin API; on exit stop both, at once."""
    token = admin_token(config)
    store = MemoryStateStore(RoutingState.initial(Color(config.routing.active)))
    server = ProxyServer(config, store)
    try:
        await server.start()
    except OSError as exc:
        await server.close()
        raise StartupError(f"listen: cannot listen on {config.listen}: {exc.strerror}") from exc
    control = ControlPlane(server, store, token)
    app = build_admin_app(control, config.limits.admin_max_body_bytes)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    listen = config.admin.listen
    try:
        await web.TCPSite(runner, listen.host, listen.port, reuse_address=True).start()
    except OSError as exc:
        await runner.cleanup()
        await server.close()
        raise StartupError(f"admin.listen: cannot listen on {listen}: {exc.strerror}") from exc
    control.ready = True
    try:
        yield Running(server, control, runner)
    finally:
        control.ready = False
        await server.close()
        await runner.cleanup()


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
    run.server.apply_config(config)
    log.info("reloaded %s", path)
    return True


async def serve(config: Config, path: str | None) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    async with running(config) as run:
        host, port = run.proxy_address
        ahost, aport = run.admin_address
        log.info("bgproxy listening on http://%s:%d (admin http://%s:%d)", host, port, ahost, aport)
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGINT, stop.set)
        if path is not None:
            loop.add_signal_handler(signal.SIGHUP, reload_config, run, path)
        await stop.wait()
        log.info("shutting down")
        await graceful_stop(run, run.server.config.drain.timeout)
    return 0


def main_serve(path: str, workers: int = 1) -> int:
    logging.basicConfig(
        level=os.environ.get("BGPROXY_LOG_LEVEL", "INFO").upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        config = load_config(path)
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    try:
        return run_loop(serve(config, path))
    except StartupError as exc:
        print(f"bgproxy: {exc}", file=sys.stderr)
        return exc.code


def run_loop(coro: object) -> int:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency; kept for odd platforms
        return asyncio.run(coro)  # type: ignore[arg-type]
    return uvloop.run(coro)  # type: ignore[arg-type]
