"""HTTP/1.1 request syntax the listener needs, decided once per message.

Which request headers the proxy handles itself, the checks llhttp leaves to us
(HTTP/0.9 lines, WebSocket keys, absolute-form targets).
"""

from __future__ import annotations

import base64
import binascii

import httptools

from proxy.errors import Reply
from proxy.headers import HOP_BY_HOP
from proxy.settings import OVERRIDE_TOKEN_HEADER

IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"TRACE"})

# Request headers with special handling; every other header is forwarded as it came.
H_HOST, H_CONN, H_HOP, H_TE, H_UPGRADE, H_XFF, H_UNTRUSTED = range(7)
H_COOKIE, H_TOKEN, H_CL, H_WSKEY = range(7, 11)
SPECIAL: dict[bytes, int] = {name: H_HOP for name in HOP_BY_HOP}
SPECIAL.update(
    {
        b"host": H_HOST,
        b"connection": H_CONN,
        b"transfer-encoding": H_TE,
        b"upgrade": H_UPGRADE,
        b"x-forwarded-for": H_XFF,
        b"forwarded": H_UNTRUSTED,
        b"x-real-ip": H_UNTRUSTED,
        b"x-forwarded-proto": H_UNTRUSTED,
        b"x-forwarded-host": H_UNTRUSTED,
        b"cookie": H_COOKIE,
        OVERRIDE_TOKEN_HEADER: H_TOKEN,
        b"content-length": H_CL,
        b"sec-websocket-key": H_WSKEY,
    }
)

# RFC 9110 token characters, and what a field value or reason phrase may hold (HTAB, SP,
# VCHAR, obs-text): one byte per character, 1 where allowed. For the compiled build's
# readers of plain heads (UpstreamConnection._fast_response, ClientConnection.
# _fast_request), which take a strict subset of what llhttp takes.
TCHAR = bytes(
    1 if chr(c).isascii() and (chr(c).isalnum() or chr(c) in "!#$%&'*+-.^_`|~") else 0
    for c in range(256)
)
VCHAR = bytes(1 if c == 9 or 32 <= c <= 126 or c >= 128 else 0 for c in range(256))


# Host names the fast path takes: letters, digits, '-', '.', '_', '~' (see plain_host).
NAMECHAR = bytes(
    1 if chr(c).isascii() and (chr(c).isalnum() or chr(c) in "-._~") else 0 for c in range(256)
)


def _marks(allowed: bytes) -> bytes:
    """A ``bytes.translate`` table: 0 for the ``allowed`` bytes, 1 for any other."""
    return bytes(0 if c in allowed else 1 for c in range(256))


