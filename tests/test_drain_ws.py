"""Switch-time behaviour: drain of the old color, WebSocket handoff, relay fidelity."""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp

from conftest import Proxy, StartProxy, Upstream, config_dict


async def _status(proxy: Proxy) -> dict:
    code, body = await proxy.admin("GET", "/status")
    assert code == 200
    return body


async def test_slow_request_finishes_on_old_color_and_drain_completes(
    proxy: Proxy,
) -> None:
    slow = asyncio.create_task(proxy.get("/slow?s=0.6"))
    # Wait until the proxy counts it in flight on blue (readiness, not a sleep).
    for _ in range(200):
        if (await _status(proxy))["colors"]["blue"]["in_flight"] == 1:
            break
        await asyncio.sleep(0.01)
    code, status = await proxy.admin("POST", "/switch", {"color": "green"})
    assert code == 200
    assert status["drain"]["color"] == "blue"
    assert status["drain"]["state"] == "draining"
    # New requests go to green at once, while the slow one is still on blue.
    _, _, headers = await proxy.get("/new")
    assert headers["X-Bg-Color"] == "green"
    code_slow, body, headers = await slow
    assert code_slow == 200 and headers["X-Bg-Color"] == "blue" and "blue slow" in body
    for _ in range(200):
        drain = (await _status(proxy))["drain"]
        if drain["state"] == "done":
            break
        await asyncio.sleep(0.01)
    assert drain["state"] == "done"
    assert drain["forced"] == 0
    assert drain["completed_at"] is not None


async def test_straggler_is_ended_at_drain_timeout(
    upstreams: dict[str, Upstream], start_proxy: StartProxy
) -> None:
    proxy = await start_proxy(
        config_dict([upstreams["blue"].url], [upstreams["green"].url], drain={"timeout": "300ms"})
    )
    # A raw client: aiohttp would silently retry the cut GET on green.
    host, port = proxy.run.proxy_address
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(b"GET /slow?s=5 HTTP/1.1\r\nHost: x\r\n\r\n")
    for _ in range(200):
        if (await _status(proxy))["colors"]["blue"]["in_flight"] == 1:
            break
        await asyncio.sleep(0.01)
    started = time.monotonic()
    await proxy.admin("POST", "/switch", {"color": "green"})
    async with asyncio.timeout(2):
        got = await reader.read()
    writer.close()
    assert got == b""  # ended without a response
    assert time.monotonic() - started < 2.0
    drain = (await _status(proxy))["drain"]
    assert drain["state"] == "done" and drain["forced"] == 1
    assert (await _status(proxy))["colors"]["blue"]["in_flight"] == 0


async def _ws_clients(proxy: Proxy, n: int) -> list[aiohttp.ClientWebSocketResponse]:
    socks = []
    for _ in range(n):
        ws = await proxy.session.ws_connect(proxy.url + "/ws", protocols=("chat",))
        socks.append(ws)
    return socks


async def test_websocket_relay_is_faithful(proxy: Proxy) -> None:
    async with proxy.session.ws_connect(proxy.url + "/ws", protocols=("chat",)) as ws:
        assert ws.protocol == "chat"
        await ws.send_str("hello")
        assert (await ws.receive_str(timeout=2)) == "blue:hello"
        payload = bytes(range(256)) * 1000
        await ws.send_bytes(payload)
        assert (await ws.receive_bytes(timeout=2)) == payload
        status = await _status(proxy)
        assert status["colors"]["blue"]["websockets"] == 1
        await ws.send_str("close:4001")
        msg = await ws.receive(timeout=2)
        assert msg.type == aiohttp.WSMsgType.CLOSE
        assert msg.data == 4001 and msg.extra == "bye"  # the upstream's code, passed through
    for _ in range(200):
        if (await _status(proxy))["colors"]["blue"]["websockets"] == 0:
            break
        await asyncio.sleep(0.01)
    assert (await _status(proxy))["colors"]["blue"]["websockets"] == 0


async def test_websocket_handoff_spreads_reconnects_then_closes_1012(
    upstreams: dict[str, Upstream], start_proxy: StartProxy
) -> None:
    proxy = await start_proxy(
        config_dict(
            [upstreams["blue"].url],
            [upstreams["green"].url],
            websocket={"reconnect_window": ["1s", "3s"], "close_grace": "500ms"},
        )
    )
    socks = await _ws_clients(proxy, 40)
    t0 = time.monotonic()
    code, _ = await proxy.admin("POST", "/switch", {"color": "green", "reason": "release 42"})
    assert code == 200

    async def watch(ws: aiohttp.ClientWebSocketResponse) -> tuple[float, dict, int | None]:
        msg = await ws.receive(timeout=6)
        assert msg.type == aiohttp.WSMsgType.TEXT, msg
        at = time.monotonic() - t0
        closing = await ws.receive(timeout=3)
        assert closing.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED), closing
        return at, json.loads(msg.data), ws.close_code

    results = await asyncio.gather(*(watch(ws) for ws in socks))
    times = sorted(r[0] for r in results)
    assert all(
        r[1] == {"type": "reconnect", "color": "green", "reason": "release 42"} for r in results
    )
    assert all(r[2] == 1012 for r in results)
    assert times[0] >= 0.95 and times[-1] <= 3.3, times
    # Spread, not a burst: the arrivals cover most of the window.
    assert times[-1] - times[0] > 1.0, times
    assert len({round(t, 1) for t in times}) > 10
    for ws in socks:
        await ws.close()
    # A client that reconnects lands on green.
    async with proxy.session.ws_connect(proxy.url + "/ws") as ws:
        await ws.send_str("hi")
        assert (await ws.receive_str(timeout=2)) == "green:hi"


async def test_rollback_before_handoff_time_cancels_it(
    upstreams: dict[str, Upstream], start_proxy: StartProxy
) -> None:
    proxy = await start_proxy(
        config_dict(
            [upstreams["blue"].url],
            [upstreams["green"].url],
            websocket={"reconnect_window": ["1s", "1.5s"], "close_grace": "200ms"},
        )
    )
    socks = await _ws_clients(proxy, 5)
    await proxy.admin("POST", "/switch", {"color": "green"})
    await asyncio.sleep(0.5)
    code, status = await proxy.admin("POST", "/rollback", {})
    assert code == 200 and status["active"] == "blue"
    for ws in socks:
        # Nothing arrives past the whole window plus grace; the socket still works.
        try:
            msg = await ws.receive(timeout=1.5)
            raise AssertionError(f"unexpected {msg}")
        except TimeoutError:
            pass
        await ws.send_str("still")
        assert (await ws.receive_str(timeout=2)) == "blue:still"
        await ws.close()


async def test_websocket_client_half_close_releases_both_legs(proxy: Proxy) -> None:
    """A client that sends FIN without a close frame must not leave a half-open tunnel."""
    host, port = proxy.run.proxy_address
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(
        b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 2)
    assert head.startswith(b"HTTP/1.1 101")
    assert (await _status(proxy))["colors"]["blue"]["websockets"] == 1
    writer.write_eof()
    async with asyncio.timeout(2):
        rest = await reader.read()  # the proxy closes its side
    writer.close()
    assert rest == b"" or rest[:1] == b"\x88"  # nothing, or a close frame
    for _ in range(200):
        if (await _status(proxy))["colors"]["blue"]["websockets"] == 0:
            break
        await asyncio.sleep(0.01)
    assert (await _status(proxy))["colors"]["blue"]["websockets"] == 0
