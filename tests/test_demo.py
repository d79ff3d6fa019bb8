"""``bgproxy demo`` as a newcomer runs it: one command, it serves blue, the CLI flips it to
green, the dashboard is there, and Ctrl-C stops everything with exit 0."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys

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


async def test_demo_starts_serves_flips_and_stops_on_sigint() -> None:
    port, admin_port, blue_port, green_port = free_ports(4)
    env = {k: v for k, v in os.environ.items() if not k.startswith("BGPROXY_")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "admin.cli",
        "demo",
        "--port",
        str(port),
        "--admin-port",
        str(admin_port),
        "--app-ports",
        f"{blue_port},{green_port}",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    assert proc.stdout is not None and proc.stderr is not None
    proxy = f"http://127.0.0.1:{port}"
    admin = f"http://127.0.0.1:{admin_port}"
    try:
        # Ready when it has printed its banner: that happens once everything listens.
        banner: list[str] = []
        async with asyncio.timeout(20):
            while not banner or "Ctrl-C stops everything." not in banner[-1]:
                line = await proc.stdout.readline()
                if not line:
                    err = await proc.stderr.read()
                    raise AssertionError(f"demo exited early: {err.decode()}")
                banner.append(line.decode())
        text = "".join(banner)
        assert f"proxy      {proxy}/" in text
        assert f"dashboard  {admin}/" in text
        assert f"bgproxy --admin {admin} switch green" in text
        assert "X-Bg-Color: green" in text

        async with aiohttp.ClientSession() as session:
            async with session.get(proxy + "/") as resp:
                assert resp.status == 200
                assert resp.headers["X-Bg-Color"] == "blue"
                assert "hello from blue" in await resp.text()
            async with session.get(proxy + "/", headers={"X-Bg-Color": "green"}) as resp:
                assert "hello from green" in await resp.text()
            async with session.get(admin + "/") as resp:
                assert resp.status == 200
                assert "<title>bgproxy</title>" in await resp.text()

            code, out, err = await cli("--admin", admin, "switch", "green", "--reason", "demo")
            assert code == 0, err
            assert "blue -> green" in out
            async with session.get(proxy + "/") as resp:
                assert resp.headers["X-Bg-Color"] == "green"
                assert "hello from green" in await resp.text()

        proc.send_signal(signal.SIGINT)
        rest = await asyncio.wait_for(proc.stdout.read(), 15)
        assert await asyncio.wait_for(proc.wait(), 15) == 0
        assert "bgproxy demo stopped" in rest.decode()
        # Everything it started is gone: the ports are free again.
        for p in (port, admin_port, blue_port, green_port):
            with socket.socket() as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind(("127.0.0.1", p))
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


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
