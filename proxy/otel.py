"""OTLP export of the proxy's spans, with the OpenTelemetry SDK (``bgproxy[otel]``).

The request path only appends its finished record (the access-log tuple, which carries
the ``Span``) to a list. Every ``BATCH_DELAY`` the list is turned into SDK spans and
handed to a ``BatchSpanProcessor``, whose own thread encodes and POSTs them to the
collector: no export, encoding or network wait ever runs on the event loop. A
collector that is down costs dropped spans (the SDK's bounded queue), never latency.

Each span: kind SERVER, named ``<METHOD>`` as the HTTP semantic conventions ask, with
``http.request.method``, ``url.path``, ``http.response.status_code``, ``client.address``,
``bgproxy.service``, ``bgproxy.color``, ``bgproxy.reason``, ``bgproxy.upstream`` and
``bgproxy.request_id``; a 5xx sets the status to error.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from proxy.logformat import (
    R_CLIENT,
    R_COLOR,
    R_DURATION,
    R_END,
    R_METHOD,
    R_REASON,
    R_REQUEST_ID,
    R_SERVICE,
    R_STATUS,
    R_TARGET,
    R_TRACE,
    R_UPSTREAM,
    R_WS,
)

log = logging.getLogger("bgproxy.tracing")

BATCH_DELAY = 0.2


class OtelUnavailable(Exception):
    """The optional extra is not installed."""


class OtlpExporter:
    def __init__(
        self, loop: asyncio.AbstractEventLoop, endpoint: str, service_name: str
    ) -> None:
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
                OTLPSpanExporter,
            )
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace.export import BatchSpanProcessor
            from opentelemetry.sdk.util.instrumentation import InstrumentationScope
        except ImportError as exc:
            raise OtelUnavailable(
                "tracing.otlp_endpoint needs the OpenTelemetry SDK: pip install 'bgproxy[otel]'"
            ) from exc
        self.loop = loop
        self.processor = BatchSpanProcessor(
            OTLPSpanExporter(endpoint=endpoint, timeout=5), schedule_delay_millis=500
        )
        self.resource = Resource.create({"service.name": service_name})
        self.scope = InstrumentationScope("bgproxy")
        self.pending: list[tuple[Any, ...]] = []
        self._timer: asyncio.TimerHandle | None = None
        self.exported = 0

    def add(self, rec: tuple[Any, ...]) -> None:
        self.pending.append(rec)
        if self._timer is None:
            self._timer = self.loop.call_later(BATCH_DELAY, self.flush)

    def flush(self) -> None:
        self._timer = None
        pending, self.pending = self.pending, []
        if not pending:
            return
        offset = time.time() - time.monotonic()
        for rec in pending:
            try:
                self.processor.on_end(self._span(rec, offset))
                self.exported += 1
            except Exception:  # a bug here must cost a span, never the data plane
                log.exception("could not export a span")

    def _span(self, rec: tuple[Any, ...], offset: float) -> Any:
        from opentelemetry.sdk.trace import ReadableSpan
        from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags

        span = rec[R_TRACE]
        flags = TraceFlags(TraceFlags.SAMPLED)
        context = SpanContext(int(span.trace_id, 16), int(span.span_id, 16), False, flags)
        parent = None
        if span.parent is not None:
            parent = SpanContext(int(span.trace_id, 16), int(span.parent, 16), True, flags)
        end = int((rec[R_END] + offset) * 1e9)
        start = end - int(rec[R_DURATION] * 1e9)
        method = rec[R_METHOD].decode("latin-1")
        target = rec[R_TARGET].decode("latin-1")
        attributes: dict[str, Any] = {
            "http.request.method": method,
            "url.path": target.partition("?")[0],
            "http.response.status_code": rec[R_STATUS],
            "client.address": rec[R_CLIENT],
        }
        for key, index in (
            ("bgproxy.service", R_SERVICE),
            ("bgproxy.color", R_COLOR),
            ("bgproxy.reason", R_REASON),
            ("bgproxy.upstream", R_UPSTREAM),
        ):
            if rec[index] is not None:
                attributes[key] = rec[index]
        if rec[R_REQUEST_ID] is not None:
            attributes["bgproxy.request_id"] = rec[R_REQUEST_ID].decode("latin-1")
        if rec[R_WS] is not None:
            attributes["bgproxy.ws_close"] = rec[R_WS][2]
        status = Status(StatusCode.ERROR) if rec[R_STATUS] >= 500 else Status(StatusCode.UNSET)
        return ReadableSpan(
            name=method,
            context=context,
            parent=parent,
            resource=self.resource,
            attributes=attributes,
            kind=SpanKind.SERVER,
            status=status,
            start_time=start,
            end_time=end,
            instrumentation_scope=self.scope,
        )

    async def close(self) -> None:
        """Send what is left; the SDK's shutdown blocks (joins its thread), so it runs in
        a thread of its own."""
        if self._timer is not None:
            self._timer.cancel()
        self.flush()
        await asyncio.to_thread(self.processor.shutdown)
