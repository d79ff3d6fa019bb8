"""Request IDs and W3C Trace Context: parsing, sampling, and spans delivered to a real
OTLP/HTTP receiver."""

from __future__ import annotations

import json
import random
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from otlp_receiver import OtlpReceiver, start_receiver

from conftest import Proxy, StartProxy, Upstream, config_dict
from proxy.observability import Observer
from proxy.tracing import RequestIds, Tracer, parse_traceparent, valid_request_id

GOOD = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
IDS = (b"4bf92f3577b34da6a3ce929d0e0e4736", b"00f067aa0ba902b7")


@pytest.mark.parametrize(
    ("value", "parsed"),
    [
        (GOOD, (*IDS, 1)),
        (GOOD[:-2] + b"00", (*IDS, 0)),
        (b" " + GOOD + b"\t", (*IDS, 1)),
        # A later version may append fields after a dash; its first four are read.
        (b"01" + GOOD[2:] + b"-what", (*IDS, 1)),
        (GOOD + b"-x", None),  # version 00 has exactly four fields
        (b"ff" + GOOD[2:], None),  # version ff is invalid
        (GOOD.upper(), None),  # lower-case hex only
        (b"00-" + b"0" * 32 + GOOD[35:], None),  # all-zero trace id
        (GOOD[:36] + b"0" * 16 + GOOD[52:], None),  # all-zero parent id
        (GOOD[:-1], None),
        (GOOD.replace(b"-", b"_"), None),
        (b"00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01", None),
        (b"", None),
    ],
)
def test_traceparent_is_parsed_as_w3c_trace_context_says(
    value: bytes, parsed: tuple[bytes, bytes, int] | None
) -> None:
    assert parse_traceparent(value) == parsed


def test_request_ids_are_unique_per_process_and_cheap_to_make() -> None:
    a, b = RequestIds(), RequestIds()
    ids = [a.next() for _ in range(1000)] + [b.next() for _ in range(1000)]
    assert len(set(ids)) == 2000
    assert all(valid_request_id(i) for i in ids)
    assert a.next().startswith(a.prefix) and a.prefix != b.prefix


@pytest.mark.parametrize(
    ("value", "ok"),
    [(b"abc-123", True), (b"", False), (b"a b", False), (b'a"b', False), (b"x" * 201, False),
     (b"\xff", False), (b"a\nb", False)],
)  # fmt: skip
def test_a_peer_request_id_is_kept_only_if_it_is_log_safe(value: bytes, ok: bool) -> None:
    assert valid_request_id(value) is ok


def test_sampling_follows_the_parent_and_the_ratio_for_new_traces() -> None:
    tracer = Tracer(0.0)
    sampled = tracer.start(GOOD, 0.0)
    assert sampled.sampled and sampled.trace_id == GOOD[3:35] and sampled.parent == GOOD[36:52]
    assert sampled.span_id != sampled.parent
    assert not tracer.start(GOOD[:-2] + b"00", 0.0).sampled
    assert not tracer.start(None, 0.0).sampled
    fresh = Tracer(1.0).start(b"garbage", 0.0)
    assert fresh.sampled and fresh.parent is None and len(fresh.trace_id) == 32
    line = fresh.traceparent()
    assert parse_traceparent(line.split(b": ", 1)[1].strip()) == (
        fresh.trace_id, fresh.span_id, 1
    )  # fmt: skip
    half = Tracer(0.5)
    share = sum(half.start(None, 0.0).sampled for _ in range(4000)) / 4000
    assert 0.45 < share < 0.55


@pytest.fixture
async def receiver() -> AsyncIterator[OtlpReceiver]:
    r = await start_receiver()
    yield r
    assert r.runner is not None
    await r.runner.cleanup()


async def test_exporter_delivers_spans_to_an_otlp_http_receiver(receiver: OtlpReceiver) -> None:
    import asyncio

    from access_records import record

    from proxy.otel import OtlpExporter

    exporter = OtlpExporter(asyncio.get_running_loop(), receiver.url, "edge-test")
    span = Tracer(1.0).start(GOOD, time.time())
    exporter.add(
        record(trace=span, status=502, method=b"POST", target=b"/cart?id=1", color="green",
               reason="weight", service="shop", request_id=b"rid-7", duration=0.25)
    )  # fmt: skip
    await exporter.close()
    (got,) = await receiver.wait_for(1)
    assert (got.trace_id, got.span_id, got.parent_span_id) == (
        GOOD[3:35].decode(), span.span_id.decode(), GOOD[36:52].decode()
    )  # fmt: skip
    assert got.name == "POST" and got.kind == 2  # SPAN_KIND_SERVER
    assert got.status_code == 2  # STATUS_CODE_ERROR: a 5xx
    assert got.resource["service.name"] == "edge-test"
    assert got.attributes == {
        "http.request.method": "POST", "url.path": "/cart", "http.response.status_code": 502,
        "client.address": "127.0.0.1", "bgproxy.service": "shop", "bgproxy.color": "green",
        "bgproxy.reason": "weight", "bgproxy.upstream": "http://127.0.0.1:1",
        "bgproxy.request_id": "rid-7",
    }  # fmt: skip
    assert abs((got.end - got.start) / 1e9 - 0.25) < 1e-3


