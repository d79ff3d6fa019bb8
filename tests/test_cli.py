"""The operator commands as scripts and people run them: a ``bgproxy`` process against a
live proxy, checking what it prints and the exit code (0 ok, 1 refused, 2 usage or
connection error)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import sys
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from conftest import Proxy, StartProxy, Upstream, config_dict, dead_address, start_upstream


async def bgproxy(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """Run the CLI as a process; the proxy under test keeps serving on this loop meanwhile."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("BGPROXY_")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "admin.cli",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**base, **(env or {})},
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def status_of(proxy: Proxy) -> dict[str, Any]:
    code, body = await proxy.admin("GET", "/status")
    assert code == 200
    return dict(body)


async def test_status_human_and_json_with_options_before_or_after(proxy: Proxy) -> None:
    code, out, err = await bgproxy("status", "--admin", proxy.admin_url)
    assert code == 0, err
    assert "active      BLUE" in out
    assert "generation  1" in out
    lines = out.splitlines()
    assert any(line.split()[:3] == ["blue", "LIVE", "100"] for line in lines)
    assert any(line.split()[:3] == ["green", "idle", "0"] for line in lines)
    for up in ("blue", "green"):
        assert proxy.run.server.config.upstreams.pool(up).targets[0].url in out
    assert "drain       idle" in out
    assert "rollback    idle" in out
    assert "INSTANCE" in out and "GENERATION" in out

    code, out, _ = await bgproxy("--admin", proxy.admin_url, "--json", "status")
    assert code == 0
    data = json.loads(out)
    assert data["active"] == "blue" and data["generation"] == 1
    code, out2, _ = await bgproxy("status", "--json", env={"BGPROXY_ADMIN_URL": proxy.admin_url})
    assert code == 0 and json.loads(out2)["active"] == "blue"


async def test_switch_weights_rollback_and_events(proxy: Proxy) -> None:
    admin = ("--admin", proxy.admin_url)
    code, out, err = await bgproxy("switch", "green", "--reason", "release v2", *admin)
    assert code == 0, err
    assert "blue -> green   (generation 1 -> 2)" in out
    assert "active      GREEN" in out
    assert (await status_of(proxy))["active"] == "green"

    code, out, _ = await bgproxy("switch", "green", *admin)
    assert code == 0
    assert "nothing to change: green is already live (generation 2)" in out

    code, out, _ = await bgproxy("weights", "90", "10", "--json", *admin)
    assert code == 0
    assert json.loads(out)["weights"] == {"blue": 90, "green": 10}

    code, out, _ = await bgproxy("rollback", "--reason", "canary looked bad", *admin)
    assert code == 0
    assert "split blue 90 / green 10 -> green" in out
    assert (await status_of(proxy))["weights"] == {"blue": 0, "green": 100}

    code, out, _ = await bgproxy("events", "--limit", "2", *admin)
    assert code == 0
    header, *rows = out.splitlines()
    assert header.split() == ["AT", "GEN", "ACTION", "FROM", "TO", "TRIGGER", "ACTOR", "REASON"]
    assert len(rows) == 2
    assert rows[0].split()[1:7] == ["4", "rollback", "blue=90,green=10", "green", "manual", "admin"]
    assert rows[0].endswith("canary looked bad")

    code, out, _ = await bgproxy("--json", "events", *admin)
    events = json.loads(out)["events"]
    assert [e["action"] for e in events] == ["rollback", "weights", "switch"]
    assert events[-1]["reason"] == "release v2"


async def test_refusals_exit_1_with_the_reason(
    upstreams: dict[str, Upstream], start_proxy: StartProxy
) -> None:
    # A smoke gate green cannot pass: its /health says "OK", not "READY".
    proxy = await start_proxy(
        config_dict(
            [upstreams["blue"].url],
            [upstreams["green"].url],
            gates={"smoke": [{"path": "/health", "expect_body": "READY"}]},
        )
    )
    admin = ("--admin", proxy.admin_url)
    code, out, err = await bgproxy("rollback", *admin)
    assert code == 1 and out == ""
    assert "refused (409 nothing_to_roll_back)" in err

    code, out, err = await bgproxy("switch", "green", *admin)
    assert code == 1
    assert "refused (409 gate_failed): smoke:" in err
    assert "--force" in err
    assert (await status_of(proxy))["active"] == "blue"

    code, out, _ = await bgproxy("switch", "green", "--json", *admin)
    assert code == 1
    assert json.loads(out)["error"] == "gate_failed"

    code, out, err = await bgproxy("switch", "green", "--force", *admin)
    assert code == 0, err
    assert (await status_of(proxy))["active"] == "green"


