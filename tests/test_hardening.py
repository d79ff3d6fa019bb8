"""Edge hardening over real sockets: the bytes attackers send, and what must come out.

A recording upstream (a raw asyncio server parsing with llhttp, one parser per
connection) writes down every complete request the proxy forwards, so each wire-level
case can assert both the client's status and the exact requests that reached the
upstream: none smuggled, none lost. Misbehaving upstreams are raw servers scripted per
test; slow clients, header trust, a property test of the no-smuggling invariant and the
admin surface follow.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import itertools
import json
import logging
import re
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import httptools
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from config import parse_config
from conftest import Proxy, StartProxy, config_dict, dead_address, read_response

HC_PATH = b"/__hc"  # health checks land here; never recorded
BARRIER = b"/__barrier/"  # barrier requests; recorded apart
HOST = b"edge.test"


# --- a recording upstream -------------------------------------------------------------------


def lenient_parser(protocol: Any) -> httptools.HttpRequestParser:
    """llhttp as strict as the proxy's own request parser, no stricter (RFC 9112 allows
    white space before a chunk extension; HTTP/1.x is read as 1.1)."""
    parser = httptools.HttpRequestParser(protocol)
    parser.set_dangerous_leniencies(lenient_spaces_after_chunk_size=True, lenient_version=True)
    return parser


@dataclass(frozen=True)
class Seen:
    """One complete request as the upstream's strict parser saw it."""

    color: str
    method: bytes
    path: bytes
    headers: tuple[tuple[bytes, bytes], ...]  # names lowercased, wire order
    body: bytes

    def values(self, name: bytes) -> list[bytes]:
        return [v for n, v in self.headers if n == name]

    @property
    def key(self) -> tuple[bytes, bytes, bytes]:
        return self.method, self.path, self.body


class _RecordingProtocol(asyncio.Protocol):
    def __init__(self, rec: Recorder) -> None:
        self.rec = rec
        self.parser = lenient_parser(self)
        self.transport: asyncio.Transport | None = None
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._body: list[bytes] = []
        self._method: bytes | None = None  # a method llhttp does not know, read as PUT

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.rec.transports.add(self.transport)  # type: ignore[arg-type]
        self.rec.connections += 1
        self.rec.open += 1
        self.rec.changed()

    def connection_lost(self, exc: Exception | None) -> None:
        self.rec.transports.discard(self.transport)  # type: ignore[arg-type]
        self.rec.open -= 1
        self.rec.changed()

    def data_received(self, data: bytes) -> None:
        try:
            try:
                self.parser.feed_data(data)
            except httptools.HttpParserInvalidMethodError:
                # The proxy writes each request head whole and one request at a time, so
                # the message llhttp refused starts this read: read it under a stand-in.
                method, _, rest = data.partition(b" ")
                self.parser = lenient_parser(self)
                self._method = method
                self.parser.feed_data(b"PUT " + rest)
        except httptools.HttpParserUpgrade:
            # The request was recorded and answered (200, never 101): nothing more to parse.
            assert self.transport is not None
            self.transport.close()
        except httptools.HttpParserError as exc:
            self.rec.errors.append(f"{type(exc).__name__}: {exc} in {data[:300]!r}")
            self.rec.changed()
            assert self.transport is not None
            self.transport.close()

    def on_message_begin(self) -> None:
        self._url = b""
        self._headers = []
        self._body = []

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        if not self._url.startswith((HC_PATH, BARRIER)):
            self.rec.heads.append(self._url)
            self.rec.changed()

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        method = self._method or self.parser.get_method()
        self._method = None
        url = self._url
        seen = Seen(self.rec.color, method, url, tuple(self._headers), b"".join(self._body))
        self.rec.record(seen)
        body = b"ok " + url
        assert self.transport is not None
        self.transport.write(
            b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s"
            % (len(body), b"" if method == b"HEAD" else body)
        )


class Recorder:
    """A raw upstream that records every complete request and answers 200 + Content-Length.

    Recorders of one test share a ``journal`` so the order across colors is kept.
    """

    def __init__(self, color: str, journal: list[Seen]) -> None:
        self.color = color
        self.journal = journal
        self.heads: list[bytes] = []  # request targets whose head arrived (complete or not)
        self.errors: list[str] = []  # what the upstream's strict parser refused
        self.barriers: list[bytes] = []
        self.connections = 0
        self.open = 0
        self.transports: set[asyncio.Transport] = set()
        self.url = ""
        self._server: asyncio.Server | None = None
        self._event = asyncio.Event()

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _RecordingProtocol(self), "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for t in list(self.transports):
            t.abort()
        if self._server is not None:
            await self._server.wait_closed()

    @property
    def requests(self) -> list[Seen]:
        return [s for s in self.journal if s.color == self.color]

    def record(self, seen: Seen) -> None:
        if seen.path.startswith(BARRIER):
            self.barriers.append(seen.path)
        elif not seen.path.startswith(HC_PATH):
            self.journal.append(seen)
        self.changed()

    def changed(self) -> None:
        event, self._event = self._event, asyncio.Event()
        event.set()

    async def wait(self, predicate: Callable[[], bool], timeout: float = 3.0) -> None:
        """Until ``predicate()`` holds, woken by every change (no polling)."""
        async with asyncio.timeout(timeout):
            while not predicate():
                await self._event.wait()


@dataclass
class Edge:
    """A running proxy in front of two recording upstreams."""

    proxy: Proxy
    recs: dict[str, Recorder]
    journal: list[Seen]
    _barrier_n: int = 0

    @property
    def addr(self) -> tuple[str, int]:
        return self.proxy.run.proxy_address

    def heads(self) -> list[bytes]:
        return self.recs["blue"].heads + self.recs["green"].heads

    def errors(self) -> list[str]:
        return self.recs["blue"].errors + self.recs["green"].errors

    def clear(self) -> None:
        self.journal.clear()
        for rec in self.recs.values():
            rec.heads.clear()
            rec.errors.clear()

    async def barrier(self) -> None:
        """Wait until everything the proxy wrote upstream before now has been parsed.

        A fresh request per color must come back through the proxy: by then the recorders
        have read every byte the proxy had written to them earlier.
        """
        for color in ("blue", "green"):
            self._barrier_n += 1
            path = BARRIER + str(self._barrier_n).encode()
            req = b"GET %s HTTP/1.1\r\nHost: barrier\r\nX-Bg-Color: %s\r\nConnection: close\r\n\r\n"
            got = await exchange(self.addr, req % (path, color.encode()))
            responses = parse_responses(got.data)
            assert [r.status for r in responses] == [200], f"barrier failed: {got.data!r}"
            assert responses[0].body == b"ok " + path, "barrier answered by the wrong request"


@pytest.fixture
async def recorders() -> AsyncIterator[dict[str, Recorder]]:
    journal: list[Seen] = []
    recs = {"blue": Recorder("blue", journal), "green": Recorder("green", journal)}
    for rec in recs.values():
        await rec.start()
    yield recs
    for rec in recs.values():
        await rec.close()


def edge_config(recs: dict[str, Recorder], **sections: Any) -> dict[str, Any]:
    sections.setdefault("health_check", {"path": HC_PATH.decode(), "interval": 3600})
    return config_dict([recs["blue"].url], [recs["green"].url], **sections)


async def make_edge(recs: dict[str, Recorder], start_proxy: StartProxy, **sections: Any) -> Edge:
    proxy = await start_proxy(edge_config(recs, **sections))
    return Edge(proxy, recs, recs["blue"].journal)


# --- raw client helpers ---------------------------------------------------------------------


@dataclass
class Got:
    data: bytes
    closed: bool  # the proxy ended the connection (EOF or reset) within the bound
    reset: bool
    elapsed: float


