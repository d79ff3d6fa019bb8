"""Access-log lines: the record a request hands in, the two formats, and escaping.

A finished request becomes its line at once, on the request's callback, so nothing it
holds is kept past it. The common line (every client-given value printable ASCII and
short, an upstream answered) is one f-string, which the compiled build joins in C from
C values: the time text is built once a millisecond (``_Clock``), the config strings
(service, color, reason, upstream) once per combination (``LineFormatter._segment``),
and the user agent and referer are found in the raw head by one C pass. Anything else
(escaping, cutting, WebSocket and trace fields, the proxy's own refusals) goes through
``format_json`` / ``format_combined`` with a ``bytes %`` template. Writing, in batches,
is proxy/accesslog.py's.

Every value that came from a client or an upstream (target, method, user agent,
referer, a trusted peer's request ID) is escaped before it is written: in ``json``,
control characters and quotes as JSON escapes, non-ASCII as ``\\uXXXX`` and invalid
UTF-8 as ``\\xNN`` text; in ``combined``, as nginx does, ``"``, ``\\`` and bytes
outside printable ASCII as ``\\xNN``. A line never contains a raw newline, and is cut to
fit ``PIPE_BUF`` (each field is shortened, the line marked ``"truncated": true``).
"""

from __future__ import annotations

import json
import re
import time
from typing import Any

from proxy import _hotpath
from proxy.logsink import PIPE_BUF

# The record of a request the common path does not take (WebSocket sessions, traced
# requests, the proxy's refusals): a plain tuple, read by position here and by the span
# exporter (proxy/otel.py).
(
    R_END,  # time.monotonic() when it ended
    R_CLIENT,  # str: the client address
    R_METHOD,  # bytes
    R_TARGET,  # bytes
    R_VERSION,  # bytes: b"1.1", b"1.0"
    R_STATUS,  # int: 0 when no response was sent
    R_BYTES_IN,  # int: head and body bytes read from the client
    R_BYTES_OUT,  # int: bytes written to the client
    R_DURATION,  # float seconds
    R_UPSTREAM_TIME,  # float seconds to the upstream's response head, or -1.0
    R_SERVICE,  # str | None
    R_COLOR,  # str | None
    R_REASON,  # str | None: active, override, weight, sticky
    R_UPSTREAM,  # str | None: the target URL
    R_REQUEST_ID,  # bytes | None
    R_HEAD,  # bytes (the raw head) | list of (name, value) | None: user agent, referer
    R_TLS,  # str | None: the TLS version
    R_SNI,  # str | None
    R_WS,  # None | (messages in, messages out, close kind)
    R_TRACE,  # None | the proxy's Span (proxy/tracing.py)
) = range(20)
RECORD_SIZE = 20

# JSON string content that needs no escaping: printable ASCII but '"' and '\\'.
_UNSAFE = re.compile(rb'[^\x20\x21\x23-\x5b\x5d-\x7e]')
_CAPS = (1024, 256, 48)  # bytes per client-given field, tried in turn until a line fits
# The router's reasons (proxy/router.py ``Reason`` values) as the log spells them.
REASONS = {"active": "active", "override": "override", "weighted": "weight", "sticky": "sticky"}
# C loops over bytes in the compiled build; the interpreter is faster with re and lower().
_COMPILED = _hotpath.KIND == "compiled"
_AGENT = b"user-agent:"
_REFERER = b"referer:"
_MONTHS = (b"Jan", b"Feb", b"Mar", b"Apr", b"May", b"Jun", b"Jul", b"Aug", b"Sep", b"Oct",
           b"Nov", b"Dec")  # fmt: skip


def json_text(value: bytes) -> bytes:
    """``value`` as the inside of a JSON string, ASCII only."""
    if _UNSAFE.search(value) is None:
        return value
    text = json.dumps(value.decode("utf-8", "backslashreplace"))[1:-1]
    return text.replace("\x7f", "\\u007f").encode("ascii")


