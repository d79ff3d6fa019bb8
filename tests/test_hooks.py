"""Hooks against a real receiver (an aiohttp server on port 0) and the real proxy: gate
hooks refusing and accepting a switch or a rollout, notifications delivered once and in
order, and a receiver that hangs or is down never delaying a change."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
import yaml

from config import ConfigError, parse_config
from config.load import _StrictLoader
from conftest import (
    Proxy,
    Receiver,
    StartApp,
    StartProxy,
    Upstream,
    config_dict,
    dead_address,
)


async def start_with_hooks(
    start_proxy: StartProxy,
    upstreams: dict[str, Upstream],
    hooks: list[dict[str, Any]],
    **sections: Any,
) -> Proxy:
    cfg = config_dict(
        [upstreams["blue"].url],
        [upstreams["green"].url],
        hooks=hooks,
        rollback={"interval": "200ms", "min_requests": 5},
        rollout={"steps": [50, 100], "step_interval": "10s"},
        **sections,
    )
    return await start_proxy(cfg)


async def hook_metrics(proxy: Proxy) -> dict[str, float]:
    async with proxy.session.get(proxy.admin_url + "/metrics") as resp:
        text = await resp.text()
    return {
        ln.rsplit(" ", 1)[0]: float(ln.rsplit(" ", 1)[1])
        for ln in text.splitlines()
        if ln.startswith("bgproxy_hook_calls_total{")
    }


async def test_a_gate_hook_refuses_then_accepts_a_switch_and_a_rollout(
    upstreams: dict[str, Upstream], start_proxy: StartProxy, start_app: StartApp
) -> None:
    receiver = Receiver()
    url = await start_app(receiver.app())
    proxy = await start_with_hooks(
        start_proxy,
        upstreams,
        [{"on": ["pre_switch"], "url": f"{url}/approve", "timeout": "1s", "name": "ci"}],
    )
    receiver.status = 403
    for path, body in (("/switch", {"color": "green"}), ("/rollout", {"color": "green"})):
        code, answer = await proxy.admin("POST", path, {**body, "reason": "release 42"})
        assert code == 409, answer
        assert answer["error"] == "gate_failed" and answer["gate"] == "hook:ci"
        assert "403" in answer["detail"]
    s = (await proxy.admin("GET", "/status"))[1]
    assert s["weights"] == {"blue": 100, "green": 0} and s["rollout"]["state"] == "idle"
    assert [(g["action"], g["color"], g["reason"], g["service"]) for g in receiver.got] == [
        ("switch", "green", "release 42", "default"),
        ("rollout", "green", "release 42", "default"),
    ]
    # force skips the gates, hooks included.
    code, answer = await proxy.admin("POST", "/rollout", {"color": "green", "force": True})
    assert code == 200 and len(receiver.got) == 2
    code, _ = await proxy.admin("POST", "/rollout/abort")
    assert code == 200

    receiver.status = 204
    code, answer = await proxy.admin("POST", "/rollout", {"color": "green"})
    assert code == 200 and answer["weights"] == {"blue": 50, "green": 50}
    assert len(receiver.got) == 3  # once for the rollout, not at each step
    m = await hook_metrics(proxy)
    assert m['bgproxy_hook_calls_total{hook="ci",result="error",service="default"}'] == 2
    assert m['bgproxy_hook_calls_total{hook="ci",result="ok",service="default"}'] == 1


async def test_a_gate_hook_that_is_down_or_slow_refuses(
    upstreams: dict[str, Upstream], start_proxy: StartProxy, start_app: StartApp
) -> None:
    receiver = Receiver()
    receiver.hang = True
    url = await start_app(receiver.app())
    proxy = await start_with_hooks(
        start_proxy,
        upstreams,
        [
            {"on": ["pre_switch"], "url": f"{url}/slow", "timeout": "300ms", "name": "slow"},
        ],
    )
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    code, answer = await proxy.admin("POST", "/switch", {"color": "green"})
    assert (code, answer["gate"]) == (409, "hook:slow")
    assert "did not answer in time" in answer["detail"]
    assert loop.time() - t0 < 2.0
    proxy2 = await start_with_hooks(
        start_proxy,
        upstreams,
        [{"on": ["pre_switch"], "url": dead_address() + "/x", "timeout": "1s", "name": "gone"}],
    )
    code, answer = await proxy2.admin("POST", "/switch", {"color": "green"})
    assert (code, answer["gate"]) == (409, "hook:gone")
    assert "could not be reached" in answer["detail"]


async def test_notifications_arrive_once_in_order(
    upstreams: dict[str, Upstream], start_proxy: StartProxy, start_app: StartApp
) -> None:
    receiver = Receiver()
    url = await start_app(receiver.app())
    every = ["switch", "rollout_step", "promote", "abort", "rollback"]
    proxy = await start_with_hooks(
        start_proxy,
        upstreams,
        [
            {"on": every, "url": f"{url}/json", "timeout": "1s"},
            {"on": ["promote"], "url": f"{url}/chat", "format": "slack", "name": "chat"},
        ],
    )
    for path, body in (
        ("/rollout", {"color": "green", "reason": "v2"}),
        ("/rollout/promote", {}),
        ("/rollback", {"reason": "oops"}),
        ("/weights", {"blue": 50, "green": 50}),  # no hook wants weights
        ("/switch", {"color": "green"}),
    ):
        code, answer = await proxy.admin("POST", path, body)
        assert code == 200, (path, answer)
    got = await receiver.wait(5)
    await asyncio.sleep(0.3)  # nothing more arrives
    assert [(g["path"], g.get("action")) for g in got] == [
        ("/json", "rollout_step"),
        ("/json", "promote"),
        ("/chat", None),
        ("/json", "rollback"),
        ("/json", "switch"),
    ]
    first = got[0]
    assert (first["service"], first["from"], first["trigger"], first["reason"]) == (
        "default",
        "blue",
        "manual",
        "v2",
    )
    assert first["to"] == "blue=50,green=50" and first["weight"] == 50
    assert got[2]["text"].startswith("bgproxy default: promote")
    gens = [g["generation"] for g in got if "generation" in g]
    assert gens == sorted(gens)


async def test_a_hanging_or_dead_hook_delays_nothing(
    upstreams: dict[str, Upstream], start_proxy: StartProxy, start_app: StartApp
) -> None:
    receiver = Receiver()
    receiver.hang = True
    url = await start_app(receiver.app())
    proxy = await start_with_hooks(
        start_proxy,
        upstreams,
        [
            {"on": ["switch"], "url": f"{url}/hang", "timeout": "2s", "name": "hang"},
            {"on": ["switch"], "url": dead_address() + "/x", "timeout": "2s", "name": "dead"},
        ],
    )
    loop = asyncio.get_running_loop()
    for color in ("green", "blue", "green"):
        t0 = loop.time()
        code, _ = await proxy.admin("POST", "/switch", {"color": color})
        assert code == 200
        assert loop.time() - t0 < 0.5  # the hooks are not awaited
    status, _, headers = await proxy.get("/")
    assert status == 200 and headers["X-Bg-Color"] == "green"
    await receiver.wait(2, timeout=6)  # the second call came after the first timed out
    m = await hook_metrics(proxy)
    assert m['bgproxy_hook_calls_total{hook="hang",result="timeout",service="default"}'] >= 1
    assert m['bgproxy_hook_calls_total{hook="dead",result="unreachable",service="default"}'] >= 1


def test_hooks_config_accepts_bare_on_and_names_bad_keys() -> None:
    text = """
