"""Progressive rollouts against real upstreams, the real proxy and real HTTP clients:
steps under load, the watch aborting, inconclusive holds, the controls and their 409s,
stickiness across steps, and the pure transitions (tables, no event loop)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from admin.runner import reload_config
from conftest import Proxy, StartProxy, Upstream, config_dict
from proxy.state import (
    AlreadyLive,
    Color,
    NoRollout,
    RolloutInProgress,
    RoutingState,
    Weights,
    abort_rollout,
    advance_rollout,
    pause_rollout,
    promote_rollout,
    resume_rollout,
    set_weights,
    start_rollout,
    steps_problem,
    switch_to,
)

B, G = Color.BLUE, Color.GREEN
INTERVAL = 0.2  # rollback.interval: the watch judges every 200 ms


# --- the transitions (pure) --------------------------------------------------------------------


def blue() -> RoutingState:
    return RoutingState(generation=3, active=B, weights=Weights(100, 0))


@pytest.mark.parametrize(
    ("steps", "problem"),
    [
        ((10, 25, 50, 100), None),
        ((100,), None),
        ((), "at least one"),
        ((10, 50), "last step must be 100"),
        ((50, 25, 100), "increase"),
        ((0, 100), "from 1 to 100"),
        ((10, 10, 100), "increase"),
    ],
)
def test_steps_problem(steps: tuple[int, ...], problem: str | None) -> None:
    got = steps_problem(steps)
    assert (got is None) if problem is None else (got is not None and problem in got)


def test_a_rollout_walks_its_steps_and_promotes() -> None:
    s = start_rollout(blue(), G, (10, 50, 100), 1.0, True, 100.0)
    assert (s.generation, s.active, s.weights) == (4, B, Weights(90, 10))
    assert s.rollout is not None and s.rollout.state == "progressing" and s.rollout.step == 0
    # /rollback during a rollout returns to the stable color at 100.
    assert (s.previous, s.previous_weights) == (B, Weights(100, 0))
    s = advance_rollout(s, 101.0)
    assert (s.active, s.weights, s.rollout.step) == (B, Weights(50, 50), 1)  # type: ignore[union-attr]
    assert s.rollout is not None and s.rollout.step_started_at == 101.0
    s = advance_rollout(s, 102.0)
    assert (s.active, s.weights) == (G, Weights(0, 100))
    assert s.rollout is not None and s.rollout.state == "promoted" and not s.rollout.running
    assert (s.previous, s.previous_weights) == (B, Weights(100, 0))
    with pytest.raises(NoRollout):
        advance_rollout(s, 103.0)


def test_without_auto_promote_the_last_step_below_100_waits() -> None:
    s = start_rollout(blue(), G, (25, 100), 1.0, False, 100.0)
    s = advance_rollout(s, 101.0)
    assert s.rollout is not None and s.rollout.state == "waiting_promotion"
    assert s.weights == Weights(75, 25)  # held where it was
    s = promote_rollout(s, 102.0)
    assert s.weights == Weights(0, 100) and s.rollout is not None
    assert s.rollout.state == "promoted"


def test_pause_resume_keep_the_time_spent_at_the_step() -> None:
    s = start_rollout(blue(), G, (10, 100), 10.0, True, 100.0)
    p = pause_rollout(s, 104.0)
    assert p is not None and p.rollout is not None and p.rollout.state == "paused"
    assert pause_rollout(p, 105.0) is None  # already paused: a no-op
    r = resume_rollout(p, 200.0)
    assert r is not None and r.rollout is not None and r.rollout.state == "progressing"
    assert r.rollout.step_started_at == pytest.approx(196.0)  # 4 s were spent before
    assert resume_rollout(r, 201.0) is None
    assert r.weights == s.weights  # pausing never moves traffic


def test_abort_puts_the_stable_color_back_and_manual_changes_cancel() -> None:
    s = start_rollout(blue(), G, (10, 50, 100), 1.0, True, 100.0)
    a = abort_rollout(advance_rollout(s, 101.0), 102.0)
    assert (a.active, a.weights) == (B, Weights(100, 0))
    assert a.rollout is not None and a.rollout.state == "aborted"
    for manual in (
        switch_to(s, B, 103.0),
        set_weights(s, 70, 30, 103.0),
    ):
        assert manual is not None and manual.rollout is not None
        assert manual.rollout.state == "cancelled"


def test_refusals() -> None:
    s = start_rollout(blue(), G, (10, 100), 1.0, True, 100.0)
    with pytest.raises(RolloutInProgress):
        start_rollout(s, G, (10, 100), 1.0, True, 101.0)
    with pytest.raises(AlreadyLive):
        start_rollout(blue(), B, (10, 100), 1.0, True, 101.0)
    for transition in (pause_rollout, resume_rollout, promote_rollout, abort_rollout):
        with pytest.raises(NoRollout):
            transition(blue(), 101.0)


def test_a_split_already_in_place_skips_the_steps_below_it() -> None:
    split = set_weights(blue(), 70, 30, 99.0)
    s = start_rollout(split, G, (10, 25, 50, 100), 1.0, True, 100.0)
    assert s.weights == Weights(50, 50)  # never back to 10 or 25: no client flips back


def test_the_record_round_trips() -> None:
    s = start_rollout(blue(), G, (10, 50, 100), 1.5, False, 100.0)
    assert RoutingState.from_dict(s.to_dict()) == s
    p = pause_rollout(s, 101.0)
    assert p is not None and RoutingState.from_dict(p.to_dict()) == p


# --- against the real proxy ------------------------------------------------------------------


def rollout_config(upstreams: dict[str, Upstream], **sections: Any) -> dict[str, Any]:
    rollback = {
        "interval": f"{int(INTERVAL * 1000)}ms",
        "max_error_rate": 0.05,
        "max_p99_latency": "1s",
        "min_requests": 10,
        "failure_limit": 1,
        **sections.pop("rollback", {}),
    }
    rollout = {"steps": [10, 25, 50, 100], "step_interval": "600ms", **sections.pop("rollout", {})}
    return config_dict(
        [upstreams["blue"].url],
        [upstreams["green"].url],
        rollback=rollback,
        rollout=rollout,
        **sections,
    )


@dataclasses.dataclass
class Seen:
    at: float
    client: int
    color: str
    status: int
    weight: int  # the new color's weight in /status just before
    sent: float = 0.0  # wall-clock time the request was sent


class Clients:
    """``n`` browsers keeping their cookies, each requesting in turn, as fast as the proxy
    answers; what each got is recorded with the green weight in force when it was sent."""

    def __init__(self, proxy: Proxy, n: int) -> None:
        self.proxy = proxy
        self.n = n
        self.cookies: list[str | None] = [None] * n
        self.seen: list[Seen] = []
        self.weight = 0  # green's weight as last read from /status

    async def run(self, stop: asyncio.Event, concurrency: int = 4) -> None:
        loop = asyncio.get_running_loop()
        jar = aiohttp.DummyCookieJar()  # cookies are kept per client, by hand
        async with aiohttp.ClientSession(cookie_jar=jar) as session:
            nxt = iter(range(10**9))

            async def worker() -> None:
                while not stop.is_set():
                    c = next(nxt) % self.n
                    headers = {"Cookie": f"bg_sticky={self.cookies[c]}"} if self.cookies[c] else {}
                    weight = self.weight
                    sent = time.time()
                    async with session.get(self.proxy.url + "/r", headers=headers) as resp:
                        await resp.read()
                        sticky = resp.cookies.get("bg_sticky")
                        if sticky is not None:
                            self.cookies[c] = sticky.value
                        color = resp.headers["X-Bg-Color"]
                        self.seen.append(Seen(loop.time(), c, color, resp.status, weight, sent))

            await asyncio.gather(*(worker() for _ in range(concurrency)))


@contextlib.asynccontextmanager
async def load(proxy: Proxy, n: int = 200, concurrency: int = 4) -> AsyncIterator[Clients]:
    clients = Clients(proxy, n)
    stop = asyncio.Event()

    async def follow() -> None:  # the weight each request was sent under
        while not stop.is_set():
            s = await status(proxy)
            clients.weight = s["weights"]["green"]
            await asyncio.sleep(0.02)

    tasks = [asyncio.create_task(clients.run(stop, concurrency)), asyncio.create_task(follow())]
    try:
        yield clients
    finally:
        stop.set()
        await asyncio.gather(*tasks)


async def status(proxy: Proxy, path: str = "/status") -> dict[str, Any]:
    code, body = await proxy.admin("GET", path)
    assert code == 200, body
    return dict(body)


async def wait_for(
    proxy: Proxy, predicate: Callable[[dict[str, Any]], bool], timeout: float
) -> dict[str, Any]:
    async with asyncio.timeout(timeout):
        while True:
            s = await status(proxy)
            if predicate(s):
                return s
            await asyncio.sleep(0.02)


async def events(proxy: Proxy) -> list[dict[str, Any]]:
    code, body = await proxy.admin("GET", "/events?limit=100")
    assert code == 200
    return list(reversed(body["events"]))  # oldest first


async def metric_lines(proxy: Proxy, name: str) -> dict[str, float]:
    async with proxy.session.get(proxy.admin_url + "/metrics") as resp:
        text = await resp.text()
    return {
        ln.rsplit(" ", 1)[0]: float(ln.rsplit(" ", 1)[1])
        for ln in text.splitlines()
        if ln.startswith(name + "{")
    }


async def test_a_full_rollout_under_load_tracks_each_step(
    upstreams: dict[str, Upstream], start_proxy: StartProxy
) -> None:
    proxy = await start_proxy(rollout_config(upstreams, rollout={"step_interval": "1s"}))
    async with load(proxy, n=150) as clients:
        code, body = await proxy.admin("POST", "/rollout", {"color": "green", "reason": "v2"})
        assert code == 200, body
        ro = body["rollout"]
        assert (ro["state"], ro["color"], ro["step"]) == ("progressing", "green", 1)
        assert ro["weight"] == 10
        assert ro["steps"] == [10, 25, 50, 100] and ro["next_at"] is not None
        assert body["weights"] == {"blue": 90, "green": 10}
        gauges = await metric_lines(proxy, "bgproxy_rollout_weight")
        assert gauges == {
            'bgproxy_rollout_weight{color="blue",service="default"}': 90.0,
            'bgproxy_rollout_weight{color="green",service="default"}': 10.0,
        }
        seen_weights = set()
        s = body
        while s["rollout"]["state"] == "progressing":
            seen_weights.add(s["weights"]["green"])
            s = await wait_for(proxy, lambda x, s=s: x["generation"] != s["generation"], timeout=5)
        assert s["rollout"]["state"] == "promoted"
        assert s["weights"] == {"blue": 0, "green": 100} and s["active"] == "green"
        assert seen_weights == {10, 25, 50}
        await asyncio.sleep(0.2)  # a little traffic at 100
    seen = clients.seen
    assert len(seen) > 300
    assert all(x.status == 200 for x in seen), Counter(x.status for x in seen)
    # The share of clients on green at each step tracks its weight. Each request is put
    # in the step the events say was in force when it was sent, 50 ms clear of a step
    # change: the weight polled from /status lags behind when the proxy is slow to
    # answer it (the pure-Python build under load), which would count the end of the
    # next step as this one's.
    steps = [e for e in await events(proxy) if e["action"] in ("rollout_step", "promote")]
    starts = [datetime.fromisoformat(e["at"].replace("Z", "+00:00")).timestamp() for e in steps]
    for i, weight in enumerate((10, 25, 50)):
        assert steps[i]["weight"] == weight, steps
        begin, end = starts[i] + 0.05, starts[i + 1] - 0.05
        latest: dict[int, str] = {}
        for x in seen:
            if begin <= x.sent <= end:
                latest[x.client] = x.color
        assert len(latest) >= 0.6 * clients.n, (weight, len(latest))
        share = sum(c == "green" for c in latest.values()) / len(latest)
        assert abs(share - weight / 100) < 0.13, (weight, share, len(latest))
    assert all(x.color == "green" for x in seen if x.weight == 100)
    # No client ever went back from green to blue while the weight only grew.
    flips = [
        c for c in range(clients.n)
        if "gb" in "".join("g" if x.color == "green" else "b" for x in seen if x.client == c)
    ]  # fmt: skip
    assert flips == []

    evs = [e for e in await events(proxy) if e["action"] in ("rollout_step", "promote")]
    assert [(e["action"], e.get("weight")) for e in evs] == [
        ("rollout_step", 10),
        ("rollout_step", 25),
        ("rollout_step", 50),
        ("promote", 100),
    ]
    assert evs[0]["trigger"] == "manual" and evs[0]["reason"] == "v2"
    assert all(e["trigger"] == "auto" for e in evs[1:])
    assert all(e["passed"]["requests"] >= 10 for e in evs[1:])
    assert sorted((await metric_lines(proxy, "bgproxy_rollout_weight")).values()) == [0, 0]


async def test_an_error_rate_at_step_two_aborts_within_one_interval(
    upstreams: dict[str, Upstream], start_proxy: StartProxy
) -> None:
    proxy = await start_proxy(rollout_config(upstreams, rollout={"step_interval": "500ms"}))
    loop = asyncio.get_running_loop()
    async with load(proxy, n=100) as clients:
        code, _ = await proxy.admin("POST", "/rollout", {"color": "green"})
        assert code == 200
        await wait_for(proxy, lambda s: s["rollout"]["step"] == 2, timeout=5)
        upstreams["green"].behaviour.fail_rate = 0.5
        failing = loop.time()
        s = await wait_for(proxy, lambda s: s["rollout"]["state"] != "progressing", timeout=3)
        aborted = loop.time()
        await asyncio.sleep(0.3)
    assert s["rollout"]["state"] == "aborted" and s["rollout"]["step"] == 2
    assert s["weights"] == {"blue": 100, "green": 0} and s["active"] == "blue"
    assert aborted - failing <= 2 * INTERVAL + 0.3
    # Everyone is back on blue at once: nothing served by green after the abort landed.
    assert all(x.color == "blue" for x in clients.seen if x.at > aborted + 0.05)
    (abort,) = [e for e in await events(proxy) if e["action"] == "abort"]
    assert abort["trigger"] == "auto" and abort["actor"] == "auto"
    assert abort["figures"]["error_rate"] > 0.05 and abort["figures"]["requests"] >= 10
    assert abort["thresholds"]["max_error_rate"] == 0.05
    assert abort["step"] == 2 and abort["weight"] == 25
    assert "error rate" in abort["reason"]
    auto = await metric_lines(proxy, "bgproxy_auto_rollbacks_total")
    assert auto == {'bgproxy_auto_rollbacks_total{service="default"}': 1.0}


async def test_too_little_traffic_holds_the_step(
    upstreams: dict[str, Upstream], start_proxy: StartProxy
) -> None:
    cfg = rollout_config(
        upstreams, rollback={"min_requests": 30}, rollout={"step_interval": "300ms"}
    )
    proxy = await start_proxy(cfg)
    code, _ = await proxy.admin("POST", "/rollout", {"color": "green"})
    assert code == 200
    await asyncio.sleep(1.0)  # three step intervals without a request
    s = await status(proxy)
    ro = s["rollout"]
    assert (ro["state"], ro["step"], s["weights"]["green"]) == ("progressing", 1, 10)
    assert ro["held"] is not None and "min_requests 30" in ro["held"]
    assert ro["step_requests"] == 0
    # Traffic arrives: the step passes once it has seen min_requests on green.
    async with load(proxy, n=100):
        s = await wait_for(proxy, lambda s: s["rollout"]["step"] >= 2, timeout=5)
    assert s["rollout"]["state"] in ("progressing", "promoted")


async def test_controls_and_their_409s(
    upstreams: dict[str, Upstream], start_proxy: StartProxy
) -> None:
    proxy = await start_proxy(rollout_config(upstreams, rollout={"step_interval": "300ms"}))
    for verb in ("pause", "resume", "promote", "abort"):
        code, body = await proxy.admin("POST", f"/rollout/{verb}")
        assert (code, body["error"]) == (409, "no_rollout"), verb
    code, body = await proxy.admin("POST", "/rollout", {"color": "blue"})
    assert (code, body["error"]) == (409, "already_live")
    code, body = await proxy.admin("POST", "/rollout", {"color": "green", "steps": [10, 50]})
    assert (code, body["error"]) == (400, "bad_rollout") and "100" in body["detail"]
    code, body = await proxy.admin("POST", "/rollout", {"color": "green", "step_interval": "x"})
    assert (code, body["error"]) == (400, "bad_rollout")

    code, body = await proxy.admin(
        "POST", "/rollout", {"color": "green", "steps": [20, 100], "step_interval": "10s"}
    )
    assert code == 200 and body["rollout"]["steps"] == [20, 100]
    code, body = await proxy.admin("POST", "/rollout", {"color": "green"})
    assert (code, body["error"]) == (409, "rollout_in_progress")
    code, body = await proxy.admin("POST", "/rollout/pause")
    assert code == 200 and body["rollout"]["state"] == "paused"
    assert body["rollout"]["next_at"] is None and body["weights"]["green"] == 20
    code, body = await proxy.admin("POST", "/rollout/resume")
    assert code == 200 and body["rollout"]["state"] == "progressing"
    code, body = await proxy.admin("POST", "/rollout/promote", {"reason": "looks good"})
    assert code == 200 and body["rollout"]["state"] == "promoted"
    assert body["weights"] == {"blue": 0, "green": 100}
    # Promoted, green is watched like after any switch (the rollout watched its steps).
    assert (body["rollback"]["state"], body["rollback"]["color"]) == ("watching", "green")
    code, body = await proxy.admin("POST", "/rollout/abort")
    assert (code, body["error"]) == (409, "no_rollout")

    code, body = await proxy.admin("POST", "/rollout", {"color": "blue", "step_interval": 10})
    assert code == 200 and body["weights"] == {"blue": 10, "green": 90}
    code, body = await proxy.admin("POST", "/rollout/abort", {"reason": "not today"})
    assert code == 200 and body["rollout"]["state"] == "aborted"
    assert body["weights"] == {"blue": 0, "green": 100}
    actions = [(e["action"], e["trigger"]) for e in await events(proxy)]
    assert actions == [
        ("rollout_step", "manual"),
        ("rollout_pause", "manual"),
        ("rollout_resume", "manual"),
        ("promote", "manual"),
        ("rollout_step", "manual"),
        ("abort", "manual"),
    ]


async def test_a_manual_switch_cancels_the_rollout(
    upstreams: dict[str, Upstream], start_proxy: StartProxy
) -> None:
    proxy = await start_proxy(rollout_config(upstreams, rollout={"step_interval": "10s"}))
    code, _ = await proxy.admin("POST", "/rollout", {"color": "green"})
    assert code == 200
    code, body = await proxy.admin("POST", "/switch", {"color": "blue", "reason": "stop"})
    assert code == 200
    assert body["rollout"]["state"] == "cancelled"
    assert body["weights"] == {"blue": 100, "green": 0}
    last = (await events(proxy))[-1]
    assert last["action"] == "switch" and last["rollout_cancelled"] is True
    # It stays cancelled: nothing drives it any more.
    await asyncio.sleep(3 * INTERVAL)
    s = await status(proxy)
    assert s["rollout"]["state"] == "cancelled" and s["weights"]["green"] == 0


async def test_a_manual_rollback_cancels_and_returns_to_the_stable_color(
    upstreams: dict[str, Upstream], start_proxy: StartProxy
) -> None:
    proxy = await start_proxy(rollout_config(upstreams, rollout={"step_interval": "10s"}))
    code, _ = await proxy.admin("POST", "/rollout", {"color": "green", "steps": [30, 60, 100]})
    assert code == 200
    code, body = await proxy.admin("POST", "/rollback")
    assert code == 200
    assert body["weights"] == {"blue": 100, "green": 0} and body["active"] == "blue"
    assert body["rollout"]["state"] == "cancelled"
    last = (await events(proxy))[-1]
    assert (last["action"], last["rollout_cancelled"]) == ("rollback", True)


async def test_without_auto_promote_it_waits_for_a_promote(
    upstreams: dict[str, Upstream], start_proxy: StartProxy
) -> None:
    cfg = rollout_config(
        upstreams, rollout={"steps": [50, 100], "step_interval": "300ms", "auto_promote": False}
    )
    proxy = await start_proxy(cfg)
    async with load(proxy, n=50):
        code, _ = await proxy.admin("POST", "/rollout", {"color": "green"})
        assert code == 200
        s = await wait_for(proxy, lambda s: s["rollout"]["state"] != "progressing", timeout=5)
        assert s["rollout"]["state"] == "waiting_promotion"
        assert s["weights"] == {"blue": 50, "green": 50}
        await asyncio.sleep(4 * INTERVAL)  # it holds
        s = await status(proxy)
        assert s["rollout"]["state"] == "waiting_promotion" and s["weights"]["green"] == 50
        code, body = await proxy.admin("POST", "/rollout/promote")
    assert code == 200 and body["weights"] == {"blue": 0, "green": 100}


async def test_a_reload_keeps_the_rollout_going(
    upstreams: dict[str, Upstream], start_proxy: StartProxy, tmp_path: Path
) -> None:
    cfg = rollout_config(upstreams, rollout={"steps": [20, 60, 100], "step_interval": "500ms"})
    proxy = await start_proxy(cfg)
    async with load(proxy, n=50):
        code, _ = await proxy.admin("POST", "/rollout", {"color": "green"})
        assert code == 200
        path = tmp_path / "bgproxy.yaml"
        cfg["rollback"]["max_p99_latency"] = "2s"  # any change: a new config object
        path.write_text(yaml.safe_dump(cfg))
        assert reload_config(proxy.run, str(path))
        s = await wait_for(proxy, lambda s: s["rollout"]["state"] != "progressing", timeout=8)
    assert s["rollout"]["state"] == "promoted" and s["generation"] == 4
    assert s["rollout"]["thresholds"]["max_p99_latency"] == 2.0
