"""The access log through the real proxy: the lines an operator reads for requests,
WebSocket sessions, the proxy's own refusals and the control plane's events."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
from access_records import COMBINED

from admin.runner import Running, running
from config import parse_config
from conftest import Proxy, StartProxy, Upstream, config_dict, raw_exchange


def lines(proxy: Proxy, path: Path) -> list[dict[str, Any]]:
    """What the log file holds once the pending lines are written (the proxy writes in
    batches a few milliseconds apart: flushing now makes the test deterministic)."""
    observer = proxy.run.observer
    assert observer is not None and observer.access is not None
    observer.access.flush()
    return [json.loads(line) for line in path.read_bytes().splitlines()]


async def logged_proxy(
    start_proxy: StartProxy, upstreams: dict[str, Upstream], path: Path, **access: Any
) -> Proxy:
    cfg = config_dict(
        [upstreams["blue"].url], [upstreams["green"].url],
        access_log={"destination": str(path), **access},
    )  # fmt: skip
    return await start_proxy(cfg)


async def test_switch_weights_rollback_and_drain_are_json_log_lines(
    start_proxy: StartProxy, upstreams: dict[str, Upstream], tmp_path: Path
) -> None:
    path = tmp_path / "access.log"
    proxy = await logged_proxy(start_proxy, upstreams, path)
    assert (await proxy.admin("POST", "/switch", {"color": "green", "reason": "v2"}))[0] == 200
    assert (await proxy.admin("POST", "/weights", {"blue": 10, "green": 90}))[0] == 200
    assert (await proxy.admin("POST", "/rollback", {"reason": "bad"}))[0] == 200
    events = [line for line in lines(proxy, path) if line.get("event")]
    changes = [e for e in events if e["action"] != "drain_done"]
    assert [(e["action"], e["from"], e["to"], e["generation"]) for e in changes] == [
        ("switch", "blue", "green", 2),
        ("weights", "green", "blue=10,green=90", 3),
        ("rollback", "blue=10,green=90", "green", 4),
    ]
    _, api = await proxy.admin("GET", "/events")
    # The same fields as /events (newest first there), plus the service and the time.
    for line, listed in zip(changes, reversed(api["events"]), strict=True):
        assert {k: line[k] for k in listed} == listed
        assert line["service"] == "default" and line["time"].endswith("Z")
    drained = [e for e in events if e["action"] == "drain_done"]
    assert drained and drained[0]["color"] == "blue" and drained[0]["forced"] == 0


def header(headers: dict[str, str], name: str) -> str | None:
    """A header by name in any case (aiohttp spells some names its own way)."""
    found = [v for k, v in headers.items() if k.lower() == name.lower()]
    assert len(found) <= 1, found
    return found[0] if found else None


def up_header(seen: dict[str, Any], name: str) -> str | None:
    """A header the upstream app received."""
    return header(seen["headers"], name)


async def wait_line(
    proxy: Proxy, path: Path, match: Callable[[dict[str, Any]], bool], timeout: float = 5.0
) -> dict[str, Any]:
    """The first line ``match`` accepts, once the proxy has written it."""
    async with asyncio.timeout(timeout):
        while True:
            found = [line for line in lines(proxy, path) if match(line)]
            if found:
                return found[0]
            await asyncio.sleep(0.02)


async def test_a_request_line_holds_what_client_and_upstream_saw(
    start_proxy: StartProxy, upstreams: dict[str, Upstream], tmp_path: Path
) -> None:
    path = tmp_path / "access.log"
    proxy = await logged_proxy(start_proxy, upstreams, path)
    host, port = proxy.run.proxy_address
    # The fast path (a plain GET) and llhttp's (a POST with a body) make the same line.
    for request in (
        b"GET /a/b?c=1 HTTP/1.1\r\nHost: shop.test\r\nUser-Agent: probe/1.0\r\n"
        b"Referer: https://ref.test/x\r\nConnection: close\r\n\r\n",
        b"POST /a/b?c=1 HTTP/1.1\r\nHost: shop.test\r\nUser-Agent: probe/1.0\r\n"
        b"Referer: https://ref.test/x\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello",
    ):
        raw = await raw_exchange(host, port, request)
        head = raw.split(b"\r\n\r\n", 1)[0].decode()
        rid = next(v for k, _, v in (h.partition(": ") for h in head.split("\r\n")[1:])
                   if k.lower() == "x-request-id")  # fmt: skip
        seen = upstreams["blue"].behaviour.seen[-1]
        assert up_header(seen, "X-Request-Id") == rid  # the app got the same ID
        method = request.split(b" ")[0].decode()
        line = await wait_line(proxy, path, lambda x, m=method: x.get("method") == m)
        assert line["request_id"] == rid
        assert line["client"] == "127.0.0.1"
        assert (line["target"], line["version"], line["status"]) == ("/a/b?c=1", "1.1", 200)
        assert line["bytes_in"] == len(request) and line["bytes_out"] == len(raw)
        assert (line["service"], line["color"], line["reason"]) == ("default", "blue", "active")
        assert line["upstream"] == upstreams["blue"].url
        assert (line["user_agent"], line["referer"]) == ("probe/1.0", "https://ref.test/x")
        assert 0 < line["upstream_time"] <= line["duration"] < 5
        assert (line["tls"], line["sni"]) == (None, None)
        assert datetime.fromisoformat(line["time"]).tzinfo is not None
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", line["time"])


async def test_request_ids_from_trusted_peers_are_kept_and_others_replaced(
    start_proxy: StartProxy, upstreams: dict[str, Upstream], tmp_path: Path
) -> None:
    path = tmp_path / "access.log"
    cfg = config_dict(
        [upstreams["blue"].url], [upstreams["green"].url],
        access_log={"destination": str(path)}, trusted_proxies=["127.0.0.1"],
    )  # fmt: skip
    proxy = await start_proxy(cfg)
    status, _, headers = await proxy.get("/t", headers={"X-Request-Id": "lb-42"})
    assert status == 200 and header(headers, "X-Request-Id") == "lb-42"
    assert up_header(upstreams["blue"].behaviour.seen[-1], "X-Request-Id") == "lb-42"
    # Not log-safe, even from a trusted peer: replaced by one of ours.
    status, _, headers = await proxy.get("/t", headers={"X-Request-Id": 'x" y'})
    assert header(headers, "X-Request-Id") != 'x" y'
    theirs = up_header(upstreams["blue"].behaviour.seen[-1], "X-Request-Id")
    assert theirs == header(headers, "X-Request-Id")

    # The client is the one the trusted proxy names, not the proxy (nginx's realip).
    xff = {"X-Forwarded-For": "198.51.100.7, 127.0.0.1"}
    assert (await proxy.get("/behind", headers=xff))[0] == 200
    line = await wait_line(proxy, path, lambda x: x.get("target") == "/behind")
    assert line["client"] == "198.51.100.7"

    untrusted = await logged_proxy(start_proxy, upstreams, tmp_path / "b.log")
    status, _, _ = await untrusted.get("/spoof", headers={"X-Forwarded-For": "203.0.113.1"})
    line = await wait_line(untrusted, tmp_path / "b.log", lambda x: x.get("target") == "/spoof")
    assert line["client"] == "127.0.0.1"  # from anyone else, the socket peer
    status, _, headers = await untrusted.get("/u", headers={"X-Request-Id": "spoofed"})
    assert header(headers, "X-Request-Id") != "spoofed"
    seen = upstreams["blue"].behaviour.seen[-1]
    assert up_header(seen, "X-Request-Id") == header(headers, "X-Request-Id")  # one ID, ours
    assert "spoofed" not in json.dumps(seen["headers"])
    line = await wait_line(untrusted, tmp_path / "b.log", lambda x: x.get("target") == "/u")
    assert line["request_id"] == header(headers, "X-Request-Id")


async def test_without_log_or_tracing_nothing_is_added(proxy: Proxy, upstreams: dict) -> None:
    assert proxy.run.server.observer is None
    status, _, headers = await proxy.get("/plain", headers={"X-Request-Id": "client-1"})
    assert status == 200 and header(headers, "X-Request-Id") is None
    assert up_header(upstreams["blue"].behaviour.seen[-1], "X-Request-Id") == "client-1"


async def test_sampling_keeps_every_error_and_a_share_of_the_rest(
    start_proxy: StartProxy, upstreams: dict[str, Upstream], tmp_path: Path
) -> None:
    path = tmp_path / "access.log"
    proxy = await logged_proxy(start_proxy, upstreams, path, sample=0.25)
    for i in range(400):
        assert (await proxy.get(f"/ok{i}"))[0] == 200
    upstreams["blue"].behaviour.fail_rate = 1.0
    for i in range(20):
        assert (await proxy.get(f"/fail{i}"))[0] == 500
    got = lines(proxy, path)
    ok = [x for x in got if x["status"] == 200]
    assert 50 <= len(ok) <= 150
    assert sorted(x["target"] for x in got if x["status"] == 500) == sorted(
        f"/fail{i}" for i in range(20)
    )


async def test_combined_format_reads_like_nginx_plus_color(
    start_proxy: StartProxy, upstreams: dict[str, Upstream], tmp_path: Path
) -> None:
    path = tmp_path / "access.log"
    proxy = await logged_proxy(start_proxy, upstreams, path, format="combined")
    status, body, headers = await proxy.get(
        "/c?x=1", headers={"User-Agent": "ua/2", "X-Bg-Color": "green"}
    )
    assert status == 200
    observer = proxy.run.observer
    assert observer is not None and observer.access is not None
    observer.access.flush()
    (raw,) = path.read_bytes().splitlines()
    m = COMBINED.fullmatch(raw)
    assert m is not None, raw
    assert m["request"] == b"GET /c?x=1 HTTP/1.1" and m["status"] == b"200"
    assert (m["agent"], m["color"], m["service"]) == (b"ua/2", b"green", b"default")
    assert m["rid"].decode() == header(headers, "X-Request-Id")
    assert int(m["bytes"]) > len(body)


async def test_websocket_sessions_are_one_line_each_with_how_they_ended(
    start_proxy: StartProxy, upstreams: dict[str, Upstream], tmp_path: Path
) -> None:
    path = tmp_path / "access.log"
    proxy = await logged_proxy(start_proxy, upstreams, path)
    session = proxy.session
    # The client closes after three messages out and three echoes back.
    async with session.ws_connect(proxy.url + "/ws?who=client") as ws:
        for i in range(3):
            await ws.send_str(f"m{i}")
            assert await ws.receive_str(timeout=2) == f"blue:m{i}"
    # The app closes.
    async with session.ws_connect(proxy.url + "/ws?who=upstream") as ws:
        await ws.send_str("hello")
        await ws.receive_str(timeout=2)
        await ws.send_str("close:4000")
        msg = await ws.receive(timeout=2)
        assert (msg.type == aiohttp.WSMsgType.CLOSE and ws.close_code == 4000) or msg.extra == 4000
    by_client = await wait_line(proxy, path, lambda x: x.get("target") == "/ws?who=client")
    assert by_client["status"] == 101 and by_client["color"] == "blue"
    assert (by_client["ws_messages_in"], by_client["ws_messages_out"]) == (3, 3)
    assert by_client["ws_close"] == "client"
    by_app = await wait_line(proxy, path, lambda x: x.get("target") == "/ws?who=upstream")
    assert (by_app["ws_messages_in"], by_app["ws_messages_out"]) == (2, 1)
    assert by_app["ws_close"] == "upstream"
    assert by_app["duration"] > 0 and by_app["bytes_out"] > 0


async def test_handoff_and_shutdown_closes_are_named_in_the_session_line(
    upstreams: dict[str, Upstream], tmp_path: Path
) -> None:
    path = tmp_path / "access.log"
    cfg = parse_config(config_dict(
        [upstreams["blue"].url], [upstreams["green"].url],
        access_log={"destination": str(path)},
        websocket={"reconnect_window": ["50ms", "100ms"], "close_grace": "50ms"},
    ))  # fmt: skip
    async with running(cfg) as run, aiohttp.ClientSession() as session:
        host, port = run.proxy_address
        url = f"http://{host}:{port}/ws"
        handed = await session.ws_connect(url + "?who=handoff")
        code, _ = await admin_post(run, session, "/switch", {"color": "green"})
        assert code == 200
        msg = await handed.receive(timeout=3)
        assert msg.type == aiohttp.WSMsgType.TEXT  # the reconnect message
        msg = await handed.receive(timeout=3)
        assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
        await handed.close()
        stayed = await session.ws_connect(url + "?who=shutdown")
        await stayed.send_str("x")
        assert await stayed.receive_str(timeout=2) == "green:x"
        stopping = asyncio.create_task(run.server.shutdown(5.0))
        assert (await stayed.receive(timeout=3)).type == aiohttp.WSMsgType.TEXT
        await stayed.receive(timeout=3)
        await stayed.close()
        await stopping
        assert run.observer is not None and run.observer.access is not None
        run.observer.access.flush()
        got = {x["target"]: x for x in map(json.loads, path.read_bytes().splitlines())
               if "ws_close" in x}  # fmt: skip
    assert got["/ws?who=handoff"]["ws_close"] == "handoff"
    assert got["/ws?who=handoff"]["color"] == "blue"
    assert got["/ws?who=shutdown"]["ws_close"] == "shutdown"
    assert got["/ws?who=shutdown"]["ws_messages_in"] == 1


async def admin_post(
    run: Running, session: aiohttp.ClientSession, path: str, body: Any
) -> tuple[int, Any]:
    host, port = run.admin_address
    async with session.post(f"http://{host}:{port}{path}", json=body) as resp:
        return resp.status, await resp.json()


async def test_refusals_are_logged_escaped_and_rate_limited(
    start_proxy: StartProxy, upstreams: dict[str, Upstream], tmp_path: Path
) -> None:
    path = tmp_path / "access.log"
    proxy = await logged_proxy(start_proxy, upstreams, path, rejections_per_second=5)
    host, port = proxy.run.proxy_address
    hostile = [
        b"GET /\x1b[31m\"x HTTP/1.1\r\nHost: a\r\n\r\n",  # a control byte in the target: 400
        b"GET / HTTP/1.1\r\nHost: a\r\nX-Big: " + b"y" * 40000 + b"\r\n\r\n",  # 431
        b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",  # two Hosts: 400
        b"GET / HTTP/1.1\r\nHost: a\r\nX-Bg-Color: purple\r\n\r\n",  # a bad override: 400
    ] + [b"\xff\xfe\x00garbage\r\n\r\n"] * 30
    statuses = []
    for request in hostile:
        raw = await raw_exchange(host, port, request)
        statuses.append(int(raw.split(b" ", 2)[1]))
    assert statuses[:4] == [400, 431, 400, 400]
    # The count of what was left out follows within a second of the flood.
    await wait_line(proxy, path, lambda x: "suppressed_rejections" in x)
    text = path.read_bytes()
    assert text.isascii()
    got = [json.loads(line) for line in text.splitlines()]  # every line one object
    refused = [x for x in got if "status" in x]
    # At most five a second were written; the rest are counted, not lost.
    suppressed = sum(x.get("suppressed_rejections", 0) for x in got)
    assert len(refused) + suppressed == len(hostile)
    assert len(refused) <= 5 * 3
    first = refused[0]
    assert first["status"] == 400 and first["service"] is None


async def test_hostile_header_values_that_are_forwarded_never_break_a_line(
    start_proxy: StartProxy, upstreams: dict[str, Upstream], tmp_path: Path
) -> None:
    # Values llhttp lets through (obs-text, DEL, quotes, backslashes, a JSON look-alike)
    # reach the upstream and the log; each still makes exactly one line.
    path = tmp_path / "access.log"
    proxy = await logged_proxy(start_proxy, upstreams, path)
    host, port = proxy.run.proxy_address
    values = [b'"},"status":999,"x":{"', b"back\\slash", b"del\x7fdel", b"\xff\xfe\xc3(",
              "é漢".encode(), b"\x1b]0;title\x07"]  # fmt: skip
    for i, value in enumerate(values):
        request = (b"GET /h%d HTTP/1.1\r\nHost: a\r\nUser-Agent: %s\r\nReferer: %s\r\n"
                   b"Connection: close\r\n\r\n" % (i, value, value))  # fmt: skip
        raw = await raw_exchange(host, port, request)
        assert raw.startswith((b"HTTP/1.1 200", b"HTTP/1.1 400")), raw[:40]
    await wait_line(proxy, path, lambda x: x.get("target") == f"/h{len(values) - 1}")
    data = path.read_bytes()
    assert data.isascii()
    got = [json.loads(line) for line in data.splitlines()]
    assert len(got) == len(values)
    assert sum(line["status"] == 200 for line in got) >= 4, got
    for line in got:
        assert line["status"] in (200, 400)
        if line["status"] == 200:
            i = int(line["target"][2:])
            assert line["user_agent"] == values[i].decode("utf-8", "backslashreplace")
            assert line["referer"] == line["user_agent"]
