"""What the request path reaches for logs, request IDs and traces: one ``Observer``.

``ProxyServer.observer`` is None when the access log, request IDs and tracing are all
off, and the request path then checks that one pointer and does nothing more. Built by
the composition root (admin/runner.py) from the config's ``access_log``, ``request_id``
and ``tracing`` sections, and closed there: pending lines flushed, spans sent.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
from typing import TYPE_CHECKING, Any

from config import Config
from config.observability import request_ids_on
from proxy import _hotpath
from proxy.accesslog import AccessLog
from proxy.logformat import R_TRACE, REASONS, _named
from proxy.router import Reason
from proxy.tracing import RequestIds, Span, Tracer

if TYPE_CHECKING:
    from proxy.settings import Settings

log = logging.getLogger("bgproxy.events")

# A C loop over the head in the compiled build; the interpreter is faster with lower().
_COMPILED = _hotpath.KIND == "compiled"


def real_client(xff: bytes, settings: Settings) -> str | None:
    """The client a trusted peer's ``X-Forwarded-For`` names, as nginx's realip module
    with ``real_ip_recursive`` reads it: the rightmost address that is not itself a
    trusted proxy. None when an entry is not an address (the socket peer is logged)."""
    found = None
    for part in reversed(xff.split(b",")):
        text = part.strip().decode("latin-1")
        try:
            ipaddress.ip_address(text)
        except ValueError:
            return None
        found = text
        if not settings.is_trusted(text):
            break
    return found


class Observer:
    # A C type in the compiled build (observability.pxd): the request path reads its
    # fields and calls ``rewrites`` without a Python frame.
    __slots__ = ("_marks", "_names", "access", "exporter", "id_header", "id_line", "ids",
                 "reasons", "tracer", "watch")  # fmt: skip

    def __init__(
        self,
        access: AccessLog | None,
        ids: RequestIds | None,
        id_header: str | None,
        tracer: Tracer | None,
    ) -> None:
        self.access = access
        self.ids = ids
        self.tracer = tracer
        self.exporter: Any = tracer.exporter if tracer is not None else None
        name = (id_header or "X-Request-Id").encode("latin-1")
        self.id_header = name.lower()  # how the request path recognises it
        self.id_line = name + b": "  # how it writes it, up- and downstream
        # Fields the request path rewrites: the ID while IDs are made, traceparent while
        # tracing. The fast reader leaves requests carrying them to llhttp's path.
        self.watch = ids is not None or tracer is not None
        self._names = tuple(
            n + b":" for n, on in ((self.id_header, ids), (b"traceparent", tracer))
            if on is not None
        )  # fmt: skip
        self._marks = tuple(b"\r\n" + n for n in self._names)
        # The router's reasons as the log spells them (one spelling: logformat's).
        self.reasons = {r: REASONS[r.value] for r in Reason if r.value in REASONS}

    @property
    def active(self) -> bool:
        """Whether the request path has anything to do for it."""
        return self.access is not None or self.ids is not None or self.tracer is not None

    @property
    def dropped(self) -> int:
        return self.access.dropped if self.access is not None else 0

    # -- the request path ---------------------------------------------------------------

    def rewrites(self, head: bytes) -> bool:
        """Whether a raw head carries a field this observer rewrites (any case)."""
        if not _COMPILED:
            low = head.lower()
            for mark in self._marks:
                if mark in low:
                    return True
            return False
        names = self._names
        for i in range(len(head) - 1):
            if head[i] == 13 and head[i + 1] == 10:
                for name in names:
                    if _named(head, i + 2, name):
                        return True
        return False

    def start_span(self, traceparent: bytes | None, now: float) -> Span | None:
        tracer = self.tracer
        return tracer.start(traceparent, now) if tracer is not None else None

    def finish(self, rec: tuple[Any, ...]) -> None:
        """A request or WebSocket session ended: log it, export its span if sampled."""
        if self.access is not None:
            self.access.add(rec)
        span = rec[R_TRACE]
        if span is not None and span.sampled and self.exporter is not None:
            self.exporter.add(rec)

    def rejected(self, rec: tuple[Any, ...]) -> None:
        """The proxy refused a request itself: logged, rate-limited."""
        if self.access is not None:
            self.access.rejected(rec)

    # -- the control plane --------------------------------------------------------------

    def event(self, fields: dict[str, Any]) -> None:
        """A control-plane event: a JSON line in a ``json`` access log, else a line of the
        process log (stderr), so a release's story is in the log either way."""
        if self.access is not None and self.access.format == "json":
            self.access.event(fields)
        else:
            log.info("event %s", json.dumps(fields, separators=(",", ":"), default=str))

    def reopen(self) -> None:
        if self.access is not None:
            self.access.reopen()

    async def close(self) -> None:
        if self.access is not None:
            self.access.close()
        if self.exporter is not None:
            await self.exporter.close()


def build_observer(config: Config, data_plane: bool = True) -> Observer:
    """From the config; a process that serves no requests (a supervisor) only writes
    events, so it neither makes IDs nor exports spans."""
    loop = asyncio.get_running_loop()
    cfg = config.access_log
    access = None
    if cfg.destination is not None:
        access = AccessLog(
            loop, cfg.destination, cfg.format, cfg.sample, cfg.rejections_per_second
        )
    ids = None
    if data_plane and request_ids_on(config.request_id, cfg, config.tracing):
        ids = RequestIds()
    tracer = None
    tracing = config.tracing
    if data_plane and tracing.otlp_endpoint is not None:
        from proxy.otel import OtlpExporter  # the optional extra: imported only when asked

        exporter = OtlpExporter(loop, tracing.otlp_endpoint, tracing.service_name)
        tracer = Tracer(tracing.sample_ratio, exporter)
    return Observer(access, ids, config.request_id.header, tracer)