def clf_text(value: bytes) -> bytes:
    """``value`` escaped as nginx escapes a variable in its default log format."""
    if _UNSAFE.search(value) is None:
        return value
    return _UNSAFE.sub(lambda m: b"\\x%02X" % m[0][0], value)


def _field(head: bytes, low: bytes, name: bytes) -> bytes | None:
    """The value of field ``name`` (lower case, with its CRLF and colon) in a raw head
    whose lower-case copy is ``low``."""
    i = low.find(name)
    if i < 0:
        return None
    i += len(name)
    return head[i : head.find(b"\r\n", i)].strip()


def _plain(value: bytes) -> bool:
    """Whether ``value`` needs no escaping in either format (printable ASCII but ``"``
    and ``\\``): what ``_UNSAFE`` finds nothing in."""
    if not _COMPILED:
        return _UNSAFE.search(value) is None
    for c in value:
        if c < 0x20 or c > 0x7E or c == 0x22 or c == 0x5C:
            return False
    return True


def head_fields(head: object) -> tuple[bytes | None, bytes | None]:
    """``header_values``; in the compiled build one C pass over a raw head finds both,
    without a lower-case copy of it."""
    if not _COMPILED or type(head) is not bytes:
        return header_values(head)
    return _scan(head)


def _scan(head: bytes) -> tuple[bytes | None, bytes | None]:
    agent = referer = None
    n = len(head)
    i = 0
    while i < n - 1:
        if head[i] == 13 and head[i + 1] == 10:
            if agent is None and _named(head, i + 2, _AGENT):
                agent = _value(head, i + 13)
            elif referer is None and _named(head, i + 2, _REFERER):
                referer = _value(head, i + 10)
        i += 1
    return agent, referer


def _named(head: bytes, at: int, name: bytes) -> bool:
    """Whether the field at ``at`` is ``name`` (lower case, with its colon), any case."""
    m = len(name)
    if at + m > len(head):
        return False
    for k in range(m):
        c = head[at + k]
        if 65 <= c <= 90:
            c += 32
        if c != name[k]:
            return False
    return True


def _value(head: bytes, i: int) -> bytes:
    """``head[i : head.find(b"\\r\\n", i)].strip()`` (what ``_field`` reads), in C."""
    n = len(head)
    e = i
    while e < n - 1 and not (head[e] == 13 and head[e + 1] == 10):
        e += 1
    if e >= n - 1:  # no line end: find's -1 slices to the last byte but one
        e = n - 1
    if e < i:
        e = i
    while i < e and head[i] in (32, 9, 10, 13, 11, 12):  # bytes.strip()'s white space
        i += 1
    while e > i and head[e - 1] in (32, 9, 10, 13, 11, 12):
        e -= 1
    return head[i:e]


def header_values(head: object) -> tuple[bytes | None, bytes | None]:
    """The user agent and referer of a request head (raw bytes or parsed fields)."""
    if head is None:
        return None, None
    if type(head) is bytes:
        low = head.lower()
        return _field(head, low, b"\r\nuser-agent:"), _field(head, low, b"\r\nreferer:")
    agent = referer = None
    for name, value in head:  # type: ignore[attr-defined]
        if len(name) == 10 and name.lower() == b"user-agent":
            agent = value
        elif len(name) == 7 and name.lower() == b"referer":
            referer = value
    return agent, referer


