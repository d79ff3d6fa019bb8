"""Several services behind one listener (SPEC "Services"): matching, isolation, admin.

Real parts: each service has its own blue and green aiohttp apps on port 0 that answer
with a label naming the service and color, so a test sees which app served a request.
"""

from __future__ import annotations

import asyncio
import gc
import json
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from redis.asyncio import Redis

from admin.rollback import RollbackController
from admin.rollout import RolloutDriver
from admin.runner import reload_config
from config import ConfigError, parse_config
from conftest import (
    Proxy,
    ProxyProcess,
    RedisServer,
    StartProxy,
    Upstream,
    free_port,
    raw_exchange,
    start_upstream,
)
from proxy.hosts import ServiceTable
from proxy.redis_store import RedisStateStore

Apps = dict[str, Upstream]  # "shop-blue" -> its app


def service_config(apps: Apps, services: dict[str, dict[str, Any]], **top: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "listen": "127.0.0.1:0",
        "admin": {"listen": "127.0.0.1:0"},
        "services": {
            name: {
                **claims,
                "upstreams": {c: {"targets": [apps[f"{name}-{c}"].url]} for c in ("blue", "green")},
            }
            for name, claims in services.items()
        },
    }
    data.update(top)
    return data


@pytest.fixture
async def apps() -> AsyncIterator[Apps]:
    started: Apps = {}
    for name in ("shop", "api", "admin"):
        for color in ("blue", "green"):
            started[f"{name}-{color}"] = await start_upstream(f"{name}-{color}")
    yield started
    for app in started.values():
        await app.runner.cleanup()


THREE = {
    "shop": {"hosts": ["shop.example.com", "*.shop.example.com"]},
    "api": {"hosts": ["api.example.com"], "paths": ["/v1", "/v2"]},
    "admin": {"hosts": ["api.example.com"], "paths": ["/"]},
}


async def served_by(proxy: Proxy, host: str, path: str = "/") -> tuple[int, str | None]:
    """(status, the app that answered or None)."""
    async with proxy.session.get(proxy.url + path, headers={"Host": host}) as resp:
        body = await resp.read()
        if resp.status != 200:
            return resp.status, None
        return resp.status, json.loads(body)["color"]


# -- matching ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "path", "want"),
    [
        ("shop.example.com", "/", "shop"),
        ("SHOP.Example.com:8080", "/cart", "shop"),  # case-insensitive, port ignored
        ("shop.example.com.", "/", "shop"),  # a trailing dot names the same host
        ("a.b.shop.example.com", "/", "shop"),  # *.suffix: one or more labels
        ("shop.example.com", "/v1", "shop"),  # the host decides first
        ("api.example.com", "/v1", "api"),
        ("api.example.com", "/v1/users?x=/v2", "api"),  # path, not query
        ("api.example.com", "/v2/", "api"),
        ("api.example.com", "/v10", "admin"),  # / boundaries: /v1 does not claim /v10
        ("api.example.com", "/", "admin"),
        ("example.com", "/", None),  # *.shop.example.com never matches bare example.com
        ("xshop.example.com", "/", None),
        ("other.test", "/v1", "catchall"),  # * after exact and suffix
        ("other.test", "/elsewhere", "fallback"),  # * claims only /v1: default_service
        ("api.example.com", "/zzz", "admin"),
    ],
)
def test_host_and_path_precedence_table(host: str, path: str, want: str | None) -> None:
    claims = [
        ("shop", ["shop.example.com", "*.shop.example.com"], ["/"]),
        ("api", ["api.example.com"], ["/v1", "/v2"]),
        ("admin", ["api.example.com"], ["/"]),
        ("catchall", ["*"], ["/v1"]),
    ]
    default = "fallback" if want == "fallback" else None
    table = ServiceTable(claims, default)
    assert table.only is None
    assert table.match(host.encode(), path.encode()) == want


def test_a_more_specific_host_never_falls_back_to_a_wildcard() -> None:
    # nginx's server-then-location: api.example.com claims only /v1, so /other on that
    # host goes to the default (here none), not to the "*" service that claims "/".
    table = ServiceTable([("api", ["api.example.com"], ["/v1"]), ("any", ["*"], ["/"])], None)
    assert table.match(b"api.example.com", b"/other") is None
    assert table.match(b"elsewhere", b"/other") == "any"


def test_single_service_form_skips_matching() -> None:
    assert ServiceTable([("default", ["*"], ["/"])], None).only == "default"
    assert ServiceTable([("default", ["*"], ["/v1"])], None).only is None


