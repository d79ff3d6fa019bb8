"""Real parts only: upstream apps on port 0, the real proxy, real clients.

``upstreams`` starts blue and green aiohttp apps that answer with their color; ``start_proxy``
starts bgproxy in-process exactly as ``serve`` wires it (data plane + admin API).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import os
import socket
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web

from admin.runner import Running, running
from config import Config, parse_config


@dataclass
class Behaviour:
    """Knobs a test turns on an upstream while it runs."""

    health_status: int = 200
    fail_rate: float = 0.0  # share of requests answered 500
    delay: float = 0.0  # seconds before the response head
    seen: list[dict[str, Any]] = field(default_factory=list)
    _count: int = 0

    def should_fail(self) -> bool:
        self._count += 1
        if self.fail_rate <= 0:
            return False
        period = round(1 / self.fail_rate)
        return self._count % period == 0


@dataclass
class Upstream:
    color: str
    url: str
    behaviour: Behaviour
    runner: web.AppRunner


def make_upstream_app(color: str, behaviour: Behaviour) -> web.Application:
    async def echo(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        behaviour.seen.append(
            {
                "method": request.method,
                "path": request.path_qs,
                "headers": dict(request.headers),
                "body": body,
            }
        )
        if behaviour.delay:
            await asyncio.sleep(behaviour.delay)
        if behaviour.should_fail():
            return web.Response(status=500, text="boom", headers={"X-Upstream": color})
        payload = {
            "color": color,
            "method": request.method,
            "path": request.path_qs,
            "headers": {k: v for k, v in request.headers.items()},
            "body_len": len(body),
        }
        return web.json_response(payload, headers={"X-Upstream": color})

    async def health(request: web.Request) -> web.Response:
        return web.Response(status=behaviour.health_status, text="OK")

    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(float(request.query.get("s", "1")))
        return web.Response(text=f"{color} slow", headers={"X-Upstream": color})

    async def sse(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"X-Upstream": color})
        resp.content_type = "text/event-stream"
        await resp.prepare(request)
        n = int(request.query.get("n", "3"))
        gap = float(request.query.get("gap", "0.2"))
        for i in range(n):
            await resp.write(f"data: {color} {i}\n\n".encode())
            await asyncio.sleep(gap)
        return resp

    async def upload(request: web.Request) -> web.StreamResponse:
        # Streams the body back as it arrives, so a test can check both directions.
        resp = web.StreamResponse(headers={"X-Upstream": color})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        async for chunk in request.content.iter_any():
            await resp.write(chunk)
        return resp

    async def big(request: web.Request) -> web.StreamResponse:
        size = int(request.query.get("size", str(4 * 1024 * 1024)))
        resp = web.StreamResponse(headers={"X-Upstream": color})
        resp.content_length = size
        await resp.prepare(request)
        block = bytes(range(256)) * 256
        sent = 0
        while sent < size:
            part = block[: min(len(block), size - sent)]
            await resp.write(part)
            sent += len(part)
        return resp

    async def ws(request: web.Request) -> web.WebSocketResponse:
        wsr = web.WebSocketResponse(protocols=("chat",))
        await wsr.prepare(request)
        async for msg in wsr:
            if msg.type == aiohttp.WSMsgType.TEXT and msg.data.startswith("close:"):
                await wsr.close(code=int(msg.data[6:]), message=b"bye")
            elif msg.type == aiohttp.WSMsgType.TEXT:
                await wsr.send_str(f"{color}:{msg.data}")
            elif msg.type == aiohttp.WSMsgType.BINARY:
                await wsr.send_bytes(msg.data)
        return wsr

    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_get("/slow", slow)
    app.router.add_get("/sse", sse)
    app.router.add_post("/upload", upload)
    app.router.add_get("/big", big)
    app.router.add_get("/ws", ws)
    app.router.add_route("*", "/{tail:.*}", echo)
    return app


async def start_upstream(color: str, behaviour: Behaviour | None = None) -> Upstream:
    behaviour = behaviour or Behaviour()
    runner = web.AppRunner(make_upstream_app(color, behaviour), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return Upstream(color, f"http://127.0.0.1:{port}", behaviour, runner)


def dead_address() -> str:
    """An address that refuses connections: bound, then closed."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return f"http://127.0.0.1:{port}"