class _Clock:
    """Wall-clock text for monotonic times, the second's prefix built once."""

    __slots__ = ("_clf", "_clf_str", "_iso", "_ms", "_ms_str", "_second", "offset")

    def __init__(self) -> None:
        self.offset = time.time() - time.monotonic()
        self._second = -1
        self._iso = ""
        self._clf = b""
        self._clf_str = ""
        self._ms = -1
        self._ms_str = ""

    def refresh(self) -> None:
        # Once a batch: NTP may step the wall clock; requests keep monotonic times.
        self.offset = time.time() - time.monotonic()

    def _set(self, second: int) -> None:
        t = time.gmtime(second)
        self._second = second
        self._iso = time.strftime("%Y-%m-%dT%H:%M:%S", t)
        self._clf = b"%02d/%s/%04d:%02d:%02d:%02d +0000" % (
            t.tm_mday, _MONTHS[t.tm_mon - 1], t.tm_year, t.tm_hour, t.tm_min, t.tm_sec
        )  # fmt: skip
        self._clf_str = self._clf.decode()

    def iso(self, mono: float) -> bytes:
        return self.iso_text(mono).encode()

    def iso_text(self, mono: float) -> str:
        ms = int((mono + self.offset) * 1000)
        if ms == self._ms:  # under load, many lines share a millisecond
            return self._ms_str
        second = ms // 1000
        if second != self._second:
            self._set(second)
        self._ms = ms
        text = self._ms_str = f"{self._iso}.{ms % 1000:03d}Z"
        return text

    def clf(self, mono: float) -> bytes:
        second = int(mono + self.offset)
        if second != self._second:
            self._set(second)
        return self._clf

    def clf_text(self, mono: float) -> str:
        self.clf(mono)
        return self._clf_str


class _Names:
    """Config-given strings (service, color, target URL, address) as JSON, cached."""

    __slots__ = ("_clf", "_json", "_text")

    def __init__(self) -> None:
        self._clf: dict[str, str] = {}
        self._json: dict[str | None, bytes] = {None: b"null"}
        self._text: dict[str | None, str] = {None: "null"}

    def text(self, value: str | None) -> str:
        out = self._text.get(value)
        if out is None:
            out = self.json(value).decode()
            if len(self._text) < 4096:
                self._text[value] = out
        return out

    def segment(
        self, service: str | None, color: str | None, reason: str | None, upstream: str | None
    ) -> str:
        """The JSON line's ``"service":...,"upstream":...`` part."""
        return (
            f'"service":{self.text(service)},"color":{self.text(color)},'
            f'"reason":{self.text(reason)},"upstream":{self.text(upstream)}'
        )

    def clf(self, client: str) -> str:
        """A client address as the combined line writes it."""
        out = self._clf.get(client)
        if out is None:
            out = clf_text(client.encode()).decode("latin-1")
            if len(self._clf) < 4096:
                self._clf[client] = out
        return out

    def json(self, value: str | None) -> bytes:
        out = self._json.get(value)
        if out is None:
            assert value is not None
            out = b'"%s"' % json_text(value.encode("utf-8", "surrogateescape"))
            if len(self._json) < 4096:  # addresses are many; the rest are few
                self._json[value] = out
        return out


_JSON = (
    b'{"time":"%s","client":%s,"method":"%s","target":"%s","version":"%s","status":%d,'
    b'"bytes_in":%d,"bytes_out":%d,"duration":%.6f,"upstream_time":%s,"service":%s,'
    b'"color":%s,"reason":%s,"upstream":%s,"request_id":%s,"user_agent":%s,"referer":%s,'
    b'"tls":%s,"sni":%s'
)


def _jstr(value: bytes | None, cap: int) -> bytes:
    if value is None:
        return b"null"
    return b'"%s"' % json_text(value[:cap])


def format_json(rec: tuple[Any, ...], clock: _Clock, names: _Names) -> bytes:
    # One unpacking, in C in the compiled build, rather than an index per field.
    (
        end, client, method, target, version, status, bytes_in, bytes_out, duration,
        upstream_time, service, color, reason, upstream, rid, head, tls, sni, ws, trace,
    ) = rec  # fmt: skip
    agent, referer = head_fields(head)
    if ws is None and trace is None and sni is None:
        common = _json_line(
            clock, names, names.segment(service, color, reason, upstream), end, client, method,
            target, version, status, bytes_in, bytes_out, duration, upstream_time, rid, agent,
            referer, tls,
        )  # fmt: skip
        if common is not None:
            return common.encode("ascii")
    return _slow_json(rec, clock, names, agent, referer)


