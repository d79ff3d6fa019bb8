"""Pre-switch gates: require_healthy, smoke probes and warm-up, as an operator sees them."""

from __future__ import annotations

import asyncio
from typing import Any

from conftest import Proxy, StartProxy, Upstream, config_dict, start_upstream

FAST_CHECKS = {"interval": "100ms", "timeout": "500ms", "unhealthy_threshold": 1}


async def status(proxy: Proxy) -> dict[str, Any]:
    code, body = await proxy.admin("GET", "/status")
    assert code == 200
    return dict(body)


async def events(proxy: Proxy) -> list[dict[str, Any]]:
    code, body = await proxy.admin("GET", "/events")
    assert code == 200
    return list(body["events"])


async def wait_unhealthy(proxy: Proxy, color: str) -> None:
    async with asyncio.timeout(5):
        while True:  # polls /status, as an operator would
            if not (await status(proxy))["colors"][color]["healthy"]:
                return
            await asyncio.sleep(0.05)


def assert_gate_failed(body: Any, gate: str) -> None:
    assert body["error"] == "gate_failed"
    assert body["gate"] == gate
    assert isinstance(body["detail"], str) and body["detail"].startswith(gate)


async def test_unhealthy_green_refuses_the_switch_and_force_overrides(
    upstreams: dict[str, Upstream], start_proxy: StartProxy
) -> None:
    green = upstreams["green"]
    proxy = await start_proxy(
        config_dict([upstreams["blue"].url], [green.url], health_check=FAST_CHECKS)
    )
    green.behaviour.health_status = 503
    await wait_unhealthy(proxy, "green")
    before = await status(proxy)

    code, body = await proxy.admin("POST", "/switch", {"color": "green"})
    assert code == 409
    assert_gate_failed(body, "require_healthy")
    assert green.url in body["detail"] and "503" in body["detail"]
    assert body["color"] == "green"
    after = await status(proxy)
    assert (after["active"], after["generation"]) == (before["active"], before["generation"])
    assert await events(proxy) == []
    code, _, headers = await proxy.get("/")
    assert code == 200 and headers["X-Bg-Color"] == "blue"

    code, body = await proxy.admin(
        "POST", "/switch", {"color": "green", "force": True, "reason": "hotfix"}
    )
    assert code == 200, body
    assert body["active"] == "green"
    assert body["generation"] == before["generation"] + 1
    (event,) = await events(proxy)
    assert event["action"] == "switch" and event["to"] == "green"
    assert event["force"] is True
    assert event["trigger"] == "manual" and event["reason"] == "hotfix"


async def test_failing_smoke_probe_refuses_the_switch(
    upstreams: dict[str, Upstream], start_proxy: StartProxy
) -> None:
    green = upstreams["green"]
    smoke = [{"path": "/health", "expect_status": 200, "expect_body": "OK"}]
    # Checks far apart: green still counts healthy, so the smoke probe is what fails.
    proxy = await start_proxy(
        config_dict(
            [upstreams["blue"].url],
            [green.url],
            health_check={"interval": "60s"},
            gates={"smoke": smoke},
        )
    )
    green.behaviour.health_status = 500
    before = await status(proxy)
    code, body = await proxy.admin("POST", "/switch", {"color": "green"})
    assert code == 409
    assert_gate_failed(body, "smoke")
    assert body["target"] == green.url and body["path"] == "/health"
    assert body["status"] == 500 and body["expect_status"] == 200
    assert "expected status 200, got status 500" in body["detail"]
    after = await status(proxy)
    assert after["generation"] == before["generation"] and after["active"] == "blue"
    assert await events(proxy) == []

    green.behaviour.health_status = 200
    code, body = await proxy.admin("POST", "/switch", {"color": "green"})
    assert code == 200, body
    assert body["active"] == "green"


async def test_smoke_probe_checks_the_body_on_every_target(
    upstreams: dict[str, Upstream], start_proxy: StartProxy
) -> None:
    g1 = upstreams["green"]
    g2 = await start_upstream("green")
    try:
        smoke = [{"path": "/anything", "expect_status": 200, "expect_body": '"color": "green"'}]
        proxy = await start_proxy(
            config_dict([upstreams["blue"].url], [g1.url, g2.url], gates={"smoke": smoke})
        )
        code, body = await proxy.admin("POST", "/switch", {"color": "green"})
        assert code == 200, body
        # Each target was probed directly (the echo app records it), not through the router.
        for up in (g1, g2):
            paths = [(r["path"], r["headers"].get("User-Agent")) for r in up.behaviour.seen]
            assert paths == [("/anything", "bgproxy-gate")]
            assert "X-Forwarded-For" not in up.behaviour.seen[0]["headers"]

        await proxy.admin("POST", "/switch", {"color": "blue"})
        bad = [{"path": "/anything", "expect_body": "no such text"}]
        proxy2 = await start_proxy(
            config_dict([upstreams["blue"].url], [g1.url, g2.url], gates={"smoke": bad})
        )
        code, body = await proxy2.admin("POST", "/switch", {"color": "green"})
        assert code == 409
        assert_gate_failed(body, "smoke")
        assert "'no such text'" in body["detail"]
    finally:
        await g2.runner.cleanup()