def config_dict(blue: list[str], green: list[str], **sections: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "listen": "127.0.0.1:0",
        "admin": {"listen": "127.0.0.1:0"},
        "upstreams": {"blue": {"targets": blue}, "green": {"targets": green}},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = copy.deepcopy(value)
    return data


@dataclass
class Proxy:
    """A running bgproxy as tests see it: its two URLs and a client session."""

    run: Running
    url: str
    admin_url: str
    session: aiohttp.ClientSession

    async def admin(
        self, method: str, path: str, body: Any = None, token: str | None = None
    ) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        async with self.session.request(
            method, self.admin_url + path, json=body, headers=headers
        ) as resp:
            text = await resp.text()
            return resp.status, json.loads(text) if text else None

    async def get(self, path: str = "/", **kw: Any) -> tuple[int, str, dict[str, str]]:
        async with self.session.get(self.url + path, **kw) as resp:
            return resp.status, await resp.text(), dict(resp.headers)


@pytest.fixture
async def upstreams() -> AsyncIterator[dict[str, Upstream]]:
    ups = {"blue": await start_upstream("blue"), "green": await start_upstream("green")}
    yield ups
    for up in ups.values():
        await up.runner.cleanup()


StartProxy = Callable[..., Awaitable[Proxy]]


@pytest.fixture
async def start_proxy() -> AsyncIterator[StartProxy]:
    """``await start_proxy(config_or_dict)`` → a running Proxy, stopped after the test."""
    stack = contextlib.AsyncExitStack()

    async def start(cfg: Config | dict[str, Any]) -> Proxy:
        config = cfg if isinstance(cfg, Config) else parse_config(cfg)
        run = await stack.enter_async_context(running(config))
        session = await stack.enter_async_context(aiohttp.ClientSession())
        host, port = run.proxy_address
        ahost, aport = run.admin_address
        return Proxy(run, f"http://{host}:{port}", f"http://{ahost}:{aport}", session)

    async with stack:
        yield start


@pytest.fixture
async def proxy(upstreams: dict[str, Upstream], start_proxy: StartProxy) -> Proxy:
    """The common case: one blue and one green upstream, default config."""
    return await start_proxy(config_dict([upstreams["blue"].url], [upstreams["green"].url]))


async def raw_exchange(
    host: str, port: int, data: bytes, *, timeout: float = 5.0, read_until_close: bool = True
) -> bytes:
    """Send raw bytes, return what comes back until the server closes (or timeout)."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(data)
        await writer.drain()
        chunks = []
        async with asyncio.timeout(timeout):
            while True:
                chunk = await reader.read(65536)
                if not chunk:
                    break
                chunks.append(chunk)
                if not read_until_close:
                    break
        return b"".join(chunks)
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


# --- helpers added for the forwarding, admin and switching suites ----------------------------


@dataclass
class RawResponse:
    """One HTTP/1.x response read off a raw socket."""

    status: int
    headers: list[tuple[str, str]]  # names lowercased, in wire order
    body: bytes
    head: bytes

    def header(self, name: str) -> str | None:
        name = name.lower()
        for k, v in self.headers:
            if k == name:
                return v
        return None

    def all(self, name: str) -> list[str]:
        name = name.lower()
        return [v for k, v in self.headers if k == name]


async def read_response(
    reader: asyncio.StreamReader, *, head_only: bool = False, timeout: float = 5.0
) -> RawResponse:
    """Read exactly one response (``head_only`` for a response to HEAD or a 1xx)."""
    async with asyncio.timeout(timeout):
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers = []
        for line in lines[1:]:
            if line:
                name, _, value = line.partition(":")
                headers.append((name.strip().lower(), value.strip()))
        resp = RawResponse(status, headers, b"", head)
        if head_only or status in (204, 304) or 100 <= status < 200:
            return resp
        te = resp.header("transfer-encoding")
        length = resp.header("content-length")
        if te is not None and "chunked" in te.lower():
            parts = []
            while True:
                size_line = await reader.readuntil(b"\r\n")
                size = int(size_line.split(b";", 1)[0].strip(), 16)
                if size == 0:
                    while (await reader.readuntil(b"\r\n")) != b"\r\n":
                        pass  # trailers
                    break
                parts.append(await reader.readexactly(size))
                await reader.readexactly(2)
            resp.body = b"".join(parts)
        elif length is not None:
            resp.body = await reader.readexactly(int(length))
        else:
            resp.body = await reader.read()  # close-delimited
        return resp


@contextlib.asynccontextmanager
async def raw_connection(
    proxy: Proxy,
) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    """A raw TCP connection to the proxy's public listener, closed afterwards."""
    host, port = proxy.run.proxy_address
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 5)
    try:
        yield reader, writer
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


def upstream_headers(body: str | bytes) -> dict[str, str]:
    """The request headers the echo upstream saw (from its JSON answer), names lowercased."""
    payload = json.loads(body)
    return {k.lower(): v for k, v in payload["headers"].items()}


