"""Automatic rollback: the pure decision (table tests) and the controller against real
upstreams whose failure rate and latency the test sets."""

from __future__ import annotations

import asyncio
import contextlib
from bisect import bisect_left
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from typing import Any

import pytest

from admin.rollback import Outcome, Thresholds, decide, gained_traffic
from conftest import Proxy, StartProxy, Upstream, config_dict
from proxy.state import Color, Event, RoutingState, Weights, describe, roll_back, switch_to
from proxy.stats import LATENCY_BUCKETS, Window, quantile

# --- the decision (pure) -----------------------------------------------------------------------


def window(requests: int, errors: int = 0, latency: float = 0.01) -> Window:
    """``requests`` responses, all at ``latency`` seconds, ``errors`` of them 5xx."""
    counts = [0] * (len(LATENCY_BUCKETS) + 1)
    counts[bisect_left(LATENCY_BUCKETS, latency)] = requests
    return Window(duration=1.0, requests=requests, errors=errors, counts=tuple(counts))


TH = Thresholds(max_error_rate=0.05, max_p99_latency=0.5, min_requests=20, failure_limit=1)
TH3 = Thresholds(max_error_rate=0.05, max_p99_latency=0.5, min_requests=20, failure_limit=3)


@pytest.mark.parametrize(
    ("win", "th", "before", "outcome", "after"),
    [
        # Too little traffic: inconclusive, whatever it looks like; the count carries over.
        (window(19, errors=19), TH, 0, Outcome.INCONCLUSIVE, 0),
        (window(0), TH, 2, Outcome.INCONCLUSIVE, 2),
        (window(5, latency=9.0), TH3, 1, Outcome.INCONCLUSIVE, 1),
        # Enough traffic, within thresholds: passing, resets the count.
        (window(20), TH, 0, Outcome.PASSING, 0),
        (window(100, errors=5), TH3, 2, Outcome.PASSING, 0),  # 5% is not above 5%
        (window(100, latency=0.45), TH, 0, Outcome.PASSING, 0),  # p99 <= 0.5 s
        # Error rate above the limit.
        (window(100, errors=6), TH, 0, Outcome.ROLL_BACK, 1),
        (window(40, errors=20), TH3, 0, Outcome.FAILING, 1),
        (window(40, errors=20), TH3, 1, Outcome.FAILING, 2),
        (window(40, errors=20), TH3, 2, Outcome.ROLL_BACK, 3),
        # p99 above the limit.
        (window(50, latency=0.8), TH, 0, Outcome.ROLL_BACK, 1),
        (window(50, latency=0.8), TH3, 0, Outcome.FAILING, 1),
        # min_requests 0: an empty interval passes (no p99, no errors).
        (window(0), Thresholds(0.05, 0.5, 0, 1), 0, Outcome.PASSING, 0),
    ],
)
def test_decide(win: Window, th: Thresholds, before: int, outcome: Outcome, after: int) -> None:
    verdict = decide(win, th, before)
    assert verdict.outcome is outcome
    assert verdict.consecutive_failures == after
    assert verdict.reason


def test_decide_names_every_breached_threshold() -> None:
    verdict = decide(window(50, errors=25, latency=3.0), TH, 0)
    assert "error rate 50.0% > 5.0%" in verdict.reason
    assert "p99 latency" in verdict.reason


@pytest.mark.parametrize(
    ("old", "new", "gained"),
    [
        (Weights(100, 0), Weights(0, 100), Color.GREEN),
        (Weights(100, 0), Weights(90, 10), Color.GREEN),
        (Weights(0, 100), Weights(100, 0), Color.BLUE),
        (Weights(90, 10), Weights(50, 50), None),  # green had traffic already
        (Weights(90, 10), Weights(100, 0), None),
        (Weights(100, 0), Weights(100, 0), None),
    ],
)
def test_gained_traffic(old: Weights, new: Weights, gained: Color | None) -> None:
    def state(w: Weights) -> RoutingState:
        return RoutingState(1, Color.BLUE if w.blue >= w.green else Color.GREEN, w)

    assert gained_traffic(state(old), state(new)) is gained