async def test_requests_reach_the_service_their_host_and_path_claim(
    apps: Apps, start_proxy: StartProxy
) -> None:
    proxy = await start_proxy(service_config(apps, THREE))
    assert await served_by(proxy, "shop.example.com", "/cart") == (200, "shop-blue")
    assert await served_by(proxy, "www.shop.example.com") == (200, "shop-blue")
    assert await served_by(proxy, "api.example.com", "/v1/users") == (200, "api-blue")
    assert await served_by(proxy, "api.example.com", "/v10") == (200, "admin-blue")
    # Paths are forwarded unchanged: no prefix stripping.
    seen = apps["api-blue"].behaviour.seen[-1]
    assert seen["path"] == "/v1/users"


async def test_no_match_is_a_short_404_and_no_upstream_is_contacted(
    apps: Apps, start_proxy: StartProxy
) -> None:
    proxy = await start_proxy(service_config(apps, THREE))
    host, port = proxy.run.proxy_address
    raw = await raw_exchange(host, port, b"GET / HTTP/1.1\r\nHost: unknown.test\r\n\r\n")
    assert raw.startswith(b"HTTP/1.1 404 ")
    assert b"no service for this host and path" in raw
    assert all(not app.behaviour.seen for app in apps.values())
    # HTTP/1.0 without Host: no host to match, and no "*" claims it.
    raw = await raw_exchange(host, port, b"GET / HTTP/1.0\r\n\r\n")
    assert raw.startswith(b"HTTP/1.1 404 ")


async def test_default_service_takes_what_nothing_claims(
    apps: Apps, start_proxy: StartProxy
) -> None:
    proxy = await start_proxy(service_config(apps, THREE, default_service="shop"))
    assert await served_by(proxy, "unknown.test", "/x") == (200, "shop-blue")
    assert await served_by(proxy, "127.0.0.1") == (200, "shop-blue")


async def test_absolute_form_target_is_matched_by_its_authority(
    apps: Apps, start_proxy: StartProxy
) -> None:
    proxy = await start_proxy(service_config(apps, THREE))
    host, port = proxy.run.proxy_address
    raw = await raw_exchange(
        host,
        port,
        b"GET http://api.example.com/v2/x HTTP/1.1\r\nHost: api.example.com\r\n"
        b"Connection: close\r\n\r\n",
    )
    assert raw.startswith(b"HTTP/1.1 200 ") and b'"api-blue"' in raw


# -- independent state ------------------------------------------------------------------


async def test_per_service_overrides_apply_key_by_key(apps: Apps, start_proxy: StartProxy) -> None:
    services = {
        "shop": {"hosts": ["shop.test"], "routing": {"active": "green", "response_header": None}},
        "api": {"hosts": ["api.test"]},
    }
    proxy = await start_proxy(
        service_config(apps, services, routing={"response_header": "X-Served-By"})
    )
    async with proxy.session.get(proxy.url, headers={"Host": "shop.test"}) as resp:
        assert (await resp.json())["color"] == "shop-green"
        assert "X-Served-By" not in resp.headers and "X-Bg-Color" not in resp.headers
    async with proxy.session.get(proxy.url, headers={"Host": "api.test"}) as resp:
        assert (await resp.json())["color"] == "api-blue"
        assert resp.headers["X-Served-By"] == "blue"  # the top-level routing applies


async def test_switching_one_service_under_load_leaves_the_other_untouched(
    apps: Apps, start_proxy: StartProxy
) -> None:
    services = {"shop": {"hosts": ["shop.test"]}, "api": {"hosts": ["api.test"]}}
    proxy = await start_proxy(service_config(apps, services))
    tallies: dict[str, Counter[str]] = {"shop.test": Counter(), "api.test": Counter()}
    stop = asyncio.Event()

    async def client(host: str) -> None:
        async with aiohttp.ClientSession() as session:
            while not stop.is_set():
                async with session.get(proxy.url + "/", headers={"Host": host}) as resp:
                    body = await resp.read()
                    key = json.loads(body)["color"] if resp.status == 200 else str(resp.status)
                    tallies[host][key] += 1

    loaders = [asyncio.create_task(client(h)) for h in ("shop.test", "api.test") for _ in range(4)]
    await asyncio.sleep(0.3)
    shop_before = (await proxy.admin("GET", "/services/shop/status"))[1]
    code, body = await proxy.admin("POST", "/services/api/switch", {"color": "green"})
    assert code == 200 and body["active"] == "green" and body["service"] == "api"
    switched_at = sum(tallies["api.test"].values())
    await asyncio.sleep(0.3)
    stop.set()
    await asyncio.gather(*loaders)

    # shop: every request served by shop-blue, no error, and its state did not move.
    assert set(tallies["shop.test"]) == {"shop-blue"} and tallies["shop.test"]["shop-blue"] > 50
    shop_after = (await proxy.admin("GET", "/services/shop/status"))[1]
    assert shop_after["generation"] == shop_before["generation"] == 1
    assert shop_after["drain"]["state"] == "idle" and shop_after["active"] == "blue"
    # api: no errors, both colors served, green after the switch.
    assert set(tallies["api.test"]) == {"api-blue", "api-green"}
    assert sum(tallies["api.test"].values()) > switched_at
    api = (await proxy.admin("GET", "/services/api/status"))[1]
    assert api["generation"] == 2 and api["drain"]["color"] == "blue"


