"""``bgproxy serve --workers N`` as users run it: one port, one routing state, N processes."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from conftest import (
    Proxy,
    ProxyProcess,
    RedisServer,
    StartProxy,
    Upstream,
    config_dict,
    free_port,
    start_upstream,
)


def write(path: Path, blue: list[str], green: list[str], **extra: Any) -> None:
    data = config_dict(blue, green, **extra)
    data["listen"] = f"127.0.0.1:{free_port()}"
    data["admin"] = {"listen": f"127.0.0.1:{free_port()}"}
    path.write_text(yaml.safe_dump(data))


def rewrite(path: Path, blue: list[str]) -> None:
    data = yaml.safe_load(path.read_text())
    data["upstreams"]["blue"]["targets"] = blue
    path.write_text(yaml.safe_dump(data))


async def fresh_requests(url: str, n: int, path: str = "/") -> list[str]:
    """``n`` concurrent requests, each on its own new connection (so the kernel spreads
    them over the workers' sockets); the upstream each was served by."""
    connector = aiohttp.TCPConnector(force_close=True, limit=0)
    async with aiohttp.ClientSession(connector=connector) as s:

        async def one() -> str:
            async with s.get(url + path) as r:
                assert r.status == 200, r.status
                return r.headers["X-Upstream"]

        return list(await asyncio.gather(*(one() for _ in range(n))))


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 10.0) -> None:
    """Worker processes have no event this test can wait on: look every 50 ms, bounded."""
    async with asyncio.timeout(timeout):
        while True:
            if await check():
                return
            await asyncio.sleep(0.05)


@pytest.fixture
async def ups() -> AsyncIterator[dict[str, Upstream]]:
    u = {c: await start_upstream(c) for c in ("blue", "blue2", "green")}
    yield u
    for up in u.values():
        await up.runner.cleanup()


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[ProxyProcess]]]:
    started: list[ProxyProcess] = []

    async def start(path: Path, workers: int = 2) -> ProxyProcess:
        proc = ProxyProcess(path, "--workers", str(workers))
        started.append(proc)
        await proc.start()
        return proc

    yield start
    for proc in started:
        await proc.stop()


async def test_a_flip_reaches_every_worker_before_the_admin_call_returns(
    tmp_path: Path, ups: dict[str, Upstream], served: Callable[..., Awaitable[ProxyProcess]]
) -> None:
    cfg = tmp_path / "bgproxy.yaml"
    write(cfg, [ups["blue"].url], [ups["green"].url])
    p = await served(cfg, 2)
    code, status = await p.admin("GET", "/status")
    assert code == 200 and status["store"] == {"backend": "memory", "available": True, "workers": 2}
    assert len({i["pid"] for i in status["instances"]}) == 2

    # In-flight counts are the workers' own, reported to the supervisor and summed.
    slow = asyncio.create_task(fresh_requests(p.url, 30, "/slow?s=1.5"))

    async def both_busy() -> bool:
        s = (await p.admin("GET", "/status"))[1]
        per_worker = [i["in_flight"]["blue"] for i in s["instances"]]
        return min(per_worker) > 0 and s["colors"]["blue"]["in_flight"] == sum(per_worker) == 30

    await eventually(both_busy, timeout=3)
    assert set(await slow) == {"blue"}

    for color in ("green", "blue", "green", "blue", "green"):
        code, body = await p.admin("POST", "/switch", {"color": color})
        assert code == 200 and body["lagging"] == []
        assert {i["generation"] for i in body["instances"]} == {body["generation"]}
        # Every request that starts after the call returned, whichever worker takes it.
        assert set(await fresh_requests(p.url, 40)) == {color}

    # The supervisor's metrics count what the workers served (reported every 250 ms).
    async def counted() -> bool:
        async with aiohttp.ClientSession() as s, s.get(p.admin_url + "/metrics") as r:
            text = await r.text()
        total = sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("bgproxy_requests_total{")
        )
        return total == 30 + 5 * 40

    await eventually(counted, timeout=3)


