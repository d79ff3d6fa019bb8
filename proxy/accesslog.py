"""The access log: one line per request or WebSocket session, written in batches.

The request path does the least it can: when a request ends it builds one tuple of
what it already holds (``Record``, below) and appends it to a list. Formatting and
writing happen later, off the request's callback: a timer a few milliseconds out (or a
full batch) turns the pending records into lines and hands them to the ``LineSink``
(proxy/logsink.py), which writes whole lines in atomic pieces. So the cost per request
is a tuple and an append, and a line costs one ``bytes %`` with a template per format,
never ``str.format`` per field; with the log off, the request path checks one pointer.

Every value that came from a client or an upstream (target, method, user agent,
referer, a trusted peer's request ID) is escaped before it is written: in ``json``,
control characters and quotes as JSON escapes, non-ASCII as ``\\uXXXX`` and invalid
UTF-8 as ``\\xNN`` text; in ``combined``, as nginx does, ``"``, ``\\`` and bytes
outside printable ASCII as ``\\xNN``. A line never contains a raw newline, and is cut to
fit ``PIPE_BUF`` (each field is shortened, the line marked ``"truncated": true``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from random import random
from typing import Any

from proxy.logsink import PIPE_BUF, LineSink

log = logging.getLogger("bgproxy.accesslog")

FLUSH_DELAY = 0.005  # seconds: lines reach the destination this soon at the latest
FLUSH_BATCH = 512  # records: a burst is written without waiting for the timer

# The record a request path hands in: a plain tuple (one allocation, built in C in the
# compiled build), read by position here.
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
# The bytes json_text leaves as they are, and NUL (format_json's separator).
_PLAIN = bytes(c for c in range(256) if c == 0 or (0x20 <= c <= 0x7E and c not in b'"\\'))
_CAPS = (1024, 256, 48)  # bytes per client-given field, tried in turn until a line fits
REASONS = {"weighted": "weight"}  # the router's names, as the log spells them
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

    def __init__(self) -> None:
        self.offset = time.time() - time.monotonic()
        self._second = -1
        self._iso = b""
        self._clf = b""
        self._ms = -1
        self._ms_text = b""
        self._ms_str = ""

    def refresh(self) -> None:
        # Once a batch: NTP may step the wall clock; requests keep monotonic times.
        self.offset = time.time() - time.monotonic()

    def _set(self, second: int) -> None:
        t = time.gmtime(second)
        self._second = second
        self._iso = time.strftime("%Y-%m-%dT%H:%M:%S", t).encode()
        self._clf = b"%02d/%s/%04d:%02d:%02d:%02d +0000" % (
            t.tm_mday, _MONTHS[t.tm_mon - 1], t.tm_year, t.tm_hour, t.tm_min, t.tm_sec
        )  # fmt: skip

    def iso(self, mono: float) -> bytes:
        ms = int((mono + self.offset) * 1000)
        if ms == self._ms:  # under load, many lines share a millisecond
            return self._ms_text
        second = ms // 1000
        if second != self._second:
            self._set(second)
        self._ms = ms
        text = self._ms_text = b"%s.%03dZ" % (self._iso, ms % 1000)
        self._ms_str = text.decode()
        return text

    def iso_text(self, mono: float) -> str:
        self.iso(mono)
        return self._ms_str

    def clf(self, mono: float) -> bytes:
        second = int(mono + self.offset)
        if second != self._second:
            self._set(second)
        return self._clf


class _Names:
    """Config-given strings (service, color, target URL, address) as JSON, cached."""

    def __init__(self) -> None:
        self._json: dict[str | None, bytes] = {None: b"null"}
        self._text: dict[str | None, str] = {None: "null"}

    def text(self, value: str | None) -> str:
        out = self._text.get(value)
        if out is None:
            out = self.json(value).decode()
            if len(self._text) < 4096:
                self._text[value] = out
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
    agent, referer = header_values(head)
    given = b"\0".join((method, target, rid or b"", agent or b"", referer or b""))
    if (
        len(given) > 2048
        or upstream_time < 0.0
        or ws is not None
        or trace is not None
        or sni is not None
        or given.translate(None, _PLAIN)  # a value needs escaping
    ):
        return _slow_json(rec, clock, names, agent, referer)
    # The common line: client-given values printable ASCII, written as they came; config
    # strings from a cache; times as whole microseconds (no float formatting). One
    # f-string: the compiled build joins it in C.
    us = int(duration * 1e6 + 0.5)
    up_us = int(upstream_time * 1e6 + 0.5)
    texts = names._text
    line = (
        f'{{"time":"{clock.iso_text(end)}","client":{texts.get(client) or names.text(client)},'
        f'"method":"{method.decode("ascii")}","target":"{target.decode("ascii")}",'
        f'"version":"{version.decode("ascii")}","status":{status},'
        f'"bytes_in":{bytes_in},"bytes_out":{bytes_out},'
        f'"duration":{us // 1000000}.{us % 1000000:06d},'
        f'"upstream_time":{up_us // 1000000}.{up_us % 1000000:06d},'
        f'"service":{texts.get(service) or names.text(service)},'
        f'"color":{texts.get(color) or names.text(color)},'
        f'"reason":{texts.get(reason) or names.text(reason)},'
        f'"upstream":{texts.get(upstream) or names.text(upstream)},'
        f'"request_id":{_quoted(rid)},"user_agent":{_quoted(agent)},'
        f'"referer":{_quoted(referer)},"tls":{texts.get(tls) or names.text(tls)},"sni":null}}\n'
    )
    return line.encode("ascii")


def _quoted(value: bytes | None) -> str:
    return "null" if value is None else '"' + value.decode("ascii") + '"'


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
    agent, referer = header_values(rec[R_HEAD])
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


FORMATS = {"json": format_json, "combined": format_combined}


class AccessLog:
    """One process's access log: pending records, the timer that writes them, the
    sampling of successful responses, the rate limit on the proxy's own refusals, and
    control-plane events as JSON lines."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        destination: str,
        format: str = "json",
        sample: float = 1.0,
        rejections_per_second: int = 10,
        sink: LineSink | None = None,
    ) -> None:
        self.loop = loop
        self.format = format
        self.sample = sample
        self.rejections_per_second = rejections_per_second
        self.sink = sink if sink is not None else LineSink(destination)
        self.pending: list[tuple[Any, ...] | bytes] = []
        self._timer: asyncio.TimerHandle | None = None
        self._format = FORMATS[format]
        self._clock = _Clock()
        self._names = _Names()
        self._second = 0
        self._rejected = 0  # refusals this second
        self._suppressed = 0  # refusals not logged since the last summary
        self._summary_timer: asyncio.TimerHandle | None = None
        self.closed = False

    @property
    def dropped(self) -> int:
        return self.sink.dropped

    # -- the request path ---------------------------------------------------------------

    def add(self, rec: tuple[Any, ...]) -> None:
        """A request or session ended; 1xx-3xx are kept with probability ``sample``."""
        if rec[R_STATUS] < 400 and self.sample < 1.0 and random() >= self.sample:
            return
        pending = self.pending
        pending.append(rec)
        if self._timer is None:
            self._timer = self.loop.call_later(FLUSH_DELAY, self.flush)
        elif len(pending) >= FLUSH_BATCH:
            self.flush()

    def rejected(self, rec: tuple[Any, ...]) -> None:
        """The proxy refused a request itself (400, 408, 413, 431...): logged, at most
        ``rejections_per_second`` lines a second; the rest are counted in a summary."""
        second = int(rec[R_END])
        if second != self._second:
            self._second = second
            self._rejected = 0
        self._rejected += 1
        if self._rejected > self.rejections_per_second:
            self._suppressed += 1
            if self._summary_timer is None:  # the count is written even if the flood stops
                self._summary_timer = self.loop.call_later(1.0, self._summary_due)
            return
        self._summary()
        self.add(rec)

    def _summary_due(self) -> None:
        self._summary_timer = None
        self._summary()

    def _summary(self) -> None:
        if self._suppressed:
            line = b'{"time":"%s","suppressed_rejections":%d}\n' % (
                self._clock.iso(time.monotonic()), self._suppressed
            )  # fmt: skip
            self._suppressed = 0
            self.line(line)

    # -- off the request path -----------------------------------------------------------

    def event(self, fields: dict[str, Any]) -> None:
        """A control-plane event (switch, weights, rollback, drain done...), one JSON line."""
        body = {"time": self._clock.iso(time.monotonic()).decode(), "event": True, **fields}
        self.line(json.dumps(body, separators=(",", ":"), default=str).encode() + b"\n")

    def line(self, line: bytes) -> None:
        """An already formatted line (escaped, newline-terminated), kept in order."""
        pending = self.pending
        pending.append(line[: PIPE_BUF - 1] + b"\n" if len(line) > PIPE_BUF else line)
        if self.closed:
            self.flush()
        elif self._timer is None:
            self._timer = self.loop.call_later(FLUSH_DELAY, self.flush)
        elif len(pending) >= FLUSH_BATCH:
            self.flush()

    def flush(self) -> None:
        timer = self._timer
        self._timer = None
        if timer is not None:
            timer.cancel()
        pending = self.pending
        if not pending:
            self.sink.flush()  # a backlog left by a full pipe
            return
        self.pending = []
        clock = self._clock
        clock.refresh()
        fmt = self._format
        names = self._names
        lines = []
        for rec in pending:
            if type(rec) is bytes:
                lines.append(rec)
                continue
            try:
                lines.append(fmt(rec, clock, names))  # type: ignore[arg-type]
            except Exception:  # a bug here must cost a line, never the data plane
                log.exception("could not format an access log record")
                self.sink.dropped += 1
        self.sink.write_lines(lines)
        if self.sink._queue and self._timer is None and not self.closed:
            self._timer = self.loop.call_later(FLUSH_DELAY * 4, self.flush)

    def reopen(self) -> None:
        """SIGUSR1: what is pending goes to the old file, then the path is opened anew."""
        self.flush()
        self.sink.reopen()

    def close(self) -> None:
        if self._summary_timer is not None:
            self._summary_timer.cancel()
            self._summary_timer = None
        self._summary()
        self.flush()
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.sink.close()
