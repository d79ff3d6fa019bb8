"""Rollouts across processes: two real proxies sharing a real redis-server, one of them
killed mid-rollout, and a proxy with ``--workers 2``. Each step and each hook call must
happen once for the fleet, and the rollout must finish after its driver dies."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from conftest import (
    ProxyProcess,
    Receiver,
    RedisServer,
    StartApp,
    Upstream,
    config_dict,
    free_port,
)


def write(path: Path, ups: dict[str, Upstream], **extra: Any) -> Path:
    data = config_dict([ups["blue"].url], [ups["green"].url], **extra)
    data["listen"] = f"127.0.0.1:{free_port()}"
    data["admin"] = {"listen": f"127.0.0.1:{free_port()}"}
    path.write_text(yaml.safe_dump(data))
    return path


@contextlib.asynccontextmanager
async def traffic(*urls: str) -> AsyncIterator[Counter[str]]:
    """Requests in a loop to each URL, fresh clients (no cookie), until the block ends."""
    served: Counter[str] = Counter()
    stop = asyncio.Event()

    async def loop(url: str) -> None:
        jar = aiohttp.DummyCookieJar()
        async with aiohttp.ClientSession(cookie_jar=jar) as s:
            while not stop.is_set():
                try:
                    async with s.get(url + "/t") as r:
                        await r.read()
                        served[f"{r.status} {r.headers.get('X-Bg-Color')}"] += 1
                except aiohttp.ClientError:
                    served["error"] += 1
                    await asyncio.sleep(0.05)  # a killed proxy refuses at once: do not spin

    tasks = [asyncio.create_task(loop(u)) for u in urls for _ in range(3)]
    try:
        yield served
    finally:
        stop.set()
        await asyncio.gather(*tasks)


async def status(p: ProxyProcess) -> dict[str, Any]:
    code, body = await p.admin("GET", "/status")
    assert code == 200
    return dict(body)


async def until(p: ProxyProcess, check: Any, timeout: float) -> dict[str, Any]:
    async with asyncio.timeout(timeout):
        while True:
            s = await status(p)
            if check(s):
                return s
            await asyncio.sleep(0.05)


ROLLOUT = {"steps": [10, 25, 50, 100], "step_interval": "800ms"}
ROLLBACK = {"interval": "200ms", "min_requests": 5, "max_error_rate": 0.05}


async def test_another_instance_takes_over_when_the_driver_dies(
    tmp_path: Path,
    upstreams: dict[str, Upstream],
    redis_server: RedisServer,
    start_app: StartApp,
) -> None:
    receiver = Receiver()
    hook_url = await start_app(receiver.app())
    hooks = [{"on": ["rollout_step", "promote"], "url": f"{hook_url}/fleet", "timeout": "1s"}]
    state = {"backend": "redis", "redis_url": redis_server.url()}
    extra = {"state": state, "rollout": ROLLOUT, "rollback": ROLLBACK, "hooks": hooks}
    procs = [ProxyProcess(write(tmp_path / f"{n}.yaml", upstreams, **extra)) for n in "ab"]
    try:
        for p in procs:
            await p.start()
        a, b = procs
        async with traffic(a.url, b.url) as served:
            code, body = await a.admin("POST", "/rollout", {"color": "green"})
            assert code == 200, body
            s = await until(a, lambda s: s["rollout"]["step"] >= 2, timeout=8)
            driving = [p for p in procs if (await status(p))["rollout"]["driving"]]
            assert len(driving) == 1  # exactly one instance drives
            driver = driving[0]
            other = b if driver is a else a
            reached = s["rollout"]["step"]
            await driver.stop()  # SIGKILL: its lease is left to expire
            killed = time.monotonic()
            s = await until(other, lambda s: s["rollout"]["step"] > reached, timeout=10)
            took_over = time.monotonic() - killed
            assert s["rollout"]["driving"] is True
            s = await until(other, lambda s: s["rollout"]["state"] != "progressing", timeout=10)
        assert s["rollout"]["state"] == "promoted"
        assert s["weights"] == {"blue": 0, "green": 100}
        assert took_over < 3.0 + 1.0 + 3.0  # lease TTL, a renewal tick, a busy machine
        code, body = await other.admin("GET", "/events?limit=50")
        steps = [(e["action"], e.get("weight")) for e in reversed(body["events"])]
        assert steps == [
            ("rollout_step", 10),
            ("rollout_step", 25),
            ("rollout_step", 50),
            ("promote", 100),
        ]  # each step once for the fleet, continued from the one reached
        got = await receiver.wait(4)
        await asyncio.sleep(0.5)
        assert [(g["action"], g.get("weight")) for g in got] == steps  # once per event
        assert served["200 green"] > 0 and served["200 blue"] > 0
        assert set(served) <= {"200 green", "200 blue", "error"}
    finally:
        for p in procs:
            await p.stop()


async def test_with_workers_the_supervisor_alone_drives(
    tmp_path: Path, upstreams: dict[str, Upstream]
) -> None:
    p = ProxyProcess(
        write(tmp_path / "w.yaml", upstreams, rollout=ROLLOUT, rollback=ROLLBACK), "--workers", "2"
    )
    try:
        await p.start()
        async with traffic(p.url) as served:
            code, body = await p.admin("POST", "/rollout", {"color": "green"})
            assert code == 200, body
            s = await until(p, lambda s: s["rollout"]["state"] != "progressing", timeout=15)
        assert s["rollout"]["state"] == "promoted", s["rollout"]
        # Every worker applies the supervisor's steps (a step does not wait for them).
        gen = s["generation"]
        await until(p, lambda s: {i["generation"] for i in s["instances"]} == {gen}, timeout=5)
        code, body = await p.admin("GET", "/events?limit=50")
        steps = [(e["action"], e.get("weight")) for e in reversed(body["events"])]
        assert steps == [
            ("rollout_step", 10),
            ("rollout_step", 25),
            ("rollout_step", 50),
            ("promote", 100),
        ]
        assert set(served) == {"200 blue", "200 green"}
    finally:
        await p.stop()