# RFC 3986 reg-name characters, less pct-encoded and ',' (see valid_host). A value is
# checked as ``1 not in value.translate(table)``: two C calls, where a set's issuperset
# hashes every byte (about 400 instructions for a short Host).
_REG_NAME = _marks(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._~!$&'()*+;=")
_IPV6 = _marks(b"0123456789abcdefABCDEF:.")
_DIGITS = _marks(b"0123456789")


def token_end(data: bytes, i: int) -> int:
    """Where the token starting at ``data[i]`` ends (``i`` itself if there is none).
    ``data`` must hold the head's closing CRLF after ``i``: the scans stop on it."""
    while TCHAR[data[i]]:
        i += 1
    return i


def line_end(data: bytes, i: int) -> int:
    """The CR of the CRLF ending the field value (or reason phrase) at ``data[i]``, or -1
    if a byte before it may not be in one or the CR is not followed by LF. ``data`` must
    hold the head's closing CRLF after ``i``."""
    while data[i] != 13:
        if not VCHAR[data[i]]:
            return -1
        i += 1
    return i if data[i + 1] == 10 else -1


def plain_host(data: bytes, start: int, end: int) -> bool:
    """The fast path's Host check: ``data[start:end]`` is a name of ``NAMECHAR`` and an
    optional ``:port`` of digits. Anything else goes to llhttp's path (``valid_host``)."""
    i = start
    while i < end and NAMECHAR[data[i]]:
        i += 1
    if i == start:
        return False
    if i < end:
        if data[i] != 58:  # ":"
            return False
        i += 1
        while i < end:
            c = data[i]
            if c < 48 or c > 57:
                return False
            i += 1
    return True


def valid_host(value: bytes) -> bool:
    """RFC 9112 §3.2 / RFC 3986 §3.2.2: ``host [":" port]``, host a reg-name, an IPv4
    address or an ``[IPv6]`` literal. Stricter than RFC 3986 where two readers could
    disagree on the name: no percent-encoding, and no ',' (a list of Host values)."""
    if value[:1] == b"[":
        close = value.find(b"]")
        literal = value[1:close]
        if close < 0 or literal.find(b":") < 0 or 1 in literal.translate(_IPV6):
            return False
        rest = value[close + 1 :]
        return not rest or (rest[:1] == b":" and 1 not in rest[1:].translate(_DIGITS))
    name, _, port = value.partition(b":")
    return bool(name) and 1 not in name.translate(_REG_NAME) and 1 not in port.translate(_DIGITS)


def request_host(headers: list[tuple[bytes, bytes]], http11: bool) -> bytes | None:
    """The request's one Host value, checked before anything routes by it: 400 for two
    Host fields, an invalid value (a list among them) or, on HTTP/1.1, none or an empty
    one (RFC 9112 §3.2). Trailing white space is no part of the value."""
    host = None
    for name, value in headers:
        if len(name) == 4 and name.lower() == b"host":
            value = value.rstrip(b" \t")
            if host is not None or not valid_host(value):
                raise Reject(Reply.BAD_REQUEST)
            host = value
    if host is None and http11:
        raise Reject(Reply.BAD_REQUEST)
    return host


def head_end(data: bytes) -> int:
    """``data.find(b"\r\n\r\n")``: a C loop in the compiled build, where calling the
    bytes method cost more than the search through a head. It looks at every fourth byte
    while none is CR or LF: no match can span a byte that is neither."""
    n = len(data)
    e = 3  # where a match would end
    while e < n:
        c = data[e]
        if c == 10:
            if data[e - 1] == 13 and data[e - 2] == 10 and data[e - 3] == 13:
                return e - 3
            e += 2  # the next match ending in LF needs a CR just before it
        elif c == 13:
            e += 1
        else:
            e += 4
    return -1


def by_length(kinds: dict[bytes, int]) -> dict[int, tuple[tuple[bytes, int], ...]]:
    """``kinds`` (lowercased field name -> kind) grouped by name length, for field_kind."""
    out: dict[int, tuple[tuple[bytes, int], ...]] = {}
    for name, kind in kinds.items():
        out[len(name)] = (*out.get(len(name), ()), (name, kind))
    return out


def is_lower(data: bytes, start: int, end: int, lowered: bytes) -> bool:
    """``data[start:end].lower() == lowered`` for a token, without slicing. ``| 32``
    lowercases letters and keeps '-', the only other character in the names compared."""
    if end - start != len(lowered):
        return False
    for k in range(end - start):
        if (data[start + k] | 32) != lowered[k]:
            return False
    return True


def connection_close(data: bytes, start: int, end: int) -> int:
    """A plain ``Connection`` value for the fast readers: 1 for ``close``, 0 for
    ``keep-alive`` (any case), -1 for anything else, which llhttp's path handles."""
    if is_lower(data, start, end, b"close"):
        return 1
    if is_lower(data, start, end, b"keep-alive"):
        return 0
    return -1


def kind_hints(kinds: dict[bytes, int]) -> bytes:
    """A 2 KiB filter for field_kind: 1 at ``len(name) * 32 + (name[0] & 31)`` of every
    name in ``kinds``. Most fields (Accept, User-Agent, Date, Server...) miss it, so they
    are told apart from the special ones without a dict lookup or a compare."""
    hints = bytearray(64 * 32)
    for name in kinds:
        hints[len(name) * 32 + (name[0] & 31)] = 1
    return bytes(hints)


def field_kind(
    data: bytes,
    start: int,
    end: int,
    table: dict[int, tuple[tuple[bytes, int], ...]],
    hints: bytes,
) -> int:
    """The kind of the field named ``data[start:end]`` in a ``by_length`` table, or -1.
    ``hints`` is ``kind_hints`` of the same names; ``& 31`` folds case."""
    n = end - start
    if n >= 64 or not hints[n * 32 + (data[start] & 31)]:
        return -1
    candidates = table.get(n)
    if candidates is not None:
        for name, kind in candidates:
            if is_lower(data, start, end, name):
                return kind
    return -1


BODY_BUFFER_LIMIT = 256 * 1024
NO_TRAILER = frozenset(SPECIAL) | {b"x-bg-color", b"authorization", b"cookie"}


class MethodParser(httptools.HttpRequestParser):
    """A request parser fed a message whose method llhttp does not know under the
    stand-in ``PUT`` (see ``stand_in``): ``get_method`` gives the real one back, once."""

    def __init__(self, protocol: object, method: bytes) -> None:
        super().__init__(protocol)
        self.method: bytes | None = method

    def get_method(self) -> bytes:
        method = self.method
        if method is None:
            return super().get_method()
        self.method = None
        return method


def request_parser(protocol: object, method: bytes | None = None) -> httptools.HttpRequestParser:
    """llhttp for requests, strict but for two things RFC 9112 allows and nginx and HAProxy
    take: white space between a chunk size and its extension (``5 ;ext``, §7.1.1: BWS;
    the body is re-chunked upstream, so the spelling never reaches it), and an HTTP/1.x
    version above 1.1, which ``_dispatch`` answers as 1.1 (RFC 9110 §2.5). ``method``:
    the real method of a first message fed under a stand-in (``MethodParser``)."""
    if method is None:
        parser = httptools.HttpRequestParser(protocol)
    else:
        parser = MethodParser(protocol, method)
    parser.set_dangerous_leniencies(lenient_spaces_after_chunk_size=True, lenient_version=True)
    return parser


class _Completed:
    """Counts the messages a throwaway parser completes."""

    __slots__ = ("n",)

    def __init__(self) -> None:
        self.n = 0

    def on_message_complete(self) -> None:
        self.n += 1


def _completed(data: bytes, end: int) -> int:
    count = _Completed()
    try:
        request_parser(count).feed_data(memoryview(data)[:end])
    except (httptools.HttpParserError, httptools.HttpParserUpgrade):
        pass
    return count.n


def message_start(data: bytes) -> int:
    """Where the message llhttp stopped in starts, ``data`` being read from a message
    boundary: after the messages it completed first (found by parsing prefixes, galloping
    then halving: cost in proportion to how far in it is) and the empty lines llhttp
    skips between messages."""
    n = _completed(data, len(data))
    start = 0
    if n:
        lo, hi = 0, 64  # fewer than n messages end by lo; n end by hi
        while hi < len(data) and _completed(data, hi) < n:
            lo, hi = hi, hi * 2
        hi = min(hi, len(data))
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if _completed(data, mid) < n:
                lo = mid
            else:
                hi = mid
        start = hi
    while start < len(data) and (data[start] == 13 or data[start] == 10):
        start += 1
    return start


def stand_in(data: bytes) -> tuple[bytes, bytes] | Reply:
    """llhttp refused the method of a request in ``data`` (read from a message boundary):
    it knows a fixed list, while methods are an open set (RFC 9110 §9.1) and nginx and
    HAProxy forward any token. Returns that request onwards with the method replaced by
    ``PUT`` (one llhttp frames like any other: by Content-Length or chunked) and the real
    method, for ``request_parser``; or the reply when it is no method: 400 if not a token
    followed by a space, 501 if it has lower-case letters (``head`` must never reach an
    upstream that would answer it as HEAD while we wait for a body) or is not whole in
    this read."""
    start = message_start(data)
    i = start
    n = len(data)
    while i < n and TCHAR[data[i]]:
        i += 1
    method = data[start:i]
    if i == n:
        return Reply.NOT_IMPLEMENTED if method else Reply.BAD_REQUEST
    if not method or data[i] != 32:
        return Reply.BAD_REQUEST
    if method.upper() != method:
        return Reply.NOT_IMPLEMENTED
    return b"PUT" + data[i:], method


def assert_c_parser() -> None:
    """Strictness and speed both rest on llhttp: refuse to run on a pure-Python fallback."""
    from httptools.parser import parser as cparser

    if not str(cparser.__file__).endswith((".so", ".pyd")):
        raise RuntimeError("httptools is not using its C parser (llhttp)")


class Reject(Exception):
    """Raised from a parser callback: answer ``reply`` and close."""

    def __init__(self, reply: Reply) -> None:
        self.reply = reply


def method_shaped(data: bytes) -> bool:
    word = data.split(b" ", 1)[0]
    return 0 < len(word) <= 20 and word.isalpha() and word.isupper()


def origin_form(url: bytes, host: bytes | None) -> bytes:
    """Absolute-form to origin-form; the authority must agree with Host."""
    if url == b"*":
        return url
    low = url.lower()
    if not (low.startswith(b"http://") or low.startswith(b"https://")):
        raise Reject(Reply.BAD_REQUEST)
    rest = url.split(b"://", 1)[1]
    authority, slash, path = rest.partition(b"/")
    if host is None or authority.lower() != host.lower():
        raise Reject(Reply.BAD_REQUEST)
    return slash + path if slash else b"/"


def chunked_only(te: bytes) -> None:
    """A request's Transfer-Encoding (every field's value, joined with ", ") must be
    ``chunked`` alone. RFC 9112 §6.1: a coding the server does not understand is answered
    501 (the proxy decodes none and does not hand them on); a list that does not end in
    exactly one ``chunked`` has no framing the upstream could be sure to read the same
    way: 400. Empty list elements are allowed (RFC 9110 §5.6.1)."""
    codings = [c for c in (c.strip(b" \t").lower() for c in te.split(b",")) if c]
    if not codings or codings[-1] != b"chunked" or codings.count(b"chunked") > 1:
        raise Reject(Reply.BAD_REQUEST)
    if len(codings) > 1:
        raise Reject(Reply.NOT_IMPLEMENTED)


def trim_te_ows(data: bytes) -> bytes:
    """``data`` (part of a request head, from its start or a line's) with the white space
    that ends a ``Transfer-Encoding`` field line removed. RFC 9110 §5.5: it is no part of
    the value, and nginx and HAProxy ignore it; llhttp reads ``chunked<HTAB>`` as a coding
    it does not know and refuses the request. Only whole field lines of the head are
    touched, never a continuation line (obs-fold stays refused) or a body."""
    end = data.find(b"\r\n\r\n")
    head = data if end < 0 else data[:end]
    lines = head.split(b"\r\n")
    for k in range(1, len(lines)):
        line = lines[k]
        if line[:18].lower() == b"transfer-encoding:" and line[-1:] in (b" ", b"\t"):
            lines[k] = line.rstrip(b" \t")
    return b"\r\n".join(lines) + (b"" if end < 0 else data[end:])


def is_http09(data: bytes) -> bool:
    """A complete first line with no HTTP version: an HTTP/0.9 simple request."""
    end = data.find(b"\n")
    return end >= 0 and b" HTTP/" not in data[:end]


def valid_ws_key(key: bytes | None) -> bool:
    """RFC 6455 §4.1: base64 of 16 bytes."""
    if key is None:
        return False
    try:
        return len(base64.b64decode(key.strip(), validate=True)) == 16
    except (binascii.Error, ValueError):
        return False
