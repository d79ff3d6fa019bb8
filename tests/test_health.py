"""Active and passive health checks: unhealthy targets leave rotation and come back."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest
from aiohttp import web

from config import HealthCheckConfig, parse_config
from conftest import Proxy, StartProxy, Upstream, config_dict, dead_address, start_upstream
from proxy.pools import UpstreamStats, record_result

FAST_CHECKS = {
    "interval": "100ms",
    "timeout": "500ms",
    "healthy_threshold": 2,
    "unhealthy_threshold": 2,
}


async def status(proxy: Proxy) -> dict[str, Any]:
    code, body = await proxy.admin("GET", "/status")
    assert code == 200
    return dict(body)


def target_health(s: dict[str, Any], color: str, url: str) -> bool:
    (entry,) = [t for t in s["colors"][color]["targets"] if t["url"] == url]
    return bool(entry["healthy"])


async def wait_for(
    proxy: Proxy, predicate: Callable[[dict[str, Any]], bool], timeout: float = 5.0
) -> dict[str, Any]:
    """Poll /status until ``predicate`` holds (bounded), and return that status."""
    async with asyncio.timeout(timeout):
        while True:
            s = await status(proxy)
            if predicate(s):
                return s
            await asyncio.sleep(0.05)


# --- the threshold rule (pure) ------------------------------------------------------------


@pytest.mark.parametrize(
    ("start_healthy", "results", "healthy_after", "flips"),
    [
        # Starts healthy: needs `unhealthy_threshold` (3) failures in a row to leave.
        (True, [False, False], True, 0),
        (True, [False, False, False], False, 1),
        (True, [False, False, True, False, False], True, 0),  # a pass resets the count
        (True, [True] * 5, True, 0),
        # Unhealthy: needs `healthy_threshold` (2) passes in a row to return.
        (False, [True], False, 0),
        (False, [True, True], True, 1),
        (False, [True, False, True], False, 0),
        (False, [True, True, False, False, False], False, 2),
    ],
)
def test_threshold_rule(
    start_healthy: bool, results: list[bool], healthy_after: bool, flips: int
) -> None:
    cfg = HealthCheckConfig(healthy_threshold=2, unhealthy_threshold=3)
    stats = UpstreamStats("http://127.0.0.1:1", healthy=start_healthy)
    n = sum(record_result(stats, ok, cfg, None if ok else "check answered 503") for ok in results)
    assert stats.healthy is healthy_after
    assert n == flips


# --- active checks -------------------------------------------------------------------------


async def test_unhealthy_target_leaves_rotation_and_comes_back(
    upstreams: dict[str, Upstream], start_proxy: StartProxy
) -> None:
    b1 = upstreams["blue"]
    b2 = await start_upstream("blue")
    try:
        proxy = await start_proxy(
            config_dict([b1.url, b2.url], [upstreams["green"].url], health_check=FAST_CHECKS)
        )
        s = await status(proxy)
        assert target_health(s, "blue", b1.url) and target_health(s, "blue", b2.url)

        b1.behaviour.health_status = 503
        s = await wait_for(proxy, lambda s: not target_health(s, "blue", b1.url))
        assert s["colors"]["blue"]["healthy"] is True  # b2 still serves
        before = len(b1.behaviour.seen), len(b2.behaviour.seen)
        for i in range(12):
            code, _, headers = await proxy.get(f"/r{i}")
            assert code == 200 and headers["X-Bg-Color"] == "blue"
        assert len(b1.behaviour.seen) == before[0], "an unhealthy target got traffic"
        assert len(b2.behaviour.seen) == before[1] + 12

        b1.behaviour.health_status = 200
        await wait_for(proxy, lambda s: target_health(s, "blue", b1.url))
        before = len(b1.behaviour.seen), len(b2.behaviour.seen)
        for i in range(12):
            code, _, _ = await proxy.get(f"/back{i}")
            assert code == 200
        assert len(b1.behaviour.seen) - before[0] == 6  # round-robin again
        assert len(b2.behaviour.seen) - before[1] == 6
    finally:
        await b2.runner.cleanup()


async def test_no_healthy_target_in_the_chosen_color_is_503(
    upstreams: dict[str, Upstream], start_proxy: StartProxy
) -> None:
    green = upstreams["green"]
    proxy = await start_proxy(
        config_dict([upstreams["blue"].url], [green.url], health_check=FAST_CHECKS)
    )
    green.behaviour.health_status = 500
    s = await wait_for(proxy, lambda s: s["colors"]["green"]["healthy"] is False)
    assert s["colors"]["blue"]["healthy"] is True
    code, body, headers = await proxy.get("/", headers={"X-Bg-Color": "green"})
    assert code == 503
    assert headers["X-Bg-Color"] == "green"
    assert "127.0.0.1" not in body
    assert green.behaviour.seen == []
    code, _, headers = await proxy.get("/")
    assert code == 200 and headers["X-Bg-Color"] == "blue"


async def test_check_that_times_out_fails(
    upstreams: dict[str, Upstream],
    start_proxy: StartProxy,
    start_app: Callable[[web.Application], Any],
) -> None:
    stall = asyncio.Event()

    async def health(request: web.Request) -> web.Response:
        await stall.wait()  # answers only once the test lets it
        return web.Response(text="late")

    app = web.Application()
    app.router.add_get("/health", health)
    slow_url = await start_app(app)
    checks = {**FAST_CHECKS, "timeout": "100ms", "unhealthy_threshold": 1}
    proxy = await start_proxy(config_dict([upstreams["blue"].url], [slow_url], health_check=checks))
    await wait_for(proxy, lambda s: not target_health(s, "green", slow_url))
    stall.set()


async def test_checks_use_the_configured_path_and_any_2xx_passes(
    start_proxy: StartProxy, start_app: Callable[[web.Application], Any]
) -> None:
    hits: list[str] = []
    six = asyncio.Event()

    async def ready(request: web.Request) -> web.Response:
        hits.append(request.headers.get("User-Agent", ""))
        if len(hits) >= 6:
            six.set()
        return web.Response(status=204)

    app = web.Application()
    app.router.add_get("/ready", ready)
    url = await start_app(app)
    checks = {**FAST_CHECKS, "path": "/ready", "unhealthy_threshold": 1}
    proxy = await start_proxy(config_dict([url], [url], health_check=checks))
    await asyncio.wait_for(six.wait(), 5)
    s = await status(proxy)
    assert s["colors"]["blue"]["healthy"] and s["colors"]["green"]["healthy"]
    assert all(h == "bgproxy-health" for h in hits)


# --- passive marking and reload --------------------------------------------------------------


async def test_connect_failures_on_the_request_path_mark_a_target_unhealthy(
    upstreams: dict[str, Upstream], start_proxy: StartProxy
) -> None:
    dead, live = dead_address(), upstreams["blue"]
    # Active checks rarely: what takes the dead target out is the request path.
    checks = {"interval": "60s", "unhealthy_threshold": 3}
    proxy = await start_proxy(
        config_dict([dead, live.url], [upstreams["green"].url], health_check=checks)
    )
    for i in range(8):
        code, _, _ = await proxy.get(f"/p{i}")
        assert code == 200  # GETs to the refusing target are retried on the live one
    s = await status(proxy)
    assert target_health(s, "blue", dead) is False
    assert target_health(s, "blue", live.url) is True
    errors_before = proxy.run.server.services["default"].upstream_errors.copy()
    for i in range(5):
        code, _, _ = await proxy.get(f"/q{i}")
        assert code == 200
    # Out of rotation: no more connects to it.
    assert proxy.run.server.services["default"].upstream_errors == errors_before


async def test_reload_keeps_health_of_kept_targets(
    upstreams: dict[str, Upstream], start_proxy: StartProxy
) -> None:
    b1, green = upstreams["blue"], upstreams["green"]
    b2 = await start_upstream("blue")
    try:
        data = config_dict([b1.url], [green.url], health_check=FAST_CHECKS)
        proxy = await start_proxy(data)
        b1.behaviour.health_status = 503
        await wait_for(proxy, lambda s: not target_health(s, "blue", b1.url))

        # Reload adds b2 and keeps b1: b1 stays out until it recovers, b2 serves.
        proxy.run.server.apply_config(
            parse_config(config_dict([b1.url, b2.url], [green.url], health_check=FAST_CHECKS))
        )
        s = await status(proxy)
        assert target_health(s, "blue", b1.url) is False
        assert target_health(s, "blue", b2.url) is True
        for i in range(4):
            code, _, _ = await proxy.get(f"/r{i}")
            assert code == 200
        assert b1.behaviour.seen == [] and len(b2.behaviour.seen) == 4

        # The check loop picked up the new pool: b1 comes back.
        b1.behaviour.health_status = 200
        await wait_for(proxy, lambda s: target_health(s, "blue", b1.url))
    finally:
        await b2.runner.cleanup()
