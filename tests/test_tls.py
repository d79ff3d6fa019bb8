"""The HTTPS listener: real TLS clients against the real proxy, certificates from a test CA.

What a client sees: the certificate chosen by SNI, the TLS version and ALPN, the
forwarded scheme, WebSockets over wss, handshakes that fail or stall closed in time,
certificates swapped by a reload without dropping an open connection, and the status,
metrics and ``bgproxy check`` output that describe them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import ssl
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from tlskit import Leaf, TestCA, served_serial

from admin.runner import reload_config
from conftest import (
    Proxy,
    RawResponse,
    StartProxy,
    Upstream,
    config_dict,
    read_response,
    upstream_headers,
)
from proxy.clienthello import NeedMore, alpn_offer


@pytest.fixture
def ca(tmp_path: Path) -> TestCA:
    return TestCA(tmp_path)


def tls_section(*leaves: Leaf, **extra: Any) -> dict[str, Any]:
    return {
        "listen": "127.0.0.1:0",
        "certificates": [{"cert": str(leaf.cert), "key": str(leaf.key)} for leaf in leaves],
        **extra,
    }


async def tls_proxy(
    start_proxy: StartProxy, upstreams: dict[str, Upstream], *leaves: Leaf, **extra: Any
) -> Proxy:
    cfg = config_dict(
        [upstreams["blue"].url], [upstreams["green"].url], tls=tls_section(*leaves, **extra)
    )
    return await start_proxy(cfg)


@contextlib.asynccontextmanager
async def tls_connection(
    proxy: Proxy, ca: TestCA, name: str | None, ctx: ssl.SSLContext | None = None
) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    host, port = proxy.run.tls_address
    if ctx is None:
        ctx = ca.client_context()
    if name is None:
        ctx.check_hostname = False
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection(host, port, ssl=ctx, server_hostname=name or ""), 5
    )
    try:
        yield reader, writer
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


def served(writer: asyncio.StreamWriter) -> int:
    return served_serial(writer.get_extra_info("ssl_object").getpeercert(True))


async def get(
    writer: asyncio.StreamWriter, reader: asyncio.StreamReader, host: str, path: str = "/"
) -> RawResponse:
    writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    return await read_response(reader)


async def test_https_request_is_proxied_with_https_scheme_and_hsts(
    upstreams: dict[str, Upstream], start_proxy: StartProxy, ca: TestCA
) -> None:
    leaf = ca.issue("shop.example.com")
    proxy = await tls_proxy(start_proxy, upstreams, leaf, hsts="max-age=31536000")
    async with tls_connection(proxy, ca, "shop.example.com") as (reader, writer):
        ssl_object = writer.get_extra_info("ssl_object")
        assert ssl_object.selected_alpn_protocol() == "http/1.1"
        assert ssl_object.version() in ("TLSv1.2", "TLSv1.3")
        for _ in range(2):  # keep-alive: two requests on one TLS connection
            resp = await get(writer, reader, "shop.example.com", "/p?q=1")
            assert resp.status == 200
            seen = upstream_headers(resp.body)
            assert seen["x-forwarded-proto"] == "https"
            assert seen["x-forwarded-host"] == "shop.example.com"
            assert resp.header("strict-transport-security") == "max-age=31536000"
    # The plain listener, same routing: http, and no HSTS (RFC 6797 §7.2).
    status, body, headers = await proxy.get("/p")
    assert status == 200
    assert upstream_headers(body)["x-forwarded-proto"] == "http"
    assert "Strict-Transport-Security" not in headers


async def test_access_log_names_the_tls_version_and_server_name(
    upstreams: dict[str, Upstream], start_proxy: StartProxy, ca: TestCA, tmp_path: Path
) -> None:
    log_path = tmp_path / "access.log"
    cfg = config_dict(
        [upstreams["blue"].url], [upstreams["green"].url],
        tls=tls_section(ca.issue("shop.example.com")),
        access_log={"destination": str(log_path)},
    )  # fmt: skip
    proxy = await start_proxy(cfg)
    async with tls_connection(proxy, ca, "shop.example.com") as (reader, writer):
        version = writer.get_extra_info("ssl_object").version()
        assert (await get(writer, reader, "shop.example.com", "/tls")).status == 200
    assert (await proxy.get("/plain"))[0] == 200
    observer = proxy.run.observer
    assert observer is not None and observer.access is not None
    observer.access.flush()
    logged = {
        line["target"]: line
        for line in map(json.loads, log_path.read_bytes().splitlines())
        if "target" in line
    }
    assert (logged["/tls"]["tls"], logged["/tls"]["sni"]) == (version, "shop.example.com")
    assert (logged["/plain"]["tls"], logged["/plain"]["sni"]) == (None, None)


async def test_certificate_is_chosen_by_sni(
    upstreams: dict[str, Upstream], start_proxy: StartProxy, ca: TestCA
) -> None:
    default = ca.issue("default.example.org")
    wildcard = ca.issue("*.example.com")
    exact = ca.issue("shop.example.com")
    proxy = await tls_proxy(start_proxy, upstreams, default, wildcard, exact)
    expected = {
        "shop.example.com": exact.serial,  # exact beats the wildcard listed before it
        "SHOP.Example.COM": exact.serial,
        "api.example.com": wildcard.serial,
        "default.example.org": default.serial,
        "a.b.example.com": default.serial,  # a wildcard matches one label only
        "example.com": default.serial,
        "unknown.test": default.serial,
        None: default.serial,  # no SNI (a client connecting by address)
    }
    for name, serial in expected.items():
        ctx = ca.client_context()
        ctx.check_hostname = False  # the default certificate does not name these
        async with tls_connection(proxy, ca, name, ctx) as (_, writer):
            assert served(writer) == serial, name


async def test_min_version_13_refuses_a_tls12_client(
    upstreams: dict[str, Upstream], start_proxy: StartProxy, ca: TestCA
) -> None:
    leaf = ca.issue("shop.example.com")
    proxy = await tls_proxy(start_proxy, upstreams, leaf, min_version="1.3")
    old = ca.client_context()
    old.maximum_version = ssl.TLSVersion.TLSv1_2
    with pytest.raises((ssl.SSLError, ConnectionError)):
        async with tls_connection(proxy, ca, "shop.example.com", old):
            pass
    async with tls_connection(proxy, ca, "shop.example.com") as (reader, writer):
        assert writer.get_extra_info("ssl_object").version() == "TLSv1.3"
        assert (await get(writer, reader, "shop.example.com")).status == 200
    _, metrics, _ = await proxy_metrics(proxy)
    assert 'bgproxy_tls_handshakes_total{result="failed"} 1.0' in metrics
    assert 'bgproxy_tls_handshakes_total{result="ok"} 1.0' in metrics


async def proxy_metrics(proxy: Proxy) -> tuple[int, str, dict[str, str]]:
    async with proxy.session.get(proxy.admin_url + "/metrics") as resp:
        return resp.status, await resp.text(), dict(resp.headers)


async def test_stalled_and_garbage_handshakes_are_closed_in_time(
    upstreams: dict[str, Upstream], start_proxy: StartProxy, ca: TestCA
) -> None:
    leaf = ca.issue("shop.example.com")
    proxy = await tls_proxy(start_proxy, upstreams, leaf, handshake_timeout="0.5s")
    host, port = proxy.run.tls_address

    async def closed_after(payload: bytes) -> tuple[bytes, float]:
        reader, writer = await asyncio.open_connection(host, port)
        started = time.monotonic()
        writer.write(payload)
        try:
            async with asyncio.timeout(5):
                data = await reader.read()  # until the proxy closes
        except ConnectionResetError:
            data = b""
        writer.close()
        return data, time.monotonic() - started

    # A socket that never says anything, and a ClientHello cut short: the TLS slowloris.
    silent, waited = await closed_after(b"")
    assert silent == b"" and 0.3 < waited < 3
    hello_start = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"
    _, waited = await closed_after(hello_start)
    assert 0.3 < waited < 3
    # Garbage instead of a ClientHello, and plain HTTP on the TLS port: closed at once,
    # with no HTTP answer (nothing to say in a protocol the peer does not speak).
    for junk in (b"\x00" * 64, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"):
        data, waited = await closed_after(junk)
        assert b"HTTP/" not in data and waited < 0.4
    _, metrics, _ = await proxy_metrics(proxy)
    assert 'bgproxy_tls_handshakes_total{result="timeout"} 2.0' in metrics
    assert 'bgproxy_tls_handshakes_total{result="failed"} 2.0' in metrics
    # Nothing left behind: no half-made connection, no admission task.
    listener = proxy.run.server.edge.tls_listener
    assert listener.pending == 0 and not proxy.run.server.connections


async def test_wss_is_relayed_to_the_websocket_upstream(
    upstreams: dict[str, Upstream], start_proxy: StartProxy, ca: TestCA
) -> None:
    leaf = ca.issue("shop.example.com")
    proxy = await tls_proxy(start_proxy, upstreams, leaf)
    host, port = proxy.run.tls_address
    connector = aiohttp.TCPConnector(ssl=ca.client_context(), resolver=_Pinned(host))
    async with (
        aiohttp.ClientSession(connector=connector) as session,
        session.ws_connect(f"wss://shop.example.com:{port}/ws", protocols=("chat",)) as ws,
    ):
        await ws.send_str("hello")
        assert (await ws.receive(timeout=5)).data == "blue:hello"
        # Switch: the open wss session is handed off like a ws one (a reconnect message).
        status, _ = await proxy.admin("POST", "/switch", {"color": "green"})
        assert status == 200
        msg = await ws.receive(timeout=40)
        assert "reconnect" in str(msg.data)
    async with (
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(
            ssl=ca.client_context(), resolver=_Pinned(host))) as session,
        session.ws_connect(f"wss://shop.example.com:{port}/ws", protocols=("chat",)) as ws,
    ):  # fmt: skip
        await ws.send_str("again")
        assert (await ws.receive(timeout=5)).data == "green:again"


class _Pinned(aiohttp.abc.AbstractResolver):
    """Resolves every name to the proxy's address, so the client sends a real SNI name."""

    def __init__(self, host: str) -> None:
        self.host = host

    async def resolve(self, host: str, port: int = 0, family: int = 0) -> list[dict[str, Any]]:
        return [
            {"hostname": host, "host": self.host, "port": port, "family": 2, "proto": 0,
             "flags": 0}
        ]  # fmt: skip

    async def close(self) -> None:
        return None


