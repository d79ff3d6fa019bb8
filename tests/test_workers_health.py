"""Health with ``--workers``: one checker for the process tree, followed by every worker.

Real parts: upstream apps on real ports, ``python -m proxy --workers 2`` as a subprocess,
clients on fresh connections so the kernel spreads them over the workers.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
import yaml
from aiohttp import web

from conftest import ProxyProcess, config_dict, free_port

INTERVAL = 0.2  # health_check.interval of these tests, seconds
CHECKS = {
    "interval": "200ms",
    "timeout": "200ms",
    "healthy_threshold": 2,
    "unhealthy_threshold": 2,
}


class App:
    """An upstream an operator can watch: it counts the health probes it gets and the
    requests it serves, can fail its check (``health_status``), and can be stopped and
    started again on the same port."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.port = 0
        self.probes = 0
        self.served = 0
        self.health_status = 200
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> App:
        async def health(request: web.Request) -> web.Response:
            self.probes += 1
            return web.Response(status=self.health_status, text="OK")

        async def echo(request: web.Request) -> web.Response:
            self.served += 1
            return web.Response(text=self.name, headers={"X-Upstream": self.name})

        app = web.Application()
        app.router.add_get("/health", health)
        app.router.add_route("*", "/{tail:.*}", echo)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port, reuse_address=True)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def stop(self) -> None:
        """Gone: its port refuses connections until ``start`` again."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


@pytest.fixture
async def apps() -> AsyncIterator[dict[str, App]]:
    started = {name: await App(name).start() for name in ("b1", "b2", "g")}
    yield started
    for app in started.values():
        await app.stop()


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[ProxyProcess]]]:
    started: list[ProxyProcess] = []

    async def start(blue: list[str], green: list[str], workers: int = 2) -> ProxyProcess:
        data = config_dict(blue, green, health_check=CHECKS)
        data["listen"] = f"127.0.0.1:{free_port()}"
        data["admin"] = {"listen": f"127.0.0.1:{free_port()}"}
        path = tmp_path / "bgproxy.yaml"
        path.write_text(yaml.safe_dump(data))
        proc = ProxyProcess(path, "--workers", str(workers))
        started.append(proc)
        await proc.start()
        return proc

    yield start
    for proc in started:
        await proc.stop()


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 10.0) -> None:
    """Worker processes have no event this test can wait on: look every 50 ms, bounded."""
    async with asyncio.timeout(timeout):
        while True:
            if await check():
                return
            await asyncio.sleep(0.05)


async def target_healthy(p: ProxyProcess, url: str) -> bool:
    status = (await p.admin("GET", "/status"))[1]
    (target,) = [t for c in status["colors"].values() for t in c["targets"] if t["url"] == url]
    return bool(target["healthy"])


async def fresh_requests(url: str, n: int) -> list[tuple[int, str]]:
    """``n`` concurrent requests, each on a new connection (spread over the workers):
    (status, upstream that served it)."""
    connector = aiohttp.TCPConnector(force_close=True, limit=0)
    async with aiohttp.ClientSession(connector=connector) as s:

        async def one(i: int) -> tuple[int, str]:
            async with s.get(f"{url}/r{i}") as r:
                await r.read()
                return r.status, r.headers.get("X-Upstream", "")

        return list(await asyncio.gather(*(one(i) for i in range(n))))


async def pairs(url: str, n: int) -> list[set[str]]:
    """``n`` connections one after another, two requests on each: both go to the worker
    that accepted it, and nothing else reaches that worker meanwhile, so a worker that
    counts both blue targets healthy serves the pair from both (round robin)."""
    out = []
    for _ in range(n):
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as s:
            seen = set()
            for i in range(2):
                async with s.get(f"{url}/pair{i}") as r:
                    assert r.status == 200
                    seen.add(r.headers["X-Upstream"])
            out.append(seen)
    return out


async def metric_sum(p: ProxyProcess, name: str, **labels: str) -> float:
    async with aiohttp.ClientSession() as s, s.get(p.admin_url + "/metrics") as r:
        text = await r.text()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


async def settled(p: ProxyProcess, sent: int) -> None:
    """Until the supervisor counts every request sent so far (workers report every 250 ms,
    all counters at once): its error counters are then the workers' too."""

    async def all_counted() -> bool:
        return await metric_sum(p, "bgproxy_requests_total") == sent

    await eventually(all_counted, timeout=5)


async def test_one_health_checker_probes_each_target_once_per_interval(
    apps: dict[str, App], served: Callable[..., Awaitable[ProxyProcess]]
) -> None:
    p = await served([apps["b1"].url], [apps["g"].url], workers=2)
    status = (await p.admin("GET", "/status"))[1]
    assert len(status["instances"]) == 2
    loop = asyncio.get_running_loop()
    before = {name: app.probes for name, app in apps.items()}
    started = loop.time()
    await asyncio.sleep(3.0)  # a window of probe rounds to count, not a wait for a condition
    intervals = (loop.time() - started) / INTERVAL
    for name in ("b1", "g"):
        probes = apps[name].probes - before[name]
        # One checker: one probe per interval. A checker in each worker too made it 3.
        assert 0.5 * intervals <= probes <= 1.5 * intervals, (name, probes, intervals)


