"""``bgproxy demo``: two services (``shop`` and ``api``, chosen by Host), each with a
blue and a green sample app, and the proxy, in one process; nothing else needed.

``shop`` is the default service, so a plain ``curl http://127.0.0.1:8080/`` reaches it.
Both are served over HTTPS too (``--tls-port``, 8443), with a self-signed certificate
made at start for localhost and the demo's hosts, and removed at exit (admin/democert.py).
A green app can be told to fail or to be slow (``POST /_demo/chaos?fail_rate=0.5&delay=0.3``
on its port) to watch the automatic rollback, or a rollout's abort; a light built-in load
of cookie-less clients keeps the numbers of both services moving and lets a rollout
(``bgproxy rollout green --wait``) visibly step.
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

from admin.democert import DemoCert, demo_certificate
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


# The demo's two services, each fronted by its own blue and green sample app.
SERVICES = ("shop", "api")
HOSTS = tuple(f"{name}.localhost" for name in SERVICES)


def parse_app_ports(text: str) -> dict[str, tuple[int, int]]:
    """``--app-ports``: shop blue, shop green, api blue, api green. With two, they are
    shop's and api's apps take free ports (printed in the banner)."""
    try:
        ports = [int(p) for p in text.split(",")]
    except ValueError:
        raise ValueError("--app-ports takes four ports (or two, for shop only)") from None
    if len(ports) == 2:
        ports += [0, 0]
    if len(ports) != 4 or any(not 0 <= p <= 65535 for p in ports):
        raise ValueError(
            "--app-ports takes four ports: SHOP_BLUE,SHOP_GREEN,API_BLUE,API_GREEN "
            "(or two, for shop only)"
        )
    return {"shop": (ports[0], ports[1]), "api": (ports[2], ports[3])}


def demo_config(
    port: int,
    admin_port: int,
    apps: dict[str, tuple[int, int]],
    tls_port: int,
    cert: DemoCert,
) -> dict[str, Any]:
    """Two services behind one listener (and the HTTPS one), chosen by Host; ``shop``
    takes everything else."""
    return {
        "listen": f"127.0.0.1:{port}",
        "tls": {
            "listen": f"127.0.0.1:{tls_port}",
            "certificates": [{"cert": str(cert.cert), "key": str(cert.key)}],
        },
        "admin": {"listen": f"127.0.0.1:{admin_port}"},
        "services": {
            name: {
                "hosts": [f"{name}.localhost"],
                "upstreams": {
                    "blue": {"targets": [f"http://127.0.0.1:{blue}"]},
                    "green": {"targets": [f"http://127.0.0.1:{green}"]},
                },
            }
            for name, (blue, green) in apps.items()
        },
        "default_service": "shop",
        "health_check": {"interval": "1s", "timeout": "500ms"},
        "websocket": {"reconnect_window": ["1s", "5s"]},
        "rollback": {"window": "2m", "interval": "5s", "min_requests": 10},
        # Short steps, so a rollout steps (or aborts) while you watch.
        "rollout": {"steps": [10, 25, 50, 100], "step_interval": "15s"},
        # One JSON line per request, and the switches between them: what a demo is for.
        "access_log": {"destination": "stdout"},
    }


async def _load(url: str, hosts: tuple[str, ...], rate: float, stop: asyncio.Event) -> None:
    """Background traffic to every service, so the dashboard and the rollback watch have
    numbers. No cookie jar: every request is a new client, so a split shows as a split."""
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as session:
        while not stop.is_set():
            for host in hosts:
                with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                    async with session.get(
                        url, headers={"Host": host}, timeout=aiohttp.ClientTimeout(total=5)
                    ) as resp:
                        await resp.read()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1 / rate)


async def _start_app(
    runners: list[web.AppRunner], service: str, color: str, version: str, port: int
) -> int:
    runner = web.AppRunner(sample_app(color, f"{service} {version}", Chaos()), access_log=None)
    await runner.setup()
    runners.append(runner)
    site = web.TCPSite(runner, "127.0.0.1", port)
    try:
        await site.start()
    except OSError as exc:
        raise StartupError(
            f"--app-ports: cannot listen on 127.0.0.1:{port}: {exc.strerror}"
        ) from exc
    server = site._server
    sockets = getattr(server, "sockets", None) or []
    return int(sockets[0].getsockname()[1]) if sockets else port


def banner(
    proxy_url: str,
    admin_url: str,
    port: int,
    apps: dict[str, tuple[int, int]],
    tls_port: int,
    cert: DemoCert,
) -> str:
    admin = f"bgproxy --admin {admin_url}"
    https = f"https://localhost:{tls_port}"
    lines = [
        "bgproxy demo is running: two services, shop and api, each with a blue and a green app",
        f"  proxy      {proxy_url}/",
        f"  https      {https}/   (self-signed certificate, removed on exit:",
        f"             {cert.cert})",
        f"  dashboard  {admin_url}/",
    ]
    for name, (blue, green) in apps.items():
        default = "   (the default service)" if name == "shop" else ""
        lines += [
            f"  {name:<11}http://{name}.localhost:{port}/{default}",
            f"  {name + ' blue':<11}http://127.0.0.1:{blue}/",
            f"  {name + ' green':<11}http://127.0.0.1:{green}/",
        ]
    api_green = apps["api"][1]
    shop_green = apps["shop"][1]
    tries = [
        (f"curl -H 'Host: shop.localhost' {proxy_url}/", "shop, picked by the Host header"),
        (f"curl -H 'Host: api.localhost' {proxy_url}/", "api (browsers resolve *.localhost:"),
        ("", f"open http://api.localhost:{port}/ as it is)"),
        (f"curl {proxy_url}/", "no Host matches: the default service, shop"),
        (f"curl -k {https}/", "shop over HTTPS (-k: the certificate is self-signed)"),
        (f"curl -k -H 'Host: api.localhost' {https}/", "api over HTTPS"),
        (f"curl --cacert {cert.cert} {https}/", "the same, verifying the certificate"),
        (f"curl -H 'X-Bg-Color: green' {proxy_url}/", "QA reaches shop's green"),
        (f"{admin} services", "both services: live color, split, req/s"),
        (f"{admin} switch green --reason 'release v2'", "shop (the default service)"),
        (f"{admin} switch green --service api", "only api"),
        (
            f"curl -X POST 'http://127.0.0.1:{api_green}/_demo/chaos?fail_rate=0.5'",
            "api's green fails: switch api to it, watch the rollback",
        ),
        (f"{admin} status --service api", ""),
        (f"{admin} rollout green --wait", "shop moves 10→25→50→100%, each step watched"),
        (
            f"curl -X POST 'http://127.0.0.1:{shop_green}/_demo/chaos?fail_rate=0.3'",
            "then roll shop out again (switch blue first):",
        ),
        (f"{admin} rollout green --wait", "the watch aborts it, exit 1"),
    ]
    width = max(len(cmd) for cmd, _ in tries) + 3
    lines += ["", "Try:"]
    lines += [f"  {cmd:<{width}}# {note}".rstrip(" #") for cmd, note in tries]
    lines += ["", "Ctrl-C stops everything."]
    return "\n".join(lines)


async def run_demo(
    port: int,
    admin_port: int,
    app_ports: dict[str, tuple[int, int]],
    rate: float,
    tls_port: int = 8443,
) -> int:
    runners: list[web.AppRunner] = []
    # Outermost, so the certificate's directory goes whatever way the demo ends.
    with demo_certificate(HOSTS) as cert:
        try:
            await _serve(runners, port, admin_port, app_ports, rate, tls_port, cert)
        finally:
            for runner in reversed(runners):
                await runner.cleanup()
    print("bgproxy demo stopped", flush=True)
    return 0


async def _serve(
    runners: list[web.AppRunner],
    port: int,
    admin_port: int,
    app_ports: dict[str, tuple[int, int]],
    rate: float,
    tls_port: int,
    cert: DemoCert,
) -> None:
    apps: dict[str, tuple[int, int]] = {}
    for name in SERVICES:
        blue, green = app_ports[name]
        apps[name] = (
            await _start_app(runners, name, "blue", "v1", blue),
            await _start_app(runners, name, "green", "v2", green),
        )
    config = parse_config(demo_config(port, admin_port, apps, tls_port, cert))
    async with running(config) as run:
        _, pport = run.proxy_address
        _, aport = run.admin_address
        _, tport = run.tls_address
        proxy_url = f"http://127.0.0.1:{pport}"
        admin_url = f"http://127.0.0.1:{aport}"
        print(banner(proxy_url, admin_url, pport, apps, tport, cert), flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        load = asyncio.create_task(_load(proxy_url + "/", HOSTS, rate, stop), name="demo-load")
        await stop.wait()
        await load
        await run.server.shutdown(2.0)


def main_demo(
    port: int, admin_port: int, app_ports: str, rate: float = 10.0, tls_port: int = 8443
) -> int:
    try:
        apps = parse_app_ports(app_ports)
    except ValueError as exc:
        print(f"bgproxy: {exc}", file=sys.stderr)
        return 2
    try:
        return run_loop(run_demo(port, admin_port, apps, rate, tls_port))
    except (StartupError, ConfigError) as exc:
        print(f"bgproxy: {exc}", file=sys.stderr)
        return getattr(exc, "code", 2)