@pytest.fixture
async def start_app() -> AsyncIterator[Callable[[web.Application], Awaitable[str]]]:
    """``await start_app(app)`` → its http://127.0.0.1:PORT, cleaned up after the test."""
    runners: list[web.AppRunner] = []

    async def start(app: web.Application) -> str:
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        runners.append(runner)
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return f"http://127.0.0.1:{port}"

    yield start
    for runner in reversed(runners):
        await runner.cleanup()


# --- a real redis-server per test, for the fleet suites --------------------------------------


class RedisServer:
    """A ``redis-server`` on a free loopback port, without persistence, that a test can
    SIGKILL, SIGSTOP/SIGCONT and restart (on the same port, empty)."""

    def __init__(self, *extra: str) -> None:
        import shutil

        binary = shutil.which("redis-server")
        if binary is None:
            pytest.skip("redis-server is not installed (apt-get install redis-server)")
        self.binary = binary
        self.extra = extra
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = int(s.getsockname()[1])
        self.proc: Any = None

    def url(self, db: int = 0, password: str | None = None) -> str:
        auth = f":{password}@" if password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/{db}"

    async def start(self) -> None:
        args = ["--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly"]
        self.proc = await asyncio.create_subprocess_exec(
            self.binary,
            *args,
            "no",
            *self.extra,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        for _ in range(500):
            with contextlib.suppress(OSError):
                reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
                writer.write(b"PING\r\n")
                reply = await asyncio.wait_for(reader.readline(), 1)
                writer.close()
                if reply.startswith((b"+PONG", b"-NOAUTH")):
                    return
            await asyncio.sleep(0.01)
        raise AssertionError(f"redis-server on port {self.port} did not start")

    async def kill(self) -> None:
        """SIGKILL: gone at once, and (no persistence) its data with it."""
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()

    def pause(self) -> None:
        """SIGSTOP: connections stay open and nothing answers."""
        import signal

        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        import signal

        self.proc.send_signal(signal.SIGCONT)

    async def restart(self) -> None:
        await self.kill()
        await self.start()


@pytest.fixture
async def redis_server() -> AsyncIterator[RedisServer]:
    server = RedisServer()
    await server.start()
    try:
        yield server
    finally:
        await server.kill()


def free_port() -> int:
    """A port free right now (bound, then released) for a proxy run as a process."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ProxyProcess:
    """``python -m proxy -c FILE [args]`` as users run it, ready once /readyz answers 200."""

    def __init__(self, path: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.path = path
        self.args = args
        self.env = env or {}
        data = yaml.safe_load(path.read_text())
        self.url = f"http://{data['listen']}"
        self.admin_url = f"http://{data['admin']['listen']}"
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if k != "BGPROXY_ADMIN_TOKEN"}
        env.update(self.env)
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "proxy", "-c", str(self.path), *self.args,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env,
        )  # fmt: skip
        async with aiohttp.ClientSession() as s:
            for _ in range(1000):
                try:
                    async with s.get(self.admin_url + "/readyz") as r:
                        if r.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                if self.proc.returncode is not None:
                    break
                await asyncio.sleep(0.02)
        err = await self.proc.stderr.read() if self.proc.stderr else b""
        raise AssertionError(f"proxy did not start: {err.decode()}")

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    async def admin(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        async with (
            aiohttp.ClientSession() as s,
            s.request(method, self.admin_url + path, json=body) as r,
        ):
            return r.status, json.loads(await r.text())

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()


# --- a hook receiver ---------------------------------------------------------------------------

StartApp = Callable[[web.Application], Awaitable[str]]


class Receiver:
    """What a hook endpoint got, and how it answers (status, or hang)."""

    def __init__(self) -> None:
        self.got: list[dict[str, Any]] = []
        self.status = 200
        self.hang = False
        self.arrived = asyncio.Event()

    def app(self) -> web.Application:
        async def hook(request: web.Request) -> web.Response:
            body = await request.json()
            self.got.append({"path": request.path, **body})
            self.arrived.set()
            if self.hang:  # longer than any hook timeout here, short enough for teardown
                await asyncio.sleep(3)
            return web.json_response({}, status=self.status)

        app = web.Application()
        app.router.add_post("/{name}", hook)
        return app

    async def wait(self, n: int, timeout: float = 5.0) -> list[dict[str, Any]]:
        async with asyncio.timeout(timeout):
            while len(self.got) < n:
                self.arrived.clear()
                await self.arrived.wait()
        return self.got
