"""``bgproxy demo`` as a newcomer runs it: one command, two services (shop and api, by
Host) that serve blue, the CLI flips one of them to green, the dashboard is there, and
Ctrl-C stops everything with exit 0."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


async def cli(*args: str) -> tuple[int, str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BGPROXY_")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "admin.cli",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


@dataclass
class Demo:
    """A running ``bgproxy demo`` subprocess and what its banner printed."""

    proc: asyncio.subprocess.Process
    port: int
    admin_port: int
    tls_port: int
    app_ports: list[int]
    banner: str

    @property
    def proxy(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def admin(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    @property
    def https(self) -> str:
        return f"https://localhost:{self.tls_port}"

    async def stop(self) -> str:
        """Ctrl-C, as a user stops it: exit 0; what it printed after the banner."""
        assert self.proc.stdout is not None
        self.proc.send_signal(signal.SIGINT)
        rest = await asyncio.wait_for(self.proc.stdout.read(), 15)
        assert await asyncio.wait_for(self.proc.wait(), 15) == 0
        return rest.decode()


@contextlib.asynccontextmanager
async def start_demo() -> AsyncIterator[Demo]:
    """``bgproxy demo`` on free ports, ready once its banner is out (everything listens)."""
    port, admin_port, tls_port, *app_ports = free_ports(7)
    # No admin URL or token from the environment; but the pure-Python run stays pure.
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("BGPROXY_") or k == "BGPROXY_PURE_PYTHON"
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "admin.cli",
        "demo",
        "--port",
        str(port),
        "--admin-port",
        str(admin_port),
        "--tls-port",
        str(tls_port),
        "--app-ports",
        ",".join(str(p) for p in app_ports),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    assert proc.stdout is not None and proc.stderr is not None
    try:
        banner: list[str] = []
        async with asyncio.timeout(20):
            while not banner or "Ctrl-C stops everything." not in banner[-1]:
                line = await proc.stdout.readline()
                if not line:
                    err = await proc.stderr.read()
                    raise AssertionError(f"demo exited early: {err.decode()}")
                banner.append(line.decode())
        yield Demo(proc, port, admin_port, tls_port, app_ports, "".join(banner))
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_demo_starts_serves_flips_and_stops_on_sigint() -> None:
    async with start_demo() as demo:
        port, admin_port, app_ports = demo.port, demo.admin_port, demo.app_ports
        proxy, admin, text = demo.proxy, demo.admin, demo.banner
        shop, api = {"Host": "shop.localhost"}, {"Host": "api.localhost"}
        assert f"proxy      {proxy}/" in text
        assert f"dashboard  {admin}/" in text
        assert f"shop       http://shop.localhost:{port}/" in text
        assert f"api        http://api.localhost:{port}/" in text
        assert f"curl -H 'Host: api.localhost' {proxy}/" in text
        assert f"bgproxy --admin {admin} switch green" in text
        assert f"bgproxy --admin {admin} switch green --service api" in text
        assert "X-Bg-Color: green" in text
        assert f"bgproxy --admin {admin} rollout green --wait" in text
        for p in app_ports:
            assert f"http://127.0.0.1:{p}/" in text

        async with aiohttp.ClientSession() as session:
            # No Host matches: the default service, shop.
            async with session.get(proxy + "/") as resp:
                assert resp.status == 200
                assert resp.headers["X-Bg-Color"] == "blue"
                assert "hello from blue (shop v1)" in await resp.text()
            async with session.get(proxy + "/", headers=api) as resp:
                assert "hello from blue (api v1)" in await resp.text()
            async with session.get(proxy + "/", headers={"X-Bg-Color": "green"}) as resp:
                assert "hello from green (shop v2)" in await resp.text()
            async with session.get(admin + "/") as resp:
                assert resp.status == 200
                assert "<title>bgproxy</title>" in await resp.text()

            code, out, err = await cli("--admin", admin, "services")
            assert code == 0, err
            rows = {line.split()[0]: line.split() for line in out.splitlines()[1:]}
            assert rows["shop"][1:4] == ["shop.localhost", "/", "blue"]
            assert rows["api"][1:4] == ["api.localhost", "/", "blue"]

            # Switching api leaves shop alone; the unscoped command acts on shop.
            code, out, err = await cli("--admin", admin, "switch", "green", "--service", "api")
            assert code == 0, err
            assert "api: blue -> green" in out
            async with session.get(proxy + "/", headers=api) as resp:
                assert resp.headers["X-Bg-Color"] == "green"
                assert "hello from green (api v2)" in await resp.text()
            async with session.get(proxy + "/", headers=shop) as resp:
                assert "hello from blue (shop v1)" in await resp.text()
            # A rollout of shop starts at its first step, with the demo's load behind it.
            code, out, err = await cli("--admin", admin, "rollout", "green", "--reason", "demo")
            assert code == 0, err
            assert "shop: blue -> split blue 90 / green 10" in out
            assert "rollout     step 1/4  green 10%" in out
            code, out, err = await cli("--admin", admin, "promote")
            assert code == 0, err
            async with session.get(proxy + "/") as resp:
                assert resp.headers["X-Bg-Color"] == "green"
                assert "hello from green (shop v2)" in await resp.text()

        rest = await demo.stop()
        assert "bgproxy demo stopped" in rest
        # The demo logs to stdout: a JSON line per request, and the switches among them.
        logged = [json.loads(line) for line in rest.splitlines() if line.startswith("{")]
        assert any(x.get("status") == 200 and x.get("service") == "api" for x in logged)
        assert any(x.get("event") and x["action"] == "switch" and x["service"] == "api"
                   and x["to"] == "green" for x in logged)  # fmt: skip
        # Everything it started is gone: the ports are free again.
        for p in (port, admin_port, demo.tls_port, *app_ports):
            with socket.socket() as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind(("127.0.0.1", p))


async def test_demo_app_ports_must_be_four_or_two() -> None:
    code, out, err = await cli("demo", "--app-ports", "9001,9002,9003")
    assert code == 2 and out == ""
    assert "--app-ports takes four ports: SHOP_BLUE,SHOP_GREEN,API_BLUE,API_GREEN" in err


async def test_demo_port_taken_exits_non_zero_with_the_reason() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        port, admin_port, green_port = free_ports(3)
        code, _, err = await cli(
            "demo",
            "--port",
            str(port),
            "--admin-port",
            str(admin_port),
            "--app-ports",
            f"{busy},{green_port}",
        )
    assert code != 0
    assert f"--app-ports: cannot listen on 127.0.0.1:{busy}" in err
