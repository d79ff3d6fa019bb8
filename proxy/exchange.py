"""The exchange half of a client connection: upstream, response, tunnel and the ends.

``ClientConnection`` (proxy/listener.py) reads requests and ``Dispatcher``
(proxy/dispatch.py) routes them; this base class of both holds the per-connection state
and what happens once a request has somewhere to go: attaching a pooled upstream
connection, backpressure between the two, the callbacks the upstream connection makes as
the response arrives, the switch to a tunnel, and every way an exchange ends (a
response, an error reply, a cut stream).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from time import monotonic
from typing import TYPE_CHECKING

import httptools

from proxy.errors import (
    NoHealthyUpstream,
    Reply,
    UpstreamError,
    error_response,
    reply_for,
)
from proxy.http1 import IDEMPOTENT
from proxy.interfaces import ResponseSink
from proxy.request import Request
from proxy.state import Color
from proxy.websocket import WebSocketRelay

if TYPE_CHECKING:
    from proxy.accesslog import AccessLog
    from proxy.observability import Observer
    from proxy.pools import Upstream
    from proxy.router import Reason
    from proxy.server import ProxyServer
    from proxy.service import Service
    from proxy.settings import Settings
    from proxy.tracing import Span
    from proxy.upstream import UpstreamConnection

from proxy.phases import CLOSED, STREAM, TUNNEL, UPSTREAM


class Exchange(ResponseSink):
    # The compiled build makes it a C type deriving from the C type ResponseSink, whose
    # methods the upstream side calls through a C vtable.
    # Slots: faster attribute access on the hot path and less memory per idle connection.
    __slots__ = (
        "_active", "_attempts", "_body_buf", "_body_bytes", "_bytes_out", "_chunked", "_client",
        "_connecting", "_extra", "_head", "_intercept", "_paused", "_queue", "_raw_head", "_reason",
        "_req_done", "_response_started", "_rid", "_sni", "_span", "_started", "_status",
        "_tls_version", "_trace_in", "_tunnel", "_up_out", "_up_time", "_upgrade", "_websocket",
        "_xff_line", "color", "deadline", "parser", "peer", "phase", "proto_line", "req", "server",
        "service", "settings", "transport", "up", "upstream", "ws",
    )  # fmt: skip

    server: ProxyServer
    service: Service | None  # the service the current request was matched to
    settings: Settings
    parser: httptools.HttpRequestParser | None
    transport: asyncio.Transport | None
    peer: str
    phase: int
    deadline: float
    up: UpstreamConnection | None
    upstream: Upstream | None
    color: Color | None
    ws: WebSocketRelay | None
    _paused: int
    _queue: list[Request] | None  # requests pipelined behind the running one
    _up_out: list[bytes] | None
    _xff_line: bytes
    proto_line: bytes  # X-Forwarded-Proto for this connection's scheme
    # None, or what a listener checks before routing (https redirect, ACME HTTP-01):
    # ``intercept(conn, host, url)`` raises Reject to answer instead of proxying.
    _intercept: Callable[[Exchange, bytes | None, bytes], None] | None
    req: Request  # the running request (or, between requests, the next one's start)
    _extra: bytes
    _head: bytes
    _chunked: bool
    _body_buf: list[bytes] | None
    _body_bytes: int
    _req_done: bool
    _response_started: bool
    _attempts: int
    _connecting: asyncio.Task[None] | None
    _upgrade: bool
    _tunnel: bool
    _websocket: bool
    _started: float
    _status: int
    _active: bool
    # For the access log and the span (proxy/observability.py), per request:
    _bytes_out: int  # written to the client
    _client: str | None  # the client a trusted proxy's X-Forwarded-For names
    _up_time: float  # seconds to the upstream's response head, -1.0 before it
    _reason: Reason | None  # the router's reason
    _rid: bytes | None  # the request ID
    _span: Span | None  # the proxy's span, while tracing
    # The TLS version and server name of this connection, for the log (None on plain).
    _tls_version: str | None
    _sni: str | None
    _raw_head: bytes | None  # the fast path's head (user agent, referer), else None
    _trace_in: bytes | None  # the client's traceparent, while tracing

    def _next_request(self) -> None:
        """Ready for the next request on this connection (the listener's side)."""
        raise NotImplementedError

    def data_received(self, data: bytes) -> None:
        raise NotImplementedError

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
            self._bytes_out += len(data)
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
        assert self.service is not None
        self.deadline = now + max(1.0, self.service.config.websocket.close_grace)

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
            conn = await self.server.cpool.connect(upstream, self.settings.connect_timeout)
        except UpstreamError as exc:
            self._connecting = None
            service = self.service
            assert service is not None
            service.note_connect_failure(upstream, exc)
            if self.phase == CLOSED:
                return
            pool = service.pools[upstream.color]
            if self.req.method in IDEMPOTENT and self._attempts < len(pool.upstreams):
                other = pool.pick(exclude=upstream)
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
        conn.begin(self, self.req.method == b"HEAD", self._upgrade)
        self._to_upstream(data)
        self._resume(2)

    # -- called by the upstream connection ------------------------------------------------

    def response_head(self, conn: UpstreamConnection, status: int) -> None:
        self._status = status
        self._response_started = True
        self.phase = STREAM
        self.deadline = self.server.now + self.settings.upstream_response_timeout
        up_time = self._up_time = monotonic() - self._started
        self.service.record_response(self.color, status, up_time)  # type: ignore[union-attr,arg-type]

    def response_extra(self) -> bytes:
        return self._extra

    def upstream_activity(self) -> None:
        if self._response_started:
            self.deadline = self.server.now + self.settings.upstream_response_timeout

    def response_complete(self, conn: UpstreamConnection, reusable: bool) -> None:
        up = self.up  # typed, unlike ``conn`` (the interface's): use it from here on
        if conn is not up or up is None:
            return
        self.up = None
        if reusable and self._req_done:  # the client closing is no reason to drop the upstream
            self.server.cpool.release(up)
        else:
            up.client = None
            up.close()
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
            and self.req.method in IDEMPOTENT
            and self._body_bytes == 0
            and self._attempts < 3
        ):
            # A pooled connection the upstream had closed under us: retry on a fresh one.
            self.server.cpool.close_idle({conn.upstream.url})
            assert self.upstream is not None
            self._connect_and_send(self.upstream)
            return
        kind = exc.kind if isinstance(exc, UpstreamError) else "protocol"
        self.service.note_upstream_error(self.color, kind)  # type: ignore[union-attr,arg-type]
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
        assert self.color is not None and self.service is not None
        self.service.tunnel_opened(self)
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

    def _detach(self) -> UpstreamConnection | None:
        """Stop connecting and let go of the upstream connection; the caller ends it."""
        if self._connecting is not None:
            self._connecting.cancel()
            self._connecting = None
        up = self.up
        if up is not None:
            self.up = None
            up.client = None
        return up

    def _fail(self, exc: UpstreamError) -> None:
        """Map an upstream failure to the client, once: an error reply or a cut stream."""
        up = self._detach()
        if up is not None:
            up.abort()
        if self._response_started:
            if self.transport is not None:
                self.transport.abort()  # the client sees a truncated response
            return
        reply = reply_for(exc)
        if self.color is not None:
            self.service.record_response(  # type: ignore[union-attr]
                self.color, reply.status, monotonic() - self._started
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
        data = error_response(reply, extra)
        self._bytes_out += len(data)
        self._status = reply.status
        self.transport.write(data)
        self.phase = CLOSED
        observer = self.server.observer
        if not self._active and observer is not None:
            observer.rejected(self._log_record(reply.status, observer))
        self._end_exchange(aborted=False)
        self.transport.close()

    def _end_exchange(self, aborted: bool) -> None:
        if self._active:
            self._active = False
            service = self.service
            if self.color is not None and service is not None:
                if self._tunnel:
                    service.tunnel_closed(self)
                else:
                    service.end_request(self.color)
            observer = self.server.observer
            if observer is not None:
                # The one place a routed request or WebSocket session ends, however it ends.
                # A client gone before the response: 499, as nginx logs it.
                status = self._status if self._response_started else 499
                access = observer.access
                if access is not None and self.ws is None and self._span is None:
                    self._log_request(access, status)
                else:
                    observer.finish(self._log_record(status, observer))

    def _log_request(self, access: AccessLog, status: int) -> None:
        """The common case: the values handed to the access log as they are (a C call
        with C values in the compiled build), no record built."""
        end = monotonic()
        req = self.req
        service = self.service
        access.request(
            end, self._client or self.peer, req.method, req.url, self.http11, status,
            self._head_size() + self._body_bytes, self._bytes_out,
            end - self._started if self._started else 0.0, self._up_time,
            service.name if service is not None else None, self.color, self._reason,
            self.upstream, self._rid,
            self._raw_head if self._raw_head is not None else req.headers, self._tls_version,
            self._sni,
        )  # fmt: skip

    def _head_size(self) -> int:
        """The request head's bytes: counted exactly by the fast path; llhttp's path
        is summed from the parsed head (optional white space around values aside)."""
        req = self.req
        headers = req.headers
        if not headers:
            return req.size
        n = len(req.method) + len(req.url) + 14  # " ", " HTTP/1.1\r\n", final CRLF
        for name, value in headers:
            n += len(name) + len(value) + 4
        return n

    def _log_record(self, status: int, observer: Observer) -> tuple[object, ...]:
        """The access-log record (proxy/accesslog.py: ``R_*``): what the exchange holds."""
        end = monotonic()
        req = self.req
        service = self.service
        upstream = self.upstream
        color = self.color
        ws = self.ws
        return (
            end, self._client or self.peer, req.method, req.url,
            b"1.1" if self.http11 else b"1.0", status,
            self._head_size() + self._body_bytes, self._bytes_out,
            end - self._started if self._started else 0.0, self._up_time,
            service.name if service is not None else None,
            color.value if color is not None else None,
            observer.reasons.get(self._reason) if self._reason is not None else None,
            upstream.url if upstream is not None else None, self._rid,
            self._raw_head if self._raw_head is not None else req.headers, self._tls_version,
            self._sni,
            (ws.up.messages, ws.down.messages, ws.ended_by or "client") if ws is not None
            else None,
            self._span,
        )  # fmt: skip

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