async def test_a_stopped_target_leaves_every_worker_and_comes_back(
    apps: dict[str, App], served: Callable[..., Awaitable[ProxyProcess]]
) -> None:
    b1, b2 = apps["b1"], apps["b2"]
    p = await served([b1.url, b2.url], [apps["g"].url], workers=2)
    sent = 0
    warm = await fresh_requests(p.url, 40)
    sent += len(warm)
    assert {code for code, _ in warm} == {200} and {u for _, u in warm} == {"b1", "b2"}

    # Stop b1 under traffic; the supervisor's /status says when it was found down.
    loop = asyncio.get_running_loop()
    seen: list[tuple[float, int]] = []
    down = asyncio.Event()

    async def traffic() -> None:
        while not down.is_set():
            for code, _ in await fresh_requests(p.url, 4):
                seen.append((loop.time(), code))
            await asyncio.sleep(0.01)  # pacing the load, not waiting for a condition

    clients = asyncio.create_task(traffic())
    stopped_at = loop.time()
    await b1.stop()

    async def b1_down() -> bool:
        return not await target_healthy(p, b1.url)

    await eventually(b1_down, timeout=5)
    down_at = loop.time()
    down.set()
    await clients
    sent += len(seen)
    # Found within the detection window (2 failed probes, or connect failures).
    assert down_at - stopped_at < 3 * INTERVAL + 1.0
    failed = [(t - stopped_at, code) for t, code in seen if code != 200]
    assert all(t < down_at - stopped_at for t, _ in failed), failed

    # From now on no worker tries b1: no request fails, none costs an upstream error.
    await settled(p, sent)
    errors = await metric_sum(p, "bgproxy_upstream_errors_total", color="blue")
    after = await fresh_requests(p.url, 60)
    sent += len(after)
    assert set(after) == {(200, "b2")}
    await settled(p, sent)
    assert await metric_sum(p, "bgproxy_upstream_errors_total", color="blue") == errors

    # Back on its port: once the supervisor has it healthy, every worker uses it again
    # (within one check interval of the report).
    served_before = b1.served
    await b1.start()

    async def b1_up() -> bool:
        return await target_healthy(p, b1.url)

    await eventually(b1_up, timeout=5)
    await asyncio.sleep(INTERVAL)  # the promised bound for the push to reach the workers
    assert all(pair == {"b1", "b2"} for pair in await pairs(p.url, 16))
    assert b1.served == served_before + 16


async def test_a_restarted_worker_starts_with_the_current_health(
    apps: dict[str, App], served: Callable[..., Awaitable[ProxyProcess]]
) -> None:
    b1, b2 = apps["b1"], apps["b2"]
    p = await served([b1.url, b2.url], [apps["g"].url], workers=2)
    b1.health_status = 503  # up, but failing its check: a request sent to it would show

    async def b1_down() -> bool:
        return not await target_healthy(p, b1.url)

    await eventually(b1_down, timeout=5)
    before = {i["worker"]: i["pid"] for i in (await p.admin("GET", "/status"))[1]["instances"]}
    os.kill(before[0], signal.SIGKILL)

    async def replaced() -> bool:
        insts = (await p.admin("GET", "/status"))[1]["instances"]
        now = {i["worker"]: (i["pid"], i["generation"]) for i in insts}
        return now.get(0, (before[0], 0))[0] != before[0] and now[0][1] == 1

    await eventually(replaced)
    # At once, without a check round of its own: the new worker keeps b1 out too.
    served_before = b1.served
    assert set(await fresh_requests(p.url, 60)) == {(200, "b2")}
    assert b1.served == served_before

    # And it follows the supervisor's later results like the other worker.
    b1.health_status = 200

    async def b1_up() -> bool:
        return await target_healthy(p, b1.url)

    await eventually(b1_up, timeout=5)
    await asyncio.sleep(INTERVAL)  # the promised bound for the push to reach the workers
    assert all(pair == {"b1", "b2"} for pair in await pairs(p.url, 16))


async def test_reloads_that_change_targets_keep_workers_on_the_supervisors_health(
    apps: dict[str, App], served: Callable[..., Awaitable[ProxyProcess]]
) -> None:
    b1, b2 = apps["b1"], apps["b2"]
    b3 = await App("b3").start()
    try:
        p = await served([b1.url, b2.url], [apps["g"].url], workers=2)
        assert p.proc is not None

        def reload(blue: list[str]) -> None:
            data = yaml.safe_load(p.path.read_text())
            data["upstreams"]["blue"]["targets"] = blue
            p.path.write_text(yaml.safe_dump(data))
            p.signal(signal.SIGHUP)

        b1.health_status = 503

        async def b1_down() -> bool:
            return not await target_healthy(p, b1.url)

        await eventually(b1_down, timeout=5)

        async def blue_targets(*urls: str) -> bool:
            status = (await p.admin("GET", "/status"))[1]
            return [t["url"] for t in status["colors"]["blue"]["targets"]] == list(urls)

        # A reload removes b1 while it is down; it comes back into the file healthy: a new
        # target to the supervisor, so healthy at once in every worker too, not down as the
        # last report before its removal said (no target flips meanwhile to correct it).
        reload([b2.url])
        await eventually(lambda: blue_targets(b2.url), timeout=5)
        b1.health_status = 200
        reload([b1.url, b2.url])

        async def b1_used_by_every_worker() -> bool:
            return all(pair == {"b1", "b2"} for pair in await pairs(p.url, 16))

        await eventually(b1_used_by_every_worker, timeout=5)

        # A reload adds b3, which fails its checks: found down by the supervisor, kept out
        # by both workers.
        b3.health_status = 503
        reload([b1.url, b2.url, b3.url])

        async def b3_down() -> bool:
            return await blue_targets(b1.url, b2.url, b3.url) and not await target_healthy(
                p, b3.url
            )

        await eventually(b3_down, timeout=5)
        await asyncio.sleep(INTERVAL)  # the promised bound for the push to reach the workers
        served_before = b3.served
        assert {u for _, u in await fresh_requests(p.url, 60)} == {"b1", "b2"}
        assert b3.served == served_before
    finally:
        await b3.stop()