def _json_line(
    clock: _Clock, names: _Names, segment: str, end: float, client: str, method: bytes,
    target: bytes, version: bytes, status: int, bytes_in: int, bytes_out: int,
    duration: float, upstream_time: float, rid: bytes | None, agent: bytes | None,
    referer: bytes | None, tls: str | None,
) -> str | None:  # fmt: skip
    """The common JSON line, or None when a value needs escaping or cutting, or no
    upstream answered: client-given values written as they came; config strings from
    caches; times as whole microseconds (no float formatting). One f-string: the
    compiled build joins it in C."""
    if upstream_time < 0.0:
        return None
    # Values 2 KiB together at most (with a separator each, as it has always been
    # counted): nothing to cut.
    n = _given_size(method, target, version, rid, agent, referer, 2048)
    if n < 0 or n - len(version) + 4 > 2048:
        return None
    us = int(duration * 1e6 + 0.5)
    up_us = int(upstream_time * 1e6 + 0.5)
    texts = names._text
    line = (
        f'{{"time":"{clock.iso_text(end)}","client":{texts.get(client) or names.text(client)},'
        f'"method":"{method.decode("ascii")}","target":"{target.decode("ascii")}",'
        f'"version":"{version.decode("ascii")}","status":{_status_text(status)},'
        f'"bytes_in":{bytes_in},"bytes_out":{bytes_out},'
        f'"duration":{us // 1000000}.{us % 1000000:06d},'
        f'"upstream_time":{up_us // 1000000}.{up_us % 1000000:06d},{segment},'
        f'"request_id":{_QUOTE[rid is not None]}{_text(rid)}{_QUOTE[rid is not None]},'
        f'"user_agent":{_QUOTE[agent is not None]}{_text(agent)}{_QUOTE[agent is not None]},'
        f'"referer":{_QUOTE[referer is not None]}{_text(referer)}{_QUOTE[referer is not None]},'
        f'"tls":{texts.get(tls) or names.text(tls)},"sni":null}}\n'
    )
    return line if len(line) < _LINE_MAX else None


def _given_size(
    method: bytes, target: bytes, version: bytes, rid: bytes | None, agent: bytes | None,
    referer: bytes | None, cap: int,
) -> int:  # fmt: skip
    """The client-given values' total length when none needs escaping and none is
    longer than ``cap`` (the target twice that, the version 16), else -1."""
    n = len(method) + len(target) + len(version)
    if len(method) > cap or len(target) > 2 * cap or len(version) > 16:
        return -1
    if not (_plain(method) and _plain(target) and _plain(version)):
        return -1
    if rid is not None:
        if len(rid) > cap or not _plain(rid):
            return -1
        n += len(rid)
    if agent is not None:
        if len(agent) > cap or not _plain(agent):
            return -1
        n += len(agent)
    if referer is not None:
        if len(referer) > cap or not _plain(referer):
            return -1
        n += len(referer)
    return n


# Pieces of the common line: a quote around a value that is there, none around null;
# the text of the usual statuses made once.
_QUOTE = ("", '"')
_STATUS = tuple(str(n) for n in range(600))
_LINE_MAX = PIPE_BUF


def _text(value: bytes | None) -> str:
    return "null" if value is None else value.decode("ascii")


def _status_text(status: int) -> str:
    return _STATUS[status] if 0 <= status < 600 else str(status)


def _slow_json(
    rec: tuple[Any, ...], clock: _Clock, names: _Names, agent: bytes | None,
    referer: bytes | None,
) -> bytes:  # fmt: skip
    """Any line: escaping, cutting to fit, the WebSocket and trace fields."""
    upstream_time = rec[R_UPSTREAM_TIME]
    for cap in _CAPS:
        line = _JSON % (
            clock.iso(rec[R_END]), names.json(rec[R_CLIENT]), json_text(rec[R_METHOD][:cap]),
            json_text(rec[R_TARGET][:cap * 2]), json_text(rec[R_VERSION][:16]), rec[R_STATUS],
            rec[R_BYTES_IN], rec[R_BYTES_OUT], rec[R_DURATION],
            b"%.6f" % upstream_time if upstream_time >= 0.0 else b"null",
            names.json(rec[R_SERVICE]), names.json(rec[R_COLOR]), names.json(rec[R_REASON]),
            names.json(rec[R_UPSTREAM]), _jstr(rec[R_REQUEST_ID], cap), _jstr(agent, cap),
            _jstr(referer, cap), names.json(rec[R_TLS]), _jstr(_b(rec[R_SNI]), cap),
        )  # fmt: skip
        ws = rec[R_WS]
        if ws is not None:
            line += b',"ws_messages_in":%d,"ws_messages_out":%d,"ws_close":"%s"' % (
                ws[0], ws[1], ws[2].encode()
            )  # fmt: skip
        trace = rec[R_TRACE]
        if trace is not None:
            line += b',"trace_id":"%s","span_id":"%s"' % (trace.trace_id, trace.span_id)
        if len(line) < PIPE_BUF - 20:
            cut = _cut(cap, rec[R_METHOD], rec[R_REQUEST_ID], agent, referer) or (
                len(rec[R_TARGET]) > cap * 2
            )
            return line + (b',"truncated":true}\n' if cut else b"}\n")
    return line[: PIPE_BUF - 40] + b'","truncated":true}\n'  # unreachable in practice


