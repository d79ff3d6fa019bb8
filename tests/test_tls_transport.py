"""The HTTPS listener's transport (OpenSSL on the socket, proxy/tlsfd.py) under load:
what a client sees when the socket, not the proxy, sets the pace.

- A client that reads a large response slowly gets every byte, in order: the writes
  the socket cannot take are queued whole, and the upstream is paused meanwhile.
- An upload larger than a TLS record arrives whole, record after record.
- Many keep-alive requests on one connection, and a new connection per request, all
  answered.
- Handshakes share one deadline timer, yet each stalled one gets its whole
  ``tls.handshake_timeout``: not cut short by an older one's deadline, not kept past
  its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from pathlib import Path

import pytest
from test_tls import tls_connection, tls_proxy
from tlskit import TestCA

from conftest import StartProxy, Upstream, read_response

BLOCK = bytes(range(256)) * 256  # what the test upstream's /big repeats


@pytest.fixture
def ca(tmp_path: Path) -> TestCA:
    return TestCA(tmp_path)


async def test_a_slow_reader_gets_a_large_response_whole(
    upstreams: dict[str, Upstream], start_proxy: StartProxy, ca: TestCA
) -> None:
    proxy = await tls_proxy(start_proxy, upstreams, ca.issue("shop.example.com"))
    size = 24 * 1024 * 1024  # more than the socket buffers hold
    async with tls_connection(proxy, ca, "shop.example.com") as (reader, writer):
        writer.write(f"GET /big?size={size} HTTP/1.1\r\nHost: shop.example.com\r\n\r\n".encode())
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 200 ")
        await asyncio.sleep(0.5)  # let the socket buffers fill: the proxy must queue
        got = bytearray()
        deadline = time.monotonic() + 30
        while len(got) < size and time.monotonic() < deadline:
            got += await asyncio.wait_for(reader.read(min(65536, size - len(got))), 10)
            if len(got) < size // 2:
                await asyncio.sleep(0.001)  # slower than the proxy writes, for a while
        assert len(got) == size
        assert got == (BLOCK * (size // len(BLOCK) + 1))[:size]


async def test_an_upload_larger_than_a_tls_record_arrives_whole(
    upstreams: dict[str, Upstream], start_proxy: StartProxy, ca: TestCA
) -> None:
    proxy = await tls_proxy(start_proxy, upstreams, ca.issue("shop.example.com"))
    body = bytes(range(251)) * 4177  # ~1 MiB, in many records
    async with tls_connection(proxy, ca, "shop.example.com") as (reader, writer):
        writer.write(
            b"POST /echo HTTP/1.1\r\nHost: shop.example.com\r\nContent-Length: %d\r\n\r\n"
            % len(body)
        )
        writer.write(body)
        resp = await read_response(reader, timeout=20)
        assert resp.status == 200
        assert json.loads(resp.body)["body_len"] == len(body)
    assert upstreams["blue"].behaviour.seen[-1]["body"] == body


async def test_keep_alive_and_new_connections_are_all_answered(
    upstreams: dict[str, Upstream], start_proxy: StartProxy, ca: TestCA
) -> None:
    proxy = await tls_proxy(start_proxy, upstreams, ca.issue("shop.example.com"))
    request = b"GET /k HTTP/1.1\r\nHost: shop.example.com\r\n\r\n"
    async with tls_connection(proxy, ca, "shop.example.com") as (reader, writer):
        for _ in range(200):
            writer.write(request)
            assert (await read_response(reader)).status == 200
    host, port = proxy.run.tls_address
    ctx = ca.client_context()
    for _ in range(30):  # a new connection, and a handshake, per request
        reader, writer = await asyncio.open_connection(
            host, port, ssl=ctx, server_hostname="shop.example.com"
        )
        writer.write(request[:-2] + b"Connection: close\r\n\r\n")
        resp = await read_response(reader)
        assert resp.status == 200
        assert await asyncio.wait_for(reader.read(), 5) == b""  # the proxy closed it
        writer.close()


async def test_each_stalled_handshake_gets_its_whole_timeout(
    upstreams: dict[str, Upstream], start_proxy: StartProxy, ca: TestCA
) -> None:
    proxy = await tls_proxy(
        start_proxy, upstreams, ca.issue("shop.example.com"), handshake_timeout="1s"
    )
    host, port = proxy.run.tls_address
    request = b"GET /k HTTP/1.1\r\nHost: shop.example.com\r\nConnection: close\r\n\r\n"

    async def stall() -> float:  # half a ClientHello, then nothing
        reader, writer = await asyncio.open_connection(host, port)
        started = time.monotonic()
        writer.write(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")
        with contextlib.suppress(ConnectionError):
            await asyncio.wait_for(reader.read(), 5)
        writer.close()
        return time.monotonic() - started

    first = asyncio.create_task(stall())
    # A handshake that completes while the first one waits, then a second stall that
    # starts well after the first: the timer armed for the first must not close it.
    async with tls_connection(proxy, ca, "shop.example.com") as (reader, writer):
        writer.write(request)
        assert (await read_response(reader)).status == 200
    await asyncio.sleep(0.5)  # the scenario's spacing, not a wait for readiness
    second = await stall()
    assert 0.9 < await first < 2.5
    assert 0.9 < second < 2.5
    assert proxy.run.server.edge.tls_listener.pending == 0
    assert proxy.run.server.edge.handshakes == {"ok": 1, "failed": 0, "timeout": 2}