async def test_usage_errors_exit_2(proxy: Proxy) -> None:
    admin = ("--admin", proxy.admin_url)
    code, _, err = await bgproxy("weights", "0", "0", *admin)
    assert code == 2 and "refused (400 bad_weights)" in err
    code, _, err = await bgproxy("events", "--limit", "0", *admin)
    assert code == 2 and "between 1 and 1000" in err
    code, _, err = await bgproxy("switch", "purple", *admin)
    assert code == 2 and "invalid choice" in err
    code, _, _ = await bgproxy(*admin)
    assert code == 2
    assert (await status_of(proxy))["generation"] == 1


async def test_connection_refused_exits_2() -> None:
    code, out, err = await bgproxy("status", "--admin", dead_address())
    assert code == 2 and out == ""
    assert "cannot reach the admin API" in err
    # A bare host:port works as the URL, and the env var is honoured.
    url = dead_address().removeprefix("http://")
    code, _, err = await bgproxy("switch", "green", env={"BGPROXY_ADMIN_URL": url})
    assert code == 2 and f"http://{url}" in err


async def test_token_from_the_environment(
    upstreams: dict[str, Upstream], start_proxy: StartProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BGPROXY_ADMIN_TOKEN", "s3cret-token")
    proxy = await start_proxy(config_dict([upstreams["blue"].url], [upstreams["green"].url]))
    code, _, err = await bgproxy("status", "--admin", proxy.admin_url)
    assert code == 2
    assert "refused (401 unauthorized)" in err and "BGPROXY_ADMIN_TOKEN" in err
    env = {"BGPROXY_ADMIN_TOKEN": "wrong"}
    code, _, _ = await bgproxy("switch", "green", "--admin", proxy.admin_url, env=env)
    assert code == 2
    env = {"BGPROXY_ADMIN_TOKEN": "s3cret-token", "BGPROXY_ADMIN_URL": proxy.admin_url}
    code, out, err = await bgproxy("switch", "green", env=env)
    assert code == 0, err
    assert "blue -> green" in out


async def wait_for(proxy: Proxy, predicate: Any, timeout: float = 5.0) -> dict[str, Any]:
    """Poll /status until ``predicate(status)``: waiting on what the proxy reports."""
    async with asyncio.timeout(timeout):
        while True:
            status = await status_of(proxy)
            if predicate(status):
                return status
            await asyncio.sleep(0.02)


async def test_switch_wait_follows_the_drain(
    upstreams: dict[str, Upstream], start_proxy: StartProxy
) -> None:
    proxy = await start_proxy(
        config_dict(
            [upstreams["blue"].url],
            [upstreams["green"].url],
            rollback={"enabled": False},
            drain={"timeout": "10s"},
        )
    )
    slow = asyncio.create_task(proxy.get("/slow?s=1.5"))
    await wait_for(proxy, lambda s: s["colors"]["blue"]["in_flight"] == 1)
    code, out, err = await bgproxy("switch", "green", "--wait", "--admin", proxy.admin_url)
    assert code == 0, err
    assert "drain       DRAINING blue: 1 request(s) in flight" in out
    # The slow request ends 1.5 s after it began; how much of that falls after the
    # switch depends on how fast the CLI started.
    assert re.search(r"drain       done: blue drained in (\d+ms|1\.\d+s)", out), out
    assert "rollback    not watched (automatic rollback disabled)" in out
    assert out.rstrip().endswith("green is live (generation 2)")
    status, body, _ = await slow
    assert status == 200 and body == "blue slow"


@contextlib.asynccontextmanager
async def steady_load(proxy: Proxy) -> AsyncIterator[None]:
    """Client traffic through the proxy, so the rollback watch has requests to judge."""

    async def run() -> None:
        async with aiohttp.ClientSession() as session:
            while True:
                with contextlib.suppress(aiohttp.ClientError):
                    async with session.get(proxy.url + "/") as resp:
                        await resp.read()
                await asyncio.sleep(0.01)

    task = asyncio.create_task(run(), name="steady-load")
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


FAST_WATCH = {"window": "1.5s", "interval": "500ms", "min_requests": 3, "failure_limit": 1}


async def test_switch_wait_passes_the_rollback_watch(
    upstreams: dict[str, Upstream], start_proxy: StartProxy
) -> None:
    proxy = await start_proxy(
        config_dict([upstreams["blue"].url], [upstreams["green"].url], rollback=FAST_WATCH)
    )
    async with steady_load(proxy):
        code, out, err = await bgproxy("switch", "green", "--wait", "--admin", proxy.admin_url)
    assert code == 0, err
    assert "rollback    watch passed: last interval" in out
    assert "green is live (generation 2)" in out


async def test_switch_wait_exits_1_when_rolled_back(start_proxy: StartProxy) -> None:
    blue = await start_upstream("blue")
    green = await start_upstream("green")
    green.behaviour.fail_rate = 1.0  # every request 500
    try:
        proxy = await start_proxy(config_dict([blue.url], [green.url], rollback=FAST_WATCH))
        async with steady_load(proxy):
            code, out, err = await bgproxy(
                "switch", "green", "--wait", "--json", "--admin", proxy.admin_url
            )
        assert code == 1
        assert "green was rolled back automatically: auto rollback: green" in err
        final = json.loads(out)  # --json: only the final status, no progress lines
        assert final["active"] == "blue" and final["rollback"]["state"] == "rolled_back"

        # `rollback` now would restore the failed green: refused unless --force.
        code, out, err = await bgproxy("rollback", "--admin", proxy.admin_url)
        assert code == 1 and out == ""
        assert "send traffic back to green, the color that just failed" in err
        assert (await status_of(proxy))["active"] == "blue"
        code, _, err = await bgproxy("rollback", "--force", "--admin", proxy.admin_url)
        assert code == 0, err
        assert (await status_of(proxy))["active"] == "green"
    finally:
        await blue.runner.cleanup()
        await green.runner.cleanup()


# --- several services ---------------------------------------------------------------------


def services_dict(ups: dict[str, Upstream], **top: Any) -> dict[str, Any]:
    """Two services, shop (by Host) and api (by Host and /v1), each with its own pools."""
    return {
        "listen": "127.0.0.1:0",
        "admin": {"listen": "127.0.0.1:0"},
        "services": {
            "shop": {
                "hosts": ["shop.example.com"],
                "upstreams": {
                    "blue": {"targets": [ups["shop-blue"].url]},
                    "green": {"targets": [ups["shop-green"].url]},
                },
            },
            "api": {
                "hosts": ["api.example.com"],
                "paths": ["/v1"],
                "upstreams": {
                    "blue": {"targets": [ups["api-blue"].url]},
                    "green": {"targets": [ups["api-green"].url]},
                },
            },
        },
        **top,
    }


@pytest.fixture
async def four_upstreams() -> AsyncIterator[dict[str, Upstream]]:
    ups = {
        f"{svc}-{color}": await start_upstream(color)
        for svc in ("shop", "api")
        for color in ("blue", "green")
    }
    yield ups
    for up in ups.values():
        await up.runner.cleanup()


@pytest.fixture
async def two_services(four_upstreams: dict[str, Upstream], start_proxy: StartProxy) -> Proxy:
    return await start_proxy(services_dict(four_upstreams))


async def service_status(proxy: Proxy, name: str) -> dict[str, Any]:
    code, body = await proxy.admin("GET", f"/services/{name}/status")
    assert code == 200
    return dict(body)


def table_rows(out: str) -> dict[str, list[str]]:
    """``bgproxy services`` rows by service name (first column)."""
    header, *rows = out.splitlines()
    assert header.split() == [
        "SERVICE", "HOSTS", "PATHS", "LIVE", "SPLIT", "B/G", "GEN", "REQ/S", "ERRORS", "P99",
        "NOTES",
    ]  # fmt: skip
    return {row.split()[0]: row.split() for row in rows}


async def test_services_lists_each_service_with_its_color_split_and_traffic(
    two_services: Proxy,
) -> None:
    proxy = two_services
    admin = ("--admin", proxy.admin_url)
    for _ in range(5):
        status, _, _ = await proxy.get("/", headers={"Host": "shop.example.com"})
        assert status == 200
    code, _, err = await bgproxy("weights", "90", "10", "--service", "api", *admin)
    assert code == 0, err

    code, out, err = await bgproxy("services", *admin)
    assert code == 0, err
    rows = table_rows(out)
    assert list(rows) == ["shop", "api"]
    assert rows["shop"][1:6] == ["shop.example.com", "/", "blue", "100/0", "1"]
    assert rows["api"][1:6] == ["api.example.com", "/v1", "blue", "90/10", "2"]
    assert rows["shop"][6] != "-" and rows["shop"][7] == "0.0%"  # req/s, errors: traffic seen

    code, out, _ = await bgproxy("--json", "services", *admin)
    assert code == 0
    data = json.loads(out)
    assert [s["name"] for s in data["services"]] == ["shop", "api"]
    assert data["services"][1]["weights"] == {"blue": 90, "green": 10}


async def test_service_option_scopes_every_command_to_one_service(two_services: Proxy) -> None:
    proxy = two_services
    admin = ("--admin", proxy.admin_url)
    code, out, err = await bgproxy("switch", "green", "--service", "api", "--reason", "v2", *admin)
    assert code == 0, err
    assert "api: blue -> green   (generation 1 -> 2)" in out
    assert "service     api" in out
    assert (await service_status(proxy, "api"))["active"] == "green"
    assert (await service_status(proxy, "shop"))["active"] == "blue"  # untouched
    status, body, _ = await proxy.get("/v1/x", headers={"Host": "api.example.com"})
    assert status == 200 and json.loads(body)["color"] == "green"
    status, body, _ = await proxy.get("/", headers={"Host": "shop.example.com"})
    assert json.loads(body)["color"] == "blue"

    # Before the subcommand, and from $BGPROXY_SERVICE, like --admin.
    code, out, _ = await bgproxy("--service", "shop", "--json", "status", *admin)
    assert code == 0
    data = json.loads(out)
    assert data["service"] == "shop" and data["active"] == "blue"
    env = {"BGPROXY_SERVICE": "shop", "BGPROXY_ADMIN_URL": proxy.admin_url}
    code, out, err = await bgproxy("weights", "50", "50", env=env)
    assert code == 0, err
    assert (await service_status(proxy, "shop"))["weights"] == {"blue": 50, "green": 50}
    code, _, err = await bgproxy("rollback", env=env)
    assert code == 0, err
    assert (await service_status(proxy, "shop"))["weights"] == {"blue": 100, "green": 0}
    assert (await service_status(proxy, "api"))["active"] == "green"

    # Events: one service's with --service; every service's, with a SERVICE column, without.
    code, out, _ = await bgproxy("events", "--service", "api", *admin)
    assert code == 0
    header, *rows = out.splitlines()
    assert header.split()[:2] == ["AT", "GEN"] and len(rows) == 1
    assert rows[0].split()[1:5] == ["2", "switch", "blue", "green"]
    code, out, _ = await bgproxy("events", *admin)
    header, *rows = out.splitlines()
    assert header.split()[:3] == ["AT", "SERVICE", "GEN"]
    assert [r.split()[1] for r in rows] == ["shop", "shop", "api"]
    code, out, _ = await bgproxy("events", "--json", *admin)
    assert [e["service"] for e in json.loads(out)["events"]] == ["shop", "shop", "api"]


async def test_without_a_service_status_lists_them_and_exits_2(two_services: Proxy) -> None:
    admin = ("--admin", two_services.admin_url)
    code, out, err = await bgproxy("status", *admin)
    assert code == 2
    assert list(table_rows(out)) == ["shop", "api"]  # what there is, on stdout
    assert "refused (400 service_required)" in err
    assert "pass --service NAME" in err and "shop, api" in err

    code, out, err = await bgproxy("switch", "green", *admin)
    assert code == 2 and out == ""
    assert "pass --service NAME" in err
    code, out, _ = await bgproxy("status", "--json", *admin)
    assert code == 2 and json.loads(out)["error"] == "service_required"
    for name in ("shop", "api"):
        assert (await service_status(two_services, name))["generation"] == 1

    code, out, err = await bgproxy("switch", "green", "--service", "nope", *admin)
    assert code == 2 and out == ""
    assert "refused (404 unknown_service)" in err and "bgproxy services" in err


async def test_default_service_answers_unscoped_commands(
    four_upstreams: dict[str, Upstream], start_proxy: StartProxy
) -> None:
    proxy = await start_proxy(services_dict(four_upstreams, default_service="shop"))
    code, out, err = await bgproxy("switch", "green", "--admin", proxy.admin_url)
    assert code == 0, err
    assert "shop: blue -> green" in out
    assert (await service_status(proxy, "shop"))["active"] == "green"
    assert (await service_status(proxy, "api"))["active"] == "blue"
