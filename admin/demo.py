"""``bgproxy demo``: two sample apps and the proxy in one process, nothing else needed.

Green can be told to fail or to be slow (``POST /_demo/chaos?fail_rate=0.5&delay=0.3``
on its port) to watch the automatic rollback; a light built-in load keeps the numbers
moving.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import signal
import sys
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web

from admin.runner import StartupError, run_loop, running
from config import ConfigError, parse_config


@dataclass
class Chaos:
    fail_rate: float = 0.0
    delay: float = 0.0


def sample_app(color: str, version: str, chaos: Chaos) -> web.Application:
    """A tiny app that says which color served it; what the proxy fronts in the demo."""

    async def index(request: web.Request) -> web.Response:
        if chaos.delay:
            await asyncio.sleep(chaos.delay)
        if chaos.fail_rate and random.random() < chaos.fail_rate:
            return web.Response(status=500, text=f"{color} {version}: simulated failure\n")
        return web.Response(text=f"hello from {color} ({version})\n")

    async def health(request: web.Request) -> web.Response:
        return web.Response(text="OK")

    async def set_chaos(request: web.Request) -> web.Response:
        try:
            chaos.fail_rate = min(1.0, max(0.0, float(request.query.get("fail_rate", "0"))))
            chaos.delay = min(30.0, max(0.0, float(request.query.get("delay", "0"))))
        except ValueError:
            return web.json_response({"error": "fail_rate and delay must be numbers"}, status=400)
        return web.json_response(
            {"color": color, "fail_rate": chaos.fail_rate, "delay": chaos.delay}
        )

    async def ws(request: web.Request) -> web.WebSocketResponse:
        sock = web.WebSocketResponse()
        await sock.prepare(request)
        async for msg in sock:
            if msg.type == aiohttp.WSMsgType.TEXT:
                await sock.send_str(f"{color}: {msg.data}")
        return sock

    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_post("/_demo/chaos", set_chaos)
    app.router.add_get("/ws", ws)
    app.router.add_route("*", "/{tail:.*}", index)
    return app


def demo_config(port: int, admin_port: int, blue_port: int, green_port: int) -> dict[str, Any]:
    return {
        "listen": f"127.0.0.1:{port}",
        "admin": {"listen": f"127.0.0.1:{admin_port}"},
        "upstreams": {
            "blue": {"targets": [f"http://127.0.0.1:{blue_port}"]},
            "green": {"targets": [f"http://127.0.0.1:{green_port}"]},
        },
        "health_check": {"interval": "1s", "timeout": "500ms"},
        "websocket": {"reconnect_window": ["1s", "5s"]},
        "rollback": {"window": "2m", "interval": "5s", "min_requests": 10},
    }


async def _load(url: str, rate: float, stop: asyncio.Event) -> None:
    """Background traffic so the dashboard and the rollback watch have numbers."""
    async with aiohttp.ClientSession() as session:
        while not stop.is_set():
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with session.get(url, timeout=aiohttp.ClientTimeout(total=5)) as resp:
                    await resp.read()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1 / rate)


async def run_demo(port: int, admin_port: int, app_ports: tuple[int, int], rate: float) -> int:
    runners: list[web.AppRunner] = []
    try:
        for color, version, app_port in (
            ("blue", "v1", app_ports[0]),
            ("green", "v2", app_ports[1]),
        ):
            runner = web.AppRunner(sample_app(color, version, Chaos()), access_log=None)
            await runner.setup()
            runners.append(runner)
            try:
                await web.TCPSite(runner, "127.0.0.1", app_port).start()
            except OSError as exc:
                raise StartupError(
                    f"--app-ports: cannot listen on 127.0.0.1:{app_port}: {exc.strerror}"
                ) from exc
        config = parse_config(demo_config(port, admin_port, *app_ports))
        async with running(config) as run:
            _, pport = run.proxy_address
            _, aport = run.admin_address
            proxy_url = f"http://127.0.0.1:{pport}"
            admin_url = f"http://127.0.0.1:{aport}"
            print(
                f"bgproxy demo is running\n"
                f"  proxy      {proxy_url}/\n"
                f"  dashboard  {admin_url}/\n"
                f"  blue app   http://127.0.0.1:{app_ports[0]}/\n"
                f"  green app  http://127.0.0.1:{app_ports[1]}/\n"
                f"\nTry:\n"
                f"  curl -H 'X-Bg-Color: green' {proxy_url}/        # QA reaches green\n"
                f"  bgproxy --admin {admin_url} switch green --reason 'release v2'\n"
                f"  curl -X POST 'http://127.0.0.1:{app_ports[1]}/_demo/chaos?fail_rate=0.5'"
                f"   # green fails: watch the rollback\n"
                f"  bgproxy --admin {admin_url} status\n"
                f"\nCtrl-C stops everything.",
                flush=True,
            )
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)
            load = asyncio.create_task(_load(proxy_url + "/", rate, stop), name="demo-load")
            await stop.wait()
            await load
            await run.server.shutdown(2.0)
    finally:
        for runner in reversed(runners):
            await runner.cleanup()
    print("bgproxy demo stopped", flush=True)
    return 0


def main_demo(port: int, admin_port: int, app_ports: str, rate: float = 5.0) -> int:
    try:
        blue, green = (int(p) for p in app_ports.split(","))
    except ValueError:
        print("bgproxy: --app-ports takes two ports: BLUE,GREEN", file=sys.stderr)
        return 2
    try:
        return run_loop(run_demo(port, admin_port, (blue, green), rate))
    except (StartupError, ConfigError) as exc:
        print(f"bgproxy: {exc}", file=sys.stderr)
        return getattr(exc, "code", 2)