async def test_reload_swaps_certificates_without_dropping_open_connections(
    upstreams: dict[str, Upstream],
    start_proxy: StartProxy,
    ca: TestCA,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    first = ca.issue("shop.example.com", file="served")
    cfg = config_dict([upstreams["blue"].url], [upstreams["green"].url], tls=tls_section(first))
    import yaml

    path = tmp_path / "bgproxy.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proxy = await start_proxy(cfg)
    async with tls_connection(proxy, ca, "shop.example.com") as (reader, writer):
        assert served(writer) == first.serial
        # Renewed in place (same file names, as certbot or cert-manager do), then SIGHUP.
        second = ca.issue("shop.example.com", file="served")
        assert reload_config(proxy.run, str(path))
        async with tls_connection(proxy, ca, "shop.example.com") as (r2, w2):
            assert served(w2) == second.serial
            assert (await get(w2, r2, "shop.example.com")).status == 200
        # The connection opened before the reload still serves requests.
        assert (await get(writer, reader, "shop.example.com")).status == 200

        # A bad file: the reload is refused, logged, and the certificate in use stays.
        spoil(second.key)
        with caplog.at_level(logging.ERROR):
            assert not reload_config(proxy.run, str(path))
        assert "tls.certificates[0].key" in caplog.text
        async with tls_connection(proxy, ca, "shop.example.com") as (r3, w3):
            assert served(w3) == second.serial
            assert (await get(w3, r3, "shop.example.com")).status == 200
        assert (await get(writer, reader, "shop.example.com")).status == 200


def spoil(path: Path) -> None:
    path.write_text("not a key\n")


async def test_installed_certificate_is_served_at_once(
    upstreams: dict[str, Upstream], start_proxy: StartProxy, ca: TestCA
) -> None:
    """The seam ACME uses: install() serves a new certificate from the next handshake."""
    leaf = ca.issue("shop.example.com")
    proxy = await tls_proxy(start_proxy, upstreams, leaf)
    acme = ca.issue("new.example.net")
    certs = proxy.run.server.edge.certs
    certs.install(["new.example.net"], acme.cert_pem, acme.key_pem, source="acme")
    async with tls_connection(proxy, ca, "new.example.net") as (reader, writer):
        assert served(writer) == acme.serial
        assert (await get(writer, reader, "new.example.net")).status == 200
    status, body = await proxy.admin("GET", "/status")
    assert status == 200
    sources = {c["names"][0]: c["source"] for c in body["tls"]["certificates"]}
    assert sources == {"shop.example.com": "file", "new.example.net": "acme"}
    with pytest.raises(ValueError, match="does not match"):
        certs.install(["x.example.net"], acme.cert_pem, leaf.key_pem)


async def test_status_and_metrics_describe_the_certificates(
    upstreams: dict[str, Upstream], start_proxy: StartProxy, ca: TestCA
) -> None:
    a = ca.issue("shop.example.com", "www.shop.example.com", days=30)
    b = ca.issue("*.example.com", days=60)
    proxy = await tls_proxy(start_proxy, upstreams, a, b)
    status, body = await proxy.admin("GET", "/status")
    assert status == 200
    certs = body["tls"]["certificates"]
    assert [c["names"] for c in certs] == [["shop.example.com", "www.shop.example.com"],
                                           ["*.example.com"]]  # fmt: skip
    assert certs[0]["file"] == str(a.cert) and certs[0]["source"] == "file"
    assert certs[0]["not_after"].startswith(
        time.strftime("%Y-%m-%d", time.gmtime(time.time() + 30 * 86400))
    )
    _, metrics, _ = await proxy_metrics(proxy)
    lines = [
        line
        for line in metrics.splitlines()
        if line.startswith("bgproxy_tls_certificate_expiry_timestamp_seconds{")
    ]
    assert len(lines) == 3
    expiry = {line.split('"')[1]: float(line.split()[-1]) for line in lines}
    assert abs(expiry["*.example.com"] - (time.time() + 60 * 86400)) < 3600


async def test_a_tls_alpn_01_challenge_certificate_is_served_while_set(
    upstreams: dict[str, Upstream], start_proxy: StartProxy, ca: TestCA
) -> None:
    """The seam ACME's TLS-ALPN-01 uses: a challenge certificate for a name, with ALPN
    acme-tls/1, served while set to clients offering acme-tls/1 only (RFC 8737 §3);
    the name's own certificate again once cleared."""
    leaf = ca.issue("shop.example.com")
    proxy = await tls_proxy(start_proxy, upstreams, leaf)
    challenge = ca.issue("shop.example.com", file="challenge")
    certs = proxy.run.server.edge.certs
    certs.set_challenge("shop.example.com", challenge.cert_pem, challenge.key_pem)
    ctx = ca.client_context(alpn=("acme-tls/1",))
    async with tls_connection(proxy, ca, "shop.example.com", ctx) as (_, writer):
        assert served(writer) == challenge.serial
        assert writer.get_extra_info("ssl_object").selected_alpn_protocol() == "acme-tls/1"
    # Meanwhile, everyone else asking for the name gets its real certificate and is served.
    for alpn in (("http/1.1",), (), ("h2", "http/1.1")):
        async with tls_connection(proxy, ca, "shop.example.com", ca.client_context(alpn)) as (
            reader,
            writer,
        ):
            assert served(writer) == leaf.serial
            assert (await get(writer, reader, "shop.example.com")).status == 200
    async with tls_connection(proxy, ca, "other.example.com", _unverified(ca)) as (_, writer):
        assert served(writer) == leaf.serial  # other names are not affected
    certs.clear_challenge("shop.example.com")
    async with tls_connection(proxy, ca, "shop.example.com") as (_, writer):
        assert served(writer) == leaf.serial


def _client_hello(alpn: tuple[str, ...], name: str = "shop.example.com") -> bytes:
    """The ClientHello a Python client sends (as a TLS record)."""
    ctx = ssl.create_default_context()
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    conn = ctx.wrap_bio(incoming, outgoing, server_hostname=name)
    with contextlib.suppress(ssl.SSLWantReadError):
        conn.do_handshake()
    return outgoing.read()


def test_the_alpn_offer_is_read_from_a_client_hello() -> None:
    hello = _client_hello(("acme-tls/1",))
    assert alpn_offer(hello) == ("acme-tls/1",)
    assert alpn_offer(_client_hello(("h2", "http/1.1"))) == ("h2", "http/1.1")
    assert alpn_offer(_client_hello(())) == ()
    # Split over two handshake records, as a client may send it.
    body = hello[5:]
    split = b"".join(
        b"\x16\x03\x01" + len(part).to_bytes(2, "big") + part for part in (body[:40], body[40:])
    )
    assert alpn_offer(split) == ("acme-tls/1",)
    with pytest.raises(NeedMore) as more:
        alpn_offer(split[:50])
    assert more.value.want == len(split)
    with pytest.raises(NeedMore):
        alpn_offer(hello[:3])
    with pytest.raises(ValueError):
        alpn_offer(b"GET / HTTP/1.1\r\n\r\n")


async def test_a_client_hello_sent_in_pieces_still_reaches_the_challenge(
    upstreams: dict[str, Upstream], start_proxy: StartProxy, ca: TestCA
) -> None:
    """While a challenge is up, a ClientHello arriving byte by byte is waited for, not
    misread: acme-tls/1 gets the challenge, and the handshake completes."""
    leaf = ca.issue("shop.example.com")
    proxy = await tls_proxy(start_proxy, upstreams, leaf)
    challenge = ca.issue("shop.example.com", file="challenge")
    proxy.run.server.edge.certs.set_challenge(
        "shop.example.com", challenge.cert_pem, challenge.key_pem
    )
    ctx = ca.client_context(alpn=("acme-tls/1",))
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    conn = ctx.wrap_bio(incoming, outgoing, server_hostname="shop.example.com")
    with contextlib.suppress(ssl.SSLWantReadError):
        conn.do_handshake()
    hello = outgoing.read()
    reader, writer = await asyncio.open_connection(*proxy.run.tls_address)
    try:
        for piece in (hello[:3], hello[3:60], hello[60:]):
            writer.write(piece)
            await writer.drain()
            await asyncio.sleep(0.05)  # separate segments: the server sees a partial hello
        async with asyncio.timeout(5):
            while True:
                try:
                    conn.do_handshake()
                    break
                except ssl.SSLWantReadError:
                    if outgoing.pending:
                        writer.write(outgoing.read())
                    data = await reader.read(65536)
                    assert data, "the proxy closed the connection"
                    incoming.write(data)
        assert served_serial(conn.getpeercert(True)) == challenge.serial
        assert conn.selected_alpn_protocol() == "acme-tls/1"
    finally:
        writer.close()


def _unverified(ca: TestCA) -> ssl.SSLContext:
    ctx = ca.client_context()
    ctx.check_hostname = False
    return ctx


async def test_a_soak_of_bad_tls_clients_leaks_no_connection_task_or_descriptor(
    upstreams: dict[str, Upstream], start_proxy: StartProxy, ca: TestCA
) -> None:
    import os

    leaf = ca.issue("shop.example.com")
    cfg = config_dict(
        [upstreams["blue"].url],
        [upstreams["green"].url],
        tls=tls_section(leaf, handshake_timeout="2s"),
        # The soak loads the one test upstream hard: a slow health check there must not
        # turn into 503s here, which are no part of what is measured.
        health_check={"interval": "1h"},
    )
    proxy = await start_proxy(cfg)
    host, port = proxy.run.tls_address
    server = proxy.run.server

    def open_fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    async def garbage() -> None:
        _, writer = await asyncio.open_connection(host, port)
        writer.write(b"\x16\x03\x01\x00\x05hello" + b"\xff" * 64)
        await asyncio.sleep(0.05)
        writer.close()

    async def stall() -> None:  # half a ClientHello, then nothing: the deadline closes it
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")
        with contextlib.suppress(ConnectionError):
            await asyncio.wait_for(reader.read(), 10)
        writer.close()

    async def drop_mid_response() -> None:
        reader, writer = await asyncio.open_connection(
            host, port, ssl=_unverified(ca), server_hostname="unknown.test"
        )
        writer.write(b"GET /big?size=400000 HTTP/1.1\r\nHost: shop.example.com\r\n\r\n")
        await reader.readexactly(1000)
        writer.transport.abort()  # gone mid-stream, no close_notify

    async def unknown_name_request() -> None:
        async with tls_connection(proxy, ca, "unknown.test", _unverified(ca)) as (r, w):
            assert (await get(w, r, "shop.example.com")).status == 200

    # Warm up what is made once (TLS contexts, the upstream app), then measure.
    await unknown_name_request()
    server.cpool.close_idle()
    # The upstream app's side of that connection ends.
    await until(
        lambda: all("RequestHandler" not in repr(t.get_coro()) for t in asyncio.all_tasks())
    )
    baseline_fds = open_fds()
    baseline_tasks = len(asyncio.all_tasks())
    kinds = (garbage, drop_mid_response, unknown_name_request)
    semaphore = asyncio.Semaphore(20)

    async def one(i: int) -> None:
        async with semaphore:
            await kinds[i % len(kinds)]()

    # 200 stalled handshakes held open meanwhile, 600 others through a few at a time.
    await asyncio.gather(*(stall() for _ in range(200)), *(one(i) for i in range(600)))

    # The proxy's side closes what the clients dropped.
    await until(lambda: not server.connections and not server.edge.tls_listener.pending)
    handshakes = server.edge.handshakes
    assert handshakes["failed"] == 200  # the garbage, told apart from timeouts
    assert handshakes["timeout"] == 200  # the stalls
    assert handshakes["ok"] == 1 + 400
    # Idle pooled upstream connections are kept on purpose (2 descriptors and an
    # upstream task each here): close them, then nothing may be left over.
    server.cpool.close_idle()
    await until(lambda: len(asyncio.all_tasks()) <= baseline_tasks and open_fds() <= baseline_fds)


async def until(check: Callable[[], bool], timeout: float = 10.0) -> None:
    """Closing happens in the proxy's own time, with no event to wait on: look, bounded."""
    async with asyncio.timeout(timeout):
        while True:
            if check():
                return
            await asyncio.sleep(0.02)