upstreams:
  blue: {targets: ["http://127.0.0.1:9001"]}
  green: {targets: ["http://127.0.0.1:9002"]}
hooks:
  - {on: [pre_switch], url: "http://ci.internal/approve", timeout: 10s}
  - {"on": switch, url: "https://chat.example/hook/secret", format: slack}
"""
    config = parse_config(yaml.load(text, Loader=_StrictLoader))
    assert [h.on for h in config.hooks] == [("pre_switch",), ("switch",)]
    assert [h.name for h in config.hooks] == ["ci.internal", "chat.example"]  # never the path
    bad = text.replace("[pre_switch]", "[pre_swich]").replace("format: slack", "format: teams")
    with pytest.raises(ConfigError) as err:
        parse_config(yaml.load(bad, Loader=_StrictLoader))
    assert err.value.errors == [
        "hooks[0].on[0]: expected one of pre_switch, switch, weights, rollout_step, promote, "
        "abort, rollback",
        "hooks[1].format: must be 'json' or 'slack', got 'teams'",
    ]


def test_a_service_overrides_rollout_key_by_key_and_hooks_whole() -> None:
    data = {
        "rollout": {"steps": [5, 100], "step_interval": "2m"},
        "hooks": [{"on": ["switch"], "url": "http://a.example/"}],
        "services": {
            "shop": {
                "hosts": ["shop.example"],
                "upstreams": {
                    "blue": {"targets": ["http://127.0.0.1:1"]},
                    "green": {"targets": ["http://127.0.0.1:2"]},
                },
                "rollout": {"auto_promote": False},
                "hooks": [{"on": ["abort"], "url": "http://b.example/"}],
            },
            "api": {
                "hosts": ["api.example"],
                "upstreams": {
                    "blue": {"targets": ["http://127.0.0.1:3"]},
                    "green": {"targets": ["http://127.0.0.1:4"]},
                },
            },
        },
    }
    config = parse_config(json.loads(json.dumps(data)))
    shop, api = config.services
    assert (shop.rollout.steps, shop.rollout.step_interval, shop.rollout.auto_promote) == (
        (5, 100),
        120.0,
        False,
    )
    assert [h.url for h in shop.hooks] == ["http://b.example/"]
    assert api.rollout == config.rollout and api.hooks == config.hooks