# -- admin API --------------------------------------------------------------------------


async def test_services_listing_and_scoped_endpoints(apps: Apps, start_proxy: StartProxy) -> None:
    proxy = await start_proxy(service_config(apps, THREE))
    code, body = await proxy.admin("GET", "/services")
    assert code == 200
    by_name = {s["name"]: s for s in body["services"]}
    assert set(by_name) == {"shop", "api", "admin"}
    assert by_name["api"]["hosts"] == ["api.example.com"]
    assert by_name["api"]["paths"] == ["/v1", "/v2"]
    assert by_name["api"]["active"] == "blue" and by_name["api"]["generation"] == 1
    assert by_name["api"]["weights"] == {"blue": 100, "green": 0}

    code, body = await proxy.admin("POST", "/services/api/weights", {"blue": 90, "green": 10})
    assert code == 200 and body["weights"] == {"blue": 90, "green": 10}
    code, body = await proxy.admin("POST", "/services/shop/switch", {"color": "green"})
    assert code == 200 and body["generation"] == 2
    code, body = await proxy.admin("POST", "/services/shop/rollback", {"reason": "oops"})
    assert code == 200 and body["active"] == "blue" and body["generation"] == 3
    # generation counts per service
    status = {
        s["name"]: s["generation"] for s in (await proxy.admin("GET", "/services"))[1]["services"]
    }
    assert status == {"shop": 3, "api": 2, "admin": 1}

    code, body = await proxy.admin("GET", "/services/api/events")
    assert [(e["service"], e["action"]) for e in body["events"]] == [("api", "weights")]
    code, body = await proxy.admin("GET", "/events")
    assert [(e["service"], e["action"]) for e in body["events"]] == [
        ("shop", "rollback"),
        ("shop", "switch"),
        ("api", "weights"),
    ]
    code, body = await proxy.admin("GET", "/services/nope/status")
    assert code == 404 and body["error"] == "unknown_service"
    code, body = await proxy.admin("POST", "/services/nope/switch", {"color": "green"})
    assert code == 404 and body["error"] == "unknown_service"


async def test_unscoped_endpoints_need_a_service_when_there_are_several(
    apps: Apps, start_proxy: StartProxy
) -> None:
    proxy = await start_proxy(service_config(apps, THREE))
    code, body = await proxy.admin("POST", "/switch", {"color": "green"})
    assert code == 400 and body["error"] == "service_required"
    assert all(name in body["detail"] for name in ("shop", "api", "admin"))
    code, body = await proxy.admin("GET", "/status")
    assert code == 400 and body["error"] == "service_required"
    # Nothing moved.
    gens = [s["generation"] for s in (await proxy.admin("GET", "/services"))[1]["services"]]
    assert gens == [1, 1, 1]


async def test_unscoped_endpoints_act_on_the_default_service(
    apps: Apps, start_proxy: StartProxy
) -> None:
    proxy = await start_proxy(service_config(apps, THREE, default_service="api"))
    code, body = await proxy.admin("POST", "/switch", {"color": "green"})
    assert code == 200 and body["service"] == "api" and body["active"] == "green"
    assert await served_by(proxy, "api.example.com", "/v1") == (200, "api-green")
    assert await served_by(proxy, "shop.example.com") == (200, "shop-blue")


