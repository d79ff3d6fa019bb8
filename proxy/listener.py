"""The client side of the data plane: one ``asyncio.Protocol`` per client connection.

llhttp (via httptools) parses the request head strictly; on the head's completion the
request is routed from one snapshot, a pooled upstream connection is attached, and the
rewritten head plus whatever body bytes arrived are written in one go. Bodies stream
both ways with backpressure. Timeouts are deadlines checked by the server's coarse
sweeper, never a timer per request.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

import httptools

from proxy._hotpath import KIND
from proxy.dispatch import Dispatcher
from proxy.errors import (
    Reply,
    UpstreamError,
    UpstreamTimeout,
    error_response,
)
from proxy.http1 import (
    BODY_BUFFER_LIMIT,
    NO_TRAILER,
    Reject,
    head_end,
    is_http09,
    method_shaped,
    request_parser,
    stand_in,
    trim_te_ows,
)
from proxy.phases import CLOSED, HEAD, IDLE, STREAM, TUNNEL, UPSTREAM
from proxy.request import Request, fast_head

if TYPE_CHECKING:
    from proxy.server import ProxyServer

log = logging.getLogger("bgproxy.listener")


# The compiled build reads plain requests (see _fast_request) without llhttp's callbacks;
# interpreted, the callbacks are the cheaper way, so only llhttp runs there.
_FAST = KIND == "compiled"
# What the connection tells the upstream about the client's scheme (see upstream_head).
HTTP_PROTO = b"X-Forwarded-Proto: http\r\n"
HTTPS_PROTO = b"X-Forwarded-Proto: https\r\n"


class ClientConnection(Dispatcher):
    """Reads requests and hands each head to its routing half (``proxy.dispatch``); the
    exchange half lives in ``proxy.exchange``."""

    __slots__ = ()

    def __init__(self, server: ProxyServer) -> None:
        self.server = server
        self.settings = server.settings
        # llhttp's parser is made on the first request the fast path declines: most
        # connections never need one, and it costs ~7k instructions plus a reference cycle.
        self.parser = None
        self.transport: asyncio.Transport | None = None
        self.peer = ""
        self.phase = IDLE
        self.deadline = 0.0
        self.closing = False  # send Connection: close and close after this response
        self.http11 = True
        self._paused = 0
        self._queue: list[Request] | None = None
        self._up_out: list[bytes] | None = None
        self.proto_line = HTTP_PROTO
        self._intercept = None
        self._tls_version = self._sni = None
        self._reset_request(Request())

    def _reset_request(self, req: Request) -> None:
        """The one fresh start of per-request state: at the first request, and after
        each exchange (``req`` is the next request, parked or new)."""
        self.req = req
        self.up = None
        self.upstream = None
        self.color = None
        self.service = None
        self._extra = b""
        self._head = b""
        self._chunked = False
        self._body_buf = None
        self._body_bytes = 0
        self._req_done = False
        self._response_started = False
        self._attempts = 0
        self._connecting = None
        self._upgrade = False
        self._tunnel = False
        self._websocket = False
        self.ws = None
        self._started = 0.0
        self._status = 0
        self._active = False
        self._bytes_out = 0
        self._client = None
        self._up_time = -1.0
        self._reason = None
        self._rid = None
        self._span = None
        self._raw_head = None
        self._trace_in = None

    # -- connection lifecycle -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = t = transport  # type: ignore[assignment]
        server = self.server
        peer = transport.get_extra_info("peername")
        self.peer = peer[0] if peer else ""
        self._xff_line = b"X-Forwarded-For: %s\r\n" % self.peer.encode()
        if transport.get_extra_info("sslcontext") is not None:
            self.proto_line = HTTPS_PROTO
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
        self.parser = None  # it holds our bound methods: let reference counting free both
        self.server.connections.discard(self)
        up = self._detach()
        if up is not None:
            if self.ws is not None:
                self.ws.client_lost()
                up.close()
            else:
                up.abort()  # mid-exchange: its stream state is unknown
        self._end_exchange(aborted=True)

    def eof_received(self) -> bool | None:
        if self.phase == TUNNEL:
            # A tunnel's client is gone: tell the upstream (a close frame beats a bare FIN
            # for a WebSocket) and close both; half-open tunnels would pile up.
            up = self._detach()
            if up is not None:
                if self.ws is not None:
                    self.ws.client_lost()
                up.close()
            return False
        # A client half-close: finish the response in flight, then close.
        self.closing = True
        return self._active or self.up is not None

    def on_deadline(self) -> None:
        """The sweeper found this connection past its deadline."""
        phase = self.phase
        if phase == HEAD:
            self._reply(Reply.REQUEST_TIMEOUT)
        elif phase == UPSTREAM and not self._response_started:
            if self.service is not None and self.color is not None:
                self.service.note_upstream_error(self.color, "timeout")
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
        if (
            phase == IDLE
            and _FAST
            and not self.req.size
            and self._queue is None
            and self.settings.fast
        ):
            end = head_end(data)
            if 0 < end <= self.settings.max_header_bytes - 4 and self._fast_request(data, end + 4):
                if len(data) > end + 4 and self.phase != CLOSED and not self.closing:
                    self.data_received(data[end + 4 :])  # pipelined: the usual way
                return
        if phase == IDLE or phase == HEAD:
            # A tab in a head is rare. Not ``b"\t" in data``: a bytes operand is first tried
            # as an int, and the TypeError raised and cleared costs ~2k instructions.
            if data.find(b"\t") >= 0:
                data = trim_te_ows(data)
            self.req.size += len(data)
        # Everything this read produces for the upstream goes out in one write, and only
        # if the whole read parsed: a smuggling attempt in one packet never leaves here.
        out: list[bytes] = []
        self._up_out = out
        parser = self.parser
        if parser is None:
            parser = self.parser = request_parser(self)
        queue = self._queue
        # Does this read start a message? Then a method llhttp does not know is readable.
        boundary = (
            phase == IDLE
            or (self._req_done and not queue)
            or (queue is not None and len(queue) > 0 and queue[-1].complete)
        )
        while True:
            try:
                parser.feed_data(data)
            except httptools.HttpParserUpgrade as exc:
                self._flush_upstream(out)
                self._after_upgrade_head(data[exc.args[0] :])
                return
            except httptools.HttpParserCallbackError as exc:
                ctx = exc.__context__
                if isinstance(ctx, Reject):
                    self._parse_failed(ctx.reply, out)
                else:
                    if ctx is not None and not isinstance(ctx, UpstreamError):
                        log.exception("internal error handling a request", exc_info=ctx)
                    self._up_out = None
                    self._reply(Reply.BAD_GATEWAY if self.up else Reply.BAD_REQUEST)
                return
            except httptools.HttpParserInvalidMethodError:
                fed = stand_in(data) if boundary else None
                if fed is None:
                    fed = Reply.NOT_IMPLEMENTED if method_shaped(data) else Reply.BAD_REQUEST
                if isinstance(fed, Reply):
                    self._parse_failed(fed, out)
                    return
                # The requests before it parsed (their bytes are in ``out``); a new parser
                # reads the rest, this request under a stand-in method. It begins the
                # message again: forget the parked request llhttp had begun for it.
                queue = self._queue
                if queue and not queue[-1].head_done:
                    queue.pop()
                data, method = fed
                parser = self.parser = request_parser(self, method)
                continue
            except httptools.HttpParserError:
                self._parse_failed(Reply.BAD_REQUEST, out)
                return
            break
        self._flush_upstream(out)
        if self.phase == HEAD:  # the head is still incomplete: never the case on the fast path
            if self.req.size > self.settings.max_header_bytes:
                self._reply(Reply.HEADERS_TOO_LARGE)
            elif self.req.size == len(data) and is_http09(data):
                self._reply(Reply.BAD_REQUEST)  # llhttp would wait for a version that never comes

    def _fast_request(self, data: bytes, end: int) -> bool:
        """Read and dispatch a plain request whose whole head is ``data[:end]`` without
        llhttp (see ``fast_head``). False, having changed nothing, if it is not one."""
        server = self.server
        # The settings this request runs under, read once: a reload applies from here on.
        s = self.settings = server.settings
        req = self.req
        observer = server.observer
        if observer is not None and observer.watch and observer.rewrites(data[:end]):
            return False  # llhttp's path replaces the request ID or traceparent
        if not fast_head(req, data, end, s):
            return False
        if observer is not None and observer.access is not None:
            self._raw_head = data[:end]  # for the user agent and referer, read when logged
        self.http11 = True
        self.closing = self.closing or not req.keep_alive or server.stopping
        self.phase = HEAD
        try:
            self._match_service(req.host, req.url)
            self._route_and_send(req, False)
            self._request_complete()
        except Reject as exc:
            self._reply(exc.reply)
        except Exception as exc:  # as data_received answers a callback's failure
            if not isinstance(exc, UpstreamError):
                log.exception("internal error handling a request", exc_info=exc)
            self._reply(Reply.BAD_GATEWAY if self.up else Reply.BAD_REQUEST)
        return True

    def _parse_failed(self, reply: Reply, out: list[bytes]) -> None:
        """A read did not parse. If the error is in a request pipelined behind a running
        exchange, that exchange's bytes were good: send them, and answer the error in its
        turn (writing it now would cut into the response in flight). Bytes after a
        request that ends the connection (``Connection: close``, HTTP/1.0) are no request:
        llhttp refuses them, and they are dropped, as nginx and HAProxy drop them."""
        queue = self._queue
        if self._active and (self._req_done or queue):
            self._flush_upstream(out)
            if queue:
                last = queue[-1]
                if last.complete:
                    if not last.keep_alive:
                        return  # after a parked closing request: it is served, then we close
                    queue.append(Request())  # the error is in a request not begun yet
            elif self.closing:
                return  # after the closing request in flight
            else:
                queue = self._queue = [Request()]
            queue[-1].reject = reply
            self._pause(4)
            return
        self._up_out = None
        self._reply(reply)

    def on_message_begin(self) -> None:
        if self._active:
            # Pipelined: park this request until the response before it is done.
            if self._queue is None:
                self._queue = []
            self._queue.append(Request())
            self._pause(4)
            return
        self.phase = HEAD
        self.deadline = self.server.now + self.settings.request_header_timeout

    # llhttp's callbacks fill the request being read: the running one, or the last one
    # parked behind it.

    def on_url(self, url: bytes) -> None:
        queue = self._queue
        req = queue[-1] if queue else self.req
        req.url += url
        if queue:
            req.size += len(url)  # a running request's head is counted as it is read
        if len(req.url) > self.settings.max_header_bytes:
            raise Reject(Reply.URI_TOO_LONG)

    def on_header(self, name: bytes, value: bytes) -> None:
        queue = self._queue
        req = queue[-1] if queue else self.req
        if req.head_done:
            if req.trailers is None:
                req.trailers = []
            req.trailers.append((name, value))
            return
        req.headers.append((name, value))
        if queue:
            req.size += len(name) + len(value) + 4
            if req.size > self.settings.max_header_bytes:
                raise Reject(Reply.HEADERS_TOO_LARGE)
        if len(req.headers) > self.settings.max_headers:
            raise Reject(Reply.HEADERS_TOO_LARGE)

    def on_headers_complete(self) -> None:
        parser = self.parser
        assert parser is not None  # only llhttp calls this, from feed_data
        queue = self._queue
        req = queue[-1] if queue else self.req
        req.head_done = True
        req.method = parser.get_method()
        req.version = parser.get_http_version()
        req.keep_alive = parser.should_keep_alive()
        req.upgrade = parser.should_upgrade()
        if not queue:
            self._dispatch(req)

    def on_body(self, body: bytes) -> None:
        queue = self._queue
        if queue:
            req = queue[-1]
            if req.body is None:
                req.body = []
            req.body.append(body)
            return
        self._body(body)

    def _body(self, body: bytes) -> None:
        self._body_bytes += len(body)
        limit = self.settings.max_body_bytes
        if limit is not None and self._body_bytes > limit:
            raise Reject(Reply.PAYLOAD_TOO_LARGE)
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
            trailers = [t for t in self.req.trailers or () if t[0].lower() not in NO_TRAILER]
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
            if sum(map(len, buf)) > BODY_BUFFER_LIMIT:
                self._pause(2)
        else:
            self._to_upstream(data)

    # -- after the head -------------------------------------------------------------------

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

    def _next_request(self) -> None:
        queue = self._queue
        pending = queue.pop(0) if queue else None
        if queue is not None and not queue:
            self._queue = None
        self._reset_request(pending if pending is not None else Request())
        self.phase = IDLE
        self.deadline = self.server.now + self.settings.idle_timeout
        if pending is None:
            return
        if pending.reject is not None:
            self._reply(pending.reject)
            return
        if not pending.head_done:
            # Its head is still arriving: stop queueing, let the parser feed it directly.
            self.deadline = self.server.now + self.settings.request_header_timeout
            self.phase = HEAD
            if self._queue is None:
                self._resume(4)
            return
        try:
            self._dispatch(pending)
            # Replayed straight into this request: later parked requests stay parked.
            body = pending.body
            pending.body = None
            for chunk in body or ():
                self._body(chunk)
            if pending.complete:
                self._request_complete()
        except Reject as exc:
            self._reply(exc.reply)
            return
        if self._queue is None:
            self._resume(4)