@pytest.mark.parametrize(
    ("latencies", "q", "low", "high"),
    [
        ([0.01] * 100, 0.99, 0.0075, 0.01),
        ([0.01] * 99 + [2.0], 0.99, 0.0075, 0.01),
        ([0.01] * 98 + [2.0] * 2, 0.99, 1.5, 2.0),
        ([0.302] * 10, 0.99, 0.3, 0.4),
        ([500.0], 0.99, 120.0, 120.0),  # beyond the last bound: the last bound
    ],
)
def test_quantile_estimate(latencies: list[float], q: float, low: float, high: float) -> None:
    counts = [0] * (len(LATENCY_BUCKETS) + 1)
    for x in latencies:
        counts[bisect_left(LATENCY_BUCKETS, x)] += 1
    est = quantile(counts, q)
    assert est is not None and low <= est <= high
    assert quantile([0] * len(counts), q) is None


# --- the controller against real upstreams ----------------------------------------------------

INTERVAL = 0.3


def rollback_cfg(**overrides: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "window": "3s",
        "interval": f"{int(INTERVAL * 1000)}ms",
        "max_error_rate": 0.05,
        "max_p99_latency": "1s",
        "min_requests": 10,
        "failure_limit": 1,
    }
    cfg.update(overrides)
    return cfg


async def start(start_proxy: StartProxy, upstreams: dict[str, Upstream], **rollback: Any) -> Proxy:
    return await start_proxy(
        config_dict(
            [upstreams["blue"].url], [upstreams["green"].url], rollback=rollback_cfg(**rollback)
        )
    )


@contextlib.asynccontextmanager
async def steady_traffic(
    proxy: Proxy, workers: int = 4, pause: float = 0.01
) -> AsyncIterator[list[tuple[str, int]]]:
    """Clients sending requests until the block ends; yields (color, status) as they land."""
    seen: list[tuple[str, int]] = []
    stop = asyncio.Event()

    async def client() -> None:
        while not stop.is_set():
            async with proxy.session.get(proxy.url + "/traffic") as resp:
                await resp.read()
                seen.append((resp.headers["X-Bg-Color"], resp.status))
            await asyncio.sleep(pause)  # pacing the load, not waiting for a condition

    tasks = [asyncio.create_task(client(), name=f"traffic-{i}") for i in range(workers)]
    try:
        yield seen
    finally:
        stop.set()
        await asyncio.gather(*tasks)


async def status(proxy: Proxy) -> dict[str, Any]:
    code, body = await proxy.admin("GET", "/status")
    assert code == 200
    return dict(body)


async def auto_events(proxy: Proxy) -> list[dict[str, Any]]:
    code, body = await proxy.admin("GET", "/events")
    assert code == 200
    return [e for e in body["events"] if e["trigger"] == "auto"]


async def wait_for(
    proxy: Proxy, predicate: Callable[[dict[str, Any]], bool], timeout: float
) -> dict[str, Any]:
    async with asyncio.timeout(timeout):
        while True:
            s = await status(proxy)
            if predicate(s):
                return s
            await asyncio.sleep(0.02)


async def metric(proxy: Proxy, line_prefix: str) -> float:
    async with proxy.session.get(proxy.admin_url + "/metrics") as resp:
        text = await resp.text()
    (line,) = [ln for ln in text.splitlines() if ln.startswith(line_prefix + " ")]
    return float(line.rsplit(" ", 1)[1])


