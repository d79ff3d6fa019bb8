"""Pooled keep-alive connections to upstream targets, and the response half of an exchange.

An ``UpstreamConnection`` is an ``asyncio.Protocol`` that outlives requests: the client
side attaches it for one exchange (``begin``), it parses the response head with llhttp,
rewrites it, and streams the body to the client transport, collecting everything one
``data_received`` produces into a single write. A connection is returned to the pool only
when both the request and the response framing ended cleanly; anything unexpected
(bytes while idle, a 101 nobody asked for, a parse error) closes it.
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
from proxy.headers import HOP_BY_HOP, drop_fields
from proxy.http1 import (
    by_length,
    connection_close,
    field_kind,
    head_end,
    kind_hints,
    line_end,
    token_end,
)
from proxy.interfaces import ResponseSink
from proxy.pools import Upstream
from proxy.upstream_tls import FailureLog, tls_failure

log = logging.getLogger("bgproxy.upstream")

_STATUS_LINES: dict[tuple[int, bytes], bytes] = {}
_NO_BODY_STATUS = frozenset({204, 304})


def _status_line(status: int, reason: bytes) -> bytes:
    key = (status, reason)
    line = _STATUS_LINES.get(key)
    if line is None:
        line = b"HTTP/1.1 %d %s\r\n" % (status, reason)
        if len(_STATUS_LINES) < 256:
            _STATUS_LINES[key] = line
    return line


class _HeadResponseDone(Exception):
    """Raised from the parser callback to stop at the head of a response to HEAD."""


class _ExtraBytes(Exception):
    """A second response began where none was asked for."""


_R_CL, _R_TE, _R_CONN, _R_HOP = range(4)
_RESPONSE_SPECIAL: dict[bytes, int] = dict.fromkeys(HOP_BY_HOP, _R_HOP)
_RESPONSE_SPECIAL.update(
    {b"content-length": _R_CL, b"transfer-encoding": _R_TE, b"connection": _R_CONN}
)
# The Connection values nearly every upstream sends name nothing beyond hop-by-hop.
_CONN_VALUES: dict[bytes, set[bytes]] = {
    v: set() for v in (b"keep-alive", b"Keep-Alive", b"close", b"Close", b"upgrade", b"Upgrade")
}

# Body framing towards the client.
_RAW, _CHUNKED, _NONE = 0, 1, 2

# The compiled build reads plain responses (see _fast_response) without llhttp's per-header
# callbacks; interpreted, those callbacks are the cheaper way, so only llhttp runs there.
_FAST = KIND == "compiled"
# The response fields with special handling, by name length, for the fast path.
_SPECIAL_BY_LENGTH = by_length(_RESPONSE_SPECIAL)
_SPECIAL_HINTS = kind_hints(_RESPONSE_SPECIAL)


def _response_parser(protocol: UpstreamConnection) -> httptools.HttpResponseParser:
    """llhttp for responses. Strict, but RFC 9112 §6.3 settles a response with both
    Content-Length and Transfer-Encoding (the latter wins; ``_final_head`` removes the
    former and never reuses the connection), and §7.1.1 allows white space before a
    chunk extension; nginx and HAProxy take both."""
    parser = httptools.HttpResponseParser(protocol)
    parser.set_dangerous_leniencies(
        lenient_chunked_length=True, lenient_spaces_after_chunk_size=True
    )
    return parser


def _end_head(lines: list[bytes], client: ResponseSink) -> None:
    """The end of a response head for the client, on both reading paths: the client
    connection's own Connection field (the upstream's is never forwarded), the fields the
    proxy adds (``response_extra``) and the blank line."""
    if client.closing:
        lines.append(b"Connection: close\r\n")
    elif not client.http11:
        lines.append(b"Connection: keep-alive\r\n")
    lines.append(client.response_extra())
    lines.append(b"\r\n")


class UpstreamConnection:
    # A protocol by duck typing: the compiled build makes it a C type, which cannot
    # inherit a Python class.

    __slots__ = (
        "_body_until_eof",
        "_framing",
        "_headers",
        "_interim",
        "_keep_alive",
        "_out",
        "_reason",
        "_remaining",
        "_trailers",
        "at_start",
        "client",
        "closed",
        "connected",
        "done",
        "idle_since",
        "is_head",
        "parser",
        "pool",
        "request_done",
        "response_started",
        "reused",
        "transport",
        "tunnel",
        "upgrade_requested",
        "upstream",
    )

    def __init__(self, pool: ConnectionPool, upstream: Upstream) -> None:
        self.pool = pool
        self.upstream = upstream
        self.transport: asyncio.Transport | None = None
        self.parser = _response_parser(self)
        self.client: ResponseSink | None = None
        self.connected = asyncio.get_running_loop().create_future()
        self.closed = False
        self.reused = False
        self.idle_since = 0.0
        self.tunnel = False
        self.at_start = True  # llhttp has seen nothing of the response in progress
        self._remaining = -1  # body bytes still due on the fast path; -1: not on it
        self._reset_exchange()

    def _reset_exchange(self) -> None:
        self._out: list[bytes] = []
        self._headers: list[tuple[bytes, bytes]] = []
        self._trailers: list[tuple[bytes, bytes]] | None = None
        self._reason = b""
        self._interim = False
        self._keep_alive = False
        self._framing = _RAW
        self._body_until_eof = False
        self.response_started = False
        self.done = False
        self.request_done = False
        self.is_head = False
        self.upgrade_requested = False

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
            # A close-delimited body ends here; re-framed as chunked, it gets its terminator.
            if self._framing == _CHUNKED:
                client.write(b"0\r\n\r\n")
            self.done = True
            client.response_complete(self, reusable=False)
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
            if isinstance(exc.__context__, _HeadResponseDone):
                self._finish_head_response(data)
            elif isinstance(exc.__context__, _ExtraBytes) or self.done:
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

    def _fast_response(self, data: bytes, end: int) -> bool:
        """Read a plain response (``HTTP/1.1``, a status of 200-599 but 204/304, one
        ``Content-Length``, no ``Transfer-Encoding``, ``Connection`` at most keep-alive or
        close) whose whole head is in ``data[:end]``, and forward it: its header lines go
        out as they came, less the hop-by-hop ones. Anything else returns False having
        changed nothing, and llhttp reads the response as usual. Every head this accepts,
        llhttp accepts the same way (tests/test_fast_response.py holds it to that).
        """
        # Status line: "HTTP/1.1 NNN reason\r\n".
        if end < 17 or not data.startswith(b"HTTP/1.1 ") or data[12] != 32:
            return False
        i = 9
        status = 0
        while i < 12:
            c = data[i]
            if c < 48 or c > 57:
                return False
            status = status * 10 + (c - 48)
            i += 1
        if status < 200 or status == 204 or status == 304 or status > 599:
            return False
        i = line_end(data, 13)
        if i < 0:
            return False
        line = i + 2  # start of the first header line
        parts = [data[:line]]
        run = line  # start of the run of header lines forwarded as they came
        length = -1
        keep_alive = True
        while line < end - 2:
            # Name: a token, then ':' with no space before it.
            name_end = token_end(data, line)
            if name_end == line or data[name_end] != 58:
                return False
            value = name_end + 1
            while data[value] == 32 or data[value] == 9:
                value += 1
            i = line_end(data, value)
            if i < 0:
                return False
            value_end = i
            while value_end > value and (data[value_end - 1] == 32 or data[value_end - 1] == 9):
                value_end -= 1
            nxt = i + 2
            kind = field_kind(data, line, name_end, _SPECIAL_BY_LENGTH, _SPECIAL_HINTS)
            if kind == _R_CL:
                # Digits only, as llhttp wants them, and only once.
                if length != -1 or value_end == value or value_end - value > 15 or value_end != i:
                    return False
                length = 0
                for j in range(value, value_end):
                    c = data[j]
                    if c < 48 or c > 57:
                        return False
                    length = length * 10 + (c - 48)
            elif kind == _R_TE:
                return False
            elif kind != -1:
                # Connection and the other hop-by-hop fields: end the run before the line.
                if kind == _R_CONN:
                    close = connection_close(data, value, value_end)
                    if close < 0:
                        return False
                    keep_alive = keep_alive and not close
                if line > run:
                    parts.append(data[run:line])
                run = nxt
            line = nxt
        if length == -1:
            return False  # close-delimited: llhttp's path handles the ending

        client = self.client
        assert client is not None
        if end - 2 > run:
            parts.append(data[run : end - 2])
        client.response_head(self, status)
        self._keep_alive = keep_alive
        self.response_started = True
        self._framing = _RAW
        _end_head(parts, client)
        body = len(data) - end
        if body > length:
            self.request_done = False  # bytes after the response: never reuse
            body = length
        if body:
            parts.append(data[end : end + body])
        self._remaining = length - body
        client.write(b"".join(parts))
        self._fast_end()
        return True

    def _fast_body(self, data: bytes) -> None:
        remaining = self._remaining
        client = self.client
        assert client is not None
        if len(data) > remaining:
            self.request_done = False  # bytes after the response: never reuse
            data = data[:remaining]
        self._remaining = remaining - len(data)
        if data:
            client.write(data)
        self._fast_end()

    def _fast_end(self) -> None:
        client = self.client
        if self._remaining == 0:
            self._remaining = -1
            self.done = True
            if client is not None:
                client.response_complete(self, reusable=self._reusable())
        elif client is not None:
            client.upstream_activity()

    def _reusable(self) -> bool:
        return self.request_done and self._keep_alive and not self._body_until_eof

    def _fail(self, exc: Exception) -> None:
        client = self.client
        self.client = None
        self.abort()
        if client is not None:
            client.upstream_failed(self, exc)

    def _finish_head_response(self, data: bytes) -> None:
        # llhttp cannot be told a response answers HEAD, so it would wait for a body that
        # never comes: stop at the head, and keep the connection only if the head ended
        # exactly at the end of what was read.
        self.parser = _response_parser(self)
        self.done = True
        if not data.endswith(b"\r\n\r\n"):
            self.request_done = False  # makes it unreusable

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

    # -- parser callbacks ---------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self.done:
            raise _ExtraBytes
        self._headers = []
        self._reason = b""

    def on_status(self, reason: bytes) -> None:
        self._reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._trailers is not None:
            self._trailers.append((name, value))
        else:
            self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        client = self.client
        assert client is not None
        status = self.parser.get_status_code()
        if 100 <= status < 200 and status != 101:
            # Interim responses go to HTTP/1.1 clients as they are; the final one follows.
            self._interim = True
            if client.http11:
                self._out.append(self._head(status, b"", close=False, te=False))
            return
        if status == 101 and not self.upgrade_requested:
            raise UpstreamProtocolError("101 without an upgrade request")
        client.response_head(self, status)
        self._keep_alive = self.parser.should_keep_alive()
        if status == 101:
            self._out.append(self._head(status, client.response_extra(), close=False, te=False))
            return
        self.response_started = True
        if self.is_head:
            self._out.append(self._head(status, client.response_extra(), client.closing, False))
            raise _HeadResponseDone
        self._out.append(self._final_head(status, client))

    def _head(self, status: int, extra: bytes, close: bool, te: bool) -> bytes:
        """Heads off the common path: interim (1xx), 101 and responses to HEAD."""
        parts = [_status_line(status, self._reason)]
        drop: set[bytes] = set()
        for name, value in self._headers:
            if name.lower() == b"connection":
                drop = drop_fields(value, drop, HOP_BY_HOP)
        for name, value in self._headers:
            low = name.lower()
            if low in HOP_BY_HOP or low in drop:
                if status == 101 and low in (b"connection", b"upgrade"):
                    parts.append(b"%s: %s\r\n" % (name, value))
                continue
            parts.append(b"%s: %s\r\n" % (name, value))
        if te:
            parts.append(b"Transfer-Encoding: chunked\r\n")
        if close:
            parts.append(b"Connection: close\r\n")
        elif self.client is not None and not self.client.http11 and status != 101:
            parts.append(b"Connection: keep-alive\r\n")
        parts.append(extra)
        parts.append(b"\r\n")
        return b"".join(parts)

    def _final_head(self, status: int, client: ResponseSink) -> bytes:
        """The response head for the client, and the body framing, in one pass."""
        lines = [_status_line(status, self._reason)]
        has_cl = has_te = False
        codings: bytes | None = None  # a transfer coding other than chunked, kept for the client
        drop: set[bytes] | None = None
        for name, value in self._headers:
            low = name.lower()
            kind = _RESPONSE_SPECIAL.get(low, -1)
            if kind == -1:
                lines.extend((name, b": ", value, b"\r\n"))
            elif kind == _R_CL:
                has_cl = True
                lines.extend((name, b": ", value, b"\r\n"))
            elif kind == _R_TE:
                # Only a final "chunked" delimits the body; any other coding runs to close.
                has_te = value.rpartition(b",")[2].strip().lower() == b"chunked"
                if not has_te:
                    codings = value
            elif kind == _R_CONN:
                tokens = _CONN_VALUES.get(value)
                if tokens is None:
                    tokens = drop_fields(value, None, HOP_BY_HOP)
                if tokens:
                    drop = tokens if drop is None else drop | tokens
        if has_cl and (has_te or codings is not None):
            # Transfer-Encoding overrides Content-Length, which must go (RFC 9112 §6.3);
            # someone may have framed this response by the other one: never reuse.
            has_cl = False
            self._keep_alive = False
            drop = drop or set()
        if drop is not None:
            # Rare: the upstream named its own hop-by-hop headers in Connection.
            lines = [lines[0]] + [
                b"%s: %s\r\n" % (n, v) for n, v in self._headers
                if (n.lower() not in drop and n.lower() not in _RESPONSE_SPECIAL)
                or (has_cl and n.lower() == b"content-length")
            ]
        te = False
        if status in _NO_BODY_STATUS:
            self._framing = _NONE
        elif has_cl:
            self._framing = _RAW
        else:
            # Chunked or close-delimited: re-chunk for HTTP/1.1 clients, else close after.
            self._body_until_eof = not has_te
            if client.http11:
                self._framing = _CHUNKED
                self._trailers = []
                te = True
            else:
                self._framing = _RAW
                client.closing = True
        if te:
            if codings is not None:
                lines += (b"Transfer-Encoding: ", codings, b", chunked\r\n")
            else:
                lines.append(b"Transfer-Encoding: chunked\r\n")
        _end_head(lines, client)
        return b"".join(lines)

    def on_body(self, body: bytes) -> None:
        if self._framing == _CHUNKED:
            self._out.append(b"%x\r\n%s\r\n" % (len(body), body))
        else:
            self._out.append(body)

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
            return
        if self.tunnel or self.client is None:
            return
        if self._framing == _CHUNKED:
            trailers = self._trailers or []
            self._out.append(b"0\r\n" + b"".join(b"%s: %s\r\n" % t for t in trailers) + b"\r\n")
        self.done = True


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
