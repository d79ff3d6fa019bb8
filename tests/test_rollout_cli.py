"""``bgproxy rollout`` and its controls as a ``bgproxy`` process against a live proxy:
the progress lines, the exit codes (0 promoted, 1 aborted or refused), ``--service``."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import aiohttp
from test_cli import bgproxy

from conftest import Proxy, StartProxy, Upstream, config_dict

FAST = {"interval": "200ms", "min_requests": 5, "max_error_rate": 0.05, "max_p99_latency": "1s"}


@contextlib.asynccontextmanager
async def traffic(proxy: Proxy) -> AsyncIterator[None]:
    async def run() -> None:
        async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as session:
            while True:
                with contextlib.suppress(aiohttp.ClientError):
                    async with session.get(proxy.url + "/") as resp:
                        await resp.read()

    tasks = [asyncio.create_task(run(), name=f"traffic-{i}") for i in range(3)]
    try:
        yield
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def start(start_proxy: StartProxy, upstreams: dict[str, Upstream]) -> Proxy:
    return await start_proxy(
        config_dict(
            [upstreams["blue"].url],
            [upstreams["green"].url],
            rollback=FAST,
            rollout={"step_interval": "10s"},
        )
    )


async def test_rollout_wait_prints_each_step_and_exits_0_when_promoted(
    upstreams: dict[str, Upstream], start_proxy: StartProxy
) -> None:
    proxy = await start(start_proxy, upstreams)
    async with traffic(proxy):
        code, out, err = await bgproxy(
            "rollout", "green", "--steps", "20,60,100", "--interval", "500ms", "--wait",
            "--admin", proxy.admin_url,
        )  # fmt: skip
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == "blue -> split blue 80 / green 20   (generation 1 -> 2)"
    assert "step 1 passed" in lines and "step 2 passed" in lines
    assert lines.index("step 1 passed") < lines.index("step 2 passed")
    assert any(ln.startswith("step 1/3  green 20%") for ln in lines)
    assert any(ln.startswith("step 2/3  green 60%") for ln in lines)
    assert lines[-1] == "green promoted: 100% (generation 4)"


async def test_rollout_wait_exits_1_when_aborted(
    upstreams: dict[str, Upstream], start_proxy: StartProxy
) -> None:
    upstreams["green"].behaviour.fail_rate = 1.0
    proxy = await start(start_proxy, upstreams)
    async with traffic(proxy):
        code, out, err = await bgproxy(
            "rollout", "green", "--interval", "500ms", "--wait", "--admin", proxy.admin_url
        )
    assert code == 1
    assert "rollout aborted: blue has all the traffic" in out
    assert "bgproxy: rollout of green aborted: error rate 100.0% > 5.0%" in err
    s = (await proxy.admin("GET", "/status"))[1]
    assert s["weights"] == {"blue": 100, "green": 0}


async def test_controls_from_the_cli_with_a_service(
    upstreams: dict[str, Upstream], start_proxy: StartProxy
) -> None:
    svc = {
        "hosts": ["shop.example"],
        "upstreams": {
            "blue": {"targets": [upstreams["blue"].url]},
            "green": {"targets": [upstreams["green"].url]},
        },
    }
    cfg = config_dict([], [], rollout={"step_interval": "1m"}, services={"shop": svc})
    del cfg["upstreams"]
    proxy = await start_proxy(cfg)
    admin = ("--admin", proxy.admin_url, "--service", "shop")
    code, out, err = await bgproxy("promote", *admin)
    assert code == 1 and "refused (409 no_rollout)" in err
    code, out, err = await bgproxy("rollout", "green", "--steps", "30,100", *admin)
    assert code == 0, err
    assert "rollout     step 1/2  green 30%" in out
    code, out, _ = await bgproxy("services", "--admin", proxy.admin_url)
    assert code == 0 and "rolling out green 30%" in out
    code, out, err = await bgproxy("rollout", "green", *admin)
    assert code == 1 and "rollout_in_progress" in err
    code, out, _ = await bgproxy("pause", *admin)
    assert code == 0 and "paused (bgproxy resume)" in out
    code, out, _ = await bgproxy("resume", *admin)
    assert code == 0 and "next step in" in out
    code, out, _ = await bgproxy("abort", "--reason", "bad numbers", *admin)
    assert code == 0 and "rollout     green aborted" in out
    code, body = await proxy.admin("GET", "/services/shop/events")
    last = body["events"][0]
    assert (last["action"], last["reason"], last["service"]) == ("abort", "bad numbers", "shop")
    code, out, err = await bgproxy("rollout", "green", "--steps", "10,x", *admin)
    assert code == 2 and "10,25,50,100" in err