async def test_error_rate_rolls_back_within_two_intervals(
    upstreams: dict[str, Upstream], start_proxy: StartProxy
) -> None:
    upstreams["green"].behaviour.fail_rate = 0.5
    proxy = await start(start_proxy, upstreams)
    loop = asyncio.get_running_loop()
    async with steady_traffic(proxy) as seen:
        code, body = await proxy.admin("POST", "/switch", {"color": "green"})
        assert code == 200
        switched = loop.time()
        assert body["rollback"]["state"] == "watching"
        assert body["rollback"]["color"] == "green"
        s = await wait_for(proxy, lambda s: s["active"] == "blue", timeout=3)
        assert loop.time() - switched <= 2 * INTERVAL + 0.2
        assert s["weights"] == {"blue": 100, "green": 0}
        rb = s["rollback"]
        assert rb["state"] == "rolled_back" and rb["color"] == "green"
        assert rb["last"]["requests"] >= 10 and rb["last"]["error_rate"] > 0.05
        # No flapping: several more intervals of traffic, still blue, still one rollback.
        await asyncio.sleep(4 * INTERVAL)
        assert seen[-1][0] == "blue"
    s = await status(proxy)
    assert s["active"] == "blue" and s["rollback"]["state"] == "rolled_back"

    (event,) = await auto_events(proxy)
    assert event["action"] == "rollback" and event["actor"] == "auto"
    assert (event["from"], event["to"]) == ("green", "blue")
    assert event["reason"].startswith("auto rollback")
    assert event["figures"]["error_rate"] > 0.05
    assert event["figures"]["requests"] >= 10
    assert event["thresholds"] == {
        "max_error_rate": 0.05,
        "max_p99_latency": 1.0,
        "min_requests": 10,
        "failure_limit": 1,
    }
    assert await metric(proxy, 'bgproxy_auto_rollbacks_total{service="default"}') == 1
    assert await metric(proxy, 'bgproxy_switches_total{service="default",trigger="auto"}') == 1
    assert await metric(proxy, 'bgproxy_switches_total{service="default",trigger="manual"}') == 1


async def test_too_little_traffic_is_inconclusive(
    upstreams: dict[str, Upstream], start_proxy: StartProxy
) -> None:
    upstreams["green"].behaviour.fail_rate = 1.0  # every request fails, but too few of them
    proxy = await start(start_proxy, upstreams, window="1200ms", min_requests=50)
    async with steady_traffic(proxy, workers=1, pause=0.1):
        code, _ = await proxy.admin("POST", "/switch", {"color": "green"})
        assert code == 200
        s = await wait_for(proxy, lambda s: s["rollback"]["state"] != "watching", timeout=4)
    assert s["rollback"]["state"] == "idle"
    assert s["rollback"]["last"]["verdict"] == "inconclusive"
    assert s["active"] == "green"
    assert await auto_events(proxy) == []
    assert await metric(proxy, 'bgproxy_auto_rollbacks_total{service="default"}') == 0


async def test_slow_green_rolls_back_on_p99(
    upstreams: dict[str, Upstream], start_proxy: StartProxy
) -> None:
    upstreams["green"].behaviour.delay = 0.3
    proxy = await start(start_proxy, upstreams, max_p99_latency="100ms", min_requests=5)
    async with steady_traffic(proxy, workers=12, pause=0.0):
        code, _ = await proxy.admin("POST", "/switch", {"color": "green"})
        assert code == 200
        s = await wait_for(proxy, lambda s: s["active"] == "blue", timeout=3)
    assert s["rollback"]["state"] == "rolled_back"
    (event,) = await auto_events(proxy)
    assert event["figures"]["p99"] > 0.1
    assert event["figures"]["error_rate"] == 0
    assert "p99 latency" in event["reason"]


async def test_healthy_green_is_kept_and_the_watch_ends(
    upstreams: dict[str, Upstream], start_proxy: StartProxy
) -> None:
    proxy = await start(start_proxy, upstreams, window="1500ms")
    loop = asyncio.get_running_loop()
    async with steady_traffic(proxy):
        code, body = await proxy.admin("POST", "/switch", {"color": "green"})
        assert code == 200
        switched = loop.time()
        rb = body["rollback"]
        assert rb["state"] == "watching" and rb["color"] == "green"
        assert rb["started_at"] and rb["until"] and rb["next_evaluation"]
        s = await wait_for(proxy, lambda s: s["rollback"]["last"] is not None, timeout=2)
        assert s["rollback"]["last"]["verdict"] == "passing"
        assert s["rollback"]["last"]["error_rate"] == 0
        assert s["rollback"]["last"]["p99"] < 1.0
        s = await wait_for(proxy, lambda s: s["rollback"]["state"] != "watching", timeout=4)
        assert loop.time() - switched >= 1.4
    assert s["rollback"]["state"] == "idle"
    assert s["rollback"]["next_evaluation"] is None
    assert s["active"] == "green"
    assert await auto_events(proxy) == []