async def exchange(
    addr: tuple[str, int],
    *parts: bytes,
    timeout: float = 3.0,
    half_close: bool = False,
    pauses: list[float] | None = None,
) -> Got:
    """Write ``parts`` (pausing between them if asked), then read until the proxy closes."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    reader, writer = await asyncio.wait_for(asyncio.open_connection(*addr), timeout)
    chunks: list[bytes] = []
    closed = reset = False
    try:
        async with asyncio.timeout(timeout):
            try:
                for i, part in enumerate(parts):
                    writer.write(part)
                    await writer.drain()
                    if pauses and pauses[i]:
                        await asyncio.sleep(pauses[i])  # a slow client, not a wait on state
                if half_close and writer.can_write_eof():
                    writer.write_eof()
            except OSError:
                pass  # the proxy closed on us mid-write: read what it said
            try:
                while True:
                    chunk = await reader.read(65536)
                    if not chunk:
                        closed = True
                        break
                    chunks.append(chunk)
            except ConnectionError:
                closed = reset = True
    except TimeoutError:
        pass
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()
    return Got(b"".join(chunks), closed, reset, loop.time() - start)


@dataclass
class Resp:
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes

    def header(self, name: bytes) -> bytes | None:
        for n, v in self.headers:
            if n == name:
                return v
        return None


def parse_responses(data: bytes) -> list[Resp]:
    """Every complete response in ``data`` (llhttp, strict); trailing garbage fails."""
    out: list[Resp] = []

    class Cb:
        def __init__(self) -> None:
            self.headers: list[tuple[bytes, bytes]] = []
            self.body: list[bytes] = []

        def on_message_begin(self) -> None:
            self.headers, self.body = [], []

        def on_header(self, name: bytes, value: bytes) -> None:
            self.headers.append((name.lower(), value))

        def on_body(self, body: bytes) -> None:
            self.body.append(body)

        def on_message_complete(self) -> None:
            out.append(Resp(parser.get_status_code(), self.headers, b"".join(self.body)))

    parser = httptools.HttpResponseParser(Cb())
    parser.feed_data(data)
    return out


def req(
    target: bytes = b"/",
    method: bytes = b"GET",
    *headers: bytes,
    body: bytes = b"",
    host: bytes | None = HOST,
    version: bytes = b"HTTP/1.1",
) -> bytes:
    lines = [b"%s %s %s\r\n" % (method, target, version)]
    if host is not None:
        lines.append(b"Host: %s\r\n" % host)
    lines.extend(h + b"\r\n" for h in headers)
    return b"".join(lines) + b"\r\n" + body


# --- 1. the raw-byte table ------------------------------------------------------------------


@dataclass(frozen=True)
class Want:
    """A request the upstream must have recorded, in this order."""

    color: str
    method: bytes
    path: bytes
    body: bytes = b""
    headers: tuple[tuple[bytes, bytes], ...] = ()  # (name, the only value it may have)
    absent: tuple[bytes, ...] = ()


@dataclass(frozen=True)
class Case:
    id: str
    data: bytes
    statuses: tuple[int | frozenset[int], ...]  # the responses, in order
    want: tuple[Want, ...] = ()


def _e(*codes: int) -> frozenset[int]:
    return frozenset(codes)


SMUGGLED = b"GET /smuggled HTTP/1.1\r\nHost: edge.test\r\n\r\n"
WS = (b"Upgrade: websocket", b"Connection: Upgrade", b"Sec-WebSocket-Version: 13")
WS_KEY = b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ=="
BAD_VERSION = _e(400, 505)

CASES = [
    # request smuggling: framing the proxy and an upstream could read differently
    Case(
        "cl-and-te",
        req(b"/s", b"POST", b"Content-Length: 4", b"Transfer-Encoding: chunked")
        + b"0\r\n\r\n"
        + SMUGGLED,
        (400,),
    ),
    Case(
        "te-and-cl",
        req(b"/s", b"POST", b"Transfer-Encoding: chunked", b"Content-Length: 48")
        + b"0\r\n\r\n"
        + SMUGGLED,
        (400,),
    ),
    Case(
        "te-xchunked",
        req(b"/s", b"POST", b"Transfer-Encoding: xchunked") + b"0\r\n\r\n" + SMUGGLED,
        (400,),
    ),
    Case(
        "te-chunked-chunked",
        req(b"/s", b"POST", b"Transfer-Encoding: chunked, chunked") + b"0\r\n\r\n" + SMUGGLED,
        (400,),
    ),
    Case(
        "te-two-fields-chunked-identity",
        req(b"/s", b"POST", b"Transfer-Encoding: chunked", b"Transfer-Encoding: identity")
        + b"0\r\n\r\n",
        (400,),
    ),
    Case(
        "te-gzip-alone", req(b"/s", b"POST", b"Transfer-Encoding: gzip") + b"abc", (_e(400, 501),)
    ),
    Case(
        "te-space-before-colon",
        req(b"/s", b"POST", b"Transfer-Encoding : chunked", b"Content-Length: 5") + b"0\r\n\r\n",
        (400,),
    ),
    Case("cl-space-before-colon", req(b"/s", b"POST", b"Content-Length : 3") + b"abc", (400,)),
    Case("cl-tab-before-colon", req(b"/s", b"POST", b"Content-Length\t: 3") + b"abc", (400,)),
    Case(
        "te-vertical-tab",
        req(b"/s", b"POST", b"Transfer-Encoding:\x0bchunked") + b"0\r\n\r\n" + SMUGGLED,
        (400,),
    ),
    Case("vertical-tab-in-value", req(b"/s", b"GET", b"X-A: a\x0bb"), (400,)),
    Case(
        "te-obs-fold",
        req(b"/s", b"POST", b"Transfer-Encoding:\r\n chunked") + b"0\r\n\r\n" + SMUGGLED,
        (400,),
    ),
    Case("obs-fold", req(b"/s", b"GET", b"X-Folded: a\r\n b"), (400,)),
    Case("cl-plus", req(b"/s", b"POST", b"Content-Length: +3") + b"abc", (400,)),
    Case("cl-list", req(b"/s", b"POST", b"Content-Length: 3, 3") + b"abc", (400,)),
    Case(
        "cl-duplicate",
        req(b"/s", b"POST", b"Content-Length: 3", b"Content-Length: 3") + b"abc",
        (400,),
    ),
    Case(
        "cl-duplicate-differing",
        req(b"/s", b"POST", b"Content-Length: 3", b"Content-Length: 48") + b"abc" + SMUGGLED,
        (400,),
    ),
    Case("cl-negative", req(b"/s", b"POST", b"Content-Length: -1") + b"abc", (400,)),
    Case("cl-hex", req(b"/s", b"POST", b"Content-Length: 0x3") + b"abc", (400,)),
    Case(
        "cl-huge",
        req(b"/s", b"POST", b"Content-Length: 99999999999999999999999") + b"abc",
        (_e(400, 413),),
    ),
    Case(
        "chunk-size-0x",
        req(b"/s", b"POST", b"Transfer-Encoding: chunked") + b"0x3\r\nabc\r\n0\r\n\r\n",
        (400,),
    ),
    Case(
        "chunk-size-overflow",
        req(b"/s", b"POST", b"Transfer-Encoding: chunked")
        + b"fffffffffffffffff1\r\nabc\r\n0\r\n\r\n",
        (400,),
    ),
    Case(
        "chunk-bare-lf",
        req(b"/s", b"POST", b"Transfer-Encoding: chunked") + b"3\nabc\n0\n\n" + SMUGGLED,
        (400,),
    ),
    # line endings and bytes that have no place in a head
    Case("bare-lf-everywhere", b"GET /s HTTP/1.1\nHost: edge.test\n\n", (400,)),
    Case("bare-lf-after-header", b"GET /s HTTP/1.1\r\nHost: edge.test\nX-A: b\r\n\r\n", (400,)),
    Case("bare-cr-in-value", req(b"/s", b"GET", b"X-A: b\rc"), (400,)),
    Case("nul-in-value", req(b"/s", b"GET", b"X-A: b\x00c"), (400,)),
    Case("ctl-0x01-in-value", req(b"/s", b"GET", b"X-A: b\x01c"), (400,)),
    Case("ctl-esc-in-value", req(b"/s", b"GET", b"X-A: b\x1bc"), (400,)),
    Case("del-in-value", req(b"/s", b"GET", b"X-A: b\x7fc"), (400,)),
    Case("nul-in-name", req(b"/s", b"GET", b"X-\x00A: b"), (400,)),
    Case("space-in-name", req(b"/s", b"GET", b"X A: b"), (400,)),
    Case("nul-in-target", b"GET /s\x00x HTTP/1.1\r\nHost: edge.test\r\n\r\n", (400,)),
    # versions and methods
    Case("http-0.9", b"GET /s\r\n\r\n", (BAD_VERSION,)),
    Case("http-2.0", req(b"/s", version=b"HTTP/2.0"), (BAD_VERSION,)),
    Case("http-3.0", req(b"/s", version=b"HTTP/3.0"), (BAD_VERSION,)),
    Case("lowercase-method", req(b"/s", b"get"), (_e(400, 501),)),
    Case("connect", req(b"edge.test:443", b"CONNECT"), (_e(400, 405, 501),)),
    # request target and Host
    Case("absolute-form-other-authority", req(b"http://evil.test/s"), (400,)),
    Case("absolute-form-userinfo", req(b"http://evil.test@edge.test/s"), (400,)),
    Case("absolute-form-other-scheme", req(b"ftp://edge.test/s"), (400,)),
    Case(
        "absolute-form-same-authority",
        req(b"http://edge.test/abs?q=1", b"GET", b"Connection: close"),
        (200,),
        (Want("blue", b"GET", b"/abs?q=1", headers=((b"host", HOST),)),),
    ),
    Case("duplicate-host", req(b"/s", b"GET", b"Host: evil.test"), (400,)),
    Case("duplicate-host-same-value", req(b"/s", b"GET", b"Host: edge.test"), (400,)),
    Case("missing-host-http11", req(b"/s", host=None), (400,)),
    # limits (the table's proxy: 4 KiB head, 20 fields, 1000-byte bodies)
    Case("head-over-limit", req(b"/s", b"GET", b"X-Big: " + b"a" * 5000), (431,)),
    Case(
        "too-many-fields",
        req(b"/s", b"GET", *(b"X-F%d: v" % i for i in range(25))),
        (431,),
    ),
    Case("target-over-limit", req(b"/" + b"a" * 5000), (_e(414, 431),)),
    Case("body-over-limit-content-length", req(b"/s", b"POST", b"Content-Length: 2000"), (413,)),
    Case(
        "body-over-limit-chunked",
        req(b"/s", b"POST", b"Transfer-Encoding: chunked") + b"7d1\r\n" + b"x" * 2001 + b"\r\n",
        (413,),
    ),
    # upgrades
    Case("websocket-without-key", req(b"/ws", b"GET", *WS), (400,)),
    Case("websocket-bad-key", req(b"/ws", b"GET", *WS, b"Sec-WebSocket-Key: short"), (400,)),
    Case("websocket-post", req(b"/ws", b"POST", *WS, WS_KEY, b"Content-Length: 0"), (400,)),
    Case(
        "h2c-stripped",
        req(
            b"/h2c",
            b"GET",
            b"Upgrade: h2c",
            b"Connection: Upgrade, HTTP2-Settings",
            b"HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA",
        ),
        (200,),
        (Want("blue", b"GET", b"/h2c", absent=(b"upgrade", b"http2-settings", b"connection")),),
    ),
    Case(
        "h2c-with-preface",
        req(
            b"/h2c",
            b"GET",
            b"Upgrade: h2c",
            b"Connection: Upgrade, HTTP2-Settings",
            b"HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA",
        )
        + b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
        + SMUGGLED,
        (200,),
        (Want("blue", b"GET", b"/h2c", absent=(b"upgrade", b"http2-settings")),),
    ),
    # Connection cannot strip what the proxy owns
    Case(
        "connection-names-protected-headers",
        req(
            b"/conn",
            b"POST",
            b"Content-Length: 3",
            b"X-Forwarded-For: 6.6.6.6",
            b"X-Bg-Color: green",
            b"Connection: close, X-Forwarded-For, Host, Content-Length, X-Bg-Color",
            body=b"abc",
        ),
        (200,),
        (
            Want(
                "green",
                b"POST",
                b"/conn",
                b"abc",
                headers=(
                    (b"host", HOST),
                    (b"content-length", b"3"),
                    (b"x-forwarded-for", b"127.0.0.1"),
                ),
                absent=(b"x-bg-color", b"connection"),
            ),
        ),
    ),
    # HTTP/1.1 conformance (issue 15): what RFC 9112 allows, nginx and HAProxy take,
    # and bgproxy once refused; and what it once forwarded but must refuse.
    # 1. a pipelined request with Connection: close is served; what follows is dropped
    Case(
        "pipelined-close-in-the-middle",
        req(b"/c1") + req(b"/c2", b"GET", b"Connection: close") + req(b"/c3"),
        (200, 200),
        (Want("blue", b"GET", b"/c1"), Want("blue", b"GET", b"/c2")),
    ),
    Case(
        "pipelined-two-then-garbage",
        req(b"/c1") + req(b"/c2") + b"\x00garbage\r\n\r\n",
        (200, 200, 400),
        (Want("blue", b"GET", b"/c1"), Want("blue", b"GET", b"/c2")),
    ),
    Case(
        "pipelined-close-first-then-more",
        req(b"/c1", b"GET", b"Connection: close") + req(b"/c2") + b"\x00garbage",
        (200,),
        (Want("blue", b"GET", b"/c1"),),
    ),
    Case(
        "pipelined-close-body-then-more",
        req(b"/c1")
        + req(b"/c2", b"POST", b"Connection: close", b"Content-Length: 3", body=b"abc")
        + req(b"/c3", b"POST", b"Content-Length: 3", body=b"xyz"),
        (200, 200),
        (Want("blue", b"GET", b"/c1"), Want("blue", b"POST", b"/c2", b"abc")),
    ),
    Case(
        "pipelined-http10-then-more",
        req(b"/c1") + req(b"/c2", version=b"HTTP/1.0") + req(b"/c3"),
        (200, 200),
        (Want("blue", b"GET", b"/c1"), Want("blue", b"GET", b"/c2")),
    ),
    # 2. transfer codings the proxy does not implement: 501 (RFC 9112 §6.1)
    Case(
        "te-gzip-chunked",
        req(b"/s", b"POST", b"Transfer-Encoding: gzip, chunked") + b"0\r\n\r\n",
        (501,),
    ),
    Case(
        "te-two-fields-unknown-then-chunked",
        req(b"/s", b"POST", b"Transfer-Encoding: x", b"Transfer-Encoding: chunked")
        + b"0\r\n\r\n",
        (501,),
    ),
    Case(
        "te-identity-chunked",
        req(b"/s", b"POST", b"Transfer-Encoding: identity, chunked") + b"0\r\n\r\n",
        (501,),
    ),
    Case(
        "te-empty-list-element",
        req(b"/te", b"POST", b"Transfer-Encoding: , chunked", b"Connection: close")
        + b"3\r\nabc\r\n0\r\n\r\n",
        (200,),
        (Want("blue", b"POST", b"/te", b"abc", headers=((b"transfer-encoding", b"chunked"),)),),
    ),
    # 3. methods are an open set (RFC 9110 §9.1): any upper-case token goes upstream
    Case(
        "unknown-method",
        req(b"/m", b"FOO", b"Connection: close"),
        (200,),
        (Want("blue", b"FOO", b"/m"),),
    ),
    Case(
        "unknown-method-with-body",
        req(b"/m", b"X-QUERY_2", b"Content-Length: 3", b"Connection: close", body=b"abc"),
        (200,),
        (Want("blue", b"X-QUERY_2", b"/m", b"abc"),),
    ),
    Case(
        "unknown-method-prefix-of-known",
        req(b"/m", b"GETX", b"Connection: close"),
        (200,),
        (Want("blue", b"GETX", b"/m"),),
    ),
    Case(
        "unknown-method-pipelined",
        req(b"/p1", b"POST", b"Content-Length: 3", body=b"abc")
        + req(b"/m", b"FOO")
        + req(b"/p3", b"BAR", b"Transfer-Encoding: chunked", b"Connection: close")
        + b"2\r\nxy\r\n0\r\n\r\n",
        (200, 200, 200),
        (
            Want("blue", b"POST", b"/p1", b"abc"),
            Want("blue", b"FOO", b"/m"),
            Want("blue", b"BAR", b"/p3", b"xy"),
        ),
    ),
    Case(
        "unknown-method-after-fast-get",
        req(b"/p1") + req(b"/m", b"FOO", b"Connection: close"),
        (200, 200),
        (Want("blue", b"GET", b"/p1"), Want("blue", b"FOO", b"/m")),
    ),
    Case("mixed-case-method", req(b"/s", b"Head"), (501,)),
    Case("method-not-a-token", req(b"/s", b"GE(T"), (_e(400, 501),)),
    # 4. syntax RFC 9112 allows
    Case(
        "chunk-ext-after-white-space",
        req(b"/ce", b"POST", b"Transfer-Encoding: chunked", b"Connection: close")
        + b"5 ;foo=bar\r\nhello\r\n0\r\n\r\n",
        (200,),
        (Want("blue", b"POST", b"/ce", b"hello"),),
    ),
    Case(
        "te-chunked-trailing-white-space",
        req(b"/tw", b"POST", b"Transfer-Encoding: chunked \t", b"Connection: close")
        + b"2\r\nhi\r\n0\r\n\r\n",
        (200,),
        (Want("blue", b"POST", b"/tw", b"hi", headers=((b"transfer-encoding", b"chunked"),)),),
    ),
    Case(
        "te-chunked-trailing-tab-space",
        req(b"/tw", b"POST", b"Transfer-Encoding:\tchunked\t ", b"Connection: close")
        + b"2\r\nhi\r\n0\r\n\r\n",
        (200,),
        (Want("blue", b"POST", b"/tw", b"hi", headers=((b"transfer-encoding", b"chunked"),)),),
    ),
    Case(
        "te-obs-fold-tab-still-refused",
        req(b"/s", b"POST", b"Transfer-Encoding: chunked\t", b"\t", b"X-A: b") + b"0\r\n\r\n",
        (400,),
    ),
    Case(
        "http-1.2-read-as-1.1",
        req(b"/v12", b"GET", b"Connection: close", version=b"HTTP/1.2"),
        (200,),
        (Want("blue", b"GET", b"/v12"),),
    ),
    # 5. Host: one valid value (RFC 9112 §3.2, RFC 3986 host [":" port])
    Case("host-with-slash", req(b"/s", host=b"t.example/evil"), (400,)),
    Case("host-with-space", req(b"/s", host=b"a b"), (400,)),
    Case("host-empty-http11", req(b"/s", host=b""), (400,)),
    Case("host-comma-list", req(b"/s", host=b"a.example, b.example"), (400,)),
    Case("host-comma-no-space", req(b"/s", host=b"a.example,b.example"), (400,)),
    Case("host-userinfo", req(b"/s", host=b"u@edge.test"), (400,)),
    Case("host-percent-encoded", req(b"/s", host=b"%65dge.test"), (400,)),
    Case("host-bad-port", req(b"/s", host=b"edge.test:8x"), (400,)),
    Case("host-bad-ipv6", req(b"/s", host=b"[::1"), (400,)),
    Case(
        "pipelined-second-bad-host",
        req(b"/p1") + req(b"/s", b"GET", host=b"a b"),
        (200, 400),
        (Want("blue", b"GET", b"/p1"),),
    ),
    Case(
        "host-with-port",
        req(b"/hp", b"GET", b"Connection: close", host=b"Edge.Test:8080"),
        (200,),
        (Want("blue", b"GET", b"/hp", headers=((b"host", b"Edge.Test:8080"),)),),
    ),
    Case(
        "host-ipv6-literal",
        req(b"/h6", b"GET", b"Connection: close", host=b"[::1]:80"),
        (200,),
        (Want("blue", b"GET", b"/h6", headers=((b"host", b"[::1]:80"),)),),
    ),
    Case(
        "host-ipv4",
        req(b"/h4", b"POST", b"Content-Length: 0", b"Connection: close", host=b"10.0.0.1"),
        (200,),
        (Want("blue", b"POST", b"/h4", headers=((b"host", b"10.0.0.1"),)),),
    ),
    # 6. an Upgrade the upstream did not take: the response says the connection closes
    Case(
        "websocket-not-upgraded",
        req(b"/ws", b"GET", *WS, WS_KEY),
        (200,),
        (Want("blue", b"GET", b"/ws"),),
    ),
    # legitimate traffic goes through whole
    Case(
        "pipelined-pair",
        req(b"/p1") + req(b"/p2", b"GET", b"Connection: close"),
        (200, 200),
        (Want("blue", b"GET", b"/p1"), Want("blue", b"GET", b"/p2")),
    ),
    # a pipelined request is held to the same rules as the first one on a connection
    Case(
        "pipelined-second-duplicate-host",
        req(b"/p1") + req(b"/s", b"GET", b"Host: evil.test"),
        (200, 400),
        (Want("blue", b"GET", b"/p1"),),
    ),
    Case(
        "pipelined-second-too-many-fields",
        req(b"/p1")
        + req(b"/s", b"GET", b"Connection: close", *(b"X-F%d: v" % i for i in range(25))),
        (200, 431),
        (Want("blue", b"GET", b"/p1"),),
    ),
    Case(
        "pipelined-second-head-over-limit",
        req(b"/p1") + req(b"/s", b"GET", b"Connection: close", b"X-Big: " + b"a" * 5000),
        (200, 431),
        (Want("blue", b"GET", b"/p1"),),
    ),
    Case(
        "pipelined-second-target-over-limit",
        req(b"/p1") + req(b"/" + b"a" * 5000, b"GET", b"Connection: close"),
        (200, _e(414, 431)),
        (Want("blue", b"GET", b"/p1"),),
    ),
    Case(
        "pipelined-second-body-over-limit",
        req(b"/p1") + req(b"/s", b"POST", b"Content-Length: 2000"),
        (200, 413),
        (Want("blue", b"GET", b"/p1"),),
    ),
    Case(
        "pipelined-second-chunked-body-over-limit",
        req(b"/p1")
        + req(b"/s", b"POST", b"Transfer-Encoding: chunked")
        + b"7d1\r\n"
        + b"x" * 2001
        + b"\r\n0\r\n\r\n",
        (200, 413),
        (Want("blue", b"GET", b"/p1"),),
    ),
    Case(
        "pipelined-bodies",
        req(b"/p1", b"POST", b"Content-Length: 5", body=b"hello")
        + req(b"/p2", b"POST", b"Transfer-Encoding: chunked", b"Connection: close")
        + b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
        (200, 200),
        (Want("blue", b"POST", b"/p1", b"hello"), Want("blue", b"POST", b"/p2", b"abcde")),
    ),
]

TABLE_LIMITS = {"max_header_bytes": 4096, "max_headers": 20, "max_body_bytes": 1000}


@pytest.fixture
async def edge(recorders: dict[str, Recorder], start_proxy: StartProxy) -> Edge:
    return await make_edge(
        recorders, start_proxy, limits=TABLE_LIMITS, timeouts={"request_header": 3, "idle": 3}
    )


XFAIL: dict[str, str] = {}


@pytest.mark.parametrize(
    "case",
    [
        pytest.param(
            c,
            id=c.id,
            marks=[pytest.mark.xfail(reason=XFAIL[c.id], strict=True)] if c.id in XFAIL else [],
        )
        for c in CASES
    ],
)
async def test_raw_request_table(edge: Edge, case: Case) -> None:
    got = await exchange(edge.addr, case.data, timeout=1.5)
    assert got.closed, f"the proxy kept the connection open; it sent {got.data!r}"
    responses = parse_responses(got.data)
    statuses = [r.status for r in responses]
    assert len(statuses) == len(case.statuses), f"responses {statuses}: {got.data!r}"
    for status, want in zip(statuses, case.statuses, strict=True):
        allowed = want if isinstance(want, frozenset) else {want}
        assert status in allowed, f"status {status}, wanted {sorted(allowed)}: {got.data!r}"

    await edge.barrier()
    assert edge.errors() == [], "the proxy sent the upstream bytes a strict parser refuses"
    seen = list(edge.journal)
    assert [(s.color, *s.key) for s in seen] == [
        (w.color, w.method, w.path, w.body) for w in case.want
    ]
    for s, w in zip(seen, case.want, strict=True):
        for name, value in w.headers:
            assert s.values(name) == [value], f"{name!r}: {s.values(name)}"
        for name in w.absent:
            assert s.values(name) == [], f"{name!r} reached the upstream: {s.values(name)}"
    if not case.want:
        # Refused before a byte went upstream: not even a partial head.
        assert edge.heads() == []
    for resp, w in zip(responses, case.want, strict=False):
        assert resp.body == b"ok " + w.path  # each answer belongs to its own request
    for resp in responses:
        if resp.status >= 400:
            assert len(resp.body) < 100 and b"edge.test" not in resp.body
            assert b"smuggled" not in resp.body
    # Every case ends with the proxy closing: its last response must say so.
    assert responses[-1].header(b"connection") == b"close", responses[-1].headers


HOST_BEFORE_MATCH = {
    "list": (b"GET", (b"Host: edge.test, other.test",)),
    "list-llhttp-path": (b"POST", (b"Host: edge.test, other.test", b"Content-Length: 0")),
    "two-fields-first-matches": (b"GET", (b"Host: edge.test", b"Host: other.test")),
    "invalid-no-service": (b"GET", (b"Host: nowhere.test/x",)),
    "empty": (b"GET", (b"Host: ",)),
    "missing": (b"GET", ()),
}


@pytest.mark.parametrize("method,fields", HOST_BEFORE_MATCH.values(), ids=HOST_BEFORE_MATCH.keys())
async def test_host_is_validated_before_the_service_is_matched(
    recorders: dict[str, Recorder],
    start_proxy: StartProxy,
    method: bytes,
    fields: tuple[bytes, ...],
) -> None:
    """With services routed by Host, an invalid Host is a 400 before matching (never a
    404, never another service): two layers must not read the Host apart."""
    config = edge_config(recorders)
    pools = config.pop("upstreams")
    config["services"] = {
        "edge": {"hosts": ["edge.test", "barrier"], "upstreams": pools},
        "other": {"hosts": ["other.test"], "upstreams": pools},
    }
    proxy = await start_proxy(config)
    edge = Edge(proxy, recorders, recorders["blue"].journal)
    got = await exchange(edge.addr, req(b"/h", method, *fields, b"Connection: close", host=None))
    assert got.closed
    assert [r.status for r in parse_responses(got.data)] == [400], got.data
    ok = await exchange(edge.addr, req(b"/ok", b"GET", b"Connection: close"))
    assert [r.status for r in parse_responses(ok.data)] == [200]
    await edge.barrier()
    assert [s.path for s in edge.journal] == [b"/ok"]


BAD_SECONDS = {
    "cl-plus": req(b"/bad", b"POST", b"Content-Length: +3") + b"abc" + SMUGGLED,
    "cl-and-te": req(b"/bad", b"POST", b"Content-Length: 4", b"Transfer-Encoding: chunked")
    + b"0\r\n\r\n"
    + SMUGGLED,
    "te-obs-fold": req(b"/bad", b"POST", b"Transfer-Encoding:\r\n chunked")
    + b"0\r\n\r\n"
    + SMUGGLED,
    "cl-duplicate-differing": req(b"/bad", b"POST", b"Content-Length: 3", b"Content-Length: 48")
    + b"abc"
    + SMUGGLED,
    "nul-in-value": req(b"/bad", b"GET", b"X-A: \x00") + SMUGGLED,
}


@pytest.mark.parametrize("bad", BAD_SECONDS.values(), ids=BAD_SECONDS.keys())
async def test_pipelined_valid_then_malformed_in_one_read(edge: Edge, bad: bytes) -> None:
    """A good request followed by a bad one in one packet: either the good one is answered
    and then the 400, or nothing goes upstream and the 400 comes alone — never a smuggle."""
    got = await exchange(edge.addr, req(b"/ok") + bad)
    assert got.closed
    statuses = [r.status for r in parse_responses(got.data)]
    await edge.barrier()
    keys = [s.key for s in edge.journal]
    assert statuses in ([400], [200, 400])
    assert keys == [(b"GET", b"/ok", b"")][: len(statuses) - 1]


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_h2c_upgrade_with_a_body_is_not_left_hanging(
    recorders: dict[str, Recorder], start_proxy: StartProxy, framing: str
) -> None:
    """Upgrade: h2c is stripped, so the request is a plain one: its body must go upstream
    whole (or the request be refused), never a head promising a body that never comes."""
    edge = await make_edge(recorders, start_proxy, timeouts={"upstream_response": 1.5})
    h2c = (b"Upgrade: h2c", b"Connection: Upgrade, HTTP2-Settings", b"HTTP2-Settings: AAMAAABk")
    if framing == "content-length":
        data = req(b"/h2c-body", b"POST", *h2c, b"Content-Length: 5", body=b"hello")
    else:
        data = req(b"/h2c-body", b"POST", *h2c, b"Transfer-Encoding: chunked")
        data += b"5\r\nhello\r\n0\r\n\r\n"
    got = await exchange(edge.addr, data, timeout=1.2)
    assert got.closed, f"no answer within 1.2s: {got.data!r}"
    statuses = [r.status for r in parse_responses(got.data)]
    await edge.barrier()
    if statuses == [200]:
        assert [s.key for s in edge.journal] == [(b"POST", b"/h2c-body", b"hello")]
    else:
        assert statuses == [400]
        assert edge.heads() == []


async def test_pipelined_partial_head_gets_the_request_header_timeout(
    recorders: dict[str, Recorder], start_proxy: StartProxy
) -> None:
    """A slow head behind a pipelined request is cut at timeouts.request_header, not idle."""
    edge = await make_edge(recorders, start_proxy, timeouts={"request_header": 0.5, "idle": 4})
    got = await exchange(
        edge.addr, req(b"/p1") + b"GET /p2 HTTP/1.1\r\nHost: edge.test\r\n", timeout=1.5
    )
    assert got.closed, f"still open after {got.elapsed:.1f}s (request_header is 0.5s)"
    statuses = [r.status for r in parse_responses(got.data)]
    assert statuses in ([200], [200, 408])
    await edge.barrier()
    assert [s.path for s in edge.journal] == [b"/p1"]


async def test_chunked_body_over_limit_midstream_is_413_and_never_completes(
    edge: Edge,
) -> None:
    """The body limit holds when the excess arrives after the proxy began streaming: 413,
    and the upstream never sees a complete request (its connection is not reused)."""
    head = req(b"/upload", b"POST", b"Transfer-Encoding: chunked")
    first = b"100\r\n" + b"a" * 256 + b"\r\n"
    async with asyncio.timeout(5):
        reader, writer = await asyncio.open_connection(*edge.addr)
        try:
            writer.write(head + first)
            await writer.drain()
            await edge.recs["blue"].wait(lambda: b"/upload" in edge.recs["blue"].heads)
            writer.write(b"400\r\n" + b"b" * 1024 + b"\r\n0\r\n\r\n")
            with contextlib.suppress(ConnectionError):
                await writer.drain()
            resp = await read_response(reader)
            assert resp.status == 413
            assert await reader.read() == b""
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
    await edge.barrier()  # would be parsed as chunk data on a reused connection
    assert edge.journal == []
    assert edge.errors() == []


async def test_http09_simple_request_is_refused_at_once(
    recorders: dict[str, Recorder], start_proxy: StartProxy
) -> None:
    """A real HTTP/0.9 request is one line; refusing it must not wait for a header timeout."""
    edge = await make_edge(recorders, start_proxy, timeouts={"request_header": 5})
    got = await exchange(edge.addr, b"GET /\r\n", timeout=1.5)
    assert got.closed, "an HTTP/0.9 request was left hanging until the header timeout"
    assert not got.data or got.data.startswith((b"HTTP/1.1 400", b"HTTP/1.1 505"))
    await edge.barrier()
    assert edge.heads() == []


# --- 2. header trust ------------------------------------------------------------------------

SPOOFED = (
    b"X-Forwarded-For: 6.6.6.6",
    b"x-forwarded-for: 7.7.7.7",
    b"Forwarded: for=6.6.6.6;proto=https",
    b"X-Real-IP: 6.6.6.6",
    b"X-Forwarded-Host: evil.test",
    b"X-Forwarded-Proto: https",
    b"Connection: close",
)


async def test_client_forwarding_headers_not_trusted_by_default(
    recorders: dict[str, Recorder], start_proxy: StartProxy
) -> None:
    edge = await make_edge(recorders, start_proxy)
    got = await exchange(edge.addr, req(b"/trust", b"GET", *SPOOFED))
    assert [r.status for r in parse_responses(got.data)] == [200]
    (seen,) = edge.journal
    assert seen.values(b"x-forwarded-for") == [b"127.0.0.1"]
    assert seen.values(b"forwarded") == []
    assert seen.values(b"x-real-ip") == []
    assert seen.values(b"x-forwarded-host") == [HOST]
    assert seen.values(b"x-forwarded-proto") == [b"http"]


async def test_trusted_proxy_forwarding_chain_is_kept(
    recorders: dict[str, Recorder], start_proxy: StartProxy
) -> None:
    edge = await make_edge(recorders, start_proxy, trusted_proxies=["127.0.0.1/32"])
    got = await exchange(edge.addr, req(b"/trust", b"GET", *SPOOFED))
    assert [r.status for r in parse_responses(got.data)] == [200]
    (seen,) = edge.journal
    assert seen.values(b"x-forwarded-for") == [b"6.6.6.6, 7.7.7.7, 127.0.0.1"]


async def test_untrusted_peer_outside_trusted_cidr(
    recorders: dict[str, Recorder], start_proxy: StartProxy
) -> None:
    edge = await make_edge(recorders, start_proxy, trusted_proxies=["10.0.0.0/8"])
    got = await exchange(edge.addr, req(b"/trust", b"GET", *SPOOFED))
    assert [r.status for r in parse_responses(got.data)] == [200]
    (seen,) = edge.journal
    assert seen.values(b"x-forwarded-for") == [b"127.0.0.1"]
    assert seen.values(b"forwarded") == [] and seen.values(b"x-real-ip") == []


# --- 3. slow clients ------------------------------------------------------------------------


async def test_slowloris_is_cut_off_and_does_not_starve_others(
    recorders: dict[str, Recorder], start_proxy: StartProxy
) -> None:
    edge = await make_edge(recorders, start_proxy, timeouts={"request_header": 1, "idle": 1})
    loop = asyncio.get_running_loop()
    n, header_timeout, slack = 200, 1.0, 1.5

    async def slow_client(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, started: float, drip: bool
    ) -> tuple[float, bytes]:
        data = b""
        try:
            while True:
                try:
                    chunk = await asyncio.wait_for(reader.read(65536), 0.2)
                except TimeoutError:
                    if drip:
                        writer.write(b"X-Drip: 1\r\n")  # one more header line, every 200 ms
                    continue
                except ConnectionError:
                    break
                if not chunk:
                    break
                data += chunk
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
        return loop.time() - started, data

    async with asyncio.timeout(header_timeout + slack + 2):
        started = loop.time()
        socks = await asyncio.gather(*(asyncio.open_connection(*edge.addr) for _ in range(n)))
        for i, (_, writer) in enumerate(socks):
            if i % 4:  # every fourth one stays silent: it is cut off the same way
                writer.write(b"GET /slow HTTP/1.1\r\nHost: edge.test\r\n")
        slow = [
            asyncio.ensure_future(slow_client(r, w, started, bool(i % 4)))
            for i, (r, w) in enumerate(socks)
        ]
        try:
            latencies = []
            for i in range(20):  # a normal client, while the slow ones hold their sockets
                got = await exchange(
                    edge.addr, req(b"/normal/%d" % i, b"GET", b"Connection: close"), timeout=1.0
                )
                assert [r.status for r in parse_responses(got.data)] == [200]
                latencies.append(got.elapsed)
            results = await asyncio.gather(*slow)
        finally:
            for t in slow:
                t.cancel()
    assert max(latencies) < header_timeout, f"normal requests starved: {max(latencies):.2f}s"
    assert max(t for t, _ in results) <= header_timeout + slack
    for _, data in results:
        assert data == b"" or data.startswith(b"HTTP/1.1 408 "), data
    await edge.barrier()
    assert b"/slow" not in edge.heads()
    assert [s.path for s in edge.journal] == [b"/normal/%d" % i for i in range(20)]


async def test_stalled_request_body_is_closed_by_idle_timeout(
    recorders: dict[str, Recorder], start_proxy: StartProxy
) -> None:
    edge = await make_edge(recorders, start_proxy, timeouts={"request_header": 1, "idle": 1})
    blue = edge.recs["blue"]
    loop = asyncio.get_running_loop()
    started = loop.time()
    reader, writer = await asyncio.open_connection(*edge.addr)
    try:
        writer.write(req(b"/stall", b"POST", b"Content-Length: 100") + b"0123456789")
        await writer.drain()
        await blue.wait(lambda: b"/stall" in blue.heads)
        data = b""
        async with asyncio.timeout(1 + 1.5):
            with contextlib.suppress(ConnectionError):
                while chunk := await reader.read(65536):
                    data += chunk
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()
    assert loop.time() - started >= 0.5, "closed long before the idle timeout"
    assert data == b"" or data.startswith(b"HTTP/1.1 408 "), data
    # the half-sent request's upstream connection is closed, never reused
    await blue.wait(lambda: blue.open == 0)
    await edge.barrier()
    assert edge.journal == [] and edge.errors() == []


async def test_connection_cap_refuses_fast_and_recovers(
    recorders: dict[str, Recorder], start_proxy: StartProxy
) -> None:
    cap = 50
    edge = await make_edge(recorders, start_proxy, limits={"max_connections": cap})
    conns: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def one_request(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> int:
        writer.write(req(b"/kept"))
        await writer.drain()
        return (await read_response(reader, timeout=2.0)).status

    async def refused() -> None:
        got = await exchange(edge.addr, timeout=1.0)
        assert got.closed and got.elapsed < 1.0
        assert got.data.startswith(b"HTTP/1.1 503 "), got.data

    try:
        for _ in range(cap):
            conns.append(await asyncio.open_connection(*edge.addr))
        assert await asyncio.gather(*(one_request(r, w) for r, w in conns)) == [200] * cap
        await refused()
        # the ones already in keep working
        assert await one_request(*conns[0]) == 200
        assert await one_request(*conns[-1]) == 200
        for _, w in conns[:10]:
            w.close()
            with contextlib.suppress(Exception):
                await w.wait_closed()
        del conns[:10]
        assert await one_request(*conns[0]) == 200  # a round trip after the closes
        for _ in range(10):
            conns.append(await asyncio.open_connection(*edge.addr))
            assert await one_request(*conns[-1]) == 200
        await refused()
    finally:
        for _, w in conns:
            w.close()
            with contextlib.suppress(Exception):
                await w.wait_closed()


# --- 4. misbehaving upstreams ---------------------------------------------------------------

OK_FRESH = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfresh"
INJECTED = b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\nX-Injected: yes\r\n\r\ninjected"

Script = Callable[[bytes, asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def serve_fresh(head: bytes, reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    """A well-behaved keep-alive upstream (requests without bodies)."""
    while True:
        w.write(OK_FRESH)
        await w.drain()
        try:
            await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            return


class ScriptedUpstream:
    """A raw upstream: its n-th connection (health checks aside) runs ``scripts[n]`` with
    the first request head already read; later ones serve ``fresh``. ``closed[n]`` is set
    when the proxy closes that connection."""

    def __init__(self, *scripts: Script) -> None:
        self.scripts = scripts
        self.accepted = 0
        self.closed: dict[int, asyncio.Event] = {}
        self.heads: list[bytes] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self._server: asyncio.Server | None = None
        self.url = ""

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"
        return self.url

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for t in list(self._tasks):
            t.cancel()
        for t in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, ConnectionError):
                return
            if head.split(b" ", 2)[1].startswith(HC_PATH):
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nOK")
                return
            index = self.accepted
            self.accepted += 1
            self.heads.append(head)
            closed = self.closed.setdefault(index, asyncio.Event())
            script = self.scripts[index] if index < len(self.scripts) else serve_fresh
            with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
                await script(head, reader, writer)
                with contextlib.suppress(ConnectionError):
                    while await reader.read(65536):
                        pass  # until the proxy closes it
            closed.set()
        finally:
            self._tasks.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def wait_closed(self, index: int, timeout: float = 3.0) -> None:
        event = self.closed.setdefault(index, asyncio.Event())
        try:
            await asyncio.wait_for(event.wait(), timeout)
        except TimeoutError:
            pytest.fail(f"the proxy kept upstream connection {index} open")


@pytest.fixture
async def scripted() -> AsyncIterator[Callable[..., Awaitable[ScriptedUpstream]]]:
    made: list[ScriptedUpstream] = []

    async def make(*scripts: Script) -> ScriptedUpstream:
        up = ScriptedUpstream(*scripts)
        await up.start()
        made.append(up)
        return up

    yield make
    for up in made:
        await up.close()


async def behind(start_proxy: StartProxy, up: ScriptedUpstream, **sections: Any) -> Proxy:
    sections.setdefault("health_check", {"path": HC_PATH.decode(), "interval": 3600})
    return await start_proxy(config_dict([up.url], [dead_address()], **sections))


async def get_raw(proxy: Proxy, path: bytes, *, keep: bool = False) -> Got:
    headers = () if keep else (b"Connection: close",)
    return await exchange(proxy.run.proxy_address, req(path, b"GET", *headers))


async def fresh_client_gets_fresh(proxy: Proxy, up: ScriptedUpstream, connections: int) -> None:
    """Another client: its answer comes from a new upstream connection, not the bad one."""
    got = await get_raw(proxy, b"/b")
    (resp,) = parse_responses(got.data)
    assert (resp.status, resp.body, resp.header(b"x-injected")) == (200, b"fresh", None)
    assert up.accepted == connections, f"upstream connections: {up.accepted}"


@pytest.mark.parametrize("when", ["same-read", "while-pooled"])
async def test_bytes_after_content_length_never_reach_another_client(
    scripted: Any, start_proxy: StartProxy, when: str
) -> None:
    release = asyncio.Event()

    async def extra(head: bytes, reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        if when == "same-read":
            w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello" + INJECTED)
            return
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello")
        await w.drain()
        await release.wait()
        w.write(INJECTED)  # while the proxy holds the connection idle

    up = await scripted(extra)
    proxy = await behind(start_proxy, up)
    async with proxy.session.get(proxy.url + "/a") as resp:
        assert (resp.status, await resp.read()) == (200, b"hello")
    release.set()
    await up.wait_closed(0)
    await fresh_client_gets_fresh(proxy, up, 2)


async def test_101_to_a_plain_request_is_502(scripted: Any, start_proxy: StartProxy) -> None:
    async def upgrade(head: bytes, reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(
            b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
            b"\r\n" + INJECTED
        )

    up = await scripted(upgrade)
    proxy = await behind(start_proxy, up)
    got = await get_raw(proxy, b"/a", keep=True)
    assert got.closed
    assert [r.status for r in parse_responses(got.data)] == [502]
    assert b"injected" not in got.data
    await up.wait_closed(0)
    await fresh_client_gets_fresh(proxy, up, 2)


BAD_RESPONSES = {
    "header-without-colon": b"HTTP/1.1 200 OK\r\nBad Header\r\nContent-Length: 2\r\n\r\nok",
    "nul-in-value": b"HTTP/1.1 200 OK\r\nX-A: a\x00b\r\nContent-Length: 2\r\n\r\nok",
    "space-before-colon": b"HTTP/1.1 200 OK\r\nContent-Length : 2\r\n\r\nok",
    "duplicate-content-length": (
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 10\r\n\r\nok" + INJECTED
    ),
    "obs-fold": b"HTTP/1.1 200 OK\r\nX-A: a\r\n b\r\nContent-Length: 2\r\n\r\nok",
    "bare-lf": b"HTTP/1.1 200 OK\nContent-Length: 2\n\nok",
    "bad-status": b"HTTP/1.1 2000 OK\r\nContent-Length: 2\r\n\r\nok",
    "not-http": b"hello, this is not HTTP\r\n\r\n",
}


@pytest.mark.parametrize("raw", BAD_RESPONSES.values(), ids=BAD_RESPONSES.keys())
async def test_invalid_response_head_is_502(
    scripted: Any, start_proxy: StartProxy, raw: bytes
) -> None:
    async def bad(head: bytes, reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(raw)

    up = await scripted(bad)
    proxy = await behind(start_proxy, up)
    got = await get_raw(proxy, b"/a", keep=True)
    assert got.closed
    responses = parse_responses(got.data)
    assert [r.status for r in responses] == [502], got.data
    assert b"injected" not in got.data and len(responses[0].body) < 100
    await up.wait_closed(0)
    await fresh_client_gets_fresh(proxy, up, 2)


@pytest.mark.parametrize("after", [b"", INJECTED], ids=["alone", "then-injected"])
async def test_response_with_content_length_and_chunked_is_read_chunked(
    scripted: Any, start_proxy: StartProxy, after: bytes
) -> None:
    """RFC 9112 §6.3: Transfer-Encoding overrides Content-Length, which is removed, and
    the connection is never reused (someone may have framed it by Content-Length)."""

    async def both(head: bytes, reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(
            b"HTTP/1.1 200 OK\r\nContent-Length: 30\r\nTransfer-Encoding: chunked\r\n"
            b"X-After: yes\r\n\r\n2\r\nok\r\n1 ;ext\r\n!\r\n0\r\n\r\n" + after
        )

    up = await scripted(both)
    proxy = await behind(start_proxy, up)
    got = await get_raw(proxy, b"/a")
    assert got.closed
    (resp,) = parse_responses(got.data)
    assert (resp.status, resp.body, resp.header(b"x-after")) == (200, b"ok!", b"yes")
    assert resp.header(b"content-length") is None
    assert resp.header(b"transfer-encoding") == b"chunked"
    assert b"injected" not in got.data
    await up.wait_closed(0)
    await fresh_client_gets_fresh(proxy, up, 2)


@pytest.mark.parametrize("how", ["reset", "fin"])
async def test_upstream_dies_mid_body_client_sees_truncation(
    scripted: Any, start_proxy: StartProxy, how: str
) -> None:
    releases = [asyncio.Event(), asyncio.Event()]

    def dies(n: int) -> Script:
        async def script(
            head: bytes, reader: asyncio.StreamReader, w: asyncio.StreamWriter
        ) -> None:
            w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"x" * 10)
            await w.drain()
            await releases[n].wait()
            if how == "reset":
                sock = w.get_extra_info("socket")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                w.transport.abort()
            else:
                w.transport.close()

        return script

    up = await scripted(dies(0), dies(1))
    proxy = await behind(start_proxy, up)
    # aiohttp sees a payload error
    async with proxy.session.get(proxy.url + "/a") as resp:
        assert resp.status == 200
        releases[0].set()
        with pytest.raises(aiohttp.ClientPayloadError):
            await resp.read()
    # a raw client: the head promises 100 bytes, the stream ends short
    async with asyncio.timeout(3):
        reader, writer = await asyncio.open_connection(*proxy.run.proxy_address)
        try:
            writer.write(req(b"/a"))
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200 ") and b"Content-Length: 100" in head
            releases[1].set()
            body = b""
            with contextlib.suppress(ConnectionError):
                while chunk := await reader.read(65536):
                    body += chunk
            assert len(body) < 100
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
    await fresh_client_gets_fresh(proxy, up, 3)


async def test_upstream_closes_without_responding_is_502(
    scripted: Any, start_proxy: StartProxy
) -> None:
    async def hang_up(head: bytes, reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.transport.close()

    up = await scripted(hang_up)
    proxy = await behind(start_proxy, up)
    got = await get_raw(proxy, b"/a", keep=True)
    assert got.closed
    assert [r.status for r in parse_responses(got.data)] == [502]
    await fresh_client_gets_fresh(proxy, up, 2)


async def test_body_on_a_head_response_never_reaches_the_client(
    scripted: Any, start_proxy: StartProxy
) -> None:
    async def head_body(head: bytes, reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(INJECTED)  # a body (and Content-Length) in answer to HEAD

    up = await scripted(head_body)
    proxy = await behind(start_proxy, up)
    async with asyncio.timeout(3):
        reader, writer = await asyncio.open_connection(*proxy.run.proxy_address)
        try:
            writer.write(req(b"/h", b"HEAD"))
            resp = await read_response(reader, head_only=True)
            assert resp.status == 200
            writer.write(req(b"/g", b"GET", b"Connection: close"))  # same client connection
            resp = await read_response(reader)
            assert (resp.status, resp.body, resp.header("x-injected")) == (200, b"fresh", None)
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
    await up.wait_closed(0)
    assert up.accepted == 2


# --- 5. property: the upstream gets nothing the client did not send -------------------------

PIECES = [
    b"\r\n",
    b"\r\n\r\n",
    b"\n",
    b"\r",
    b"\x00",
    b":",
    b" ",
    b"\t",
    b"\x0b",
    b",",
    b"\r\n ",
    b"Transfer-Encoding: chunked\r\n",
    b"Transfer-Encoding: xchunked\r\n",
    b"Content-Length: 5\r\n",
    b"Content-Length: 0\r\n",
    b"Host: other.test\r\n",
    b"0\r\n\r\n",
    b"GET /smuggled HTTP/1.1\r\nHost: h\r\n\r\n",
    b"Connection: close\r\n",
    b"Upgrade: h2c\r\nConnection: Upgrade\r\n",
]
CL_VALUES = [b"0", b"1", b"3", b"5", b"+1", b"-1", b"1, 1", b"99999", b" 3", b"0x2", b""]

header_pairs = st.sampled_from(
    [b"Accept: */*", b"X-A: 1", b"Cookie: a=b", b"X-Bg-Color: blue", b"Connection: keep-alive"]
)


@st.composite
def request_bytes(draw: st.DrawFn) -> bytes:
    method = draw(st.sampled_from([b"GET", b"POST", b"PUT", b"DELETE", b"HEAD"]))
    path = draw(st.from_regex(rb"\A/[a-z0-9]{0,6}(\?[a-z0-9=&]{0,6})?\Z"))
    headers = draw(st.lists(header_pairs, max_size=3))
    body = draw(st.binary(max_size=24))
    framing = draw(st.sampled_from(["none", "length", "chunked"]))
    if framing == "none":
        body = b""
    elif framing == "length":
        headers.append(b"Content-Length: %d" % len(body))
    else:
        headers.append(b"Transfer-Encoding: chunked")
        cut = draw(st.integers(0, len(body)))
        body = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in (body[:cut], body[cut:]) if p)
        body += b"0\r\n\r\n"
    return req(path, method, *headers, body=body)


def mutate(data: bytes, ops: list[tuple[str, int, int]]) -> bytes:
    for kind, pos, arg in ops:
        pos %= len(data) + 1
        if kind == "replace" and pos < len(data):
            data = data[:pos] + PIECES[arg % len(PIECES)][:1] + data[pos + 1 :]
        elif kind == "insert":
            data = data[:pos] + PIECES[arg % len(PIECES)] + data[pos:]
        elif kind == "delete":
            data = data[:pos] + data[pos + 1 + arg % 4 :]
        elif kind == "dup-line":
            start = data.rfind(b"\n", 0, pos) + 1
            end = data.find(b"\n", pos)
            if end != -1:
                data = data[:start] + data[start : end + 1] * 2 + data[end + 1 :]
        elif kind == "content-length":
            i = data.find(b"Content-Length: ", pos)
            if i == -1:
                i = data.find(b"Content-Length: ")
            if i != -1:
                j = data.find(b"\r\n", i)
                if j != -1:
                    data = data[: i + 16] + CL_VALUES[arg % len(CL_VALUES)] + data[j:]
    return data


mutations = st.lists(
    st.tuples(
        st.sampled_from(["replace", "insert", "delete", "dup-line", "content-length"]),
        st.integers(0, 4000),
        st.integers(0, 100),
    ),
    max_size=4,
)


TE_OWS = re.compile(rb"(?im)^(transfer-encoding:[^\r\n]*?)[ \t]+\r\n")
TOKEN = frozenset(b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")


def oracle(stream: bytes) -> list[tuple[bytes, bytes, bytes]]:
    """The complete requests a strict parser finds in what the client sent, in order.
    Methods are an open set (RFC 9110 §9.1): one llhttp does not know, if an upper-case
    token, is read under a stand-in (the stream is fed a byte at a time to know where
    the refused message began)."""
    found: list[tuple[bytes, bytes, bytes]] = []
    begun = 0  # where the message in progress began
    method: bytes | None = None  # its real method, when fed under a stand-in

    class Cb:
        url = b""
        body: list[bytes] = []  # noqa: RUF012 - reset per message

        def on_message_begin(self) -> None:
            nonlocal begun
            self.url, self.body = b"", []
            begun = pos

        def on_url(self, url: bytes) -> None:
            self.url += url

        def on_body(self, body: bytes) -> None:
            self.body.append(body)

        def on_message_complete(self) -> None:
            url = self.url
            low = url.lower()
            if low.startswith((b"http://", b"https://")):  # the proxy sends origin-form
                rest = url.split(b"://", 1)[1]
                url = b"/" + rest.partition(b"/")[2] if b"/" in rest else b"/"
            nonlocal method
            found.append((method or parser.get_method(), url, b"".join(self.body)))
            method = None

    parser = lenient_parser(Cb())
    pos = 0
    with contextlib.suppress(httptools.HttpParserError, httptools.HttpParserUpgrade):
        while pos < len(stream):
            try:
                parser.feed_data(stream[pos : pos + 1])
            except httptools.HttpParserInvalidMethodError:
                end = begun
                while end < len(stream) and stream[end] in TOKEN:
                    end += 1
                token = stream[begun:end]
                if not token or token.upper() != token or stream[end : end + 1] != b" ":
                    raise
                method = token
                parser = lenient_parser(Cb())
                stream = stream[:begun] + b"PUT" + stream[end:]
                pos = begun
                continue
            pos += 1
    return found


@pytest.fixture
async def fuzz_edge(recorders: dict[str, Recorder], start_proxy: StartProxy) -> Edge:
    return await make_edge(
        recorders,
        start_proxy,
        timeouts={"request_header": 0.5, "idle": 0.5, "upstream_response": 2},
        limits={"max_body_bytes": 64},
    )


# Hypothesis' failure report imports a deprecated mypy_extensions name; keep it readable.
@pytest.mark.filterwarnings("ignore:mypy_extensions.TypedDict is deprecated:DeprecationWarning")
@settings(
    max_examples=150,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    requests=st.lists(request_bytes(), min_size=1, max_size=3),
    ops=mutations,
    cuts=st.lists(st.integers(0, 4000), max_size=4),
    pause=st.sampled_from([0.0, 0.0, 0.001, 0.004]),
)
async def test_property_upstream_only_gets_what_the_client_sent(
    fuzz_edge: Edge,
    requests: list[bytes],
    ops: list[tuple[str, int, int]],
    cuts: list[int],
    pause: float,
) -> None:
    edge = fuzz_edge
    edge.clear()
    stream = mutate(b"".join(requests), ops)
    points = sorted({c % (len(stream) + 1) for c in cuts} | {0, len(stream)})
    parts = [stream[a:b] for a, b in itertools.pairwise(points) if b > a]
    await exchange(edge.addr, *parts, timeout=2.0, half_close=True, pauses=[pause] * len(parts))
    await edge.barrier()
    assert edge.errors() == [], "the proxy sent bytes the upstream's strict parser refused"
    sent = oracle(stream)
    got = [s.key for s in edge.journal]
    if got != sent[: len(got)]:
        # White space after a Transfer-Encoding value is no part of it (RFC 9110 §5.5):
        # the proxy trims it in a head it reads whole, which llhttp alone refuses.
        sent = oracle(TE_OWS.sub(rb"\1\r\n", stream))
    assert len(got) <= len(sent), f"more requests upstream than sent: {got} vs {sent}"
    assert got == sent[: len(got)], f"upstream got requests the client never sent: {got}"


# --- 6. the admin surface -------------------------------------------------------------------


async def admin_raw(proxy: Proxy, data: bytes, timeout: float = 3.0) -> Resp:
    host, port = proxy.run.admin_address
    got = await exchange((host, port), data, timeout=timeout)
    (resp,) = parse_responses(got.data)
    return resp


def admin_req(
    method: bytes, path: bytes, *headers: bytes, body: bytes = b"", host: bytes = b"127.0.0.1"
) -> bytes:
    extra = [b"Connection: close"]
    if body or method == b"POST":
        extra += [b"Content-Type: application/json", b"Content-Length: %d" % len(body)]
    return req(path, method, *headers, *extra, body=body, host=host)


async def state_of(proxy: Proxy, token: str | None = None) -> tuple[str, int]:
    status, body = await proxy.admin("GET", "/status", token=token)
    assert status == 200
    return body["active"], body["generation"]


@pytest.fixture
async def plain(recorders: dict[str, Recorder], start_proxy: StartProxy) -> Proxy:
    return (await make_edge(recorders, start_proxy)).proxy


def test_admin_listens_on_loopback_by_default() -> None:
    config = parse_config(
        {
            "upstreams": {
                "blue": {"targets": ["http://127.0.0.1:9001"]},
                "green": {"targets": ["http://127.0.0.1:9002"]},
            }
        }
    )
    assert ipaddress.ip_address(config.admin.listen.host).is_loopback


@pytest.mark.parametrize(
    "host", [b"evil.example", b"evil.example:9901", b"localhost.evil.example", b"10.0.0.1"]
)
async def test_admin_refuses_foreign_host_names(plain: Proxy, host: bytes) -> None:
    for path in (b"/status", b"/events", b"/"):
        resp = await admin_raw(plain, admin_req(b"GET", path, host=host))
        assert resp.status == 403, (path, resp.status)
    resp = await admin_raw(plain, admin_req(b"GET", b"/healthz", host=host))
    assert resp.status == 200  # liveness probes go through load balancers


async def test_admin_dns_rebinding_with_loopback_looking_name(plain: Proxy) -> None:
    _, port = plain.run.admin_address
    host = b"127.0.0.1.evil.example:%d" % port
    body = json.dumps({"color": "green"}).encode()
    before = await state_of(plain)
    resp = await admin_raw(
        plain,
        admin_req(b"POST", b"/switch", b"Origin: http://" + host, body=body, host=host),
    )
    assert resp.status == 403
    assert await state_of(plain) == before


async def test_admin_loopback_host_names_accepted(plain: Proxy) -> None:
    _, port = plain.run.admin_address
    for host in (b"127.0.0.1:%d" % port, b"localhost:%d" % port, b"localhost"):
        resp = await admin_raw(plain, admin_req(b"GET", b"/status", host=host))
        assert resp.status == 200, host


@pytest.mark.parametrize(
    "origin",
    [b"Origin: http://evil.example", b"Origin: null", b"Sec-Fetch-Site: cross-site"],
)
async def test_admin_cross_origin_post_refused_without_state_change(
    plain: Proxy, origin: bytes
) -> None:
    _, port = plain.run.admin_address
    before = await state_of(plain)
    for path, body in (
        (b"/switch", {"color": "green"}),
        (b"/weights", {"blue": 50, "green": 50}),
        (b"/rollback", {}),
    ):
        resp = await admin_raw(
            plain,
            admin_req(
                b"POST", path, origin, body=json.dumps(body).encode(), host=b"127.0.0.1:%d" % port
            ),
        )
        assert resp.status == 403, (path, resp.status)
    assert await state_of(plain) == before
    status, events = await plain.admin("GET", "/events")
    assert (status, events["events"]) == (200, [])


async def test_admin_same_origin_post_accepted(plain: Proxy) -> None:
    _, port = plain.run.admin_address
    host = b"127.0.0.1:%d" % port
    resp = await admin_raw(
        plain,
        admin_req(
            b"POST", b"/switch", b"Origin: http://" + host, body=b'{"color": "green"}', host=host
        ),
    )
    assert resp.status == 200
    assert (await state_of(plain))[0] == "green"


@pytest.mark.parametrize("path", ["/switch", "/weights", "/rollback"])
@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE"])
async def test_admin_mutations_are_post_only(plain: Proxy, path: str, method: str) -> None:
    before = await state_of(plain)
    status, body = await plain.admin(method, path)
    assert status == 405
    assert body["error"] == "method_not_allowed"
    assert await state_of(plain) == before


ADMIN_TOKEN = "adm-s3cret-TOKEN-7f3a"


async def test_admin_token_never_accepted_from_query(
    recorders: dict[str, Recorder], start_proxy: StartProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BGPROXY_ADMIN_TOKEN", ADMIN_TOKEN)
    proxy = (await make_edge(recorders, start_proxy)).proxy
    for query in ("token", "access_token", "auth", "authorization", "bearer"):
        status, _ = await proxy.admin("GET", f"/status?{query}={ADMIN_TOKEN}")
        assert status == 401, query
    status, _ = await proxy.admin("GET", f"/status?authorization=Bearer%20{ADMIN_TOKEN}")
    assert status == 401
    before = await state_of(proxy, ADMIN_TOKEN)
    status, _ = await proxy.admin("POST", f"/switch?token={ADMIN_TOKEN}", {"color": "green"})
    assert status == 401
    assert await state_of(proxy, ADMIN_TOKEN) == before


@pytest.mark.parametrize("chunked", [False, True])
async def test_admin_body_over_64k_is_413(plain: Proxy, chunked: bool) -> None:
    before = await state_of(plain)
    body = json.dumps({"color": "green", "reason": "x" * 70_000}).encode()
    if chunked:
        data = req(
            b"/switch",
            b"POST",
            b"Transfer-Encoding: chunked",
            b"Content-Type: application/json",
            b"Connection: close",
            host=b"127.0.0.1",
        ) + b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    else:
        data = admin_req(b"POST", b"/switch", body=body)
    resp = await admin_raw(plain, data)
    assert resp.status == 413
    assert await state_of(plain) == before


SECRETS = {
    "admin token": ADMIN_TOKEN,
    "wrong token": "wrong-s3cret-GUESS-19ab",
    "override token": "qa-s3cret-OVR-91b2",
    "cookie": "cookie-s3cret-5e1d",
    "authorization": "auth-s3cret-BASIC-c4d8",
}


def _leaks(text: str) -> list[str]:
    return [name for name, value in SECRETS.items() if value in text]


async def _traffic_with_secrets(proxy: Proxy) -> None:
    """Admin and data-plane traffic carrying every secret, much of it failing."""
    s = SECRETS
    data_headers = (
        b"Cookie: session=%s" % s["cookie"].encode(),
        b"Authorization: Basic %s" % s["authorization"].encode(),
        b"X-Bg-Override-Token: %s" % s["override token"].encode(),
    )
    cases = [
        (200, req(b"/ok", b"GET", *data_headers, b"Connection: close")),
        (502, req(b"/dead", b"GET", *data_headers, b"X-Bg-Color: green", b"Connection: close")),
        (400, req(b"/bad", b"GET", *data_headers, b"X-Bg-Color: purple")),
        (400, req(b"/bad", b"GET", *data_headers, b"X-Folded: a\r\n b")),
        (400, req(b"/bad", b"GET", *data_headers, b"X-A: \x00")),
        (400, req(b"/bad", b"GET", *data_headers, b"Content-Length: +3")),
    ]
    for status, data in cases:
        got = await exchange(proxy.run.proxy_address, data)
        assert got.data.startswith(b"HTTP/1.1 %d " % status), got.data
    for token in (s["wrong token"], s["admin token"]):
        await proxy.admin("GET", "/status", token=token)
        assert (await proxy.admin("GET", f"/status?token={token}"))[0] == 401
        status, _ = await proxy.admin("POST", "/switch", {"color": "purple"}, token=token)
        assert status == (400 if token == s["admin token"] else 401)
    # malformed admin requests whose bad line carries a credential (a stray control byte)
    for line in (
        b"Authorization: Bearer %s\x01" % s["admin token"].encode(),
        b"Cookie: session=%s\x01" % s["cookie"].encode(),
    ):
        got = await exchange(proxy.run.admin_address, admin_req(b"GET", b"/status", line))
        assert got.data.split(b" ", 2)[1] == b"400", got.data


def _record_text(record: logging.LogRecord) -> str:
    text = record.getMessage()
    if record.exc_info:
        text += logging.Formatter().formatException(record.exc_info)
    if record.exc_text:
        text += record.exc_text
    return text


@contextlib.contextmanager
def bgproxy_warning() -> Iterator[asyncio.Event]:
    """An event set by the next WARNING (or worse) from a ``bgproxy`` logger."""
    event = asyncio.Event()

    class Notify(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.levelno >= logging.WARNING:
                event.set()

    handler = Notify()
    logger = logging.getLogger("bgproxy")
    logger.addHandler(handler)
    try:
        yield event
    finally:
        logger.removeHandler(handler)


@pytest.fixture
async def secret_proxy(
    recorders: dict[str, Recorder],
    start_proxy: StartProxy,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> Proxy:
    """A proxy with an admin token and an override token that has served traffic carrying
    every secret (green is dead, so some of it failed), with DEBUG logs captured."""
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("BGPROXY_ADMIN_TOKEN", ADMIN_TOKEN)
    monkeypatch.setenv("BG_QA", SECRETS["override token"])
    proxy = await start_proxy(
        config_dict(
            [recorders["blue"].url],
            [dead_address()],
            routing={"override_token_env": "BG_QA"},
            health_check={"path": HC_PATH.decode(), "interval": 3600},
            timeouts={"request_header": 0.5},  # a fast sweeper: the 4xx summary comes soon
        )
    )
    with bgproxy_warning() as warned:
        await _traffic_with_secrets(proxy)
        await asyncio.wait_for(warned.wait(), 3.0)
    return proxy


async def test_secrets_never_in_bgproxy_logs(
    secret_proxy: Proxy, caplog: pytest.LogCaptureFixture
) -> None:
    # the traffic ran in the fixture: its records are the setup phase's
    assert any(r.name.startswith("bgproxy.") for r in caplog.get_records("setup"))
    leaked = [
        (r.name, r.levelname, _leaks(_record_text(r)))
        for r in caplog.get_records("setup") + caplog.records
        if r.name.startswith("bgproxy") and _leaks(_record_text(r))
    ]
    assert leaked == []


async def test_secrets_never_in_any_process_log(
    secret_proxy: Proxy, caplog: pytest.LogCaptureFixture
) -> None:
    leaked = [
        (r.name, r.levelname, _leaks(_record_text(r)))
        for r in caplog.get_records("setup") + caplog.records
        if _leaks(_record_text(r))
    ]
    assert leaked == []


async def test_secrets_never_in_metrics(secret_proxy: Proxy) -> None:
    proxy = secret_proxy
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    async with proxy.session.get(proxy.admin_url + "/metrics", headers=headers) as resp:
        if resp.status == 404:
            pytest.skip("no /metrics endpoint yet")
        assert resp.status == 200
        text = await resp.text()
    assert "bgproxy_" in text
    assert _leaks(text) == []


async def test_bad_request_flood_is_one_rate_limited_warning(
    recorders: dict[str, Recorder], start_proxy: StartProxy, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    edge = await make_edge(recorders, start_proxy)
    bad = [
        req(b"/f", b"GET", b"X-A: \x00"),
        req(b"/f", b"POST", b"Content-Length: +1"),
        b"GET /f HTTP/1.1\nHost: x\n\n",
        req(b"/f", b"GET", b"X-Bg-Color: purple"),
        req(b"/f", b"GET", b"Host: twice.test"),
    ]
    with bgproxy_warning() as warned:
        for batch in range(10):
            got = await asyncio.gather(
                *(exchange(edge.addr, bad[(batch + i) % len(bad)]) for i in range(50))
            )
            assert all(g.closed and g.data.startswith(b"HTTP/1.1 4") for g in got)
        await asyncio.wait_for(warned.wait(), 3.0)  # the summary comes at the next sweep
    lines = [
        r
        for r in caplog.records
        if r.levelno >= logging.WARNING and (r.name == "bgproxy" or r.name.startswith("bgproxy."))
    ]
    assert 1 <= len(lines) <= 3, [r.getMessage() for r in lines]


def test_c_parser_is_in_use() -> None:
    from proxy.http1 import assert_c_parser

    assert_c_parser()  # raises on a pure-Python fallback
    from httptools.parser import parser as cparser

    assert str(cparser.__file__).endswith((".so", ".pyd"))
