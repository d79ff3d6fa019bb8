"""Pooled keep-alive connections to upstream targets.

An ``UpstreamConnection`` is an ``asyncio.Protocol`` that outlives requests: the client
side attaches it for one exchange (``begin``), and what it reads goes to its response
half (``ResponseReader``, proxy/response.py), which parses the response, rewrites its head
and streams the body to the client. A connection is returned to the pool only when both
the request and the response framing ended cleanly; anything unexpected (bytes while
idle, a 101 nobody asked for, a parse error) closes it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import cast

import httptools

from proxy._hotpath import KIND
from proxy.errors import (
    UpstreamConnectError,
    UpstreamProtocolError,
    UpstreamTimeout,
    UpstreamTlsError,
)
from proxy.http1 import head_end
from proxy.interfaces import ResponseSink
from proxy.pools import Upstream
from proxy.response import ExtraBytes, HeadResponseDone, ResponseReader, response_parser
from proxy.upstream_tls import FailureLog, tls_failure

log = logging.getLogger("bgproxy.upstream")

# The compiled build reads plain responses (see ResponseReader._fast_response) without
# llhttp's per-header callbacks; interpreted, those callbacks are the cheaper way, so only
# llhttp runs there.
_FAST = KIND == "compiled"


class UpstreamConnection(ResponseReader):
    # A protocol by duck typing: the compiled build makes it a C type, which can derive
    # from a C type (ResponseReader) but not from a Python class.

    __slots__ = (
        "closed",
        "connected",
        "idle_since",
        "pool",
        "reused",
        "transport",
        "upstream",
    )

    def __init__(self, pool: ConnectionPool, upstream: Upstream) -> None:
        self.pool = pool
        self.upstream = upstream
        self.transport: asyncio.Transport | None = None
        self.parser = response_parser(self)
        self.client = None
        self.connected = asyncio.get_running_loop().create_future()
        self.closed = False
        self.reused = False
        self.idle_since = 0.0
        self.tunnel = False
        self.at_start = True
        self._remaining = -1
        self._reset_exchange()

    # -- lifecycle ------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        if not self.connected.done():
            self.connected.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool.forget(self)
        if not self.connected.done():
            self.connected.set_exception(UpstreamConnectError("connection lost"))
        client = self.client
        if client is None:
            return
        if self.tunnel:
            client.tunnel_closed()
            return
        if self.response_started and self._body_until_eof and not self.done:
            self._end_close_delimited(client)
            return
        if not self.done:
            client.upstream_failed(self, UpstreamProtocolError("upstream closed the connection"))

    def eof_received(self) -> bool | None:
        return False  # close our side too

    def pause_writing(self) -> None:
        if self.client is not None:
            self.client.pause_reading_for_upstream()

    def resume_writing(self) -> None:
        if self.client is not None:
            self.client.resume_reading_for_upstream()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.pool.forget(self)
            if self.transport is not None:
                self.transport.close()

    def abort(self) -> None:
        self.closed = True
        self.pool.forget(self)
        if self.transport is not None:
            self.transport.abort()

    # -- the exchange ---------------------------------------------------------------------

    def begin(self, client: ResponseSink, is_head: bool, upgrade: bool) -> None:
        self.client = client
        self.is_head = is_head
        self.upgrade_requested = upgrade

    def send(self, data: bytes) -> None:
        if not self.closed and self.transport is not None:
            self.transport.write(data)

    def data_received(self, data: bytes) -> None:
        if self.tunnel:
            client = self.client
            if client is not None:
                client.tunnel_data(data)
            return
        if self.client is None or self.done:
            # Bytes nobody asked for: this connection can never be trusted again.
            self.abort()
            return
        if self._remaining >= 0:
            self._fast_body(data)
            return
        if self.at_start and _FAST and not self.is_head and not self.upgrade_requested:
            end = head_end(data)
            if end > 0 and self._fast_response(data, end + 4):
                return
        self.at_start = False
        out = self._out
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            self._start_tunnel(data[exc.args[0] :])
            return
        except httptools.HttpParserCallbackError as exc:
            if isinstance(exc.__context__, HeadResponseDone):
                self._finish_head_response(data)
            elif isinstance(exc.__context__, ExtraBytes) or self.done:
                self.request_done = False  # bytes after the response: never reuse
            else:
                self._fail(UpstreamProtocolError("bad response"))
                return
        except httptools.HttpParserError:
            if not self.done:
                self._fail(UpstreamProtocolError("bad response"))
                return
            # Garbage after a whole response: the response stands, the connection goes.
            self.request_done = False
        client = self.client
        if out and client is not None:
            client.write(b"".join(out) if len(out) > 1 else out[0])
            out.clear()
        if self.done and client is not None:
            client.response_complete(self, reusable=self._reusable())
        elif client is not None:
            client.upstream_activity()

    def _fail(self, exc: Exception) -> None:
        client = self.client
        self.client = None
        self.abort()
        if client is not None:
            client.upstream_failed(self, exc)

    def _start_tunnel(self, rest: bytes) -> None:
        client = self.client
        out = self._out
        if client is None:
            self.abort()
            return
        if out:
            client.write(b"".join(out))
            out.clear()
        self.tunnel = True
        client.start_tunnel(self)
        if rest:
            client.tunnel_data(rest)


class ConnectionPool:
    """Idle keep-alive connections per upstream, most recently used first."""

    def __init__(self, connect_timeout: float, keepalive: float, max_idle: int = 256) -> None:
        self.connect_timeout = connect_timeout
        self.keepalive = keepalive
        self.max_idle = max_idle
        # Stacks by ``Upstream.pool_key``: the url, and for https how it is verified.
        self._idle: dict[str, list[UpstreamConnection]] = {}
        self._all: set[UpstreamConnection] = set()
        self.tls_log = FailureLog()

    def take_idle(self, upstream: Upstream) -> UpstreamConnection | None:
        stack = self._idle.get(upstream.pool_key)
        while stack:
            conn = stack.pop()
            if not conn.closed:
                conn.reused = True
                return conn
        return None

    async def connect(
        self, upstream: Upstream, timeout: float | None = None
    ) -> UpstreamConnection:
        loop = asyncio.get_running_loop()
        conn = UpstreamConnection(self, upstream)
        tls = upstream.tls
        try:
            # The budget covers the TLS handshake too: a target that accepts and then
            # stalls it is as unreachable as one that never accepts.
            async with asyncio.timeout(timeout or self.connect_timeout):
                if tls is None:
                    await loop.create_connection(
                        lambda: cast(asyncio.Protocol, conn), upstream.host, upstream.port
                    )
                else:
                    await loop.create_connection(
                        lambda: cast(asyncio.Protocol, conn),
                        upstream.host,
                        upstream.port,
                        ssl=tls.context,
                        server_hostname=tls.server_hostname,
                    )
        except TimeoutError as exc:
            conn.abort()
            raise UpstreamTimeout("connect timed out") from exc
        except OSError as exc:
            reason = tls_failure(exc) if tls is not None else None
            if reason is not None:
                self.tls_log.note(upstream.url, reason)
                raise UpstreamTlsError(reason) from exc
            raise UpstreamConnectError("connect failed") from exc
        self._all.add(conn)
        return conn

    def release(self, conn: UpstreamConnection) -> None:
        if conn.closed:
            return
        conn.client = None
        # Only what a finished exchange leaves set; the next one sets the rest as it goes.
        conn._trailers = None
        conn._body_until_eof = False
        conn.at_start = True  # a reusable connection ended at a message boundary
        conn.response_started = False
        conn.done = False
        conn.idle_since = time.monotonic()
        key = conn.upstream.pool_key
        stack = self._idle.get(key)
        if stack is None:  # not setdefault: that builds a list on every release
            stack = self._idle[key] = []
        if len(stack) >= self.max_idle:
            conn.close()
            return
        stack.append(conn)

    def forget(self, conn: UpstreamConnection) -> None:
        self._all.discard(conn)
        stack = self._idle.get(conn.upstream.pool_key)
        if stack and conn in stack:
            stack.remove(conn)

    def sweep(self, now: float) -> None:
        """Close connections idle longer than the keep-alive time (called by the sweeper)."""
        limit = now - self.keepalive
        for stack in self._idle.values():
            while stack and stack[0].idle_since < limit:
                stack.pop(0).close()

    def close_idle(self, urls: set[str] | None = None) -> None:
        for stack in list(self._idle.values()):
            for conn in list(stack):
                if urls is None or conn.upstream.url in urls:
                    conn.close()

    def close_all(self) -> None:
        for conn in list(self._all):
            conn.abort()
        self._idle.clear()
