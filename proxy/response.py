"""Reading one upstream response and writing it to the client, rewritten.

``ResponseReader`` is the response half of an upstream connection: ``UpstreamConnection``
(proxy/upstream.py), the transport half that the pool keeps, derives from it. Here are
the compiled build's fast reader for a plain response, llhttp's callbacks for every
other, the head rewritten for the client (hop-by-hop fields out; the client connection's
own ``Connection`` and the proxy's fields in) and the body framed towards the client,
re-chunked where it has to be.
"""

from __future__ import annotations

import httptools

from proxy.errors import UpstreamProtocolError
from proxy.headers import HOP_BY_HOP, drop_fields
from proxy.http1 import (
    by_length,
    connection_close,
    field_kind,
    kind_hints,
    line_end,
    token_end,
)
from proxy.interfaces import ResponseSink

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


class HeadResponseDone(Exception):
    """Raised from the parser callback to stop at the head of a response to HEAD."""


class ExtraBytes(Exception):
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

# The response fields with special handling, by name length, for the fast path.
_SPECIAL_BY_LENGTH = by_length(_RESPONSE_SPECIAL)
_SPECIAL_HINTS = kind_hints(_RESPONSE_SPECIAL)


def response_parser(protocol: ResponseReader) -> httptools.HttpResponseParser:
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


class ResponseReader:
    """The state of the response in progress and how it is read. A C type in the compiled
    build, whose fields ``UpstreamConnection`` and the pool use directly."""

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
        "done",
        "is_head",
        "parser",
        "request_done",
        "response_started",
        "tunnel",
        "upgrade_requested",
    )

    # Set by ``UpstreamConnection.__init__``, like the rest by ``_reset_exchange``.
    parser: httptools.HttpResponseParser
    client: ResponseSink | None
    tunnel: bool
    at_start: bool  # llhttp has seen nothing of the response in progress
    _remaining: int  # body bytes still due on the fast path; -1: not on it

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

    # -- the fast reader ------------------------------------------------------------------

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

    def _finish_head_response(self, data: bytes) -> None:
        # llhttp cannot be told a response answers HEAD, so it would wait for a body that
        # never comes: stop at the head, and keep the connection only if the head ended
        # exactly at the end of what was read.
        self.parser = response_parser(self)
        self.done = True
        if not data.endswith(b"\r\n\r\n"):
            self.request_done = False  # makes it unreusable

    def _end_close_delimited(self, client: ResponseSink) -> None:
        # The connection closed in a close-delimited body: that ends it. Re-framed as
        # chunked, it gets its terminator.
        if self._framing == _CHUNKED:
            client.write(b"0\r\n\r\n")
        self.done = True
        client.response_complete(self, reusable=False)

    # -- parser callbacks ---------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self.done:
            raise ExtraBytes
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
            raise HeadResponseDone
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