async def test_warmup_requests_reach_the_target_and_are_not_counted(
    upstreams: dict[str, Upstream], start_proxy: StartProxy
) -> None:
    green = upstreams["green"]
    warmup = {"requests": 7, "path": "/warm?cache=1", "concurrency": 3}
    proxy = await start_proxy(
        config_dict([upstreams["blue"].url], [green.url], gates={"warmup": warmup})
    )
    code, body = await proxy.admin("POST", "/switch", {"color": "green"})
    assert code == 200, body
    assert [r["path"] for r in green.behaviour.seen] == ["/warm?cache=1"] * 7
    assert all(r["headers"]["User-Agent"] == "bgproxy-gate" for r in green.behaviour.seen)
    # Probes bypass the data plane: no traffic counted for green.
    assert body["traffic"]["green"]["rps"] == 0
    async with proxy.session.get(proxy.admin_url + "/metrics") as resp:
        text = await resp.text()
    assert 'bgproxy_requests_total{service="default",color="green"' not in text
    assert 'bgproxy_request_duration_seconds_count{color="green",service="default"} 0.0' in text


async def test_failing_warmup_refuses_the_switch(
    upstreams: dict[str, Upstream], start_proxy: StartProxy
) -> None:
    green = upstreams["green"]
    green.behaviour.fail_rate = 1.0
    warmup = {"requests": 4, "path": "/warm", "concurrency": 2}
    proxy = await start_proxy(
        config_dict([upstreams["blue"].url], [green.url], gates={"warmup": warmup})
    )
    code, body = await proxy.admin("POST", "/switch", {"color": "green"})
    assert code == 409
    assert_gate_failed(body, "warmup")
    assert body["failed"] == 4 and body["requests"] == 4
    assert "status 500" in body["detail"]
    assert (await status(proxy))["active"] == "blue"


async def test_noop_switch_runs_no_gates(
    upstreams: dict[str, Upstream], start_proxy: StartProxy
) -> None:
    blue = upstreams["blue"]
    smoke = [{"path": "/health", "expect_status": 200}]
    proxy = await start_proxy(
        config_dict(
            [blue.url],
            [upstreams["green"].url],
            health_check=FAST_CHECKS,
            gates={"smoke": smoke, "warmup": {"requests": 3}},
        )
    )
    blue.behaviour.health_status = 503
    await wait_unhealthy(proxy, "blue")
    code, body = await proxy.admin("POST", "/switch", {"color": "blue"})
    assert code == 200, body
    assert body["generation"] == 1
    assert blue.behaviour.seen == []  # no warm-up either


async def test_weights_giving_a_color_traffic_run_the_gates(
    upstreams: dict[str, Upstream], start_proxy: StartProxy
) -> None:
    green = upstreams["green"]
    proxy = await start_proxy(
        config_dict([upstreams["blue"].url], [green.url], health_check=FAST_CHECKS)
    )
    green.behaviour.health_status = 503
    await wait_unhealthy(proxy, "green")

    code, body = await proxy.admin("POST", "/weights", {"blue": 90, "green": 10})
    assert code == 409
    assert_gate_failed(body, "require_healthy")
    assert (await status(proxy))["weights"] == {"blue": 100, "green": 0}
    code, body = await proxy.admin("POST", "/weights", {"blue": 100, "green": 0})
    assert code == 200, body  # green gains nothing: no gate

    code, body = await proxy.admin("POST", "/weights", {"blue": 90, "green": 10, "force": True})
    assert code == 200, body
    assert (await events(proxy))[0]["force"] is True
    # Green already has traffic: shifting more to it is not gated.
    code, body = await proxy.admin("POST", "/weights", {"blue": 50, "green": 50})
    assert code == 200, body
    assert body["weights"] == {"blue": 50, "green": 50}

    code, body = await proxy.admin("POST", "/weights", {"blue": 1, "green": 1, "force": "yes"})
    assert code == 400
