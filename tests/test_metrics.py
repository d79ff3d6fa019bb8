"""``GET /metrics`` and ``/status`` traffic: the numbers equal what clients saw."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import Proxy, StartProxy, Upstream, config_dict, dead_address, start_upstream

SPEC_METRICS = {
    "bgproxy_requests_total": ("counter", {"service", "color", "code"}),
    "bgproxy_request_duration_seconds": ("histogram", {"service", "color"}),
    "bgproxy_in_flight_requests": ("gauge", {"service", "color"}),
    "bgproxy_websocket_connections": ("gauge", {"service", "color"}),
    "bgproxy_websocket_reconnects_sent_total": ("counter", {"service", "color"}),
    "bgproxy_upstream_errors_total": ("counter", {"service", "color", "kind"}),
    "bgproxy_upstream_healthy": ("gauge", {"service", "color", "target"}),
    "bgproxy_active_color": ("gauge", {"service", "color"}),
    "bgproxy_weight": ("gauge", {"service", "color"}),
    "bgproxy_state_generation": ("gauge", {"service"}),
    "bgproxy_switches_total": ("counter", {"service", "trigger"}),
    "bgproxy_auto_rollbacks_total": ("counter", {"service"}),
    "bgproxy_state_store_available": ("gauge", {"service"}),
}

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(proxy: Proxy, token: str | None = None) -> tuple[str, Samples, dict[str, Any]]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with proxy.session.get(proxy.admin_url + "/metrics", headers=headers) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        text = await resp.text()
    samples: Samples = {}
    families: dict[str, Any] = {}
    for family in text_string_to_metric_families(text):
        families[family.name] = family
        for s in family.samples:
            samples[s.name, frozenset(s.labels.items())] = s.value
    return text, samples, families


def value(samples: Samples, name: str, **labels: str) -> float:
    labels.setdefault("service", "default")  # the single-service form's one service
    return samples.get((name, frozenset(labels.items())), 0.0)


async def test_every_spec_metric_with_its_labels(
    proxy: Proxy, upstreams: dict[str, Upstream]
) -> None:
    await proxy.get("/")
    _, samples, families = await scrape(proxy)
    for name, (kind, labels) in SPEC_METRICS.items():
        base = name.removesuffix("_total") if kind == "counter" else name
        assert base in families, name
        assert families[base].type == kind, name
        for s in families[base].samples:
            assert set(s.labels) - {"le"} == labels, (name, s.labels)
    assert value(samples, "bgproxy_active_color", color="blue") == 1
    assert value(samples, "bgproxy_active_color", color="green") == 0
    assert value(samples, "bgproxy_weight", color="blue") == 100
    assert value(samples, "bgproxy_weight", color="green") == 0
    assert value(samples, "bgproxy_state_generation") == 1
    assert value(samples, "bgproxy_state_store_available") == 1
    for color in ("blue", "green"):
        url = upstreams[color].url
        assert value(samples, "bgproxy_upstream_healthy", color=color, target=url) == 1
        assert value(samples, "bgproxy_in_flight_requests", color=color) == 0
        for kind in ("connect", "timeout", "protocol"):
            labels = {("service", "default"), ("color", color), ("kind", kind)}
            key = ("bgproxy_upstream_errors_total", frozenset(labels))
            assert key in samples  # every kind is exported, at 0 until it happens
            assert value(samples, "bgproxy_upstream_errors_total", color=color, kind=kind) == 0

    code, _ = await proxy.admin("POST", "/switch", {"color": "green"})
    assert code == 200
    _, samples, _ = await scrape(proxy)
    assert value(samples, "bgproxy_active_color", color="green") == 1
    assert value(samples, "bgproxy_weight", color="green") == 100
    assert value(samples, "bgproxy_state_generation") == 2
    assert value(samples, "bgproxy_switches_total", trigger="manual") == 1
    assert value(samples, "bgproxy_switches_total", trigger="auto") == 0
    assert value(samples, "bgproxy_auto_rollbacks_total") == 0


async def test_request_counters_equal_client_tallies(
    upstreams: dict[str, Upstream], start_proxy: StartProxy
) -> None:
    blue = upstreams["blue"]
    blue.behaviour.fail_rate = 0.25  # every 4th request answers 500
    dead = dead_address()
    proxy = await start_proxy(config_dict([blue.url], [dead]))
    seen: Counter[tuple[str, str]] = Counter()
    for i in range(22):
        code, _, headers = await proxy.get(f"/n{i}?q={i}")
        seen[headers["X-Bg-Color"], str(code)] += 1
    # The dead green target: the proxy's own 502s until refused connects (and the first
    # active check) take it out of rotation, then 503.
    for i in range(10):
        code, _, headers = await proxy.get(f"/g{i}", headers={"X-Bg-Color": "green"})
        seen[headers["X-Bg-Color"], str(code)] += 1
        if code == 503:
            break

    assert seen[("blue", "500")] == 5 and seen[("blue", "200")] == 17
    assert seen[("green", "502")] >= 2
    assert seen[("green", "503")] == 1

    text, samples, _ = await scrape(proxy)
    counted = {
        (dict(labels)["color"], dict(labels)["code"]): v
        for (name, labels), v in samples.items()
        if name == "bgproxy_requests_total"
    }
    assert counted == {k: float(v) for k, v in seen.items()}
    for color in ("blue", "green"):
        total = sum(v for (c, _), v in seen.items() if c == color)
        assert value(samples, "bgproxy_request_duration_seconds_count", color=color) == total
        inf = value(samples, "bgproxy_request_duration_seconds_bucket", color=color, le="+Inf")
        assert inf == total
    connects = value(samples, "bgproxy_upstream_errors_total", color="green", kind="connect")
    assert connects == seen[("green", "502")]
    assert value(samples, "bgproxy_upstream_healthy", color="green", target=dead) == 0
    # Bounded labels: never a path or a query.
    assert "/n1" not in text and "q=" not in text

    # /status agrees for the last ~10 s.
    code, s = await proxy.admin("GET", "/status")
    assert code == 200
    traffic = s["traffic"]
    assert set(traffic) == {"blue", "green"}
    assert traffic["blue"]["requests"] == 22
    assert traffic["blue"]["error_rate"] == pytest.approx(5 / 22, abs=1e-6)
    assert traffic["blue"]["rps"] > 0
    assert 0 < traffic["blue"]["p99"] < 1.0
    assert traffic["green"]["error_rate"] == 1.0


async def test_status_traffic_is_null_p99_without_requests(proxy: Proxy) -> None:
    code, s = await proxy.admin("GET", "/status")
    assert code == 200
    for color in ("blue", "green"):
        t = s["traffic"][color]
        assert t["rps"] == 0 and t["error_rate"] == 0 and t["p99"] is None


async def test_latency_histogram_sees_a_slow_upstream(
    upstreams: dict[str, Upstream], start_proxy: StartProxy
) -> None:
    upstreams["blue"].behaviour.delay = 0.2
    proxy = await start_proxy(config_dict([upstreams["blue"].url], [upstreams["green"].url]))
    for _ in range(3):
        code, _, _ = await proxy.get("/")
        assert code == 200
    _, samples, _ = await scrape(proxy)
    le = "bgproxy_request_duration_seconds_bucket"
    assert value(samples, le, color="blue", le="0.15") == 0
    assert value(samples, le, color="blue", le="0.3") == 3
    assert 0.6 <= value(samples, "bgproxy_request_duration_seconds_sum", color="blue") < 1.5


async def test_metrics_need_the_admin_token(
    upstreams: dict[str, Upstream], start_proxy: StartProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BGPROXY_TEST_METRICS_TOKEN", "s3cret")
    proxy = await start_proxy(
        config_dict(
            [upstreams["blue"].url],
            [upstreams["green"].url],
            admin={"listen": "127.0.0.1:0", "token_env": "BGPROXY_TEST_METRICS_TOKEN"},
        )
    )
    async with proxy.session.get(proxy.admin_url + "/metrics") as resp:
        assert resp.status == 401
        assert "bgproxy_" not in await resp.text()
    await scrape(proxy, token="s3cret")
    async with proxy.session.get(proxy.admin_url + "/healthz") as resp:
        assert resp.status == 200


async def test_target_labels_follow_a_reload(
    upstreams: dict[str, Upstream], start_proxy: StartProxy
) -> None:
    from config import parse_config

    extra = await start_upstream("green")
    try:
        proxy = await start_proxy(config_dict([upstreams["blue"].url], [upstreams["green"].url]))
        proxy.run.server.apply_config(
            parse_config(config_dict([upstreams["blue"].url], [extra.url]))
        )
        _, samples, _ = await scrape(proxy)
        targets = {
            dict(labels)["target"]
            for (name, labels), _ in samples.items()
            if name == "bgproxy_upstream_healthy"
        }
        assert targets == {upstreams["blue"].url, extra.url}
    finally:
        await extra.runner.cleanup()
