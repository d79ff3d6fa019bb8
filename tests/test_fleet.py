"""Two proxies sharing one real Redis: fleet-wide flips, races, and Redis trouble."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from redis.asyncio import Redis

from conftest import Proxy, RedisServer, StartProxy, Upstream, config_dict


def fleet_config(ups: dict[str, Upstream], redis: RedisServer, **state: Any) -> dict[str, Any]:
    return config_dict(
        [ups["blue"].url],
        [ups["green"].url],
        state={"backend": "redis", "redis_url": redis.url(), **state},
    )


async def served(proxy: Proxy) -> str:
    status, _, headers = await proxy.get("/")
    assert status == 200
    return headers["X-Bg-Color"]


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 5.0) -> float:
    """Seconds until ``check()`` holds. What another instance or Redis does has no local
    event to wait on, so this looks every 20 ms, bounded by ``timeout``."""
    start = time.monotonic()
    async with asyncio.timeout(timeout):
        while True:
            if await check():
                return time.monotonic() - start
            await asyncio.sleep(0.02)


@pytest.fixture
async def pair(
    upstreams: dict[str, Upstream], redis_server: RedisServer, start_proxy: StartProxy
) -> tuple[Proxy, Proxy]:
    cfg = fleet_config(upstreams, redis_server)
    a = await start_proxy(cfg)
    b = await start_proxy(cfg)

    async def both_listed() -> bool:
        return len((await b.admin("GET", "/status"))[1]["instances"]) == 2

    await eventually(both_listed)  # both registered before the test starts
    return a, b


@dataclass
class Load:
    """Requests in a loop against some proxies; every failure and latency recorded."""

    proxies: list[Proxy]
    errors: list[str] = field(default_factory=list)
    samples: list[tuple[float, float, str]] = field(default_factory=list)  # start, secs, color
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    async def _loop(self, proxy: Proxy) -> None:
        while not self._stop.is_set():
            start = time.monotonic()
            try:
                status, _, headers = await proxy.get("/")
            except aiohttp.ClientError as exc:
                self.errors.append(repr(exc))
                continue
            took = time.monotonic() - start
            if status != 200:
                self.errors.append(str(status))
            self.samples.append((start, took, headers.get("X-Bg-Color", "")))

    def start(self, per_proxy: int = 4) -> None:
        for proxy in self.proxies:
            for i in range(per_proxy):
                self._tasks.append(asyncio.create_task(self._loop(proxy), name=f"load-{i}"))

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)

    def p99_between(self, t0: float, t1: float) -> tuple[float, int]:
        lat = sorted(took for start, took, _ in self.samples if t0 <= start <= t1)
        assert lat, "no requests in that interval"
        return lat[min(len(lat) - 1, int(len(lat) * 0.99))], len(lat)


@contextlib.asynccontextmanager
async def load_on(*proxies: Proxy) -> AsyncIterator[Load]:
    load = Load(list(proxies))
    load.start()
    try:
        yield load
    finally:
        await load.stop()


async def wait_available(proxy: Proxy, want: bool, timeout: float = 8.0) -> float:
    async def store_is() -> bool:
        return bool((await proxy.admin("GET", "/status"))[1]["store"]["available"] is want)

    return await eventually(store_is, timeout)


async def test_a_switch_on_one_proxy_routes_the_other_before_the_call_returns(
    pair: tuple[Proxy, Proxy],
) -> None:
    a, b = pair
    assert await served(b) == "blue"
    started = time.monotonic()
    code, body = await a.admin("POST", "/switch", {"color": "green"})
    answered = time.monotonic() - started
    assert code == 200 and body["lagging"] == []
    assert {i["generation"] for i in body["instances"]} == {2}
    # Every request that starts after the admin call returned is routed green, on B too.
    colors = await asyncio.gather(*(served(b) for _ in range(20)))
    assert set(colors) == {"green"}
    print(f"\nswitch on A answered with B applied in {answered * 1000:.1f} ms")
    assert answered < 1.0

    # And back, measuring when B's data plane serves the new color (not waiting for A).
    started = time.monotonic()
    switching = asyncio.create_task(a.admin("POST", "/switch", {"color": "blue"}))
    while await served(b) != "blue":
        pass
    propagated = time.monotonic() - started
    assert (await switching)[0] == 200
    print(f"B served the new color {propagated * 1000:.1f} ms after the switch was sent")
    assert propagated < 1.0


async def test_status_lists_both_instances_and_events_are_shared(
    pair: tuple[Proxy, Proxy],
) -> None:
    a, b = pair
    await a.admin("POST", "/switch", {"color": "green", "reason": "release 7"})
    code, s = await b.admin("GET", "/status")
    assert code == 200
    assert s["store"]["backend"] == "redis" and s["store"]["available"] is True
    assert (s["active"], s["generation"]) == ("green", 2)
    ids = {a.run.control.identity.id, b.run.control.identity.id}
    assert {i["id"] for i in s["instances"]} == ids
    for inst in s["instances"]:
        assert inst["generation"] == 2
        assert set(inst["in_flight"]) == set(inst["websockets"]) == {"blue", "green"}
        assert {"host", "version", "last_seen"} <= set(inst)
    code, ev = await b.admin("GET", "/events")
    assert [(e["action"], e["to"], e["reason"]) for e in ev["events"]] == [
        ("switch", "green", "release 7")
    ]


async def test_stale_expected_generation_is_409_and_racing_switches_one_wins(
    pair: tuple[Proxy, Proxy],
) -> None:
    a, b = pair
    assert (await a.admin("POST", "/switch", {"color": "green"}))[0] == 200
    code, body = await b.admin("POST", "/switch", {"color": "blue", "expected_generation": 1})
    assert code == 409 and body["error"] == "generation_mismatch"
    for _ in range(5):
        gen = (await a.admin("GET", "/status"))[1]["generation"]
        target = "blue" if (await a.admin("GET", "/status"))[1]["active"] == "green" else "green"
        body = {"color": target, "expected_generation": gen}
        results = await asyncio.gather(
            a.admin("POST", "/switch", body), b.admin("POST", "/switch", body)
        )
        assert sorted(code for code, _ in results) == [200, 409], results
    assert (await a.admin("GET", "/status"))[1]["generation"] == 7


async def test_redis_killed_under_traffic_then_back_empty(
    pair: tuple[Proxy, Proxy], redis_server: RedisServer
) -> None:
    a, b = pair
    await a.admin("POST", "/switch", {"color": "green"})
    async with load_on(a, b) as load:
        await asyncio.sleep(0.2)
        await redis_server.kill()
        started = time.monotonic()
        code, body = await a.admin("POST", "/switch", {"color": "blue"})
        assert time.monotonic() - started < 1.5
        assert code == 503 and body["error"] == "store_unavailable"
        assert redis_server.url() in body["detail"], body["detail"]
        await wait_available(b, False)
        code, body = await b.admin("POST", "/weights", {"blue": 50, "green": 50})
        assert code == 503 and "unavailable" in body["detail"]
        assert (await b.admin("GET", "/events"))[0] == 503  # the trail lives in Redis
        assert (await b.admin("GET", "/status"))[0] == 200  # status does not need it
        await asyncio.sleep(0.5)  # traffic keeps flowing on the last snapshot
        await redis_server.start()  # no persistence: it comes back empty
        took = max(await wait_available(a, True), await wait_available(b, True))
        await asyncio.sleep(0.2)
    print(f"\nwrites accepted again {took * 1000:.0f} ms after Redis came back")
    assert load.errors == []
    assert {color for *_, color in load.samples} == {"green"}
    async with Redis.from_url(redis_server.url(), decode_responses=True) as r:
        stored = json.loads(await r.get("bgproxy:state"))
    assert (stored["active"], stored["generation"]) == ("green", 2)  # re-seeded, not defaults
    code, body = await b.admin("POST", "/switch", {"color": "blue"})
    assert code == 200 and body["generation"] == 3 and body["lagging"] == []
    assert await served(a) == "blue"


async def test_stalled_redis_leaves_request_latency_alone_and_fails_writes_fast(
    pair: tuple[Proxy, Proxy], redis_server: RedisServer
) -> None:
    a, b = pair
    async with load_on(a, b) as load:
        await asyncio.sleep(0.3)
        redis_server.pause()
        t0 = time.monotonic()
        try:
            code, body = await a.admin("POST", "/switch", {"color": "green"})
            write_took = time.monotonic() - t0
            assert code == 503 and body["error"] == "store_unavailable"
            code, _ = await b.admin("POST", "/switch", {"color": "green"})
            assert code == 503
            await asyncio.sleep(max(0.0, 2.0 - (time.monotonic() - t0)))
            t1 = time.monotonic()
        finally:
            redis_server.resume()
        await wait_available(a, True)
        await wait_available(b, True)
    p99, n = load.p99_between(t0, t1)
    before, _ = load.p99_between(0, t0)
    print(
        f"\nRedis stopped 2 s: {n} requests, p99 {p99 * 1000:.1f} ms "
        f"(before: {before * 1000:.1f} ms); write refused in {write_took * 1000:.0f} ms"
    )
    assert load.errors == []
    assert p99 < 0.05
    assert write_took < 1.5
    assert (await a.admin("POST", "/switch", {"color": "green"}))[0] == 200
    assert await served(b) == "green"


async def test_an_instance_that_does_not_apply_is_named_after_the_bounded_wait(
    pair: tuple[Proxy, Proxy], redis_server: RedisServer
) -> None:
    a, _ = pair
    a.run.control.only.propagation_timeout = 0.5
    stuck = {"id": "stuck-1", "host": "elsewhere", "generation": 1, "last_seen": time.time()}
    async with Redis.from_url(redis_server.url()) as r:
        await r.set("bgproxy:instance:stuck-1", json.dumps(stuck), px=5000)
        await r.sadd("bgproxy:instances", "stuck-1")
    started = time.monotonic()
    code, body = await a.admin("POST", "/switch", {"color": "green"})
    took = time.monotonic() - started
    assert code == 200 and body["lagging"] == ["stuck-1"]
    assert 0.4 < took < 1.5
    # Its record expires with its heartbeat: then it is no longer listed.
    async with Redis.from_url(redis_server.url()) as r:
        await r.delete("bgproxy:instance:stuck-1")
    code, body = await a.admin("POST", "/switch", {"color": "blue"})
    assert code == 200 and body["lagging"] == []
    assert "stuck-1" not in {i["id"] for i in body["instances"]}


async def test_start_waits_for_redis_then_loads_it(
    upstreams: dict[str, Upstream], redis_server: RedisServer, start_proxy: StartProxy
) -> None:
    await redis_server.kill()
    starting = asyncio.create_task(start_proxy(fleet_config(upstreams, redis_server)))
    await asyncio.sleep(0.5)
    assert not starting.done()  # waiting for Redis, not serving config defaults
    await redis_server.start()
    async with asyncio.timeout(5):
        proxy = await starting
    assert await served(proxy) == "blue"


async def test_serve_gives_up_on_unreachable_redis_naming_the_url(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    url = redis_server.url()
    await redis_server.kill()
    with contextlib.closing(__import__("socket").socket()) as s:
        s.bind(("127.0.0.1", 0))
        admin_port = s.getsockname()[1]
    cfg = tmp_path / "bgproxy.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "listen": "127.0.0.1:0",
                "admin": {"listen": f"127.0.0.1:{admin_port}"},
                "upstreams": {
                    "blue": {"targets": ["http://127.0.0.1:9"]},
                    "green": {"targets": ["http://127.0.0.1:9"]},
                },
                "state": {"backend": "redis", "redis_url": url, "connect_timeout": "2s"},
            }
        )
    )
    env = {k: v for k, v in os.environ.items() if k != "BGPROXY_ADMIN_TOKEN"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "-c", str(cfg), stderr=asyncio.subprocess.PIPE, env=env
    )
    try:
        ready_codes = set()
        async with aiohttp.ClientSession() as s:
            while proc.returncode is None:
                with contextlib.suppress(aiohttp.ClientError):
                    async with s.get(f"http://127.0.0.1:{admin_port}/readyz") as r:
                        ready_codes.add(r.status)
                await asyncio.sleep(0.1)
        assert proc.stderr is not None
        err = (await asyncio.wait_for(proc.stderr.read(), 10)).decode()
        code = await proc.wait()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert code == 1
    assert ready_codes == {503}  # the admin API answered "not ready" while it waited
    last = err.strip().splitlines()[-1]
    assert last.startswith("bgproxy: state.redis_url:") and url in last, err