async def test_the_app_sees_the_proxy_span_as_parent_and_the_receiver_gets_it(
    receiver: OtlpReceiver, upstreams: dict[str, Upstream], start_proxy: StartProxy,
    tmp_path: Path,
) -> None:  # fmt: skip
    log = tmp_path / "access.log"
    cfg = config_dict(
        [upstreams["blue"].url], [upstreams["green"].url],
        tracing={"otlp_endpoint": receiver.url, "sample_ratio": 1.0, "service_name": "edge"},
        access_log={"destination": str(log)},
    )  # fmt: skip
    proxy = await start_proxy(cfg)
    status, _, headers = await proxy.get(
        "/traced?q=1", headers={"traceparent": GOOD.decode(), "tracestate": "vendor=abc"}
    )
    assert status == 200
    seen = upstreams["blue"].behaviour.seen[-1]["headers"]
    sent = {k.lower(): v for k, v in seen.items()}
    trace, parent, flags = parse_traceparent(sent["traceparent"].encode()) or ((), (), 0)
    assert trace == GOOD[3:35] and flags == 1
    assert parent != GOOD[36:52]  # the app's parent is the proxy's span, not the client's
    assert sent["tracestate"] == "vendor=abc"
    # A new trace (no traceparent) is started and sampled at ratio 1.
    assert (await proxy.get("/fresh"))[0] == 200
    fresh = {k.lower(): v for k, v in upstreams["blue"].behaviour.seen[-1]["headers"].items()}
    new_trace = parse_traceparent(fresh["traceparent"].encode())
    assert new_trace is not None and new_trace[0] != trace and new_trace[2] == 1

    spans = {s.attributes["url.path"]: s for s in await receiver.wait_for(2)}
    span = spans["/traced"]
    assert (span.trace_id, span.span_id, span.parent_span_id) == (
        trace.decode(), parent.decode(), GOOD[36:52].decode()
    )  # fmt: skip
    assert span.resource["service.name"] == "edge" and span.name == "GET"
    assert span.attributes["bgproxy.color"] == "blue"
    assert span.attributes["bgproxy.reason"] == "active"
    assert span.attributes["bgproxy.request_id"] == {
        k.lower(): v for k, v in headers.items()
    }["x-request-id"]  # fmt: skip
    assert spans["/fresh"].parent_span_id == ""
    # The access line names the same trace and span.
    observer = proxy.run.observer
    assert observer is not None and observer.access is not None
    observer.access.flush()
    line = next(x for x in map(json.loads, log.read_bytes().splitlines())
                if x["target"] == "/traced?q=1")  # fmt: skip
    assert (line["trace_id"], line["span_id"]) == (span.trace_id, span.span_id)


async def test_unsampled_requests_are_propagated_but_not_exported(
    receiver: OtlpReceiver, upstreams: dict[str, Upstream], start_proxy: StartProxy
) -> None:
    cfg = config_dict(
        [upstreams["blue"].url], [upstreams["green"].url],
        tracing={"otlp_endpoint": receiver.url, "sample_ratio": 0.0},
    )  # fmt: skip
    proxy = await start_proxy(cfg)
    unsampled = GOOD[:-2] + b"00"
    assert (await proxy.get("/n", headers={"traceparent": unsampled.decode()}))[0] == 200
    sent = {k.lower(): v for k, v in upstreams["blue"].behaviour.seen[-1]["headers"].items()}
    parsed = parse_traceparent(sent["traceparent"].encode())
    assert parsed is not None and parsed[0] == GOOD[3:35] and parsed[2] == 0
    assert (await proxy.get("/s", headers={"traceparent": GOOD.decode()}))[0] == 200
    (span,) = await receiver.wait_for(1)
    assert span.attributes["url.path"] == "/s"  # only the sampled one


async def test_without_an_endpoint_traceparent_passes_through_untouched(
    proxy: Proxy, upstreams: dict[str, Upstream]
) -> None:
    headers = {"traceparent": GOOD.decode(), "tracestate": "v=1"}
    assert (await proxy.get("/p", headers=headers))[0] == 200
    sent = {k.lower(): v for k, v in upstreams["blue"].behaviour.seen[-1]["headers"].items()}
    assert (sent["traceparent"], sent["tracestate"]) == (GOOD.decode(), "v=1")


def test_the_fast_reader_declines_exactly_the_heads_carrying_a_rewritten_field() -> None:
    # Observer.rewrites scans the raw head in C in the compiled build; the reference is
    # a lower-case copy searched for each CRLF-name-colon.
    observer = Observer(None, RequestIds(), "X-Request-Id", Tracer(0.0))
    marks = (b"\r\nx-request-id:", b"\r\ntraceparent:")
    rng = random.Random(18)
    names = [b"X-Request-Id", b"x-request-ID", b"X-Request-Ids", b"X-Request", b"traceparent",
             b"TRACEPARENT", b"tracestate", b"Host", b"A"]  # fmt: skip
    for _ in range(2000):
        lines = [b"GET /x-request-id: HTTP/1.1"]
        for _ in range(rng.randrange(5)):
            value = rng.choice([b"v", b"", b"x-request-id: 1", b"\r\ntraceparent:"])
            lines.append(rng.choice(names) + rng.choice([b":", b": ", b" :"]) + value)
        head = b"\r\n".join(lines) + rng.choice([b"\r\n\r\n", b"\r\n", b""])
        assert observer.rewrites(head) == any(m in head.lower() for m in marks), head