def _cut(cap: int, *values: bytes | None) -> bool:
    return any(v is not None and len(v) > cap for v in values)


def _b(value: str | None) -> bytes | None:
    return None if value is None else value.encode("utf-8", "surrogateescape")


def _dash(value: bytes | None, cap: int) -> bytes:
    return b"-" if value is None else clf_text(value[:cap])


def format_combined(rec: tuple[Any, ...], clock: _Clock, names: _Names) -> bytes:
    """nginx's ``combined``, then the color, the service, the request ID and the
    duration in seconds: ``... "referer" "agent" "blue" "shop" "rid" 0.003``."""
    agent, referer = head_fields(rec[R_HEAD])
    if rec[R_WS] is None:
        common = _combined_line(
            clock, names, _combined_segment(rec[R_SERVICE], rec[R_COLOR]), rec[R_END],
            rec[R_CLIENT], rec[R_METHOD], rec[R_TARGET], rec[R_VERSION], rec[R_STATUS],
            rec[R_BYTES_OUT], rec[R_DURATION], rec[R_REQUEST_ID], agent, referer,
        )  # fmt: skip
        if common is not None:
            return common.encode("latin-1")  # the segment's UTF-8, byte for byte
    for cap in _CAPS:
        line = b'%s - - [%s] "%s %s HTTP/%s" %d %d "%s" "%s" "%s" "%s" "%s" %.3f' % (
            clf_text(rec[R_CLIENT].encode()), clock.clf(rec[R_END]),
            clf_text(rec[R_METHOD][:cap]), clf_text(rec[R_TARGET][:cap * 2]),
            clf_text(rec[R_VERSION][:16]), rec[R_STATUS], rec[R_BYTES_OUT],
            _dash(referer, cap), _dash(agent, cap), (rec[R_COLOR] or "-").encode(),
            (rec[R_SERVICE] or "-").encode(), _dash(rec[R_REQUEST_ID], cap), rec[R_DURATION],
        )  # fmt: skip
        ws = rec[R_WS]
        if ws is not None:
            line += b" ws=%d/%d/%s" % (ws[0], ws[1], ws[2].encode())
        if len(line) < PIPE_BUF - 1:
            return line + b"\n"
    return line[: PIPE_BUF - 1] + b"\n"  # unreachable in practice


def _combined_segment(service: str | None, color: str | None) -> str:
    """``"color" "service"`` as UTF-8 bytes held in a latin-1 str (lines are kept as
    str, each character one byte, until they are written)."""
    return f'"{color or "-"}" "{service or "-"}"'.encode().decode("latin-1")


