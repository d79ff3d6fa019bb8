"""``GET /metrics``: Prometheus text built at scrape time from the live objects.

The request path only bumps plain counters on each ``Service`` (with ``--workers``, the
supervisor's services hold its workers' sums: admin/view.py); this collector turns them,
the pools' health and the current routing snapshot into metric families when Prometheus
scrapes, so serving a request never touches prometheus-client. The registry is injected
(``build_registry``), never the global one. Labels are bounded: color, status code,
error kind, trigger, and target URLs as configured.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from typing import TYPE_CHECKING

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from proxy.state import COLORS
from proxy.stats import LATENCY_BUCKETS

if TYPE_CHECKING:
    from admin.control import ControlPlane, ServiceControl

UPSTREAM_ERROR_KINDS = ("connect", "tls", "timeout", "protocol")
TRIGGERS = ("manual", "auto")


class ProxyCollector:
    """Reads the server's counters and the routing snapshot at every scrape."""

    def __init__(self, control: ControlPlane) -> None:
        self.control = control

    def describe(self) -> list[Metric]:
        # Names only (for the registry's duplicate check); values come from collect.
        return list(self.collect())

    def collect(self) -> Iterator[Metric]:
        # Every family once, with a sample per service (the ``service`` label comes first).
        families: dict[str, Metric] = {}
        for control in self.control.services.values():
            for metric in self._service_metrics(control):
                kept = families.setdefault(metric.name, metric)
                if kept is not metric:
                    kept.samples.extend(metric.samples)
        yield from families.values()
        yield self._log_metrics()
        yield from self._tls_metrics()

    def _tls_metrics(self) -> Iterator[Metric]:
        tls = self.control.tls_status()  # this process's, or a supervisor's sum of workers'
        if tls is None:
            return
        handshakes = CounterMetricFamily(
            "bgproxy_tls_handshakes_total",
            "TLS handshakes on the HTTPS listener, by result (ok, failed, timeout).",
            labels=["result"],
        )
        for result, count in (tls.get("handshakes") or {}).items():
            handshakes.add_metric([result], count)
        yield handshakes
        expiry = GaugeMetricFamily(
            "bgproxy_tls_certificate_expiry_timestamp_seconds",
            "When each served certificate expires (Unix time), by name.",
            labels=["name"],
        )
        seen: set[str] = set()
        for cert in tls["certificates"]:  # the first certificate for a name is served
            for name in cert["names"]:
                if name not in seen:
                    seen.add(name)
                    when = dt.datetime.fromisoformat(cert["not_after"]).timestamp()
                    expiry.add_metric([name], when)
        yield expiry

    def _log_metrics(self) -> Metric:
        observer = self.control.observer
        dropped = CounterMetricFamily(
            "bgproxy_access_log_dropped",
            "Access-log lines dropped: the destination was unwritable or not keeping up.",
        )
        own = observer.dropped if observer is not None else 0
        dropped.add_metric([], own + self.control.workers_log_dropped)
        return dropped

    def _service_metrics(self, control: ServiceControl) -> Iterator[Metric]:
        server = control.service
        state = control.store.snapshot()
        svc = control.name

        requests = CounterMetricFamily(
            "bgproxy_requests_total",
            "Responses to requests routed to a color, by exact status code.",
            labels=["service", "color", "code"],
        )
        for (color, status), n in sorted(
            server.responses.items(), key=lambda kv: (kv[0][0].value, kv[0][1])
        ):
            requests.add_metric([svc, color.value, str(status)], n)
        yield requests

        duration = HistogramMetricFamily(
            "bgproxy_request_duration_seconds",
            "Time from routing a request to the upstream's response head (or the proxy's "
            "own error reply).",
            labels=["service", "color"],
        )
        bounds = [_le(b) for b in LATENCY_BUCKETS] + ["+Inf"]
        for color in COLORS:
            t = server.traffic.colors[color]
            cumulative, running = [], 0
            for le, n in zip(bounds, t.counts, strict=True):
                running += n
                cumulative.append((le, float(running)))
            duration.add_metric([svc, color.value], cumulative, sum_value=t.latency_sum)
        yield duration

        in_flight = GaugeMetricFamily(
            "bgproxy_in_flight_requests",
            "Requests in flight per color.",
            labels=["service", "color"],
        )
        websockets = GaugeMetricFamily(
            "bgproxy_websocket_connections",
            "Open WebSocket connections per color.",
            labels=["service", "color"],
        )
        reconnects = CounterMetricFamily(
            "bgproxy_websocket_reconnects_sent_total",
            "Reconnect messages sent to WebSocket clients, by the color they were on.",
            labels=["service", "color"],
        )
        for color in COLORS:
            in_flight.add_metric([svc, color.value], server.in_flight[color])
            websockets.add_metric([svc, color.value], server.websockets[color])
            reconnects.add_metric([svc, color.value], server.drain.reconnects_sent[color])
        yield in_flight
        yield websockets
        yield reconnects

        errors = CounterMetricFamily(
            "bgproxy_upstream_errors_total",
            "Failures talking to upstreams, by kind (connect, tls, timeout, protocol).",
            labels=["service", "color", "kind"],
        )
        kinds = sorted(set(UPSTREAM_ERROR_KINDS) | {k for _, k in server.upstream_errors})
        for color in COLORS:
            for kind in kinds:
                errors.add_metric([svc, color.value, kind], server.upstream_errors[color, kind])
        yield errors

        healthy = GaugeMetricFamily(
            "bgproxy_upstream_healthy",
            "1 when the target passes its health checks (in rotation), else 0.",
            labels=["service", "color", "target"],
        )
        for color, pool in server.pools.items():
            for up in pool.upstreams:
                healthy.add_metric([svc, color.value, up.url], 1.0 if up.stats.healthy else 0.0)
        yield healthy

        active = GaugeMetricFamily(
            "bgproxy_active_color", "1 for the active color, else 0.", labels=["service", "color"]
        )
        weight = GaugeMetricFamily(
            "bgproxy_weight", "Traffic weight of each color.", labels=["service", "color"]
        )
        for color in COLORS:
            active.add_metric([svc, color.value], 1.0 if state.active is color else 0.0)
            weight.add_metric([svc, color.value], state.weights.of(color))
        yield active
        yield weight
        # The weights a running rollout has set (0 for both when none runs): a graph of the
        # release's progress, apart from manual splits.
        rollout = GaugeMetricFamily(
            "bgproxy_rollout_weight",
            "Weight of each color set by the running rollout; 0 when none runs.",
            labels=["service", "color"],
        )
        running = state.rollout is not None and state.rollout.running
        for color in COLORS:
            rollout.add_metric([svc, color.value], state.weights.of(color) if running else 0)
        yield rollout
        generation = GaugeMetricFamily(
            "bgproxy_state_generation",
            "Generation of the routing state this instance applies.",
            labels=["service"],
        )
        generation.add_metric([svc], state.generation)
        yield generation

        switches = CounterMetricFamily(
            "bgproxy_switches_total",
            "Routing changes accepted through this instance (switch, weights, rollback).",
            labels=["service", "trigger"],
        )
        for trigger in TRIGGERS:
            switches.add_metric([svc, trigger], control.switches[trigger])
        yield switches
        rollback = control.rollback
        auto = CounterMetricFamily(
            "bgproxy_auto_rollbacks_total",
            "Rollbacks the rollback controller made, and rollouts aborted by their watch.",
            labels=["service"],
        )
        n = rollback.auto_rollbacks if rollback is not None else 0
        n += control.rollout.auto_aborts if control.rollout is not None else 0
        auto.add_metric([svc], n)
        yield auto
        hooks = CounterMetricFamily(
            "bgproxy_hook_calls_total",
            "Hook calls by hook name and result (ok, error, timeout, unreachable, dropped).",
            labels=["service", "hook", "result"],
        )
        if control.hooks is not None:
            for (name, result), count in sorted(control.hooks.calls.items()):
                hooks.add_metric([svc, name, result], count)
        yield hooks
        available = GaugeMetricFamily(
            "bgproxy_state_store_available",
            "1 when the state store accepts writes, else 0 (the proxy keeps serving).",
            labels=["service"],
        )
        available.add_metric([svc], 1.0 if control.store.available else 0.0)
        yield available


def _le(bound: float) -> str:
    return repr(float(bound))


def build_registry(control: ControlPlane) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ProxyCollector(control))
    return registry


def add_metrics_route(app: web.Application, registry: CollectorRegistry) -> None:
    """``GET /metrics`` on the admin app (behind its token like every other endpoint)."""

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    app.router.add_get("/metrics", metrics)
