"""The access log: one line per request or WebSocket session, written in batches.

When a request ends, the request path hands its values to ``AccessLog.request`` (a C
call with C values in the compiled build, no tuple) and the line is made at once
(proxy/logformat.py) and kept, as text, in a list. Writing happens later, off the
request's callback: a timer a few milliseconds out (or a full batch) joins the pending
lines into pieces of whole lines (at most ``PIPE_BUF`` bytes to a pipe, 64 KiB to a
file) and hands them to the ``LineSink`` (proxy/logsink.py), one ``write()`` a piece.
With the log off, the request path checks one pointer.

WebSocket sessions, traced requests and the proxy's own refusals come as a record tuple
(``add``, ``rejected``), formatted the same way.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from random import random
from typing import Any

from proxy.logformat import FORMATS, R_END, R_STATUS, LineFormatter
from proxy.logsink import PIPE_BUF, LineSink

log = logging.getLogger("bgproxy.accesslog")

FLUSH_DELAY = 0.005  # seconds: lines reach the destination this soon at the latest
FLUSH_BATCH = 512  # lines: a burst is written without waiting for the timer


class AccessLog:
    """One process's access log: pending lines, the timer that writes them, the
    sampling of successful responses, the rate limit on the proxy's own refusals, and
    control-plane events as JSON lines."""

    __slots__ = ("_format", "_lines", "_rejected", "_second", "_summary_timer", "_suppressed",
                 "_timer", "closed", "format", "loop", "pending", "rejections_per_second",
                 "sample", "sink")  # fmt: skip

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
        # Whole lines, newline-terminated, one character a byte (latin-1) until written.
        self.pending: list[str] = []
        self._timer: asyncio.TimerHandle | None = None
        self._format = FORMATS[format]
        self._lines = LineFormatter(format)
        self._second = 0
        self._rejected = 0  # refusals this second
        self._suppressed = 0  # refusals not logged since the last summary
        self._summary_timer: asyncio.TimerHandle | None = None
        self.closed = False

    @property
    def dropped(self) -> int:
        return self.sink.dropped

    # -- the request path ---------------------------------------------------------------

    def request(
        self, end: float, client: str, method: bytes, target: bytes, http11: bool,
        status: int, bytes_in: int, bytes_out: int, duration: float, upstream_time: float,
        service: str | None, color: Any, reason: Any, upstream: Any, rid: bytes | None,
        head: object, tls: str | None, sni: str | None,
    ) -> None:  # fmt: skip
        """A routed request ended (not a WebSocket session, not traced): its line, now.
        1xx-3xx are kept with probability ``sample``."""
        if status < 400 and self.sample < 1.0 and random() >= self.sample:
            return
        try:
            line = self._lines.request(
                end, client, method, target, http11, status, bytes_in, bytes_out, duration,
                upstream_time, service, color, reason, upstream, rid, head, tls, sni,
            )  # fmt: skip
        except Exception:  # a bug here must cost a line, never the data plane
            log.exception("could not format an access log line")
            self.sink.dropped += 1
            return
        self._append(line)

    def add(self, rec: tuple[Any, ...]) -> None:
        """A request or session ended, as a record (proxy/logformat.py ``R_*``)."""
        if rec[R_STATUS] < 400 and self.sample < 1.0 and random() >= self.sample:
            return
        lines = self._lines
        try:
            line = self._format(rec, lines.clock, lines.names)
        except Exception:  # a bug here must cost a line, never the data plane
            log.exception("could not format an access log record")
            self.sink.dropped += 1
            return
        self._append(line.decode("latin-1"))

    def _append(self, line: str) -> None:
        pending = self.pending
        pending.append(line)
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
                self._lines.clock.iso(time.monotonic()), self._suppressed
            )  # fmt: skip
            self._suppressed = 0
            self.line(line)

    # -- off the request path -----------------------------------------------------------

    def event(self, fields: dict[str, Any]) -> None:
        """A control-plane event (switch, weights, rollback, drain done...), one JSON line."""
        now = self._lines.clock.iso(time.monotonic()).decode()
        body = {"time": now, "event": True, **fields}
        self.line(json.dumps(body, separators=(",", ":"), default=str).encode() + b"\n")

    def line(self, line: bytes) -> None:
        """An already formatted line (escaped, newline-terminated), kept in order."""
        if len(line) > PIPE_BUF:
            line = line[: PIPE_BUF - 1] + b"\n"
        pending = self.pending
        pending.append(line.decode("latin-1"))
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
        self._lines.clock.refresh()  # NTP may step the wall clock; requests keep monotonic
        # Pieces of whole lines, each at most piece_max bytes: one write() each.
        pieces = []
        start = 0
        size = 0
        most = self.sink.piece_max
        for i in range(len(pending)):
            n = len(pending[i])
            if size + n > most and size:
                pieces.append(("".join(pending[start:i]).encode("latin-1"), i - start))
                start = i
                size = 0
            size += n
        pieces.append(("".join(pending[start:]).encode("latin-1"), len(pending) - start))
        self.sink.write_pieces(pieces)
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
