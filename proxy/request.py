"""One client request as the listener reads it, and the rewrite of its head.

A ``Request`` is what a head parses to, whichever reader read it: llhttp's callbacks
fill it field by field, the compiled fast reader (``fast_head``) in one pass. A request
pipelined behind a running exchange is parked as one too, so a request has one shape
and one fresh start wherever it waits. ``read_head`` turns the fields llhttp read into
the upstream head's field lines and picks out what the proxy acts on;
``upstream_head`` adds the fields the proxy writes, taking the client's address and
scheme from the connection, so a TLS or PROXY-protocol listener only fills those in.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from proxy.errors import Reply
from proxy.headers import drop_cookie, drop_fields, get_cookie
from proxy.http1 import (
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
    SPECIAL,
    Reject,
    by_length,
    chunked_only,
    connection_close,
    field_kind,
    is_lower,
    kind_hints,
    line_end,
    origin_form,
    plain_host,
    token_end,
    valid_host,
)

if TYPE_CHECKING:
    from proxy.settings import Settings

_NOTHING_FORWARDED: frozenset[bytes] = frozenset()
_PLAIN_CONNECTION = frozenset({b"close", b"keep-alive"})
_SPECIAL_BY_LENGTH = by_length(SPECIAL)
_SPECIAL_HINTS = kind_hints(SPECIAL)
# Request-target characters the fast reader takes: RFC 3986 unreserved, sub-delims, ':',
# '@', '/', '?' and '%'. Anything else goes to llhttp, which decides.
_URLCHAR = bytes(
    1 if chr(c).isascii() and (chr(c).isalnum() or chr(c) in "-._~!$&'()*+,;=:@/?%") else 0
    for c in range(256)
)


class Request:
    """A request's head and body as read, and what the proxy reads out of the head."""

    __slots__ = (
        "body", "complete", "content_length", "forwarded", "head_done", "headers", "host",
        "keep_alive", "lines", "method", "override", "reject", "size", "sticky", "te",
        "token", "trailers", "upgrade", "upgrade_value", "url", "version", "ws_key", "xff",
    )  # fmt: skip

    def __init__(self) -> None:
        # As read.
        self.method = b""
        self.url = b""
        self.version = "1.1"
        self.keep_alive = True
        self.upgrade = False  # llhttp's flag: an Upgrade (or CONNECT) request
        self.headers: list[tuple[bytes, bytes]] = []
        self.trailers: list[tuple[bytes, bytes]] | None = None
        self.body: list[bytes] | None = None  # only while parked behind another exchange
        self.size = 0  # head bytes so far, against limits.max_header_bytes
        self.head_done = False
        self.complete = False
        self.reject: Reply | None = None  # a parse error, answered when its turn comes
        # Read out of the head (read_head, fast_head).
        self.lines: list[bytes] = []  # request line and forwarded field lines, CRLFs in
        self.host: bytes | None = None
        self.override: bytes | None = None
        self.sticky: bytes | None = None
        self.token: bytes | None = None
        self.upgrade_value: bytes | None = None
        self.ws_key: bytes | None = None
        self.te: bytes | None = None  # b"chunked" when the body is re-framed upstream
        self.content_length: bytes | None = None
        self.xff: bytes | None = None  # a trusted peer's X-Forwarded-For
        self.forwarded: frozenset[bytes] | set[bytes] = _NOTHING_FORWARDED


def fast_head(req: Request, data: bytes, end: int, s: Settings) -> bool:
    """Read a plain request whose whole head is ``data[:end]`` into ``req`` (a fresh one)
    in one C pass: GET, HEAD,
    DELETE or OPTIONS of an origin-form target, ``HTTP/1.1``, one Host, fields written
    ``Name: value``, none of them one the proxy acts on but ``Connection: keep-alive|
    close``. Its field lines go upstream as they came. Anything else is False, ``req``
    untouched, and llhttp reads the bytes as usual: this takes a subset of what llhttp
    takes and forwards the same bytes the llhttp path would (tests/test_fast_request.py
    compares the two builds byte for byte)."""
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
    override_name = s.override_header
    max_headers = s.max_headers
    lines = [method, b" ", data[start:url_end], b" HTTP/1.1\r\n"]
    run = line  # start of the run of field lines forwarded as they came
    host = None
    keep_alive = True
    count = 0
    while line < end - 2:
        # A token, ": " and a value that does not start with white space: the form the
        # llhttp path writes a field in, so the bytes forwarded are the same.
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
    req.method = method
    req.url = lines[2]
    req.keep_alive = keep_alive
    req.size = end
    req.head_done = True
    req.lines = lines
    req.host = host
    return True


