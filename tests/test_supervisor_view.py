"""A ``--workers`` supervisor's control side, started in this process the way ``supervise``
starts it (``running(config, data_plane=False)``): it serves nothing, so it builds no
``ProxyServer`` (issue 14), yet its admin API answers, switches and drains, and reports
the sums of its workers' counters.

The workers themselves are covered as users run them, in tests/test_workers*.py.
"""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from admin.runner import Running, running
from admin.view import ControlRuntime
from config import parse_config
from conftest import Upstream, config_dict
from proxy.server import ProxyServer
from proxy.state import Color
from proxy.stats import LATENCY_BUCKETS


def _servers() -> list[object]:
    gc.collect()
    return [o for o in gc.get_objects() if type(o) is ProxyServer]


@pytest.fixture
async def supervisor(upstreams: dict[str, Upstream]) -> AsyncIterator[Running]:
    config = parse_config(config_dict([upstreams["blue"].url], [upstreams["green"].url]))
    async with running(config, data_plane=False) as run:
        yield run


async def _admin(run: Running, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    host, port = run.admin_address
    async with aiohttp.ClientSession() as session:
        async with session.request(method, f"http://{host}:{port}{path}", json=body) as resp:
            if resp.content_type == "application/json":
                return resp.status, await resp.json()
            return resp.status, await resp.text()


async def test_a_supervisor_builds_no_proxy_server(upstreams: dict[str, Upstream]) -> None:
    before = _servers()  # held, so that no id among them is reused meanwhile
    config = parse_config(config_dict([upstreams["blue"].url], [upstreams["green"].url]))
    async with running(config, data_plane=False) as run:
        built = [o for o in _servers() if not any(o is b for b in before)]
        assert built == [], "the supervisor built a ProxyServer it never serves with"
        status, body = await _admin(run, "GET", "/status")
        assert status == 200
        assert body["active"] == "blue"
        targets = {c: [t["url"] for t in body["colors"][c]["targets"]] for c in body["colors"]}
        assert targets == {"blue": [upstreams["blue"].url], "green": [upstreams["green"].url]}
        assert (await _admin(run, "GET", "/readyz"))[0] == 200


async def test_a_supervisors_switch_drains_on_its_workers_counts(supervisor: Running) -> None:
    runtime = supervisor.view
    assert isinstance(runtime, ControlRuntime)
    # One request in flight on blue in some worker: the drain after a switch waits for it.
    runtime.set_counts("default", *_counts(blue=1))
    status, body = await _admin(supervisor, "POST", "/switch", {"color": "green"})
    assert status == 200, body
    assert body["active"] == "green"
    assert body["drain"]["color"] == "blue" and body["drain"]["state"] == "draining"
    drained = runtime.services["default"].drain
    runtime.set_counts("default", *_counts(blue=0))  # the worker's next report
    task = drained._task
    assert task is not None
    await task
    assert (await _admin(supervisor, "GET", "/status"))[1]["drain"]["state"] == "done"


async def test_a_supervisor_adds_what_each_worker_counted_since_its_last_report(
    supervisor: Running,
) -> None:
    runtime = supervisor.view
    assert isinstance(runtime, ControlRuntime)
    one: dict[tuple[str, ...], Any] = {}
    two: dict[tuple[str, ...], Any] = {}
    runtime.add_stats("default", one, _report(ok=3, errors=1))
    runtime.add_stats("default", two, _report(ok=2, errors=0))
    runtime.add_stats("default", one, _report(ok=5, errors=1))  # cumulative: 2 more
    status, text = await _admin(supervisor, "GET", "/metrics")
    assert status == 200
    assert 'bgproxy_requests_total{code="200",color="blue",service="default"} 7.0' in text
    assert 'bgproxy_requests_total{code="502",color="blue",service="default"} 1.0' in text
    assert (
        'bgproxy_upstream_errors_total{color="blue",kind="connect",service="default"} 1.0' in text
    )


def _counts(blue: int) -> tuple[dict[Color, int], dict[Color, int]]:
    return {Color.BLUE: blue, Color.GREEN: 0}, {Color.BLUE: 0, Color.GREEN: 0}


def _report(ok: int, errors: int) -> dict[str, Any]:
    """One worker's cumulative counters, as admin/workers.py reports them."""
    buckets = [0] * (len(LATENCY_BUCKETS) + 1)
    return {
        "responses": [["blue", 200, ok]] + ([["blue", 502, errors]] if errors else []),
        "upstream_errors": [["blue", "connect", errors]] if errors else [],
        "reconnects": {"blue": 0, "green": 0},
        "traffic": {
            "blue": [ok + errors, errors, 0.01 * (ok + errors), buckets],
            "green": [0, 0, 0.0, buckets],
        },
    }