async def test_manual_action_ends_the_watch(
    upstreams: dict[str, Upstream], start_proxy: StartProxy
) -> None:
    upstreams["green"].behaviour.fail_rate = 0.5
    proxy = await start(start_proxy, upstreams, min_requests=1000)  # never judged by itself
    code, body = await proxy.admin("POST", "/switch", {"color": "green"})
    assert code == 200 and body["rollback"]["state"] == "watching"
    code, body = await proxy.admin("POST", "/rollback", {"reason": "operator"})
    assert code == 200
    assert body["active"] == "blue"
    assert body["rollback"]["state"] == "idle"  # a rollback starts no watch
    # A new switch starts a new watch; weights that give no color new traffic end it.
    code, body = await proxy.admin("POST", "/weights", {"blue": 90, "green": 10})
    assert body["rollback"]["state"] == "watching" and body["rollback"]["color"] == "green"
    code, body = await proxy.admin("POST", "/weights", {"blue": 50, "green": 50})
    assert body["rollback"]["state"] == "idle"
    assert await auto_events(proxy) == []


async def test_weights_giving_green_traffic_are_watched(
    upstreams: dict[str, Upstream], start_proxy: StartProxy
) -> None:
    upstreams["green"].behaviour.fail_rate = 0.5
    proxy = await start(start_proxy, upstreams, min_requests=5)
    async with steady_traffic(proxy, workers=6):
        code, _ = await proxy.admin("POST", "/weights", {"blue": 50, "green": 50})
        assert code == 200
        s = await wait_for(proxy, lambda s: s["rollback"]["state"] == "rolled_back", timeout=3)
    assert s["weights"] == {"blue": 100, "green": 0} and s["active"] == "blue"
    (event,) = await auto_events(proxy)
    assert event["to"] == "blue" and event["from"] == "blue=50,green=50"


async def test_disabled_rollback_never_acts(
    upstreams: dict[str, Upstream], start_proxy: StartProxy
) -> None:
    upstreams["green"].behaviour.fail_rate = 0.5
    proxy = await start(start_proxy, upstreams, enabled=False)
    async with steady_traffic(proxy):
        code, body = await proxy.admin("POST", "/switch", {"color": "green"})
        assert code == 200
        assert body["rollback"]["state"] == "idle"
        await asyncio.sleep(3 * INTERVAL)  # several intervals' worth of failing traffic
    s = await status(proxy)
    assert s["active"] == "green" and s["rollback"]["state"] == "idle"
    assert await auto_events(proxy) == []


async def test_changes_made_elsewhere_are_classified_by_their_event(
    upstreams: dict[str, Upstream], start_proxy: StartProxy
) -> None:
    """A write by another instance reaches this one as a bare snapshot: its event in the
    shared store says whether it was a switch (watch), a rollback or an auto rollback."""
    proxy = await start(start_proxy, upstreams, min_requests=1000)
    store = proxy.run.control.only.store
    rollback = proxy.run.control.only.rollback
    assert rollback is not None

    async def write(new: RoutingState, action: str, trigger: str, reason: str) -> None:
        old = store.snapshot()
        event = Event(
            at=new.changed_at,
            generation=new.generation,
            action=action,
            from_=describe(old),
            to=describe(new),
            trigger=trigger,
            reason=reason,
            actor="other-instance",
        )
        await store.compare_and_set(old.generation, replace(new, reason=reason), event)

    async def settled() -> dict[str, Any]:
        async with asyncio.timeout(2):
            while True:  # the event lookup is a task: wait until it has run
                task = rollback._task
                if task is None or task.get_name() != "rollback-classify":
                    return await status(proxy)
                await asyncio.sleep(0.01)

    def to_green(now: float) -> RoutingState:
        new = switch_to(store.snapshot(), Color.GREEN, now)
        assert new is not None
        return new

    await write(to_green(1.0), "switch", "manual", "release 42")
    s = await settled()
    assert s["rollback"]["state"] == "watching" and s["rollback"]["color"] == "green"

    await write(roll_back(store.snapshot(), 2.0), "rollback", "auto", "auto rollback: green")
    s = await settled()
    assert s["rollback"]["state"] == "rolled_back"

    await write(to_green(3.0), "switch", "manual", "again")
    assert (await settled())["rollback"]["state"] == "watching"
    await write(roll_back(store.snapshot(), 4.0), "rollback", "manual", "operator")
    s = await settled()
    assert s["rollback"]["state"] == "idle" and s["active"] == "blue"
    assert rollback.auto_rollbacks == 0  # another instance's rollback is not counted here