def _combined_line(
    clock: _Clock, names: _Names, segment: str, end: float, client: str, method: bytes,
    target: bytes, version: bytes, status: int, bytes_out: int, duration: float,
    rid: bytes | None, agent: bytes | None, referer: bytes | None,
) -> str | None:  # fmt: skip
    """The common combined line, or None when a value needs escaping or cutting. The
    duration is ``%.3f``'s text: whole milliseconds by integer arithmetic, except within
    a millionth of a tie, where the float is formatted."""
    if _given_size(method, target, version, rid, agent, referer, 1024) < 0:
        return None
    x = duration * 1000.0
    ms = int(x)
    if 0.499999 < x - ms < 0.500001:
        seconds = f"{duration:.3f}"
    else:
        ms = int(x + 0.5)
        seconds = f"{ms // 1000}.{ms % 1000:03d}"
    line = (
        f'{names.clf(client)} - - [{clock.clf_text(end)}] "{method.decode("ascii")} '
        f'{target.decode("ascii")} HTTP/{version.decode("ascii")}" '
        f'{_status_text(status)} {bytes_out} '
        f'"{_dashed(referer)}" "{_dashed(agent)}" {segment} "{_dashed(rid)}" {seconds}\n'
    )
    return line if len(line) < _LINE_MAX else None


def _dashed(value: bytes | None) -> str:
    return "-" if value is None else value.decode("ascii")


FORMATS = {"json": format_json, "combined": format_combined}


class LineFormatter:
    """A finished request's line, from the values the request path holds (proxy/
    exchange.py hands them over as C values): the common line with its config strings
    built once per combination, anything else as a record through the general format."""

    __slots__ = ("_color", "_reason", "_segment_text", "_service", "_upstream", "clock",
                 "json", "names")  # fmt: skip

    def __init__(self, format: str) -> None:
        self.json = format == "json"
        self.clock = _Clock()
        self.names = _Names()
        # The last (service, color, reason, upstream) by identity, and its text.
        self._service: object = _UNSET
        self._color: object = _UNSET
        self._reason: object = _UNSET
        self._upstream: object = _UNSET
        self._segment_text = ""

    def request(
        self, end: float, client: str, method: bytes, target: bytes, http11: bool,
        status: int, bytes_in: int, bytes_out: int, duration: float, upstream_time: float,
        service: str | None, color: Any, reason: Any, upstream: Any, rid: bytes | None,
        head: object, tls: str | None, sni: str | None,
    ) -> str:  # fmt: skip
        """``color``, ``reason`` and ``upstream`` are the routing's objects (a ``Color``,
        a ``Reason``, an ``Upstream``), turned into text only when they change."""
        agent, referer = head_fields(head)
        version = _HTTP11 if http11 else _HTTP10
        if (
            service is not self._service or color is not self._color
            or reason is not self._reason or upstream is not self._upstream
        ):  # fmt: skip
            self._new_segment(service, color, reason, upstream)
        line: str | None = None
        if not self.json:
            line = _combined_line(
                self.clock, self.names, self._segment_text, end, client, method, target,
                version, status, bytes_out, duration, rid, agent, referer,
            )  # fmt: skip
        elif sni is None:
            line = _json_line(
                self.clock, self.names, self._segment_text, end, client, method, target,
                version, status, bytes_in, bytes_out, duration, upstream_time, rid, agent,
                referer, tls,
            )  # fmt: skip
        if line is not None:
            return line
        rec = (
            end, client, method, target, version, status, bytes_in, bytes_out, duration,
            upstream_time, service, _color_text(color), _reason_text(reason),
            upstream.url if upstream is not None else None, rid, head, tls, sni, None, None,
        )  # fmt: skip
        fmt = format_json if self.json else format_combined
        return fmt(rec, self.clock, self.names).decode("latin-1")

    def _new_segment(self, service: str | None, color: Any, reason: Any, upstream: Any) -> None:
        self._service = service
        self._color = color
        self._reason = reason
        self._upstream = upstream
        if self.json:
            self._segment_text = self.names.segment(
                service, _color_text(color), _reason_text(reason),
                upstream.url if upstream is not None else None,
            )  # fmt: skip
        else:
            self._segment_text = _combined_segment(service, _color_text(color))


_UNSET = object()  # no segment built yet
_HTTP11 = b"1.1"
_HTTP10 = b"1.0"


def _color_text(color: Any) -> str | None:
    return None if color is None else color.value


def _reason_text(reason: Any) -> str | None:
    return None if reason is None else REASONS.get(reason.value)
