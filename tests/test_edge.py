"""The plain listener at the edge: the https redirect, ACME HTTP-01, the PROXY protocol.

Real sockets throughout: raw bytes where the wire matters (a PROXY header in the same
write as the ClientHello or the request), real TLS clients behind it.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from pathlib import Path
from typing import Any

import pytest
from tlskit import TestCA

from conftest import (
    Proxy,
    StartProxy,
    Upstream,
    config_dict,
    raw_connection,
    read_response,
    upstream_headers,
)
from proxy import proxyproto


@pytest.fixture
def ca(tmp_path: Path) -> TestCA:
    return TestCA(tmp_path)


async def edge_proxy(
    start_proxy: StartProxy, upstreams: dict[str, Upstream], ca: TestCA, **top: Any
) -> Proxy:
    leaf = ca.issue("shop.example.com")
    tls = {
        "listen": "127.0.0.1:0",
        "certificates": [{"cert": str(leaf.cert), "key": str(leaf.key)}],
        **top.pop("tls", {}),
    }
    cfg = config_dict([upstreams["blue"].url], [upstreams["green"].url], tls=tls, **top)
    return await start_proxy(cfg)


async def plain_request(proxy: Proxy, request: bytes) -> Any:
    async with raw_connection(proxy) as (reader, writer):
        writer.write(request)
        return await read_response(reader)


async def test_redirect_http_answers_308_to_https_except_acme_challenges(
    upstreams: dict[str, Upstream], start_proxy: StartProxy, ca: TestCA
) -> None:
    proxy = await edge_proxy(start_proxy, upstreams, ca, tls={"redirect_http": True})
    port = proxy.run.tls_address[1]
    # The fast path's request shape and llhttp's (a POST with a body) alike.
    for request in (
        b"GET /cart?item=3&x=%20 HTTP/1.1\r\nHost: shop.example.com:8080\r\n\r\n",
        b"POST /cart?item=3&x=%20 HTTP/1.1\r\nHost: shop.example.com\r\n"
        b"Content-Length: 2\r\n\r\nhi",
    ):
        resp = await plain_request(proxy, request)
        assert resp.status == 308
        assert resp.header("location") == f"https://shop.example.com:{port}/cart?item=3&x=%20"
    assert not upstreams["blue"].behaviour.seen  # nothing was proxied

    # ACME HTTP-01: a token bgproxy holds is answered from the store...
    certs = proxy.run.server.edge.certs
    certs.http01["tok-123"] = "tok-123.thumbprint"
    resp = await plain_request(
        proxy, b"GET /.well-known/acme-challenge/tok-123 HTTP/1.1\r\nHost: shop.example.com\r\n\r\n"
    )
    assert (resp.status, resp.body) == (200, b"tok-123.thumbprint")
    # ...and any other token goes to the app, not to https (an app may run its own ACME).
    resp = await plain_request(
        proxy, b"GET /.well-known/acme-challenge/other HTTP/1.1\r\nHost: shop.example.com\r\n\r\n"
    )
    assert resp.status == 200
    assert upstream_headers(resp.body)["host"] == "shop.example.com"
    assert upstreams["blue"].behaviour.seen[-1]["path"] == "/.well-known/acme-challenge/other"


async def test_redirect_to_the_default_https_port_names_no_port() -> None:
    from proxy.edge import redirect_location

    assert redirect_location(b"a.example:80", b"/x?y", 443) == b"https://a.example/x?y"
    assert redirect_location(b"[::1]:80", b"/", 8443) == b"https://[::1]:8443/"
    assert redirect_location(b"a.example", b"http://a.example/p", 443) == b"https://a.example/p"


async def test_without_redirect_the_plain_listener_proxies_as_before(
    upstreams: dict[str, Upstream], start_proxy: StartProxy, ca: TestCA
) -> None:
    proxy = await edge_proxy(start_proxy, upstreams, ca)
    resp = await plain_request(proxy, b"GET /a HTTP/1.1\r\nHost: shop.example.com\r\n\r\n")
    assert resp.status == 200
    assert upstream_headers(resp.body)["x-forwarded-proto"] == "http"


async def test_proxy_protocol_client_address_feeds_x_forwarded_for(
    upstreams: dict[str, Upstream], start_proxy: StartProxy, ca: TestCA
) -> None:
    proxy = await edge_proxy(
        start_proxy, upstreams, ca, proxy_protocol=True, trusted_proxies=["127.0.0.1"]
    )
    request = b"GET /who HTTP/1.1\r\nHost: shop.example.com\r\n\r\n"
    cases = {
        proxyproto.v1("203.0.113.7", 51000, "10.0.0.1", 80): "203.0.113.7",
        proxyproto.v1("2001:db8::7", 51000, "2001:db8::1", 80): "2001:db8::7",
        proxyproto.v2("198.51.100.9", 40000, "10.0.0.1", 80): "198.51.100.9",
        proxyproto.v2("", 0, "", 0, local=True): "127.0.0.1",  # LOCAL: the balancer itself
        b"PROXY UNKNOWN\r\n": "127.0.0.1",
    }
    for header, client in cases.items():
        # Header and request in one write: the request must not be lost behind it.
        resp = await plain_request(proxy, header + request)
        assert resp.status == 200, header
        assert upstream_headers(resp.body)["x-forwarded-for"] == client, header

    # The same over TLS: the header comes first, then the handshake.
    host, port = proxy.run.tls_address
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(proxyproto.v2("192.0.2.44", 1234, "10.0.0.1", 443))
    await writer.drain()
    await writer.start_tls(ca.client_context(), server_hostname="shop.example.com")
    writer.write(request)
    resp = await read_response(reader)
    assert upstream_headers(resp.body)["x-forwarded-for"] == "192.0.2.44"
    assert upstream_headers(resp.body)["x-forwarded-proto"] == "https"
    writer.close()


async def test_proxy_protocol_rejects_malformed_headers_without_a_response(
    upstreams: dict[str, Upstream], start_proxy: StartProxy, ca: TestCA
) -> None:
    proxy = await edge_proxy(
        start_proxy, upstreams, ca, proxy_protocol=True, trusted_proxies=["127.0.0.1"]
    )
    request = b"GET / HTTP/1.1\r\nHost: shop.example.com\r\n\r\n"
    for bad in (
        request,  # no header at all
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n",  # LF only
        b"PROXY TCP4 1.2.3.999 5.6.7.8 1 2\r\n",
        b"PROXY TCP6 1.2.3.4 5.6.7.8 1 2\r\n",  # family mismatch
        b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n",
        proxyproto.V2_SIGNATURE + b"\x31\x11\x00\x0c" + bytes(12),  # version 3
        b"PROXY " + b"x" * 120,  # too long for v1
    ):
        assert await closed_silently(proxy.run.proxy_address, bad + request), bad
    assert not upstreams["blue"].behaviour.seen


async def closed_silently(address: tuple[str, int], data: bytes, timeout: float = 5) -> bool:
    reader, writer = await asyncio.open_connection(*address)
    try:
        writer.write(data)
        async with asyncio.timeout(timeout):
            rest = await reader.read()
        return rest == b""
    except ConnectionResetError:
        return True
    finally:
        writer.close()


async def test_proxy_protocol_from_an_untrusted_peer_is_closed(
    upstreams: dict[str, Upstream], start_proxy: StartProxy, ca: TestCA
) -> None:
    proxy = await edge_proxy(
        start_proxy, upstreams, ca, proxy_protocol=True, trusted_proxies=["10.9.9.9"]
    )
    header = proxyproto.v1("203.0.113.7", 51000, "10.0.0.1", 80)
    request = b"GET / HTTP/1.1\r\nHost: shop.example.com\r\n\r\n"
    assert await closed_silently(proxy.run.proxy_address, header + request)
    assert await closed_silently(proxy.run.tls_address, header)
    assert not upstreams["blue"].behaviour.seen


async def test_proxy_protocol_header_that_never_completes_is_closed_in_time(
    upstreams: dict[str, Upstream], start_proxy: StartProxy, ca: TestCA
) -> None:
    proxy = await edge_proxy(
        start_proxy,
        upstreams,
        ca,
        proxy_protocol=True,
        trusted_proxies=["127.0.0.1"],
        tls={"handshake_timeout": "0.5s"},
        timeouts={"request_header": "0.5s"},
    )
    loop = asyncio.get_running_loop()
    for address in (proxy.run.proxy_address, proxy.run.tls_address):
        started = loop.time()
        assert await closed_silently(address, b"PROXY TCP4 1.2.3.4 ")
        assert loop.time() - started < 3
    edge = proxy.run.server.edge
    assert all(listener.pending == 0 for listener in edge.listeners)


async def test_proxy_protocol_is_a_config_error_without_trusted_proxies() -> None:
    from config import ConfigError, parse_config

    with pytest.raises(ConfigError, match="proxy_protocol: needs trusted_proxies"):
        parse_config(config_dict(["http://127.0.0.1:1"], ["http://127.0.0.1:2"],
                                 proxy_protocol=True))  # fmt: skip


async def test_proxy_header_and_client_hello_in_one_segment(
    upstreams: dict[str, Upstream], start_proxy: StartProxy, ca: TestCA
) -> None:
    """A balancer forwards the header and the client's first flight together: the
    ClientHello after the header must reach the TLS layer whole."""
    proxy = await edge_proxy(
        start_proxy, upstreams, ca, proxy_protocol=True, trusted_proxies=["127.0.0.1"]
    )
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ca.client_context().wrap_bio(incoming, outgoing, server_hostname="shop.example.com")
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    reader, writer = await asyncio.open_connection(*proxy.run.tls_address)
    writer.write(proxyproto.v1("198.51.100.20", 5555, "10.0.0.1", 443) + outgoing.read())
    async with asyncio.timeout(5):
        while True:
            incoming.write(await reader.read(65536))
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                writer.write(outgoing.read())
        tls.write(b"GET /one HTTP/1.1\r\nHost: shop.example.com\r\nConnection: close\r\n\r\n")
        writer.write(outgoing.read())
        plain = b""
        while not _whole_response(plain):  # the server waits for our close_notify: no EOF
            incoming.write(await reader.read(65536))
            with contextlib.suppress(ssl.SSLWantReadError):
                while data := tls.read(65536):
                    plain += data
    writer.close()
    head, _, body = plain.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert upstream_headers(body)["x-forwarded-for"] == "198.51.100.20"


def _whole_response(data: bytes) -> bool:
    head, sep, body = data.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return bool(sep) and len(body) >= int(line.split(b":")[1])
    return False
