"""The client side of the data plane: one ``asyncio.Protocol`` per client connection.

llhttp (via httptools) parses the request head strictly; on the head's completion the
request is routed from one snapshot, a pooled upstream connection is attached, and the
rewritten head plus whatever body bytes arrived are written in one go. Bodies stream
both ways with backpressure. Timeouts are deadlines checked by the server's coarse
sweeper, never a timer per request.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from random import random as roll_dice
from time import monotonic
from typing import TYPE_CHECKING

import httptools

from proxy._hotpath import KIND
from proxy.errors import (
    Reply,
    UpstreamError,
    UpstreamTimeout,
    error_response,
)
from proxy.exchange import Exchange
from proxy.headers import PROTECTED, connection_tokens, drop_cookie, get_cookie
from proxy.http1 import (
    BODY_BUFFER_LIMIT,
    H_CL,
    H_CONN,
    H_COOKIE,
    H_HOST,
    H_TE,
    H_TOKEN,
    H_UNTRUSTED,
    H_UPGRADE,
    H_WSKEY,
    H_XFF,
    NO_TRAILER,
    SPECIAL,
    Pending,
    Reject,
    by_length,
    chunked_only,
    connection_close,
    field_kind,
    head_end,
    is_http09,
    is_lower,
    kind_hints,
    line_end,
    method_shaped,
    origin_form,
    plain_host,
    request_host,
    request_parser,
    stand_in,
    token_end,
    trim_te_ows,
    valid_host,
    valid_ws_key,
)
from proxy.phases import CLOSED, HEAD, IDLE, STREAM, TUNNEL, UPSTREAM
from proxy.router import NO_ATTRS, REJECT, RequestAttrs, route
from proxy.state import Color
from proxy.websocket import WebSocketRelay

if TYPE_CHECKING:
    from proxy.pools import Upstream
    from proxy.server import ProxyServer
    from proxy.service import Service
    from proxy.upstream import UpstreamConnection

log = logging.getLogger("bgproxy.listener")



_PLAIN_CONNECTION = frozenset({b"close", b"keep-alive"})

# The compiled build reads plain requests (see _fast_request) without llhttp's callbacks;
# interpreted, the callbacks are the cheaper way, so only llhttp runs there.
_FAST = KIND == "compiled"
_SPECIAL_BY_LENGTH = by_length(SPECIAL)
_SPECIAL_HINTS = kind_hints(SPECIAL)
_NOTHING_FORWARDED: frozenset[bytes] = frozenset()
# Request-target characters the fast path takes: RFC 3986 unreserved, sub-delims, ':',
# '@', '/', '?' and '%'. Anything else goes to llhttp, which decides.
_URLCHAR = bytes(
    1 if chr(c).isascii() and (chr(c).isalnum() or chr(c) in "-._~!$&'()*+,;=:@/?%") else 0
    for c in range(256)
)


class ClientConnection(Exchange):
    """Parses requests and routes them; the exchange half lives in ``proxy.exchange``."""

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
        self._queue: list[Pending] | None = None
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
        self.service: Service | None = None
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
            and not self._head_bytes
            and self._queue is None
            and self.settings.fast
        ):
            end = head_end(data)
            if 0 < end <= self.settings.max_header_bytes - 4 and self._fast_request(data, end + 4):
                if len(data) > end + 4 and self.phase != CLOSED and not self.closing:
                    self.data_received(data[end + 4 :])  # pipelined: the usual way
                return
        if phase == IDLE or phase == HEAD:
            if b"\t" in data:  # memchr; a tab in a head is rare
                data = trim_te_ows(data)
            self._head_bytes += len(data)
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
            if self._head_bytes > self.settings.max_header_bytes:
                self._reply(Reply.HEADERS_TOO_LARGE)
            elif self._head_bytes == len(data) and is_http09(data):
                self._reply(Reply.BAD_REQUEST)  # llhttp would wait for a version that never comes

    def _fast_request(self, data: bytes, end: int) -> bool:
        """Read a plain request whose whole head is ``data[:end]`` in one C pass and
        dispatch it: GET, HEAD, DELETE or OPTIONS of an origin-form target, ``HTTP/1.1``,
        one Host, fields written ``Name: value``, none of them one the proxy acts on but
        ``Connection: keep-alive|close``. Its field lines go upstream as they came. Anything
        else returns False having changed nothing, and llhttp reads the bytes as usual:
        this takes a subset of what llhttp takes and forwards the same bytes the llhttp
        path would (tests/test_fast_request.py compares the two builds byte for byte).
        """
        if data.startswith(b"GET "):
            method = b"GET"
        elif data.startswith(b"HEAD "):
            method = b"HEAD"
        elif data.startswith(b"DELETE "):
            method = b"DELETE"
        elif data.startswith(b"OPTIONS "):
            method = b"OPTIONS"
        else:
            return False
        start = len(method) + 1
        if data[start] != 47:  # "/": origin-form only
            return False
        i = start
        while _URLCHAR[data[i]]:
            i += 1
        url_end = i
        if data[i] != 32 or not data.startswith(b"HTTP/1.1\r\n", i + 1):
            return False
        line = i + 11
        server = self.server
        # The settings this request runs under, read once: a reload applies from here on.
        s = self.settings = server.settings
        override_name = s.override_header
        max_headers = s.max_headers
        lines = [method, b" ", data[start:url_end], b" HTTP/1.1\r\n"]
        run = line  # start of the run of field lines forwarded as they came
        host = None
        keep_alive = True
        count = 0
        while line < end - 2:
            # A token, ": " and a value that does not start with white space: the form
            # the llhttp path writes a field in, so the bytes forwarded are the same.
            name_end = token_end(data, line)
            if name_end == line or data[name_end] != 58 or data[name_end + 1] != 32:
                return False
            value = name_end + 2
            if data[value] == 32 or data[value] == 9:
                return False
            i = line_end(data, value)
            if i < 0:
                return False
            count += 1
            if count > max_headers or is_lower(data, line, name_end, override_name):
                return False
            kind = field_kind(data, line, name_end, _SPECIAL_BY_LENGTH, _SPECIAL_HINTS)
            if kind == H_HOST:
                if host is not None or not plain_host(data, value, i):
                    return False  # llhttp's path answers 400 or takes it
                host = data[value:i]
            elif kind == H_CONN:
                close = connection_close(data, value, i)
                if close < 0:
                    return False
                keep_alive = keep_alive and not close
                if line > run:
                    lines.append(data[run:line])
                run = i + 2
            elif kind != -1:
                return False  # a field the proxy acts on: llhttp's path
            line = i + 2
        if host is None:
            return False
        if end - 2 > run:
            lines.append(data[run : end - 2])

        self._url = lines[2]
        self._head_bytes = end
        self.http11 = True
        self._method = method
        self.closing = self.closing or not keep_alive or server.stopping
        self._chunked = False
        self.phase = HEAD
        try:
            self._match_service(host, self._url)
            self._route_and_send(
                method, lines, host, None, None, None, False, None, None, None, None, None,
                _NOTHING_FORWARDED,
            )  # fmt: skip
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
                    queue.append(Pending())  # the error is in a request not begun yet
            elif self.closing:
                return  # after the closing request in flight
            else:
                queue = self._queue = [Pending()]
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
            self._queue.append(Pending())
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
                raise Reject(Reply.URI_TOO_LONG)
            return
        self._url += url
        if len(self._url) > self.settings.max_header_bytes:
            raise Reject(Reply.URI_TOO_LONG)

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
                raise Reject(Reply.HEADERS_TOO_LARGE)
            return
        if self._trailers is not None:
            self._trailers.append((name, value))
            return
        headers = self._headers
        headers.append((name, value))
        if len(headers) > self.settings.max_headers:
            raise Reject(Reply.HEADERS_TOO_LARGE)

    def on_headers_complete(self) -> None:
        parser = self.parser
        assert parser is not None  # only llhttp calls this, from feed_data
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
            trailers = [t for t in self._trailers or () if t[0].lower() not in NO_TRAILER]
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

    # -- dispatch -------------------------------------------------------------------------

    def _match_service(self, host: bytes | None, url: bytes) -> Service:
        """The service this request belongs to (404 if none); its settings apply from here."""
        table = self.server.table
        service = table.only
        if service is None:
            if url[:1] != b"/":
                url = origin_form(url, host)
            service = table.match(host, url)
            if service is None:
                raise Reject(Reply.NOT_FOUND)
        self.service = service
        self.settings = service.settings
        return service  # type: ignore[no-any-return]

    def _dispatch(self, method: bytes, version: str, keep_alive: bool, upgrade: bool) -> None:
        server = self.server
        s = self.settings = server.settings
        if version != "1.1" and version != "1.0":
            if not version.startswith("1."):
                raise Reject(Reply.VERSION_NOT_SUPPORTED)
            version = "1.1"  # 1.2 and up: answered as 1.1, our highest (RFC 9110 §2.5)
        self.http11 = version == "1.1"
        if method == b"CONNECT":
            raise Reject(Reply.NOT_IMPLEMENTED)
        if server.table.only is None:
            # The service names the override and sticky fields: find it by Host first,
            # once Host is known to be one valid value (two layers must not read it apart).
            first_host = request_host(self._headers, self.http11)
            s = self._match_service(first_host, self._url).settings
        else:
            s = self._match_service(None, self._url).settings
        if (
            self._head_bytes > s.max_header_bytes
            and sum(len(n) + len(v) + 4 for n, v in self._headers) + len(self._url)
            > s.max_header_bytes
        ):
            raise Reject(Reply.HEADERS_TOO_LARGE)
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
        trusted = bool(s.trusted) and s.is_trusted(self.peer)  # no call without a list
        override_name = s.override_header
        for name, value in self._headers:
            low = name.lower()
            kind = SPECIAL.get(low, -1)
            if kind == -1:
                if low == override_name:
                    override = value
                    continue
                lines.extend((name, b": ", value, b"\r\n"))
            elif kind == H_HOST:
                value = value.rstrip(b" \t")
                if host is not None or not valid_host(value):
                    raise Reject(Reply.BAD_REQUEST)  # RFC 9112 §3.2
                host = value
                lines.extend((name, b": ", value, b"\r\n"))
            elif kind == H_COOKIE:
                cookie_override = get_cookie(value, s.override_cookie)
                sticky = get_cookie(value, s.sticky_cookie)
                if cookie_override is not None:
                    value = drop_cookie(value, s.override_cookie)
                    if not value:
                        continue
                lines.extend((name, b": ", value, b"\r\n"))
            elif kind == H_CL:
                limit = s.max_body_bytes
                if limit is not None and int(value) > limit:
                    raise Reject(Reply.PAYLOAD_TOO_LARGE)  # refused before a byte is read
                lines.extend((name, b": ", value, b"\r\n"))
                content_length = value
            elif kind == H_WSKEY:
                ws_key = value
                lines.extend((name, b": ", value, b"\r\n"))
            elif kind == H_CONN:
                # "close" / "keep-alive" name no header to drop: skip the token parse.
                if value.lower() not in _PLAIN_CONNECTION:
                    conn_tokens = (conn_tokens or set()) | connection_tokens(value)
            elif kind == H_TE:
                te = value if te is None else te + b", " + value
            elif kind == H_UPGRADE:
                upgrade_value = value
            elif kind == H_XFF:
                if trusted:
                    xff = value if xff is None else xff + b", " + value
            elif kind == H_UNTRUSTED:
                if trusted:
                    lines.extend((name, b": ", value, b"\r\n"))
                    forwarded.add(low)
            elif kind == H_TOKEN:
                token = value
            # H_HOP: dropped

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
            url = origin_form(url, host)
        lines[2] = url
        if host is None:
            if self.http11:
                raise Reject(Reply.BAD_REQUEST)
        self._chunked = te is not None
        if te is not None:
            chunked_only(te)
            te = b"chunked"  # what the body is re-framed in upstream, whatever the spelling
            self._trailers = []

        if override is None:
            override = cookie_override
        self._route_and_send(
            method, lines, host, override, sticky, token, upgrade, upgrade_value, ws_key, te,
            content_length, xff, forwarded,
        )  # fmt: skip

    def _route_and_send(
        self,
        method: bytes,
        lines: list[bytes],
        host: bytes | None,
        override: bytes | None,
        sticky: bytes | None,
        token: bytes | None,
        upgrade: bool,
        upgrade_value: bytes | None,
        ws_key: bytes | None,
        te: bytes | None,
        content_length: bytes | None,
        xff: bytes | None,
        forwarded: set[bytes] | frozenset[bytes],
    ) -> None:
        """The request's head is read: route it from one snapshot, finish the upstream
        head (``lines`` so far: request line and forwarded fields) and send it."""
        s = self.settings
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
        service = self.service
        assert service is not None
        state = service.store.snapshot()
        decision = route(attrs, state, roll_dice())
        if decision is REJECT:
            raise Reject(Reply.BAD_OVERRIDE)
        color = decision.color
        assert color is not None
        self.color = color
        self._extra = (s.sticky_extra if decision.set_sticky else s.color_extra)[color]
        service.begin_request(color)
        self._active = True
        # Not loop.time(): uvloop's clock counts whole milliseconds.
        self._started = monotonic()

        is_upgrade = upgrade and upgrade_value is not None and upgrade_value.lower() != b"h2c"
        if is_upgrade and upgrade_value is not None and upgrade_value.lower() == b"websocket":
            if method != b"GET" or not valid_ws_key(ws_key):
                raise Reject(Reply.BAD_REQUEST)
        if upgrade and not is_upgrade:
            # h2c: answered as plain HTTP/1.1, then closed. llhttp ends an upgrade request
            # at its head, so a body could not be framed: refuse one rather than lose it.
            if te is not None or (content_length is not None and content_length != b"0"):
                raise Reject(Reply.BAD_REQUEST)
            self.closing = True
        if is_upgrade:
            # Unless the upstream switches protocols, the connection closes after the
            # response (what follows the head is not HTTP): the response must say so.
            self.closing = True
        self._upgrade = is_upgrade
        self._websocket = (
            is_upgrade and upgrade_value is not None and (upgrade_value.lower() == b"websocket")
        )
        pool = service.pools[color]
        upstream = pool.pick()
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
        # Only what the last exchange left behind; _dispatch sets the rest per request.
        self._url = b""
        self._headers = []
        self._head_bytes = 0
        self._trailers = None
        self.color = None
        self.service = None
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
        except Reject as exc:
            self._reply(exc.reply)
            return
        if self._queue is None:
            self._resume(4)