async def test_metrics_carry_the_service_label(apps: Apps, start_proxy: StartProxy) -> None:
    proxy = await start_proxy(service_config(apps, THREE))
    for _ in range(3):
        await served_by(proxy, "api.example.com", "/v1")
    await served_by(proxy, "shop.example.com")
    await proxy.admin("POST", "/services/api/switch", {"color": "green"})
    async with proxy.session.get(proxy.admin_url + "/metrics") as resp:
        text = await resp.text()
    lines = set(text.splitlines())
    assert 'bgproxy_requests_total{code="200",color="blue",service="api"} 3.0' in lines
    assert 'bgproxy_requests_total{code="200",color="blue",service="shop"} 1.0' in lines
    assert 'bgproxy_active_color{color="green",service="api"} 1.0' in lines
    assert 'bgproxy_active_color{color="blue",service="shop"} 1.0' in lines
    assert 'bgproxy_state_generation{service="api"} 2.0' in lines
    assert 'bgproxy_state_generation{service="admin"} 1.0' in lines
    # One HELP/TYPE per family, however many services.
    assert text.count("# TYPE bgproxy_requests_total counter") == 1


async def test_twenty_services(start_proxy: StartProxy) -> None:
    app = await start_upstream("shared")
    try:
        services = {
            f"app{i:02d}": {
                "hosts": [f"app{i:02d}.test"],
                "upstreams": {c: {"targets": [app.url]} for c in ("blue", "green")},
            }
            for i in range(20)
        }
        proxy = await start_proxy(
            {"listen": "127.0.0.1:0", "admin": {"listen": "127.0.0.1:0"}, "services": services}
        )
        await proxy.admin("POST", "/services/app07/switch", {"color": "green"})
        for i in range(20):
            async with proxy.session.get(proxy.url, headers={"Host": f"app{i:02d}.test"}) as resp:
                assert resp.status == 200
                assert resp.headers["X-Bg-Color"] == ("green" if i == 7 else "blue")
        body = (await proxy.admin("GET", "/services"))[1]
        assert len(body["services"]) == 20
    finally:
        await app.runner.cleanup()


# -- reload -----------------------------------------------------------------------------


async def test_reload_adds_and_removes_services_and_keeps_the_kept_ones_state(
    apps: Apps, start_proxy: StartProxy, tmp_path: Path
) -> None:
    two = {"shop": {"hosts": ["shop.test"]}, "api": {"hosts": ["api.test"]}}
    proxy = await start_proxy(service_config(apps, two))
    await proxy.admin("POST", "/services/shop/switch", {"color": "green"})
    # A slow request on api, in flight across the reload that removes api.
    slow = asyncio.create_task(
        proxy.session.get(proxy.url + "/slow?s=0.5", headers={"Host": "api.test"})
    )
    await asyncio.sleep(0.1)

    path = tmp_path / "bgproxy.yaml"
    new = service_config(apps, {"shop": {"hosts": ["shop.test"]}, "admin": {"hosts": ["adm.test"]}})
    path.write_text(yaml.safe_dump(new, sort_keys=False))
    assert reload_config(proxy.run, str(path))
    for _ in range(100):
        if "admin" in proxy.run.control.services:
            break
        await asyncio.sleep(0.02)

    resp = await slow  # the removed service's request finished
    assert resp.status == 200 and await resp.text() == "api-blue slow"
    resp.release()
    assert await served_by(proxy, "shop.test") == (200, "shop-green")  # state kept
    assert await served_by(proxy, "adm.test") == (200, "admin-blue")
    assert await served_by(proxy, "api.test") == (404, None)
    names = [s["name"] for s in (await proxy.admin("GET", "/services"))[1]["services"]]
    assert names == ["shop", "admin"]
    code, _ = await proxy.admin("POST", "/services/admin/switch", {"color": "green"})
    assert code == 200
    assert await served_by(proxy, "adm.test") == (200, "admin-green")


# -- config -----------------------------------------------------------------------------


