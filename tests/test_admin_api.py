"""The admin API as an operator's script sees it: JSON in and out, over a real socket."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

import pytest

from admin.runner import StartupError, running
from config import parse_config
from conftest import Proxy, StartProxy, Upstream, config_dict


def is_rfc3339_utc(value: Any) -> bool:
    if not isinstance(value, str) or not (value.endswith("Z") or value.endswith("+00:00")):
        return False
    parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    offset = parsed.utcoffset()
    return offset is not None and offset.total_seconds() == 0


def assert_error(body: Any) -> None:
    assert isinstance(body, dict)
    assert isinstance(body.get("error"), str) and body["error"]
    assert isinstance(body.get("detail"), str) and body["detail"]


async def served_color(proxy: Proxy) -> str:
    status, _, headers = await proxy.get("/")
    assert status == 200
    return headers["X-Bg-Color"]


async def generation(proxy: Proxy) -> int:
    code, status = await proxy.admin("GET", "/status")
    assert code == 200
    return int(status["generation"])


async def events(proxy: Proxy) -> list[dict[str, Any]]:
    code, body = await proxy.admin("GET", "/events")
    assert code == 200
    assert set(body) == {"events"}
    return list(body["events"])


async def raw_post(proxy: Proxy, path: str, data: bytes) -> tuple[int, Any]:
    async with proxy.session.post(
        proxy.admin_url + path, data=data, headers={"Content-Type": "application/json"}
    ) as resp:
        return resp.status, json.loads(await resp.text())


# --- /status -----------------------------------------------------------------------------------


async def test_status_shape(proxy: Proxy, upstreams: dict[str, Upstream]) -> None:
    code, s = await proxy.admin("GET", "/status")
    assert code == 200
    assert {
        "active",
        "weights",
        "generation",
        "previous",
        "changed_at",
        "colors",
        "drain",
        "rollback",
        "instances",
    } <= set(s)
    assert s["active"] == "blue"
    assert s["weights"] == {"blue": 100, "green": 0}
    assert s["generation"] == 1
    assert s["previous"] is None
    assert is_rfc3339_utc(s["changed_at"])
    assert set(s["colors"]) == {"blue", "green"}
    for color in ("blue", "green"):
        c = s["colors"][color]
        assert {"healthy", "in_flight", "websockets", "targets"} <= set(c)
        assert c["healthy"] is True
        assert c["in_flight"] == 0 and c["websockets"] == 0
        assert c["targets"] == [{"url": upstreams[color].url, "healthy": True}]
    assert {"color", "state", "started_at", "deadline", "completed_at", "forced"} <= set(s["drain"])
    assert s["drain"]["state"] in ("idle", "draining", "done")
    assert {"state", "color", "until", "last"} <= set(s["rollback"])
    assert s["rollback"]["state"] in ("idle", "watching", "rolled_back")
    assert isinstance(s["instances"], list) and len(s["instances"]) == 1
    inst = s["instances"][0]
    assert {"id", "host", "generation", "in_flight", "websockets", "last_seen"} <= set(inst)
    assert inst["generation"] == 1
    assert set(inst["in_flight"]) == {"blue", "green"}
    assert set(inst["websockets"]) == {"blue", "green"}
    assert is_rfc3339_utc(inst["last_seen"])


# --- /switch -----------------------------------------------------------------------------------


async def test_switch_changes_live_color_and_records_event(proxy: Proxy) -> None:
    assert await served_color(proxy) == "blue"
    code, s = await proxy.admin("POST", "/switch", {"color": "green", "reason": "release 42"})
    assert code == 200
    assert (s["active"], s["weights"], s["generation"], s["previous"]) == (
        "green",
        {"blue": 0, "green": 100},
        2,
        "blue",
    )
    assert "colors" in s and "instances" in s  # the full status
    assert await served_color(proxy) == "green"

    evs = await events(proxy)
    assert len(evs) == 1
    e = evs[0]
    assert {"at", "generation", "action", "from", "to", "trigger", "reason", "actor"} <= set(e)
    assert (
        e["generation"],
        e["action"],
        e["from"],
        e["to"],
        e["trigger"],
        e["reason"],
        e["actor"],
    ) == (2, "switch", "blue", "green", "manual", "release 42", "admin")
    assert is_rfc3339_utc(e["at"])


async def test_switch_to_live_color_is_a_noop(proxy: Proxy) -> None:
    code, s = await proxy.admin("POST", "/switch", {"color": "blue"})
    assert code == 200
    assert (s["active"], s["generation"]) == ("blue", 1)
    assert await events(proxy) == []

    await proxy.admin("POST", "/switch", {"color": "green"})
    code, s = await proxy.admin("POST", "/switch", {"color": "green", "reason": "again"})
    assert (code, s["generation"]) == (200, 2)
    assert len(await events(proxy)) == 1


@pytest.mark.parametrize(
    "body",
    [
        {"color": "purple"},
        {"color": ""},
        {"color": 1},
        {"color": None},
        {},
        {"reason": "x"},
        {"color": "green", "force": "yes"},
        {"color": "green", "reason": 5},
        {"color": "green", "expected_generation": "1"},
    ],
    ids=[
        "purple",
        "empty",
        "int",
        "null",
        "no-body-keys",
        "no-color",
        "force-str",
        "reason-int",
        "gen-str",
    ],
)
async def test_switch_bad_input_is_400(proxy: Proxy, body: dict[str, Any]) -> None:
    code, err = await proxy.admin("POST", "/switch", body)
    assert code == 400
    assert_error(err)
    assert await generation(proxy) == 1
    assert await served_color(proxy) == "blue"


@pytest.mark.parametrize(
    "data",
    [b"{not json", b'{"color": "green"', b"[1, 2]", b'"green"', b"\xff\xfe"],
    ids=["garbage", "truncated", "array", "string", "not-utf8"],
)
async def test_switch_invalid_json_is_400(proxy: Proxy, data: bytes) -> None:
    code, err = await raw_post(proxy, "/switch", data)
    assert code == 400
    assert_error(err)
    assert await generation(proxy) == 1


async def test_stale_expected_generation_is_409(proxy: Proxy) -> None:
    code, s = await proxy.admin("POST", "/switch", {"color": "green", "expected_generation": 1})
    assert (code, s["generation"]) == (200, 2)
    code, err = await proxy.admin("POST", "/switch", {"color": "blue", "expected_generation": 1})
    assert code == 409
    assert_error(err)
    code, err = await proxy.admin(
        "POST", "/weights", {"blue": 50, "green": 50, "expected_generation": 1}
    )
    assert code == 409
    assert await generation(proxy) == 2
    assert await served_color(proxy) == "green"
    assert len(await events(proxy)) == 1


# --- /weights ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        {"blue": -1, "green": 100},
        {"blue": 100, "green": -5},
        {"blue": 0, "green": 0},
        {"blue": True, "green": 0},
        {"blue": 50, "green": False},
        {"blue": "50", "green": 50},
        {"blue": 50.5, "green": 50},
        {"blue": 50},
        {},
        {"blue": None, "green": 100},
    ],
    ids=[
        "neg-blue",
        "neg-green",
        "both-zero",
        "bool-true",
        "bool-false",
        "string",
        "float",
        "missing-green",
        "empty",
        "null",
    ],
)
async def test_weights_validation(proxy: Proxy, body: dict[str, Any]) -> None:
    code, err = await proxy.admin("POST", "/weights", body)
    assert code == 400
    assert_error(err)
    assert await generation(proxy) == 1
    assert await events(proxy) == []


async def test_weights_zero_blue_makes_green_active(proxy: Proxy) -> None:
    code, s = await proxy.admin("POST", "/weights", {"blue": 0, "green": 100})
    assert code == 200
    assert (s["active"], s["weights"], s["generation"], s["previous"]) == (
        "green",
        {"blue": 0, "green": 100},
        2,
        "blue",
    )
    assert await served_color(proxy) == "green"
    e = (await events(proxy))[0]
    assert (e["action"], e["generation"], e["trigger"]) == ("weights", 2, "manual")


@pytest.mark.parametrize(
    ("blue", "green", "active"),
    [(80, 20, "blue"), (30, 70, "green"), (50, 50, "blue")],
)
async def test_weights_split_active_is_heavier(
    proxy: Proxy, blue: int, green: int, active: str
) -> None:
    code, s = await proxy.admin("POST", "/weights", {"blue": blue, "green": green})
    assert code == 200
    assert (s["active"], s["weights"], s["generation"]) == (
        active,
        {"blue": blue, "green": green},
        2,
    )
    assert (await events(proxy))[0]["action"] == "weights"


# --- /rollback ---------------------------------------------------------------------------------


async def test_rollback_restores_previous(proxy: Proxy) -> None:
    await proxy.admin("POST", "/switch", {"color": "green"})
    assert await served_color(proxy) == "green"
    code, s = await proxy.admin("POST", "/rollback", {"reason": "bad release"})
    assert code == 200
    assert (s["active"], s["weights"], s["generation"], s["previous"]) == (
        "blue",
        {"blue": 100, "green": 0},
        3,
        "green",
    )
    assert await served_color(proxy) == "blue"
    evs = await events(proxy)
    assert [e["generation"] for e in evs] == [3, 2]
    assert (
        evs[0]["action"],
        evs[0]["from"],
        evs[0]["to"],
        evs[0]["reason"],
        evs[0]["trigger"],
    ) == ("rollback", "green", "blue", "bad release", "manual")


async def test_rollback_restores_weights(proxy: Proxy) -> None:
    await proxy.admin("POST", "/weights", {"blue": 70, "green": 30})
    await proxy.admin("POST", "/switch", {"color": "green"})
    code, s = await proxy.admin("POST", "/rollback")
    assert code == 200
    assert (s["active"], s["weights"], s["generation"]) == ("blue", {"blue": 70, "green": 30}, 4)


async def test_rollback_with_nothing_is_409(proxy: Proxy) -> None:
    code, err = await proxy.admin("POST", "/rollback", {})
    assert code == 409
    assert_error(err)
    assert err["error"] == "nothing_to_roll_back"
    assert await generation(proxy) == 1


# --- /events -----------------------------------------------------------------------------------


async def test_events_newest_first_and_limit(proxy: Proxy) -> None:
    for color in ("green", "blue", "green"):
        await proxy.admin("POST", "/switch", {"color": color})
    evs = await events(proxy)
    assert [e["generation"] for e in evs] == [4, 3, 2]
    code, body = await proxy.admin("GET", "/events?limit=1")
    assert code == 200 and [e["generation"] for e in body["events"]] == [4]
    code, err = await proxy.admin("GET", "/events?limit=abc")
    assert code == 400
    assert_error(err)


# --- HTTP-level errors -------------------------------------------------------------------------


async def test_unknown_path_is_404_json(proxy: Proxy) -> None:
    code, err = await proxy.admin("GET", "/nope")
    assert code == 404
    assert_error(err)


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("GET", "/switch", "POST"),
        ("GET", "/weights", "POST"),
        ("GET", "/rollback", "POST"),
        ("POST", "/status", "GET"),
        ("DELETE", "/events", "GET"),
    ],
)
async def test_wrong_method_is_405_json(proxy: Proxy, method: str, path: str, allowed: str) -> None:
    async with proxy.session.request(method, proxy.admin_url + path) as resp:
        assert resp.status == 405
        assert allowed in resp.headers.get("Allow", "")
        assert_error(json.loads(await resp.text()))
    assert await generation(proxy) == 1


async def test_body_over_64k_is_413_and_changes_nothing(proxy: Proxy) -> None:
    body = json.dumps({"color": "green", "reason": "x" * (70 * 1024)}).encode()
    code, err = await raw_post(proxy, "/switch", body)
    assert code == 413
    assert_error(err)
    assert await generation(proxy) == 1
    assert await served_color(proxy) == "blue"
    assert await events(proxy) == []


# --- auth, readiness, startup ------------------------------------------------------------------


async def test_token_required_when_set(
    upstreams: dict[str, Upstream], start_proxy: StartProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BGPROXY_ADMIN_TOKEN", "adm-t0ken")
    proxy = await start_proxy(config_dict([upstreams["blue"].url], [upstreams["green"].url]))

    for token in (None, "wrong", "adm-t0ken-", ""):
        code, err = await proxy.admin("GET", "/status", token=token)
        assert code == 401, token
        assert_error(err)
        code, err = await proxy.admin("POST", "/switch", {"color": "green"}, token=token)
        assert code == 401, token
        code, err = await proxy.admin("GET", "/events", token=token)
        assert code == 401, token
    # Other schemes do not count.
    async with proxy.session.get(
        proxy.admin_url + "/status", headers={"Authorization": "Basic adm-t0ken"}
    ) as resp:
        assert resp.status == 401
    assert await served_color(proxy) == "blue"

    code, s = await proxy.admin("GET", "/status", token="adm-t0ken")
    assert (code, s["generation"]) == (200, 1)
    code, s = await proxy.admin("POST", "/switch", {"color": "green"}, token="adm-t0ken")
    assert (code, s["active"]) == (200, "green")
    assert await served_color(proxy) == "green"

    for path in ("/healthz", "/readyz"):
        code, _ = await proxy.admin("GET", path)
        assert code == 200, path


async def test_healthz_and_readyz_when_started(proxy: Proxy) -> None:
    assert (await proxy.admin("GET", "/healthz"))[0] == 200
    assert (await proxy.admin("GET", "/readyz"))[0] == 200


async def test_non_loopback_admin_without_token_refuses_to_start(
    upstreams: dict[str, Upstream], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("BGPROXY_ADMIN_TOKEN", raising=False)
    cfg = parse_config(
        config_dict(
            [upstreams["blue"].url], [upstreams["green"].url], admin={"listen": "0.0.0.0:0"}
        )
    )
    with pytest.raises(StartupError) as info:
        async with running(cfg):
            pytest.fail("started without a token on a non-loopback admin address")
    assert "admin.listen" in str(info.value)