async def test_workers_restart_reload_and_stop_gracefully(
    tmp_path: Path, ups: dict[str, Upstream], served: Callable[..., Awaitable[ProxyProcess]]
) -> None:
    cfg = tmp_path / "bgproxy.yaml"
    write(cfg, [ups["blue"].url], [ups["green"].url], drain={"timeout": "3s"})
    p = await served(cfg, 2)
    assert (await p.admin("POST", "/switch", {"color": "green"}))[0] == 200
    before = {i["worker"]: i["pid"] for i in (await p.admin("GET", "/status"))[1]["instances"]}
    os.kill(before[0], signal.SIGKILL)

    async def replaced() -> bool:
        insts = (await p.admin("GET", "/status"))[1]["instances"]
        now = {i["worker"]: (i["pid"], i["generation"]) for i in insts}
        return now.get(0, (before[0], 0))[0] != before[0] and now[0][1] == 2

    await eventually(replaced)
    assert set(await fresh_requests(p.url, 30)) == {"green"}  # the new one got the state

    # SIGHUP: every worker reloads the file (here: blue's targets).
    assert (await p.admin("POST", "/switch", {"color": "blue"}))[0] == 200
    rewrite(cfg, [ups["blue2"].url])
    assert p.proc is not None
    p.proc.send_signal(signal.SIGHUP)

    async def reloaded() -> bool:
        return set(await fresh_requests(p.url, 20)) == {"blue2"}

    await eventually(reloaded, timeout=5)

    # SIGTERM: in-flight requests finish, then the supervisor and its workers exit 0.
    pids = [i["pid"] for i in (await p.admin("GET", "/status"))[1]["instances"]]
    slow = asyncio.create_task(fresh_requests(p.url, 6, "/slow?s=0.5"))
    await asyncio.sleep(0.2)
    p.proc.send_signal(signal.SIGTERM)
    assert set(await slow) == {"blue2"}
    assert await asyncio.wait_for(p.proc.wait(), 6) == 0
    assert not any(_alive(pid) for pid in pids), pids


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def test_with_redis_each_worker_is_a_fleet_instance(
    tmp_path: Path,
    ups: dict[str, Upstream],
    redis_server: RedisServer,
    start_proxy: StartProxy,
    served: Callable[..., Awaitable[ProxyProcess]],
) -> None:
    state = {"backend": "redis", "redis_url": redis_server.url()}
    cfg = tmp_path / "bgproxy.yaml"
    write(cfg, [ups["blue"].url], [ups["green"].url], state=state)
    p = await served(cfg, 2)
    other: Proxy = await start_proxy(
        config_dict([ups["blue"].url], [ups["green"].url], state=state)
    )

    async def three_instances() -> bool:
        return len((await other.admin("GET", "/status"))[1]["instances"]) == 3

    await eventually(three_instances, timeout=5)
    # A switch on the other proxy answers once both workers (via Redis) applied it.
    code, body = await other.admin("POST", "/switch", {"color": "green"})
    assert code == 200 and body["lagging"] == []
    assert [i["generation"] for i in body["instances"]] == [2, 2, 2]
    assert set(await fresh_requests(p.url, 40)) == {"green"}
    code, status = await p.admin("GET", "/status")
    assert status["store"]["backend"] == "redis" and status["generation"] == 2

    # A supervisor that vanishes takes its workers with it (they see the channel close).
    pids = [i["pid"] for i in status["instances"] if "worker" in i]
    assert len(pids) == 2
    assert p.proc is not None
    p.proc.kill()

    async def orphans_gone() -> bool:
        return not any(_alive(pid) for pid in pids)

    await eventually(orphans_gone, timeout=5)


async def test_the_supervisor_rolls_back_on_its_workers_summed_traffic(
    tmp_path: Path, ups: dict[str, Upstream], served: Callable[..., Awaitable[ProxyProcess]]
) -> None:
    ups["green"].behaviour.fail_rate = 0.5
    rollback = {"window": "5s", "interval": "500ms", "min_requests": 10, "failure_limit": 1}
    cfg = tmp_path / "bgproxy.yaml"
    write(cfg, [ups["blue"].url], [ups["green"].url], rollback=rollback)
    p = await served(cfg, 2)
    stop = asyncio.Event()

    async def traffic() -> None:
        connector = aiohttp.TCPConnector(force_close=True)
        async with aiohttp.ClientSession(connector=connector) as s:
            while not stop.is_set():
                async with s.get(p.url + "/") as r:
                    await r.read()
                await asyncio.sleep(0.01)  # pacing the load, not waiting for a condition

    clients = [asyncio.create_task(traffic(), name=f"traffic-{i}") for i in range(4)]
    try:
        assert (await p.admin("POST", "/switch", {"color": "green"}))[0] == 200

        async def rolled_back() -> bool:
            return bool((await p.admin("GET", "/status"))[1]["active"] == "blue")

        await eventually(rolled_back, timeout=4)
    finally:
        stop.set()
        await asyncio.gather(*clients)
    events = (await p.admin("GET", "/events"))[1]["events"]
    assert [(e["action"], e["trigger"]) for e in events] == [
        ("rollback", "auto"),
        ("switch", "manual"),
    ]
    assert set(await fresh_requests(p.url, 20)) == {"blue"}