def _errors(data: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    return info.value.errors


def test_config_errors_name_their_key_paths() -> None:
    pool = {"blue": {"targets": ["http://127.0.0.1:1"]}, "green": {"targets": ["http://h:2"]}}
    errors = _errors(
        {
            "services": {
                "Bad Name": {"hosts": ["a.test"], "upstreams": pool},
                "a": {"hosts": ["a.test:80"], "paths": ["v1"], "upstreams": pool},
                "b": {"hosts": ["b.test"], "timeouts": {"idle": "5s"}, "upstreams": pool},
                "c": {"hosts": ["c.test"]},
            }
        }
    )
    assert any(e.startswith("services.Bad Name: a service name must match") for e in errors)
    assert any(e.startswith("services.a.hosts[0]: ") for e in errors)
    assert any(e.startswith("services.a.paths[0]: ") for e in errors)
    assert any(e.startswith("services.b.timeouts.idle: a connection-level timeout") for e in errors)
    assert "services.c.upstreams: required: both blue and green, each {targets: [...]}" in errors


def test_overlapping_claims_and_a_missing_default_are_errors() -> None:
    pool = {"blue": {"targets": ["http://127.0.0.1:1"]}, "green": {"targets": ["http://h:2"]}}
    errors = _errors(
        {
            "services": {
                "a": {"hosts": ["x.test"], "paths": ["/v1/"], "upstreams": pool},
                "b": {"hosts": ["X.test"], "paths": ["/v1", "/v2"], "upstreams": pool},
            },
            "default_service": "zz",
        }
    )
    assert "services: a and b both claim host 'x.test' path '/v1'" in errors
    assert "default_service: names no configured service: 'zz' (services: a, b)" in errors


def test_upstreams_and_services_together_are_an_error() -> None:
    pool = {"blue": {"targets": ["http://127.0.0.1:1"]}, "green": {"targets": ["http://h:2"]}}
    errors = _errors({"upstreams": pool, "services": {"a": {"upstreams": pool}}})
    assert errors == ["services: give either top-level upstreams or services, not both"]


def test_single_service_form_is_one_service_named_default() -> None:
    pool = {"blue": {"targets": ["http://127.0.0.1:1"]}, "green": {"targets": ["http://h:2"]}}
    config = parse_config({"upstreams": pool, "rollback": {"window": "1m"}})
    (svc,) = config.services
    assert (svc.name, svc.hosts, svc.paths) == ("default", ("*",), ("/",))
    assert svc.rollback.window == 60 and svc.upstreams is config.upstreams


def test_service_sections_override_the_top_level_key_by_key() -> None:
    pool = {"blue": {"targets": ["http://127.0.0.1:1"]}, "green": {"targets": ["http://h:2"]}}
    config = parse_config(
        {
            "rollback": {"window": "1m", "max_error_rate": 0.1},
            "gates": {"warmup": {"requests": 5}},
            "services": {
                "a": {"hosts": ["a"], "upstreams": pool, "rollback": {"window": "2m"}},
                "b": {"hosts": ["b"], "upstreams": pool, "gates": {"warmup": {"path": "/w"}}},
            },
        }
    )
    a, b = config.services
    assert (a.rollback.window, a.rollback.max_error_rate) == (120, 0.1)
    assert (b.rollback.window, b.gates.warmup.requests, b.gates.warmup.path) == (60, 5, "/w")


# -- Redis fleet ------------------------------------------------------------------------


async def test_a_redis_fleet_keeps_one_record_per_service(
    apps: Apps, start_proxy: StartProxy, redis_server: RedisServer
) -> None:
    services = {"shop": {"hosts": ["shop.test"]}, "api": {"hosts": ["api.test"]}}
    cfg = service_config(
        apps, services, state={"backend": "redis", "redis_url": redis_server.url()}
    )
    a = await start_proxy(cfg)
    b = await start_proxy(cfg)

    code, body = await a.admin("POST", "/services/api/switch", {"color": "green"})
    assert code == 200 and body["lagging"] == [] and body["generation"] == 2
    # Each service has its own record and compare-and-set: a write for api raced with a
    # stale generation is refused, while shop's generation is untouched.
    code, body = await b.admin(
        "POST", "/services/api/weights", {"blue": 50, "green": 50, "expected_generation": 1}
    )
    assert code == 409 and body["error"] == "generation_mismatch"
    code, body = await b.admin(
        "POST", "/services/shop/weights", {"blue": 50, "green": 50, "expected_generation": 1}
    )
    assert code == 200 and body["generation"] == 2

    assert await served_by(b, "api.test") == (200, "api-green")
    async with Redis.from_url(redis_server.url(), decode_responses=True) as r:
        api = json.loads(await r.get("bgproxy:svc:api:state"))
        shop = json.loads(await r.get("bgproxy:svc:shop:state"))
        assert await r.get("bgproxy:state") is None  # no record for a service not configured
    assert (api["active"], api["generation"]) == ("green", 2)
    assert (shop["weights"], shop["generation"]) == ({"blue": 50, "green": 50}, 2)
    # Every instance shows the events of both services.
    events = (await a.admin("GET", "/events"))[1]["events"]
    assert sorted((e["service"], e["action"]) for e in events) == [
        ("api", "switch"),
        ("shop", "weights"),
    ]


async def test_workers_apply_and_acknowledge_each_service_on_its_own(
    apps: Apps, tmp_path: Path
) -> None:
    path = tmp_path / "bgproxy.yaml"
    services = {"shop": {"hosts": ["shop.test"]}, "api": {"hosts": ["api.test"]}}
    data = service_config(apps, services)
    data["listen"] = f"127.0.0.1:{free_port()}"
    data["admin"] = {"listen": f"127.0.0.1:{free_port()}"}
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    proc = ProxyProcess(path, "--workers", "2")
    await proc.start()
    try:
        code, body = await proc.admin("POST", "/services/api/switch", {"color": "green"})
        # Answered once both workers acknowledged api's new generation.
        assert code == 200 and body["lagging"] == [] and body["service"] == "api"
        assert [i["generation"] for i in body["instances"]] == [2, 2]
        shop = (await proc.admin("GET", "/services/shop/status"))[1]
        assert [i["generation"] for i in shop["instances"]] == [1, 1]

        # New connections spread over both workers: every one routes by the new state.
        connector = aiohttp.TCPConnector(force_close=True, limit=0)
        async with aiohttp.ClientSession(connector=connector) as s:

            async def one(host: str) -> str:
                async with s.get(proc.url, headers={"Host": host}) as r:
                    return str((await r.json())["color"])

            got = await asyncio.gather(*(one(h) for h in ("api.test", "shop.test") * 20))
        assert set(got[0::2]) == {"api-green"} and set(got[1::2]) == {"shop-blue"}

        # The supervisor's metrics count the workers' requests per service.
        async def counted() -> bool:
            async with aiohttp.ClientSession() as s, s.get(proc.admin_url + "/metrics") as r:
                text = await r.text()
            return (
                'bgproxy_requests_total{code="200",color="green",service="api"} 20.0' in text
                and 'bgproxy_requests_total{code="200",color="blue",service="shop"} 20.0' in text
            )

        for _ in range(100):
            if await counted():
                break
            await asyncio.sleep(0.05)
        assert await counted()
    finally:
        await proc.stop()


async def test_reloads_that_add_and_remove_services_leave_nothing_behind(
    apps: Apps, start_proxy: StartProxy, tmp_path: Path, redis_server: RedisServer
) -> None:
    state = {"backend": "redis", "redis_url": redis_server.url()}
    one = {"shop": {"hosts": ["shop.test"]}, "api": {"hosts": ["api.test"]}}
    other = {"shop": {"hosts": ["shop.test"]}, "admin": {"hosts": ["adm.test"]}}
    proxy = await start_proxy(service_config(apps, one, state=state))
    run = proxy.run
    path = tmp_path / "bgproxy.yaml"

    async def reload_to(services: dict[str, Any]) -> None:
        path.write_text(yaml.safe_dump(service_config(apps, services, state=state)))
        assert reload_config(run, str(path))
        for _ in range(200):
            if set(run.control.services) == set(services) and set(run.stores) == set(services):
                return
            await asyncio.sleep(0.01)
        raise AssertionError(f"reload did not settle: {sorted(run.control.services)}")

    await reload_to(other)
    await reload_to(one)
    gc.collect()
    baseline = (
        len(run.server._tasks),
        _live(RollbackController),
        _live(RedisStateStore),
        _live(RolloutDriver),
    )
    for _ in range(10):
        await reload_to(other)
        await reload_to(one)
    assert await served_by(proxy, "api.test") == (200, "api-blue")
    # No growth (other tests' leftovers may still be collected, so "at most"), once the
    # last reload's own task has let go of the services it replaced.
    for _ in range(100):
        gc.collect()
        after = (
            len(run.server._tasks),
            _live(RollbackController),
            _live(RedisStateStore),
            _live(RolloutDriver),
        )
        if all(a <= b for a, b in zip(after, baseline, strict=True)):
            break
        await asyncio.sleep(0.02)
    assert all(a <= b for a, b in zip(after, baseline, strict=True)), (after, baseline)
    assert sorted(run.watches) == sorted(run.stores) == ["api", "shop"]
    # The removed service's store left the fleet: no instance records under its keys.
    async with Redis.from_url(redis_server.url(), decode_responses=True) as r:
        assert await r.smembers("bgproxy:svc:admin:instances") == set()


def _live(cls: type) -> int:
    return sum(1 for o in gc.get_objects() if type(o) is cls)
