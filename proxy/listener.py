"""The client side of the data plane: one ``asyncio.Protocol`` per client connection.

llhttp (via httptools) parses the request head strictly; on the head's completion the
request is routed from one snapshot, a pooled upstream connection is attached, and the
rewritten head plus whatever body bytes arrived are written in one go. Bodies stream
both ways with backpressure. Timeouts are deadlines checked by the server's coarse
sweeper, never a timer per request.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import logging
import random
from typing import TYPE_CHECKING

import httptools

from proxy.errors import (
    NoHealthyUpstream,
    Reply,
    UpstreamError,
    UpstreamTimeout,
    error_response,
    reply_for,
)
from proxy.headers import HOP_BY_HOP, PROTECTED, connection_tokens, drop_cookie, get_cookie
from proxy.router import NO_ATTRS, REJECT, RequestAttrs, route
from proxy.settings import OVERRIDE_TOKEN_HEADER
from proxy.state import Color
from proxy.websocket import WebSocketRelay

if TYPE_CHECKING:
    from proxy.pools import Upstream
    from proxy.server import ProxyServer
    from proxy.upstream import UpstreamConnection

log = logging.getLogger("bgproxy.listener")

# Phases, for the sweeper: what a passed deadline means.
IDLE, HEAD, UPSTREAM, STREAM, TUNNEL, CLOSED = range(6)

IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"TRACE"})

# Request headers with special handling; every other header is forwarded as it came.
_H_HOST, _H_CONN, _H_HOP, _H_TE, _H_UPGRADE, _H_XFF, _H_UNTRUSTED = range(7)
_H_COOKIE, _H_TOKEN, _H_CL, _H_WSKEY = range(7, 11)
_SPECIAL: dict[bytes, int] = {name: _H_HOP for name in HOP_BY_HOP}
_SPECIAL.update(
    {
        b"host": _H_HOST,
        b"connection": _H_CONN,
        b"transfer-encoding": _H_TE,
        b"upgrade": _H_UPGRADE,
        b"x-forwarded-for": _H_XFF,
        b"forwarded": _H_UNTRUSTED,
        b"x-real-ip": _H_UNTRUSTED,
        b"x-forwarded-proto": _H_UNTRUSTED,
        b"x-forwarded-host": _H_UNTRUSTED,
        b"cookie": _H_COOKIE,
        OVERRIDE_TOKEN_HEADER: _H_TOKEN,
        b"content-length": _H_CL,
        b"sec-websocket-key": _H_WSKEY,
    }
)

_BODY_BUFFER_LIMIT = 256 * 1024
_NO_TRAILER = frozenset(_SPECIAL) | {b"x-bg-color", b"authorization", b"cookie"}


def assert_c_parser() -> None:
    """Strictness and speed both rest on llhttp: refuse to run on a pure-Python fallback."""
    from httptools.parser import parser as cparser

    if not str(cparser.__file__).endswith((".so", ".pyd")):
        raise RuntimeError("httptools is not using its C parser (llhttp)")


class _Reject(Exception):
    def __init__(self, reply: Reply) -> None:
        self.reply = reply


class ClientConnection(asyncio.Protocol):
    # Slots: faster attribute access on the hot path and less memory per idle connection.
    __slots__ = (
        "_active", "_attempts", "_body_buf", "_body_bytes", "_chunked", "_connecting", "_extra",
        "_head", "_head_bytes", "_headers", "_method", "_paused", "_queue", "_req_done",
        "_response_started", "_started", "_status", "_trailers", "_tunnel", "_up_out",
        "_upgrade", "_url", "_websocket", "_xff_line", "closing", "color", "deadline", "http11",
        "parser", "peer", "phase", "server", "settings", "transport", "up", "upstream", "ws",
    )  # fmt: skip

    def __init__(self, server: ProxyServer) -> None:
        self.server = server
        self.settings = server.settings
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.peer = ""
        self.phase = IDLE
        self.deadline = 0.0
        self.closing = False  # send Connection: close and close after this response
        self.http11 = True
        self._paused = 0
        self._queue: list[_Pending] | None = None
        self._up_out: list[bytes] | None = None
        self._reset_request()

    def _reset_request(self) -> None:
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._head_bytes = 0
        self._trailers: list[tuple[bytes, bytes]] | None = None
        self.up: UpstreamConnection | None = None
        self.upstream: Upstream | None = None
        self.color: Color | None = None
        self._extra = b""
        self._method = b""
        self._head = b""
        self._chunked = False
        self._body_buf: list[bytes] | None = None
        self._body_bytes = 0
        self._req_done = False
        self._response_started = False
        self._attempts = 0
        self._connecting: asyncio.Task[None] | None = None
        self._upgrade = False
        self._tunnel = False
        self._websocket = False
        self.ws: WebSocketRelay | None = None
        self._started = 0.0
        self._status = 0
        self._active = False

    # -- connection lifecycle -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = t = transport  # type: ignore[assignment]
        server = self.server
        peer = transport.get_extra_info("peername")
        self.peer = peer[0] if peer else ""
        self._xff_line = b"X-Forwarded-For: %s\r\n" % self.peer.encode()
        if len(server.connections) >= self.settings.max_connections or server.stopping:
            # Past the cap, refuse fast: a short 503 costs less than a slow accept queue.
            t.write(error_response(Reply.SERVICE_UNAVAILABLE))  # type: ignore[attr-defined]
            t.close()
            self.phase = CLOSED
            return
        server.connections.add(self)
        self.deadline = server.now + self.settings.request_header_timeout

    def connection_lost(self, exc: Exception | None) -> None:
        self.phase = CLOSED
        self.server.connections.discard(self)
        if self._connecting is not None:
            self._connecting.cancel()
            self._connecting = None
        up = self.up
        if up is not None:
            self.up = None
            up.client = None
            if self.ws is not None:
                self.ws.client_lost()
                up.close()
            else:
                up.abort()  # mid-exchange: its stream state is unknown
        self._end_exchange(aborted=True)

    def eof_received(self) -> bool | None:
        # A client half-close: finish the response in flight, then close.
        self.closing = True
        return self._active or self.up is not None

    def pause_writing(self) -> None:
        up = self.up
        if up is not None and up.transport is not None:
            up.transport.pause_reading()

    def resume_writing(self) -> None:
        up = self.up
        if up is not None and up.transport is not None and not up.closed:
            up.transport.resume_reading()

    def pause_reading_for_upstream(self) -> None:
        self._pause(1)

    def resume_reading_for_upstream(self) -> None:
        self._resume(1)

    def _pause(self, flag: int) -> None:
        if not self._paused and self.transport is not None:
            self.transport.pause_reading()
        self._paused |= flag

    def _resume(self, flag: int) -> None:
        if self._paused & flag:
            self._paused &= ~flag
            if not self._paused and self.transport is not None and self.phase != CLOSED:
                self.transport.resume_reading()

    def write(self, data: bytes) -> None:
        if self.phase != CLOSED and self.transport is not None:
            self.transport.write(data)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def active_on(self, color: Color) -> bool:
        """A request (not a tunnel) on ``color`` is running on this connection."""
        return self._active and self.color is color and not self._tunnel

    def ws_close_started(self, now: float) -> None:
        # Our close frame is out: the client gets a bounded time to answer it.
        self.deadline = now + max(1.0, self.server.config.websocket.close_grace)

    def on_deadline(self) -> None:
        """The sweeper found this connection past its deadline."""
        phase = self.phase
        if phase == HEAD:
            self._reply(Reply.REQUEST_TIMEOUT)
        elif phase == UPSTREAM and not self._response_started:
            self.server.note_upstream_error(self.color, "timeout")
            self._fail(UpstreamTimeout("upstream response timed out"))
        elif self.transport is not None:
            self.transport.abort() if phase in (STREAM, UPSTREAM) else self.transport.close()

    # -- reading --------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        phase = self.phase
        if phase == TUNNEL:
            if self.ws is not None:
                self.ws.from_client(data)
            elif self.up is not None:
                self.up.send(data)
            return
        if phase == CLOSED:
            return
        if phase == IDLE or phase == HEAD:
            self._head_bytes += len(data)
        # Everything this read produces for the upstream goes out in one write, and only
        # if the whole read parsed: a smuggling attempt in one packet never leaves here.
        out: list[bytes] = []
        self._up_out = out
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            self._flush_upstream(out)
            self._after_upgrade_head(data[exc.args[0] :])
            return
        except httptools.HttpParserCallbackError as exc:
            ctx = exc.__context__
            if isinstance(ctx, _Reject):
                self._parse_failed(ctx.reply, out)
            else:
                if ctx is not None and not isinstance(ctx, UpstreamError):
                    log.exception("internal error handling a request", exc_info=ctx)
                self._up_out = None
                self._reply(Reply.BAD_GATEWAY if self.up else Reply.BAD_REQUEST)
            return
        except httptools.HttpParserInvalidMethodError:
            bad = Reply.NOT_IMPLEMENTED if self._method_shaped(data) else Reply.BAD_REQUEST
            self._parse_failed(bad, out)
            return
        except httptools.HttpParserError:
            self._parse_failed(Reply.BAD_REQUEST, out)
            return
        self._flush_upstream(out)
        if self.phase == HEAD:  # the head is still incomplete: never the case on the fast path
            if self._head_bytes > self.settings.max_header_bytes:
                self._reply(Reply.HEADERS_TOO_LARGE)
            elif self._head_bytes == len(data) and _is_http09(data):
                self._reply(Reply.BAD_REQUEST)  # llhttp would wait for a version that never comes

    def _parse_failed(self, reply: Reply, out: list[bytes]) -> None:
        """A read did not parse. If the error is in a request pipelined behind a running
        exchange, that exchange's bytes were good: send them, and answer the error in its
        turn (writing it now would cut into the response in flight)."""
        if self._active and (self._req_done or self._queue):
            self._flush_upstream(out)
            if not self._queue:
                self._queue = [_Pending()]
            self._queue[-1].reject = reply
            self._pause(4)
            return
        self._up_out = None
        self._reply(reply)

    def _flush_upstream(self, out: list[bytes]) -> None:
        self._up_out = None
        if out and self.up is not None:
            self.up.send(out[0] if len(out) == 1 else b"".join(out))

    def _to_upstream(self, data: bytes) -> None:
        out = self._up_out
        if out is not None:
            out.append(data)
        elif self.up is not None:
            self.up.send(data)

    @staticmethod
    def _method_shaped(data: bytes) -> bool:
        word = data.split(b" ", 1)[0]
        return 0 < len(word) <= 20 and word.isalpha() and word.isupper()

    def on_message_begin(self) -> None:
        if self._active:
            # Pipelined: park this request until the response before it is done.
            if self._queue is None:
                self._queue = []
            self._queue.append(_Pending())
            self._pause(4)
            return
        self.phase = HEAD
        self.deadline = self.server.now + self.settings.request_header_timeout

    def on_url(self, url: bytes) -> None:
        if self._queue:
            pending = self._queue[-1]
            pending.url += url
            pending.size += len(url)
            if pending.size > self.settings.max_header_bytes:
                raise _Reject(Reply.URI_TOO_LONG)
            return
        self._url += url
        if len(self._url) > self.settings.max_header_bytes:
            raise _Reject(Reply.URI_TOO_LONG)

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._queue:
            pending = self._queue[-1]
            if pending.head_done:
                pending.trailers.append((name, value))
                return
            pending.headers.append((name, value))
            pending.size += len(name) + len(value) + 4
            if (
                pending.size > self.settings.max_header_bytes
                or len(pending.headers) > self.settings.max_headers
            ):
                raise _Reject(Reply.HEADERS_TOO_LARGE)
            return
        if self._trailers is not None:
            self._trailers.append((name, value))
            return
        headers = self._headers
        headers.append((name, value))
        if len(headers) > self.settings.max_headers:
            raise _Reject(Reply.HEADERS_TOO_LARGE)

    def on_headers_complete(self) -> None:
        parser = self.parser
        if self._queue:
            pending = self._queue[-1]
            pending.head_done = True
            pending.method = parser.get_method()
            pending.version = parser.get_http_version()
            pending.keep_alive = parser.should_keep_alive()
            pending.upgrade = parser.should_upgrade()
            return
        self._dispatch(
            parser.get_method(),
            parser.get_http_version(),
            parser.should_keep_alive(),
            parser.should_upgrade(),
        )

    def on_body(self, body: bytes) -> None:
        if self._queue:
            self._queue[-1].body.append(body)
            return
        self._body(body)

    def _body(self, body: bytes) -> None:
        self._body_bytes += len(body)
        limit = self.settings.max_body_bytes
        if limit is not None and self._body_bytes > limit:
            raise _Reject(Reply.PAYLOAD_TOO_LARGE)
        self._send_body(b"%x\r\n%s\r\n" % (len(body), body) if self._chunked else body)
        self.deadline = self.server.now + self.settings.idle_timeout

    def on_message_complete(self) -> None:
        if self._queue:
            self._queue[-1].complete = True
            return
        self._request_complete()

    def _request_complete(self) -> None:
        if self._chunked:
            # Trailers may not carry framing, routing or forwarding fields (RFC 9110 §6.5.1).
            trailers = [t for t in self._trailers or () if t[0].lower() not in _NO_TRAILER]
            self._send_body(b"0\r\n" + b"".join(b"%s: %s\r\n" % t for t in trailers) + b"\r\n")
        self._req_done = True
        up = self.up
        if up is not None:
            up.request_done = True
        if self.phase == STREAM and not self._response_started:
            self.phase = UPSTREAM
            self.deadline = self.server.now + self.settings.upstream_response_timeout

    def _send_body(self, data: bytes) -> None:
        buf = self._body_buf
        if buf is not None:
            buf.append(data)
            if sum(map(len, buf)) > _BODY_BUFFER_LIMIT:
                self._pause(2)
        else:
            self._to_upstream(data)

    # -- dispatch -------------------------------------------------------------------------

    def _dispatch(self, method: bytes, version: str, keep_alive: bool, upgrade: bool) -> None:
        server = self.server
        s = self.settings = server.settings
        if version != "1.1" and version != "1.0":
            raise _Reject(Reply.VERSION_NOT_SUPPORTED)
        self.http11 = version == "1.1"
        if method == b"CONNECT":
            raise _Reject(Reply.NOT_IMPLEMENTED)
        if (
            self._head_bytes > s.max_header_bytes
            and sum(len(n) + len(v) + 4 for n, v in self._headers) + len(self._url)
            > s.max_header_bytes
        ):
            raise _Reject(Reply.HEADERS_TOO_LARGE)
        self._method = method
        self.closing = self.closing or not keep_alive or server.stopping

        url = self._url
        host: bytes | None = None
        override: bytes | None = None
        token: bytes | None = None
        cookie_override: bytes | None = None
        sticky: bytes | None = None
        te: bytes | None = None
        upgrade_value: bytes | None = None
        conn_tokens: set[bytes] | None = None
        xff: bytes | None = None
        ws_key: bytes | None = None
        content_length: bytes | None = None
        lines: list[bytes] = [method, b" ", b"", b" HTTP/1.1\r\n"]  # [2]: the target, below
        forwarded: set[bytes] = set()
        trusted = s.is_trusted(self.peer)
        override_name = s.override_header
        for name, value in self._headers:
            low = name.lower()
            kind = _SPECIAL.get(low)
            if kind is None:
                if low == override_name:
                    override = value
                    continue
                lines.extend((name, b": ", value, b"\r\n"))
            elif kind == _H_HOST:
                if host is not None:
                    raise _Reject(Reply.BAD_REQUEST)
                host = value
                lines.extend((name, b": ", value, b"\r\n"))
            elif kind == _H_COOKIE:
                cookie_override = get_cookie(value, s.override_cookie)
                sticky = get_cookie(value, s.sticky_cookie)
                if cookie_override is not None:
                    value = drop_cookie(value, s.override_cookie)
                    if not value:
                        continue
                lines.extend((name, b": ", value, b"\r\n"))
            elif kind == _H_CL:
                limit = s.max_body_bytes
                if limit is not None and int(value) > limit:
                    raise _Reject(Reply.PAYLOAD_TOO_LARGE)  # refused before a byte is read
                lines.extend((name, b": ", value, b"\r\n"))
                content_length = value
            elif kind == _H_WSKEY:
                ws_key = value
                lines.extend((name, b": ", value, b"\r\n"))
            elif kind == _H_CONN:
                conn_tokens = (conn_tokens or set()) | connection_tokens(value)
            elif kind == _H_TE:
                te = value if te is None else te + b", " + value
            elif kind == _H_UPGRADE:
                upgrade_value = value
            elif kind == _H_XFF:
                if trusted:
                    xff = value if xff is None else xff + b", " + value
            elif kind == _H_UNTRUSTED:
                if trusted:
                    lines.extend((name, b": ", value, b"\r\n"))
                    forwarded.add(low)
            elif kind == _H_TOKEN:
                token = value
            # _H_HOP: dropped

        if conn_tokens:
            drop = conn_tokens - PROTECTED - {b"close", b"keep-alive", b"upgrade"}
            if drop:
                # Every kept header is four items: name, ": ", value, CRLF.
                lines = [
                    item
                    for k in range(0, len(lines), 4)
                    if lines[k].lower() not in drop
                    for item in lines[k : k + 4]
                ]

        if url[:1] != b"/":
            url = self._origin_form(url, host)
        lines[2] = url
        if host is None:
            if self.http11:
                raise _Reject(Reply.BAD_REQUEST)
        if te is not None and te.rpartition(b",")[2].strip().lower() != b"chunked":
            # A request body must end chunked (RFC 9112 §6.3); anything else is a framing
            # an upstream might read differently.
            raise _Reject(Reply.BAD_REQUEST)
        self._chunked = te is not None
        if te is not None:
            self._trailers = []

        # Route: one snapshot, read once.
        if override is None:
            override = cookie_override
        if override is None and sticky is None:
            attrs = NO_ATTRS
        else:
            allowed = s.override_token is None or (
                token is not None and hmac.compare_digest(token, s.override_token)
            )
            attrs = RequestAttrs(
                override.decode("latin-1") if override is not None else None,
                allowed,
                sticky.decode("latin-1") if sticky is not None else None,
            )
        state = server.store.snapshot()
        decision = route(attrs, state, random.random())
        if decision is REJECT:
            raise _Reject(Reply.BAD_OVERRIDE)
        color = decision.color
        assert color is not None
        self.color = color
        self._extra = (s.sticky_extra if decision.set_sticky else s.color_extra)[color]
        server.begin_request(color)
        self._active = True
        self._started = server.loop.time()

        is_upgrade = upgrade and upgrade_value is not None and upgrade_value.lower() != b"h2c"
        if is_upgrade and upgrade_value is not None and upgrade_value.lower() == b"websocket":
            if method != b"GET" or not _valid_ws_key(ws_key):
                raise _Reject(Reply.BAD_REQUEST)
        if upgrade and not is_upgrade:
            # h2c: answered as plain HTTP/1.1, then closed. llhttp ends an upgrade request
            # at its head, so a body could not be framed: refuse one rather than lose it.
            if te is not None or (content_length is not None and content_length != b"0"):
                raise _Reject(Reply.BAD_REQUEST)
            self.closing = True
        self._upgrade = is_upgrade
        self._websocket = (
            is_upgrade and upgrade_value is not None and (upgrade_value.lower() == b"websocket")
        )
        upstream = server.pools[color].pick()
        if host is None and upstream is not None:
            lines += (b"Host: ", upstream.host_header, b"\r\n")  # HTTP/1.0 without Host
        if xff:
            lines += (b"X-Forwarded-For: ", xff, b", ", self.peer.encode(), b"\r\n")
        else:
            lines.append(self._xff_line)
        if b"x-forwarded-proto" not in forwarded:
            lines.append(b"X-Forwarded-Proto: http\r\n")
        if host is not None and b"x-forwarded-host" not in forwarded:
            lines += (b"X-Forwarded-Host: ", host, b"\r\n")
        if te is not None:
            lines += (b"Transfer-Encoding: ", te, b"\r\n")
        if is_upgrade and upgrade_value is not None:
            lines += (b"Connection: Upgrade\r\nUpgrade: ", upgrade_value, b"\r\n")
        lines.append(b"\r\n")
        self._head = b"".join(lines)
        self._connect_and_send(upstream)

    @staticmethod
    def _origin_form(url: bytes, host: bytes | None) -> bytes:
        """Absolute-form to origin-form; the authority must agree with Host."""
        if url == b"*":
            return url
        low = url.lower()
        if not (low.startswith(b"http://") or low.startswith(b"https://")):
            raise _Reject(Reply.BAD_REQUEST)
        rest = url.split(b"://", 1)[1]
        authority, slash, path = rest.partition(b"/")
        if host is None or authority.lower() != host.lower():
            raise _Reject(Reply.BAD_REQUEST)
        return slash + path if slash else b"/"

    def _connect_and_send(self, upstream: Upstream | None) -> None:
        if upstream is None:
            self._fail(NoHealthyUpstream("no healthy upstream"))
            return
        self.upstream = upstream
        self._attempts += 1
        server = self.server
        conn = server.cpool.take_idle(upstream)
        self.phase = STREAM if not self._req_done else UPSTREAM
        self.deadline = server.now + (
            self.settings.upstream_response_timeout
            if self._req_done
            else self.settings.idle_timeout
        )
        if conn is not None:
            self._attach(conn)
            return
        self._body_buf = []
        self._connecting = server.spawn(self._connect(upstream), name="upstream-connect")

    async def _connect(self, upstream: Upstream) -> None:
        try:
            conn = await self.server.cpool.connect(upstream)
        except UpstreamError as exc:
            self._connecting = None
            self.server.note_connect_failure(upstream, exc)
            if self.phase == CLOSED:
                return
            if self._method in IDEMPOTENT and self._attempts < len(
                self.server.pools[upstream.color].upstreams
            ):
                other = self.server.pools[upstream.color].pick(exclude=upstream)
                if other is not None and other is not upstream:
                    self._connect_and_send(other)
                    return
            self._fail(exc)
            return
        self._connecting = None
        if self.phase == CLOSED:
            self.server.cpool.release(conn)
            return
        self._attach(conn)

    def _attach(self, conn: UpstreamConnection) -> None:
        self.up = conn
        buf = self._body_buf
        self._body_buf = None
        data = self._head if not buf else self._head + b"".join(buf)
        conn.request_done = self._req_done
        conn.begin(self, self._method == b"HEAD", self._upgrade)
        self._to_upstream(data)
        self._resume(2)

    # -- called by the upstream connection ------------------------------------------------

    def response_head(self, conn: UpstreamConnection, status: int) -> None:
        self._status = status
        self._response_started = True
        self.phase = STREAM
        self.deadline = self.server.now + self.settings.upstream_response_timeout
        self.server.record_response(self.color, status, self.server.loop.time() - self._started)

    def response_extra(self) -> bytes:
        return self._extra

    def upstream_activity(self) -> None:
        if self._response_started:
            self.deadline = self.server.now + self.settings.upstream_response_timeout

    def response_complete(self, conn: UpstreamConnection, reusable: bool) -> None:
        if conn is not self.up:
            return
        self.up = None
        if reusable and self._req_done and not self.closing:
            self.server.cpool.release(conn)
        else:
            conn.client = None
            conn.close()
        self._end_exchange(aborted=False)
        if self.closing or not self._req_done or self._upgrade:
            self.phase = CLOSED
            self.close()
            return
        self._next_request()

    def upstream_failed(self, conn: UpstreamConnection, exc: Exception) -> None:
        conn.client = None
        if conn is not self.up or self.phase == CLOSED:
            return
        self.up = None
        if (
            not self._response_started
            and conn.reused
            and self._method in IDEMPOTENT
            and self._body_bytes == 0
            and self._attempts < 3
        ):
            # A pooled connection the upstream had closed under us: retry on a fresh one.
            self.server.cpool.close_idle({conn.upstream.url})
            assert self.upstream is not None
            self._connect_and_send(self.upstream)
            return
        kind = exc.kind if isinstance(exc, UpstreamError) else "protocol"
        self.server.note_upstream_error(self.color, kind)
        if isinstance(exc, UpstreamError):
            self._fail(exc)
        else:
            self._fail(UpstreamError("upstream failed"))

    def start_tunnel(self, conn: UpstreamConnection) -> None:
        self.phase = TUNNEL
        self.deadline = 0.0
        self._tunnel = True
        if self._websocket:
            self.ws = WebSocketRelay(self, conn)
        assert self.color is not None
        self.server.tunnel_opened(self)
        buf = self._body_buf
        self._body_buf = None
        if buf:
            self.data_received(b"".join(buf))
        self._resume(2)

    def tunnel_data(self, data: bytes) -> None:
        if self.ws is not None:
            self.ws.from_upstream(data)
        else:
            self.write(data)

    def tunnel_closed(self) -> None:
        self.up = None
        if self.ws is not None:
            self.ws.upstream_lost()
        self.close()

    # -- ends -----------------------------------------------------------------------------

    def _fail(self, exc: UpstreamError) -> None:
        """Map an upstream failure to the client, once: an error reply or a cut stream."""
        if self._connecting is not None:
            self._connecting.cancel()
            self._connecting = None
        up = self.up
        if up is not None:
            self.up = None
            up.client = None
            up.abort()
        if self._response_started:
            if self.transport is not None:
                self.transport.abort()  # the client sees a truncated response
            return
        reply = reply_for(exc)
        if self.color is not None:
            self.server.record_response(
                self.color, reply.status, self.server.loop.time() - self._started
            )
        self._reply(reply)

    def _reply(self, reply: Reply) -> None:
        """Answer with one of our own responses and close the connection."""
        if self.phase == CLOSED or self.transport is None:
            return
        if reply.status < 500:
            self.server.note_bad_request(reply.status)
        if self._response_started:
            # A response is already on the wire: an error now would corrupt it; cut it.
            self.phase = CLOSED
            self._end_exchange(aborted=True)
            self.transport.abort()
            return
        extra = self._extra if self.color is not None else b""
        self.transport.write(error_response(reply, extra))
        self.phase = CLOSED
        self._end_exchange(aborted=False)
        self.transport.close()

    def _after_upgrade_head(self, rest: bytes) -> None:
        # Bytes after an upgrade request head belong to the new protocol: hold them
        # until the upstream agrees to switch.
        if self.phase == CLOSED:
            return
        self._req_done = True
        if self.up is not None:
            self.up.request_done = True
        if not self._upgrade:
            if rest:
                self.closing = True
            return
        if rest:
            if self._body_buf is None:
                self._body_buf = []
            self._body_buf.append(rest)
            if self.up is not None and self.phase == TUNNEL:
                self.up.send(b"".join(self._body_buf))
                self._body_buf = None
            else:
                self._pause(2)

    def _end_exchange(self, aborted: bool) -> None:
        if self._active:
            self._active = False
            if self.color is not None:
                if self._tunnel:
                    self.server.tunnel_closed(self)
                else:
                    self.server.end_request(self.color)

    def _next_request(self) -> None:
        # Only what the last exchange left behind; _dispatch sets the rest per request.
        self._url = b""
        self._headers = []
        self._head_bytes = 0
        self._trailers = None
        self.color = None
        self.upstream = None
        self._extra = b""
        self._body_bytes = 0
        self._req_done = False
        self._response_started = False
        self._attempts = 0
        self.phase = IDLE
        self.deadline = self.server.now + self.settings.idle_timeout
        queue = self._queue
        if not queue:
            return
        pending = queue.pop(0)
        if not queue:
            self._queue = None
        if pending.reject is not None:
            self._reply(pending.reject)
            return
        if not pending.head_done:
            self.deadline = self.server.now + self.settings.request_header_timeout
            # Its head is still arriving: stop queueing, let the parser feed us directly.
            self._url = pending.url
            self._headers = pending.headers
            self.phase = HEAD
            if self._queue is None:
                self._resume(4)
            return
        self._url = pending.url
        self._headers = pending.headers
        try:
            self._dispatch(pending.method, pending.version, pending.keep_alive, pending.upgrade)
            # Replayed straight into this request: later parked requests stay parked.
            for chunk in pending.body:
                self._body(chunk)
            if pending.complete:
                self._trailers = pending.trailers
                self._request_complete()
        except _Reject as exc:
            self._reply(exc.reply)
            return
        if self._queue is None:
            self._resume(4)


def _is_http09(data: bytes) -> bool:
    """A complete first line with no HTTP version: an HTTP/0.9 simple request."""
    end = data.find(b"\n")
    return end >= 0 and b" HTTP/" not in data[:end]


def _valid_ws_key(key: bytes | None) -> bool:
    """RFC 6455 §4.1: base64 of 16 bytes."""
    if key is None:
        return False
    try:
        return len(base64.b64decode(key.strip(), validate=True)) == 16
    except (binascii.Error, ValueError):
        return False


class _Pending:
    """A pipelined request parsed while the one before it was still being answered."""

    __slots__ = (
        "body",
        "complete",
        "head_done",
        "headers",
        "keep_alive",
        "method",
        "reject",
        "size",
        "trailers",
        "upgrade",
        "url",
        "version",
    )

    def __init__(self) -> None:
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.trailers: list[tuple[bytes, bytes]] = []
        self.body: list[bytes] = []
        self.head_done = False
        self.complete = False
        self.method = b""
        self.version = "1.1"
        self.keep_alive = True
        self.upgrade = False
        self.size = 0  # head bytes so far, against limits.max_header_bytes
        self.reject: Reply | None = None  # a parse error, answered when its turn comes
