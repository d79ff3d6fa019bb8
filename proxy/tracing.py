"""Request IDs and W3C Trace Context, as cheap as the request path needs them.

- A request ID is this process's random prefix and a counter (``3f9c2a7e61d0-1a``):
  unique across processes and restarts with no ``uuid4()`` (~2 µs) per request.
- ``traceparent`` (W3C Trace Context level 1) is parsed strictly; the proxy's span
  becomes the parent the upstream sees, so the app's span hangs under the proxy's.
  A missing or malformed ``traceparent`` starts a new trace (and any ``tracestate``
  is dropped with it, as the spec asks). Sampling is parent-based: a parent's
  ``sampled`` flag is kept, a new trace is sampled with ``sample_ratio``.

Only with an OTLP endpoint does the proxy make spans at all: a span that is never
exported would be a parent the tracing backend never sees, breaking the app's trace,
so without export ``traceparent`` passes through untouched like any other header.
"""

from __future__ import annotations

import os
import re
from random import getrandbits, random

_HEX = re.compile(rb"[0-9a-f]+")
ZERO_TRACE = b"0" * 32
ZERO_SPAN = b"0" * 16


class RequestIds:
    """``next()``: this process's next request ID, as bytes."""

    __slots__ = ("count", "prefix")

    def __init__(self) -> None:
        self.prefix = os.urandom(6).hex().encode() + b"-"
        self.count = 0

    def next(self) -> bytes:
        self.count += 1
        return self.prefix + f"{self.count:x}".encode()  # joined in C when compiled


def valid_request_id(value: bytes) -> bool:
    """A trusted peer's ID is taken if it is printable ASCII, without spaces or quotes,
    and at most 200 bytes: anything else would need escaping in every log it reaches."""
    return 0 < len(value) <= 200 and _ID_CHARS.fullmatch(value) is not None


_ID_CHARS = re.compile(rb"[!#-~]+")


def parse_traceparent(value: bytes) -> tuple[bytes, bytes, int] | None:
    """(trace id, parent span id, flags) of a ``traceparent`` value, or None when it is
    not one (version ``ff``, wrong lengths, upper-case or non-hex digits, zero ids)."""
    value = value.strip(b" \t")
    if len(value) < 55 or value[2:3] != b"-" or value[35:36] != b"-" or value[52:53] != b"-":
        return None
    version = value[:2]
    if _HEX.fullmatch(version) is None or version == b"ff":
        return None
    if version == b"00" and len(value) != 55:
        return None
    if len(value) > 55 and value[55:56] != b"-":  # a later version may append fields
        return None
    trace, parent, flags = value[3:35], value[36:52], value[53:55]
    for part in (trace, parent, flags):
        if _HEX.fullmatch(part) is None:
            return None
    if trace == ZERO_TRACE or parent == ZERO_SPAN:
        return None
    return trace, parent, int(flags, 16)


class Span:
    """The proxy's span for one request: the ids it goes upstream with; the rest of what
    is exported comes from the access-log record made when the request ends."""

    __slots__ = ("parent", "sampled", "span_id", "start", "trace_id")

    def __init__(self, trace_id: bytes, span_id: bytes, parent: bytes | None,
                 sampled: bool, start: float) -> None:  # fmt: skip
        self.trace_id = trace_id
        self.span_id = span_id
        self.parent = parent
        self.sampled = sampled
        self.start = start  # time.time() of the request's start (OTLP wants wall time)

    def traceparent(self) -> bytes:
        """The header line the upstream gets: our span as its parent."""
        return b"traceparent: 00-%s-%s-%s\r\n" % (
            self.trace_id, self.span_id, b"01" if self.sampled else b"00"
        )  # fmt: skip


class Tracer:
    """Makes a ``Span`` per request; ``exporter.export(records)`` takes the finished
    sampled ones off the request path (proxy/otel.py)."""

    def __init__(self, sample_ratio: float, exporter: object | None = None) -> None:
        self.sample_ratio = sample_ratio
        self.exporter = exporter

    def start(self, traceparent: bytes | None, now: float) -> Span:
        parsed = parse_traceparent(traceparent) if traceparent is not None else None
        span_id = b"%016x" % (getrandbits(64) or 1)
        if parsed is None:
            trace_id = b"%032x" % (getrandbits(128) or 1)
            return Span(trace_id, span_id, None, random() < self.sample_ratio, now)
        trace_id, parent, flags = parsed
        return Span(trace_id, span_id, parent, bool(flags & 1), now)
