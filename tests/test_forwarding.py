"""The data plane over real sockets: routing, header rewriting, errors, streaming, HTTP/1.1."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import pytest
from aiohttp import web

from conftest import (
    Proxy,
    StartProxy,
    Upstream,
    config_dict,
    dead_address,
    raw_connection,
    raw_exchange,
    read_response,
    upstream_headers,
)

StartApp = Callable[[web.Application], Awaitable[str]]


def cfg(ups: dict[str, Upstream], **sections: object) -> dict[str, object]:
    return config_dict([ups["blue"].url], [ups["green"].url], **sections)


async def get(
    proxy: Proxy, path: str = "/", **kw: object
) -> tuple[int, str, aiohttp.typedefs.LooseHeaders]:
    async with proxy.session.get(proxy.url + path, **kw) as resp:  # type: ignore[arg-type]
        return resp.status, await resp.text(), resp.headers.copy()


# --- routing and the served-color header ------------------------------------------------------


async def test_active_color_serves_and_is_named(
    proxy: Proxy, upstreams: dict[str, Upstream]
) -> None:
    status, body, headers = await get(proxy, "/a?q=1")
    assert status == 200
    assert headers["X-Bg-Color"] == "blue"
    assert json.loads(body)["color"] == "blue"
    assert json.loads(body)["path"] == "/a?q=1"
    assert len(upstreams["blue"].behaviour.seen) == 1
    assert upstreams["green"].behaviour.seen == []

    code, _ = await proxy.admin("POST", "/switch", {"color": "green"})
    assert code == 200
    status, body, headers = await get(proxy, "/b")
    assert (status, headers["X-Bg-Color"], json.loads(body)["color"]) == (200, "green", "green")


async def test_response_header_null_hides_the_color(
    upstreams: dict[str, Upstream], start_proxy: StartProxy
) -> None:
    proxy = await start_proxy(cfg(upstreams, routing={"response_header": None}))
    status, body, headers = await get(proxy)
    assert status == 200 and json.loads(body)["color"] == "blue"
    assert "X-Bg-Color" not in headers


# --- overrides ---------------------------------------------------------------------------------


async def test_override_header_routes_and_is_stripped(proxy: Proxy) -> None:
    status, body, headers = await get(proxy, "/qa", headers={"X-Bg-Color": "green"})
    assert status == 200
    assert headers["X-Bg-Color"] == "green"
    assert json.loads(body)["color"] == "green"
    assert "x-bg-color" not in upstream_headers(body)


async def test_override_header_is_case_insensitive(proxy: Proxy) -> None:
    status, body, _ = await get(proxy, headers={"x-bg-color": "GREEN"})
    assert status == 200 and json.loads(body)["color"] == "green"


async def test_override_cookie_routes_stripped_other_cookies_kept(proxy: Proxy) -> None:
    status, body, headers = await get(
        proxy, "/qa", headers={"Cookie": "a=1; bg_color=green; session=xyz"}
    )
    assert status == 200
    assert headers["X-Bg-Color"] == "green"
    seen = upstream_headers(body)
    assert "bg_color" not in seen.get("cookie", "")
    cookies = {p.strip() for p in seen["cookie"].split(";")}
    assert cookies == {"a=1", "session=xyz"}


async def test_override_cookie_alone_leaves_no_cookie_header(proxy: Proxy) -> None:
    status, body, _ = await get(proxy, headers={"Cookie": "bg_color=green"})
    assert status == 200 and json.loads(body)["color"] == "green"
    assert "bg_color" not in json.dumps(upstream_headers(body))


async def test_override_header_wins_over_cookie(proxy: Proxy) -> None:
    status, body, _ = await get(proxy, headers={"X-Bg-Color": "blue", "Cookie": "bg_color=green"})
    assert status == 200 and json.loads(body)["color"] == "blue"
    assert "bg_color" not in json.dumps(upstream_headers(body))


@pytest.mark.parametrize(
    "headers",
    [
        {"X-Bg-Color": "purple-zq9xk"},
        {"Cookie": "bg_color=purple-zq9xk"},
    ],
    ids=["header", "cookie"],
)
async def test_invalid_override_is_400_without_echo(
    proxy: Proxy, upstreams: dict[str, Upstream], headers: dict[str, str]
) -> None:
    async with proxy.session.get(proxy.url + "/x", headers=headers) as resp:
        body = await resp.read()
        assert resp.status == 400
    assert len(body) < 200
    assert b"zq9xk" not in body and b"purple" not in body
    assert b"blue" in body and b"green" in body  # says which values are valid
    assert upstreams["blue"].behaviour.seen == [] and upstreams["green"].behaviour.seen == []


async def test_override_token_required_when_configured(
    upstreams: dict[str, Upstream], start_proxy: StartProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BG_QA_TOKEN", "qa-s3cret")
    proxy = await start_proxy(cfg(upstreams, routing={"override_token_env": "BG_QA_TOKEN"}))

    # No token: ignored (routes to active) and still stripped.
    status, body, headers = await get(proxy, headers={"X-Bg-Color": "green"})
    assert (status, json.loads(body)["color"], headers["X-Bg-Color"]) == (200, "blue", "blue")
    assert "x-bg-color" not in upstream_headers(body)

    # Wrong token: ignored too, and the token header is not forwarded.
    status, body, _ = await get(
        proxy, headers={"X-Bg-Color": "green", "X-Bg-Override-Token": "nope"}
    )
    assert (status, json.loads(body)["color"]) == (200, "blue")
    assert "x-bg-override-token" not in upstream_headers(body)

    # Cookie override without the token: ignored, stripped.
    status, body, _ = await get(proxy, headers={"Cookie": "bg_color=green; k=v"})
    assert (status, json.loads(body)["color"]) == (200, "blue")
    assert upstream_headers(body)["cookie"] == "k=v"

    # An invalid value is not honoured without the token, so no 400.
    status, body, _ = await get(proxy, headers={"X-Bg-Color": "purple"})
    assert (status, json.loads(body)["color"]) == (200, "blue")

    # The right token: honoured, and both headers stripped.
    status, body, headers = await get(
        proxy, headers={"X-Bg-Color": "green", "X-Bg-Override-Token": "qa-s3cret"}
    )
    assert (status, json.loads(body)["color"], headers["X-Bg-Color"]) == (200, "green", "green")
    seen = upstream_headers(body)
    assert "x-bg-color" not in seen and "x-bg-override-token" not in seen
    assert "qa-s3cret" not in body

    # With the right token an invalid value is a 400.
    status, _, _ = await get(
        proxy, headers={"X-Bg-Color": "purple", "X-Bg-Override-Token": "qa-s3cret"}
    )
    assert status == 400


# --- request headers: hop-by-hop and X-Forwarded-* ---------------------------------------------


async def test_hop_by_hop_request_headers_not_forwarded(
    proxy: Proxy, upstreams: dict[str, Upstream]
) -> None:
    request = (
        b"GET /hop HTTP/1.1\r\n"
        b"Host: example.test\r\n"
        b"X-Bar: before-connection\r\n"
        b"Connection: close, X-Foo, x-bar\r\n"
        b"X-Foo: secret-foo\r\n"
        b"Keep-Alive: timeout=5\r\n"
        b"TE: trailers\r\n"
        b"Trailer: X-Checksum\r\n"
        b"Proxy-Authorization: Basic c2VjcmV0\r\n"
        b"Proxy-Connection: keep-alive\r\n"
        b"Upgrade: foo/1\r\n"
        b"X-Keep: yes\r\n"
        b"\r\n"
    )
    async with raw_connection(proxy) as (reader, writer):
        writer.write(request)
        resp = await read_response(reader)
    assert resp.status == 200
    seen = {k.lower(): v for k, v in upstreams["blue"].behaviour.seen[-1]["headers"].items()}
    for name in (
        "x-foo",
        "x-bar",
        "keep-alive",
        "te",
        "trailer",
        "proxy-authorization",
        "proxy-connection",
        "upgrade",
    ):
        assert name not in seen, name
    assert "x-foo" not in seen.get("connection", "").lower()
    assert "upgrade" not in seen.get("connection", "").lower()
    assert seen["x-keep"] == "yes"
    assert seen["host"] == "example.test"


async def test_x_forwarded_headers_set_and_client_values_not_trusted(
    proxy: Proxy, upstreams: dict[str, Upstream]
) -> None:
    status, body, _ = await get(
        proxy,
        "/xff",
        headers={
            "Host": "shop.example:8443",
            "X-Forwarded-For": "6.6.6.6",
            "X-Forwarded-Proto": "https",
            "X-Forwarded-Host": "evil.example",
        },
    )
    assert status == 200
    seen = upstream_headers(body)
    assert seen["x-forwarded-for"] == "127.0.0.1"
    assert seen["x-forwarded-proto"] == "http"
    assert seen["x-forwarded-host"] == "shop.example:8443"
    assert seen["host"] == "shop.example:8443"
    raw = upstreams["blue"].behaviour.seen[-1]["headers"]
    assert "6.6.6.6" not in json.dumps(raw) and "evil.example" not in json.dumps(raw)


# --- response headers --------------------------------------------------------------------------


async def test_hop_by_hop_response_headers_removed(
    upstreams: dict[str, Upstream], start_proxy: StartProxy, start_app: StartApp
) -> None:
    async def handler(request: web.Request) -> web.Response:
        return web.Response(
            text="payload",
            headers={
                "Connection": "X-Secret",
                "X-Secret": "do-not-leak",
                "Keep-Alive": "timeout=99",
                "Proxy-Authenticate": "Basic realm=up",
                "X-Visible": "ok",
            },
        )

    app = web.Application()
    app.router.add_get("/{tail:.*}", handler)
    url = await start_app(app)
    proxy = await start_proxy(config_dict([url], [upstreams["green"].url]))
    async with raw_connection(proxy) as (reader, writer):
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        resp = await read_response(reader)
    assert resp.status == 200
    assert resp.body == b"payload"
    assert resp.header("x-visible") == "ok"
    assert resp.header("x-secret") is None
    assert resp.header("keep-alive") is None
    assert resp.header("proxy-authenticate") is None
    assert b"do-not-leak" not in resp.head
    assert all("x-secret" not in v.lower() for v in resp.all("connection"))


# --- upstream failures -------------------------------------------------------------------------


async def test_dead_upstream_is_502_fast(
    upstreams: dict[str, Upstream], start_proxy: StartProxy
) -> None:
    proxy = await start_proxy(config_dict([dead_address()], [upstreams["green"].url]))
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    async with proxy.session.get(proxy.url + "/x") as resp:
        body = await resp.read()
        assert resp.status == 502
        assert resp.headers["X-Bg-Color"] == "blue"
    assert loop.time() - t0 < 2.0
    assert 0 < len(body) < 200
    assert b"Error" not in body and b"errno" not in body.lower() and b"127.0.0.1" not in body


async def test_refused_target_retried_for_get_not_for_post(
    upstreams: dict[str, Upstream], start_proxy: StartProxy
) -> None:
    live = upstreams["blue"]
    # Passive health marking would take the refusing target out of rotation: keep it in.
    cfg = config_dict(
        [dead_address(), live.url],
        [upstreams["green"].url],
        health_check={"unhealthy_threshold": 1000},
    )
    proxy = await start_proxy(cfg)
    statuses = []
    for i in range(10):
        async with proxy.session.get(proxy.url + f"/g{i}") as resp:
            await resp.read()
            statuses.append(resp.status)
            assert resp.headers["X-Bg-Color"] == "blue"
    assert statuses == [200] * 10
    assert len(live.behaviour.seen) == 10

    post_statuses = []
    for i in range(10):
        async with proxy.session.post(proxy.url + f"/p{i}", data=b"x" * 10) as resp:
            await resp.read()
            post_statuses.append(resp.status)
    assert set(post_statuses) <= {200, 502}
    assert 502 in post_statuses, "a POST to the refusing target must not be retried"
    assert 200 in post_statuses
    posts_seen = [s for s in live.behaviour.seen if s["method"] == "POST"]
    assert len(posts_seen) == post_statuses.count(200)


async def test_slow_upstream_is_504_within_timeout(
    upstreams: dict[str, Upstream], start_proxy: StartProxy
) -> None:
    proxy = await start_proxy(cfg(upstreams, timeouts={"upstream_response": 0.3}))
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    async with proxy.session.get(proxy.url + "/slow?s=1") as resp:
        body = await resp.read()
        assert resp.status == 504
        assert resp.headers["X-Bg-Color"] == "blue"
    elapsed = loop.time() - t0
    assert 0.25 <= elapsed < 1.2
    assert len(body) < 200
    # A fast request still works afterwards.
    status, _, _ = await get(proxy, "/after")
    assert status == 200


# --- bodies and streaming ----------------------------------------------------------------------


async def test_large_body_streams_both_ways_intact(proxy: Proxy) -> None:
    payload = bytes(range(256)) * (8 * 1024 * 1024 // 256)
    payload = hashlib.sha256(b"seed").digest() + payload  # not block-aligned
    async with proxy.session.post(proxy.url + "/upload", data=io.BytesIO(payload)) as resp:
        assert resp.status == 200
        assert resp.headers["X-Bg-Color"] == "blue"
        digest = hashlib.sha256()
        total = 0
        async for chunk in resp.content.iter_any():
            digest.update(chunk)
            total += len(chunk)
    assert total == len(payload)
    assert digest.hexdigest() == hashlib.sha256(payload).hexdigest()


async def test_large_download_intact(proxy: Proxy) -> None:
    size = 5 * 1024 * 1024 + 123
    async with proxy.session.get(proxy.url + f"/big?size={size}") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Length"] == str(size)
        body = await resp.read()
    block = bytes(range(256)) * 256
    expected = (block * (size // len(block) + 1))[:size]
    assert len(body) == size
    assert body == expected


async def test_chunked_request_body_arrives_intact(
    proxy: Proxy, upstreams: dict[str, Upstream]
) -> None:
    parts = [b"alpha-" * 1000, b"", b"beta", b"\r\n0\r\n\r\n", b"gamma" * 30000]

    async def gen() -> AsyncIterator[bytes]:
        for p in parts:
            if p:
                yield p

    async with proxy.session.post(proxy.url + "/upload", data=gen()) as resp:
        assert resp.status == 200
        body = await resp.read()
    assert body == b"".join(parts)

    async with proxy.session.post(proxy.url + "/echo", data=gen()) as resp:
        assert resp.status == 200
        echoed = await resp.json()
    assert echoed["body_len"] == len(b"".join(parts))
    assert upstreams["blue"].behaviour.seen[-1]["body"] == b"".join(parts)


async def test_sse_delivered_incrementally(proxy: Proxy) -> None:
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    events: list[tuple[float, bytes]] = []
    async with proxy.session.get(proxy.url + "/sse?n=3&gap=0.3") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        async for line in resp.content:
            if line.startswith(b"data:"):
                events.append((loop.time() - t0, line.strip()))
    assert [e for _, e in events] == [b"data: blue 0", b"data: blue 1", b"data: blue 2"]
    end = loop.time() - t0
    assert end >= 0.85
    assert events[0][0] < 0.4, f"first event came at {events[0][0]:.2f}s, stream end {end:.2f}s"
    assert events[1][0] < 0.75


# --- HTTP/1.x wire behaviour --------------------------------------------------------------------


async def test_head_then_get_on_one_connection(proxy: Proxy) -> None:
    async with raw_connection(proxy) as (reader, writer):
        writer.write(b"HEAD /first HTTP/1.1\r\nHost: x\r\n\r\n")
        head = await read_response(reader, head_only=True)
        assert head.status == 200
        assert head.header("x-bg-color") == "blue"
        writer.write(b"GET /second HTTP/1.1\r\nHost: x\r\n\r\n")
        resp = await read_response(reader)
    assert resp.status == 200
    data = json.loads(resp.body)
    assert (data["method"], data["path"]) == ("GET", "/second")


async def test_http10_without_host(proxy: Proxy) -> None:
    async with raw_connection(proxy) as (reader, writer):
        writer.write(b"GET /ten HTTP/1.0\r\n\r\n")
        resp = await read_response(reader)
        assert await asyncio.wait_for(reader.read(), 2) == b""  # 1.0 without keep-alive: closed
    assert resp.status == 200
    data = json.loads(resp.body)
    assert (data["color"], data["path"]) == ("blue", "/ten")


async def test_pipelined_requests_answered_in_order(proxy: Proxy) -> None:
    async with raw_connection(proxy) as (reader, writer):
        writer.write(
            b"GET /one HTTP/1.1\r\nHost: x\r\n\r\n"
            b"GET /two HTTP/1.1\r\nHost: x\r\nX-Bg-Color: green\r\n\r\n"
        )
        first = await read_response(reader)
        second = await read_response(reader)
    assert (first.status, json.loads(first.body)["path"]) == (200, "/one")
    assert (second.status, json.loads(second.body)["path"]) == (200, "/two")
    assert (first.header("x-bg-color"), second.header("x-bg-color")) == ("blue", "green")


@pytest.mark.parametrize(
    "middle",
    [
        b"GET /two HTTP/1.1\r\nHost: x\r\n\r\n",
        b"POST /two HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello",
    ],
    ids=["get", "post-with-body"],
)
async def test_three_pipelined_requests_answered_in_order(
    proxy: Proxy, upstreams: dict[str, Upstream], middle: bytes
) -> None:
    async with raw_connection(proxy) as (reader, writer):
        writer.write(
            b"GET /one HTTP/1.1\r\nHost: x\r\n\r\n"
            + middle
            + b"GET /three HTTP/1.1\r\nHost: x\r\n\r\n"
        )
        responses = [await read_response(reader, timeout=2) for _ in range(3)]
    assert [r.status for r in responses] == [200, 200, 200]
    assert [json.loads(r.body)["path"] for r in responses] == ["/one", "/two", "/three"]
    assert [json.loads(r.body)["body_len"] for r in responses] == [0, middle.count(b"hello") * 5, 0]


async def _read_until_close(reader: asyncio.StreamReader) -> bytes:
    out = b""
    while chunk := await reader.read(65536):
        out += chunk
    return out


async def test_slow_request_head_is_cut_off(
    upstreams: dict[str, Upstream], start_proxy: StartProxy
) -> None:
    proxy = await start_proxy(cfg(upstreams, timeouts={"request_header": 0.5}))
    loop = asyncio.get_running_loop()
    async with raw_connection(proxy) as (reader, writer):
        t0 = loop.time()
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n")
        data = await asyncio.wait_for(_read_until_close(reader), 3)
        elapsed = loop.time() - t0
    assert data == b"" or data.startswith(b"HTTP/1.1 408")
    assert 0.3 <= elapsed < 1.5
    assert upstreams["blue"].behaviour.seen == []


async def test_dripping_request_head_is_cut_off(
    upstreams: dict[str, Upstream], start_proxy: StartProxy
) -> None:
    """Slowloris: bytes keep trickling in, but the whole head must arrive in time."""
    proxy = await start_proxy(cfg(upstreams, timeouts={"request_header": 0.5}))
    loop = asyncio.get_running_loop()
    async with raw_connection(proxy) as (reader, writer):
        t0 = loop.time()
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n")

        async def drip() -> None:
            for i in range(40):
                writer.write(b"X-Drip-%d: y\r\n" % i)
                await asyncio.sleep(0.1)

        dripper = asyncio.create_task(drip())
        try:
            data = await asyncio.wait_for(_read_until_close(reader), 3)
        except ConnectionResetError:
            data = b""
        finally:
            dripper.cancel()
            with pytest.raises((asyncio.CancelledError, ConnectionResetError)):
                await dripper
        elapsed = loop.time() - t0
    assert data == b"" or data.startswith(b"HTTP/1.1 408")
    assert elapsed < 1.5


async def test_idle_keepalive_connection_closed(
    upstreams: dict[str, Upstream], start_proxy: StartProxy
) -> None:
    proxy = await start_proxy(cfg(upstreams, timeouts={"idle": 0.5}))
    loop = asyncio.get_running_loop()
    async with raw_connection(proxy) as (reader, writer):
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        resp = await read_response(reader)
        assert resp.status == 200
        assert resp.header("connection") != "close"
        t0 = loop.time()
        rest = await asyncio.wait_for(reader.read(), 3)
        elapsed = loop.time() - t0
    assert rest == b""
    assert 0.3 <= elapsed < 1.5


async def test_oversized_request_head_is_431(
    upstreams: dict[str, Upstream], start_proxy: StartProxy
) -> None:
    proxy = await start_proxy(cfg(upstreams, limits={"max_header_bytes": 4096}))
    async with raw_connection(proxy) as (reader, writer):
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 8192 + b"\r\n\r\n")
        resp = await read_response(reader)
    assert resp.status == 431
    assert upstreams["blue"].behaviour.seen == []


async def test_default_head_limit_431_and_too_many_fields_431(
    proxy: Proxy, upstreams: dict[str, Upstream]
) -> None:
    async with raw_connection(proxy) as (reader, writer):
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 40_000 + b"\r\n\r\n")
        assert (await read_response(reader)).status == 431
    many = b"".join(b"X-H%d: v\r\n" % i for i in range(120))
    async with raw_connection(proxy) as (reader, writer):
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n" + many + b"\r\n")
        assert (await read_response(reader)).status == 431
    assert upstreams["blue"].behaviour.seen == []


async def test_expect_100_continue(proxy: Proxy, upstreams: dict[str, Upstream]) -> None:
    async with raw_connection(proxy) as (reader, writer):
        writer.write(
            b"POST /expect HTTP/1.1\r\nHost: x\r\nContent-Length: 11\r\n"
            b"Expect: 100-continue\r\n\r\n"
        )
        interim = await read_response(reader, timeout=3)
        assert interim.status == 100
        writer.write(b"hello world")
        resp = await read_response(reader)
    assert resp.status == 200
    assert json.loads(resp.body)["body_len"] == 11
    assert upstreams["blue"].behaviour.seen[-1]["body"] == b"hello world"


async def test_client_connection_close_still_reuses_the_upstream_connection(
    start_proxy: StartProxy,
) -> None:
    """New client connection per request (Connection: close) must not cost a new upstream
    connection per request too."""
    accepted = 0  # connections that carried proxied requests (health checks aside)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal accepted
        counted = False
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, ConnectionError):
                break
            if not counted and not head.startswith(b"GET /health"):
                counted = True
                accepted += 1
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    try:
        proxy = await start_proxy(config_dict([url], [url], health_check={"interval": "1h"}))
        host, port = proxy.run.proxy_address
        for _ in range(20):
            reply = await raw_exchange(
                host, port, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
            )
            assert reply.startswith(b"HTTP/1.1 200") and reply.endswith(b"ok")
        assert accepted == 1
    finally:
        server.close()
        await server.wait_closed()
