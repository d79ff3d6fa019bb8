"""The routing half of a client connection: from a request head to an upstream.

``Dispatcher`` sits between the exchange (proxy/exchange.py: the per-connection state,
the upstream side and the ends) and ``ClientConnection`` (proxy/listener.py), which reads
requests, by its fast reader or llhttp, and hands each head here: the service it belongs
to, the color the router picks from one snapshot, the request ID and trace, and the head
written for the upstream, which goes out through ``Exchange._connect_and_send``.
"""

from __future__ import annotations

import hmac
from random import random as roll_dice
from time import monotonic, time
from typing import TYPE_CHECKING

from proxy.errors import Reply
from proxy.exchange import Exchange
from proxy.http1 import Reject, origin_form, request_host, valid_ws_key
from proxy.observability import real_client
from proxy.request import Request, read_head, upstream_head
from proxy.router import NO_ATTRS, REJECT, RequestAttrs, cookie_bucket, route
from proxy.tracing import valid_request_id

if TYPE_CHECKING:
    from proxy.observability import Observer
    from proxy.service import Service


class Dispatcher(Exchange):
    """Routes the head of the running request and sends it; no state of its own."""

    __slots__ = ()

    def _match_service(self, host: bytes | None, url: bytes) -> Service:
        """The service this request belongs to (404 if none); its settings apply from here."""
        if self._intercept is not None:
            self._intercept(self, host, url)
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

    def _dispatch(self, req: Request) -> None:
        """A head llhttp read: match its service, read its fields, route and send it."""
        server = self.server
        self.settings = server.settings
        version = req.version
        if version != "1.1" and version != "1.0":
            if not version.startswith("1."):
                raise Reject(Reply.VERSION_NOT_SUPPORTED)
            version = "1.1"  # 1.2 and up: answered as 1.1, our highest (RFC 9110 §2.5)
        self.http11 = http11 = version == "1.1"
        if req.method == b"CONNECT":
            raise Reject(Reply.NOT_IMPLEMENTED)
        if server.table.only is None:
            # The service names the override and sticky fields: find it by Host first,
            # once Host is known to be one valid value (two layers must not read it apart).
            s = self._match_service(request_host(req.headers, http11), req.url).settings
        else:
            s = self._match_service(None, req.url).settings
        if (
            req.size > s.max_header_bytes
            and sum(len(n) + len(v) + 4 for n, v in req.headers) + len(req.url)
            > s.max_header_bytes
        ):
            raise Reject(Reply.HEADERS_TOO_LARGE)
        self.closing = self.closing or not req.keep_alive or server.stopping
        trusted = bool(s.trusted) and s.is_trusted(self.peer)
        read_head(req, s, trusted, http11)
        observer = server.observer
        if observer is not None and observer.watch:
            self._take_observed(req, observer, trusted)
        self._chunked = req.te is not None
        self._route_and_send(req, req.upgrade)

    def _route_and_send(self, req: Request, upgrade: bool) -> None:
        """The request's head is read: route it from one snapshot, write the upstream
        head and send it. ``upgrade``: llhttp read an Upgrade request."""
        s = self.settings
        override = req.override
        sticky = req.sticky
        if override is None and sticky is None:
            attrs = NO_ATTRS
        else:
            token = req.token
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
        roll = roll_dice()
        decision = route(attrs, state, roll)
        if decision is REJECT:
            raise Reject(Reply.BAD_OVERRIDE)
        color = decision.color
        assert color is not None
        self.color = color
        self._reason = decision.reason
        self._extra = s.color_extra[color]
        if decision.set_sticky:  # a client's first request under a split: its bucket
            self._extra += s.sticky_set % cookie_bucket(decision, state, roll)
        service.begin_request(color)
        self._active = True
        # Not loop.time(): uvloop's clock counts whole milliseconds.
        self._started = monotonic()

        value = req.upgrade_value
        if value is not None and upgrade:
            value = value.lower()
        is_upgrade = upgrade and value is not None and value != b"h2c"
        self._websocket = is_upgrade and value == b"websocket"
        if self._websocket and (req.method != b"GET" or not valid_ws_key(req.ws_key)):
            raise Reject(Reply.BAD_REQUEST)
        if upgrade and not is_upgrade:
            # h2c: answered as plain HTTP/1.1, then closed. llhttp ends an upgrade request
            # at its head, so a body could not be framed: refuse one rather than lose it.
            cl = req.content_length
            if req.te is not None or (cl is not None and cl != b"0"):
                raise Reject(Reply.BAD_REQUEST)
            self.closing = True
        if is_upgrade:
            # Unless the upstream switches protocols, the connection closes after the
            # response (what follows the head is not HTTP): the response must say so.
            self.closing = True
        self._upgrade = is_upgrade
        pool = service.pools[color]
        upstream = pool.pick()  # a C call: pool is typed in dispatch.pxd
        observer = self.server.observer
        if observer is not None:
            self._observe(observer, req)
        self._head = upstream_head(
            req,
            upstream.host_header if upstream is not None else None,
            self.peer,
            self._xff_line,
            self.proto_line,
            req.upgrade_value if is_upgrade else None,
        )
        self._connect_and_send(upstream)

    def _take_observed(self, req: Request, observer: Observer, trusted: bool) -> None:
        """The request ID and traceparent as llhttp's path read them: a trusted peer's
        log-safe ID is kept, anyone else's replaced; neither is forwarded as it came
        (``_observe`` writes the proxy's)."""
        names = set()
        for name, value in req.headers:
            low = name.lower()
            if low == observer.id_header and observer.ids is not None:
                if trusted and self._rid is None and valid_request_id(value):
                    self._rid = value
                names.add(low)
            elif low == b"traceparent" and observer.tracer is not None:
                self._trace_in = value
                names.add(low)
        if names:
            lines = req.lines  # the request line, then four items per field
            req.lines = [
                item
                for k in range(0, len(lines), 4)
                if lines[k].lower() not in names
                for item in lines[k : k + 4]
            ]

    def _observe(self, observer: Observer, req: Request) -> None:
        """The request ID up- and downstream, the proxy's span as the upstream's parent,
        and the client behind a trusted proxy: only with the observer on."""
        if req.xff:
            self._client = real_client(req.xff, self.settings)
        if observer.ids is not None:
            rid = self._rid
            if rid is None:
                rid = self._rid = observer.ids.next()
            line = observer.id_line + rid + b"\r\n"
            req.lines.append(line)
            self._extra = self._extra + line
        if observer.tracer is not None:
            span = self._span = observer.tracer.start(self._trace_in, time())
            req.lines.append(span.traceparent())