def read_head(req: Request, s: Settings, trusted: bool, http11: bool) -> None:
    """The upstream head's request line and field lines for a head llhttp read, and the
    fields the proxy acts on, into ``req``. Raises ``Reject`` for what must be refused.
    ``trusted``: the peer is in ``trusted_proxies``, so its forwarding fields stand."""
    host: bytes | None = None
    override: bytes | None = None
    cookie_override: bytes | None = None
    te: bytes | None = None
    xff: bytes | None = None
    conn_tokens: set[bytes] | None = None
    forwarded: set[bytes] = set()
    lines: list[bytes] = [req.method, b" ", b"", b" HTTP/1.1\r\n"]  # [2]: the target
    override_name = s.override_header
    for name, value in req.headers:
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
            req.sticky = get_cookie(value, s.sticky_cookie)
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
            req.content_length = value
        elif kind == H_WSKEY:
            req.ws_key = value
            lines.extend((name, b": ", value, b"\r\n"))
        elif kind == H_CONN:
            # "close" / "keep-alive" name no header to drop: skip the token parse.
            if value.lower() not in _PLAIN_CONNECTION:
                conn_tokens = drop_fields(value, conn_tokens)
        elif kind == H_TE:
            te = value if te is None else te + b", " + value
        elif kind == H_UPGRADE:
            req.upgrade_value = value
        elif kind == H_XFF:
            if trusted:
                xff = value if xff is None else xff + b", " + value
        elif kind == H_UNTRUSTED:
            if trusted:
                lines.extend((name, b": ", value, b"\r\n"))
                forwarded.add(low)
        elif kind == H_TOKEN:
            req.token = value
        # H_HOP: dropped

    if conn_tokens:
        # Every kept field is four items: name, ": ", value, CRLF.
        lines = [
            item
            for k in range(0, len(lines), 4)
            if lines[k].lower() not in conn_tokens
            for item in lines[k : k + 4]
        ]
    url = req.url
    if url[:1] != b"/":
        url = origin_form(url, host)
    lines[2] = url
    if host is None and http11:
        raise Reject(Reply.BAD_REQUEST)
    if te is not None:
        chunked_only(te)
        te = b"chunked"  # what the body is re-framed in upstream, whatever the spelling
    req.lines = lines
    req.host = host
    req.override = override if override is not None else cookie_override
    req.te = te
    req.xff = xff
    if forwarded:
        req.forwarded = forwarded


def upstream_head(
    req: Request,
    host_header: bytes | None,
    peer: str,
    xff_line: bytes,
    proto_line: bytes,
    upgrade_value: bytes | None,
) -> bytes:
    """The head sent upstream: ``req.lines`` and the fields the proxy adds. ``peer``,
    ``xff_line`` (``X-Forwarded-For: <peer>``) and ``proto_line`` (``X-Forwarded-Proto``)
    come from the client connection; ``host_header`` is the upstream's, for an HTTP/1.0
    request without Host; ``upgrade_value`` is set when the request upgrades."""
    lines = req.lines
    host = req.host
    if host is None and host_header is not None:
        lines += (b"Host: ", host_header, b"\r\n")
    xff = req.xff
    if xff:
        lines += (b"X-Forwarded-For: ", xff, b", ", peer.encode(), b"\r\n")
    else:
        lines.append(xff_line)
    forwarded = req.forwarded
    if b"x-forwarded-proto" not in forwarded:
        lines.append(proto_line)
    if host is not None and b"x-forwarded-host" not in forwarded:
        lines += (b"X-Forwarded-Host: ", host, b"\r\n")
    if req.te is not None:
        lines += (b"Transfer-Encoding: ", req.te, b"\r\n")
    if upgrade_value is not None:
        lines += (b"Connection: Upgrade\r\nUpgrade: ", upgrade_value, b"\r\n")
    lines.append(b"\r\n")
    return b"".join(lines)
