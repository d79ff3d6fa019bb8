#!/usr/bin/env python3
"""Latency at a fixed, moderate load (open loop): what does the proxy add?

One command starts everything it needs, drives each target at a fixed request
rate, prints a table and cleans up:

    python benchmarks/bench_latency.py [--rate 2000] [--duration 15] [--runs 3]
        [--connections 32] [--targets direct,nginx,haproxy,bgproxy] [--json out.json]

The load generator is open-loop: request k is *scheduled* at ``t0 + k / rate``
whatever happened to the earlier ones, and its latency is measured from that
scheduled time to the last byte of the response. A request that has to wait
for a free connection, or that the generator sends late, is charged for the
wait, so a stall shows up in the percentiles instead of silently lowering the
load (no coordinated omission). The schedule is driven by a Linux ``timerfd``
(microsecond wake-ups, not the event loop's millisecond timers).

Requests go over a pool of keep-alive connections, one request at a time per
connection (no pipelining), to ``GET /small`` (13 bytes) on the upstream nginx.
Layout as in bench_http.py: upstream nginx and the generator on CPU 0, the
proxy under test alone on CPU 1. The targets are interleaved run by run;
"added" is target minus direct for the same percentile in the same run, the
median over the runs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import os
import shutil
import tempfile
import time
from array import array
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from _common import (
    CLIENT_CPU,
    PROXY_CPU,
    SMALL_BODY,
    BenchError,
    HttpClientProtocol,
    Server,
    Servers,
    TargetFailed,
    add_target_args,
    ensure_tools,
    env_info,
    fmt,
    get_request,
    install_signal_handlers,
    log,
    make_bgproxy,
    make_haproxy,
    make_nginx_proxy,
    make_upstream,
    median_or_none,
    need_cpus,
    open_http,
    percentile,
    pin_self,
    print_rows,
    run_async,
    run_main,
    start_or_skip,
    tool_version,
    tree_cpu_seconds,
    tree_rss_bytes,
    wait_ready,
    which,
    write_json,
)

TARGETS = ("direct", "nginx", "haproxy", "bgproxy")
PCTS = (50.0, 90.0, 99.0, 99.9)


# ------------------------------------------------------------------ the ticker


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", _Timespec), ("it_value", _Timespec)]


def _timespec(seconds: float) -> _Timespec:
    sec = int(seconds)
    return _Timespec(sec, round((seconds - sec) * 1e9))


class Ticker:
    """Calls ``on_tick(expirations)`` every ``period`` s from absolute ``t0`` (CLOCK_MONOTONIC).

    A timerfd wakes the loop with microsecond precision; without one (not Linux),
    the loop's own timers are used (millisecond precision: lateness is then larger,
    and still charged to the latency)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, period: float) -> None:
        self.loop = loop
        self.period = period
        self.fd = -1
        self.handle: asyncio.TimerHandle | None = None
        self.kind = "timerfd"
        try:
            self.libc = ctypes.CDLL(None, use_errno=True)
            fd = self.libc.timerfd_create(1, os.O_NONBLOCK | os.O_CLOEXEC)  # CLOCK_MONOTONIC
            if fd < 0:
                raise OSError(ctypes.get_errno(), "timerfd_create")
            self.fd = fd
        except (OSError, AttributeError):
            self.kind = "loop timers"

    def start(self, t0: float, on_tick: Any) -> None:
        if self.fd >= 0:
            spec = _Itimerspec(_timespec(self.period), _timespec(t0 + self.period))
            if self.libc.timerfd_settime(self.fd, 1, ctypes.byref(spec), None) != 0:  # ABSTIME
                raise OSError(ctypes.get_errno(), "timerfd_settime")

            def readable() -> None:
                try:
                    n = int.from_bytes(os.read(self.fd, 8), "little")
                except BlockingIOError:
                    return
                on_tick(n)

            self.loop.add_reader(self.fd, readable)
            return
        done = [0]

        def fire() -> None:
            now = time.monotonic()
            due = int((now - t0) / self.period)
            n, done[0] = due - done[0], due
            if n > 0:
                on_tick(n)
            nxt = t0 + (due + 1) * self.period
            self.handle = self.loop.call_later(max(0.0, nxt - time.monotonic()), fire)

        self.handle = self.loop.call_later(max(0.0, t0 + self.period - time.monotonic()), fire)

    def stop(self) -> None:
        if self.fd >= 0:
            with contextlib.suppress(Exception):
                self.loop.remove_reader(self.fd)
            os.close(self.fd)
            self.fd = -1
        if self.handle is not None:
            self.handle.cancel()


# ---------------------------------------------------------------- the generator


@dataclass
class LoadResult:
    scheduled: int  # requests scheduled in the measured window
    completed: int
    errors: int  # wrong status/body, lost connections, and requests never answered
    lost_connections: int
    duration_s: float
    latency_ms: list[float]  # from the scheduled time, sorted, measured window only
    service_ms: list[float]  # from the moment the request was written
    lateness_ms: list[float]  # write time minus scheduled time
    ticker: str


class OpenLoop:
    """Fixed-rate requests over a pool of keep-alive connections."""

    def __init__(self, port: int, path: str, rate: float, conns: int, expect: bytes) -> None:
        self.port = port
        self.request = get_request(path, port)
        self.rate = rate
        self.nconns = conns
        self.expect = expect
        self.idle: deque[Slot] = deque()
        self.backlog: deque[float] = deque()  # scheduled times waiting for a connection
        self.k = 0
        self.t0 = 0.0
        self.measure_from = 0.0
        self.stop_at = 0.0
        self.lat = array("d")
        self.svc = array("d")
        self.late = array("d")
        self.scheduled = 0
        self.errors = 0
        self.lost = 0
        self.outstanding = 0
        self.stopping = False
        self.reconnects: set[asyncio.Task[None]] = set()
        self.all_done: asyncio.Event | None = None

    async def run(self, warmup: float, duration: float) -> LoadResult:
        loop = asyncio.get_running_loop()
        self.all_done = asyncio.Event()
        for _ in range(self.nconns):
            self.idle.append(await Slot.open(self))
        ticker = Ticker(loop, 1.0 / self.rate)
        self.t0 = time.monotonic() + 0.05
        self.measure_from = self.t0 + warmup
        self.stop_at = self.measure_from + duration
        ticker.start(self.t0, self.on_tick)
        try:
            await asyncio.sleep(self.stop_at - time.monotonic())
            self.stopping = True
            ticker.stop()
            if self.outstanding or self.backlog:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.all_done.wait(), 10.0)
        finally:
            ticker.stop()
            self.errors += max(0, self.outstanding)  # scheduled but never answered
            for slot in self.idle:
                slot.close()
            for task in self.reconnects:
                task.cancel()
        return LoadResult(
            scheduled=self.scheduled,
            completed=len(self.lat),
            errors=self.errors,
            lost_connections=self.lost,
            duration_s=duration,
            latency_ms=sorted(self.lat),
            service_ms=sorted(self.svc),
            lateness_ms=sorted(self.late),
            ticker=ticker.kind,
        )

    def on_tick(self, n: int) -> None:
        period = 1.0 / self.rate
        for _ in range(n):
            self.k += 1
            sched = self.t0 + self.k * period
            if sched >= self.stop_at:
                return
            if sched >= self.measure_from:
                self.scheduled += 1
            self.outstanding += 1
            if self.idle:
                self.idle.popleft().send(sched)
            else:
                self.backlog.append(sched)

    def finished(self, slot: Slot, sched: float, sent: float, ok: bool, lost: bool = False) -> None:
        now = time.monotonic()
        self.outstanding -= 1
        if sched >= self.measure_from:
            if ok:
                self.lat.append((now - sched) * 1e3)
                self.svc.append((now - sent) * 1e3)
                self.late.append((sent - sched) * 1e3)
            else:
                self.errors += 1
        if lost:
            self.replace()
        elif self.backlog:
            slot.send(self.backlog.popleft())
        else:
            self.idle.append(slot)
        if self.stopping and self.outstanding <= 0 and self.all_done is not None:
            self.all_done.set()

    def replace(self) -> None:
        """A pooled connection was lost: open another one in its place."""
        self.lost += 1
        task = asyncio.get_running_loop().create_task(self._reconnect())
        self.reconnects.add(task)
        task.add_done_callback(self.reconnects.discard)

    async def _reconnect(self) -> None:
        try:
            slot = await Slot.open(self)
        except OSError:
            await asyncio.sleep(0.1)
            self.lost -= 1
            self.replace()
            return
        if self.backlog:
            slot.send(self.backlog.popleft())
        else:
            self.idle.append(slot)


class Slot:
    """One pooled connection and the request it carries."""

    __slots__ = ("gen", "proto", "sched", "sent")

    def __init__(self, gen: OpenLoop, proto: HttpClientProtocol) -> None:
        self.gen = gen
        self.proto = proto
        self.sched = 0.0
        self.sent = 0.0

    @classmethod
    async def open(cls, gen: OpenLoop) -> Slot:
        proto = await open_http(gen.port)
        return cls(gen, proto)

    def send(self, sched: float) -> None:
        if self.proto.closed:  # lost while idle: the request waits for a new connection
            self.gen.backlog.appendleft(sched)
            self.gen.replace()
            return
        self.sched = sched
        self.sent = time.monotonic()
        self.proto.send(self.gen.request, self.done)

    def done(self, status: int, head: bytes, body: bytes) -> None:
        if status == 0:  # connection lost
            self.gen.finished(self, self.sched, self.sent, ok=False, lost=True)
            return
        self.gen.finished(self, self.sched, self.sent, ok=status == 200 and body == self.gen.expect)

    def close(self) -> None:
        if self.proto.transport is not None:
            self.proto.transport.close()


# ---------------------------------------------------------------------- runs


@dataclass
class Sample:
    run: int
    target: str
    rate_achieved: float
    scheduled: int
    completed: int
    errors: int
    lost_connections: int
    latency_ms: dict[str, float]  # p50 p90 p99 p99.9 max, from scheduled time
    service_ms: dict[str, float]  # p50 p99, from write time
    lateness_ms: dict[str, float]  # p50 p99 max: how late the generator wrote
    cpu_us_per_req: float | None
    rss_bytes: int
    ticker: str


def pct_dict(
    values: list[float], pcts: tuple[float, ...], with_max: bool = True
) -> dict[str, float]:
    out = {f"p{q:g}": percentile(values, q) for q in pcts}
    if with_max:
        out["max"] = values[-1] if values else float("nan")
    return out


def measure(
    srv: Server, run: int, target: str, rate: float, conns: int, warmup: float, duration: float
) -> Sample:
    cpu0 = tree_cpu_seconds(srv.pid)
    res: LoadResult = run_async(
        OpenLoop(srv.port, "/small", rate, conns, SMALL_BODY).run(warmup, duration)
    )
    cpu = tree_cpu_seconds(srv.pid) - cpu0
    total_reqs = res.completed * (warmup + duration) / duration if duration else 0
    return Sample(
        run=run,
        target=target,
        rate_achieved=res.completed / res.duration_s,
        scheduled=res.scheduled,
        completed=res.completed,
        errors=res.errors,
        lost_connections=res.lost_connections,
        latency_ms=pct_dict(res.latency_ms, PCTS),
        service_ms=pct_dict(res.service_ms, (50.0, 99.0), with_max=False),
        lateness_ms=pct_dict(res.lateness_ms, (50.0, 99.0)),
        cpu_us_per_req=cpu / total_reqs * 1e6 if total_reqs else None,
        rss_bytes=tree_rss_bytes(srv.pid),
        ticker=res.ticker,
    )


def summarize(samples: list[Sample], targets: list[str]) -> list[dict[str, Any]]:
    by_run_direct = {s.run: s for s in samples if s.target == "direct"}
    rows: list[dict[str, Any]] = []
    for t in targets:
        runs = [s for s in samples if s.target == t]
        if not runs:
            continue
        row: dict[str, Any] = {"target": t, "runs": len(runs)}
        row["rate"] = median_or_none([s.rate_achieved for s in runs])
        for key in ("p50", "p90", "p99", "p99.9", "max"):
            row[key] = median_or_none([s.latency_ms[key] for s in runs])
        row["svc_p50"] = median_or_none([s.service_ms["p50"] for s in runs])
        row["svc_p99"] = median_or_none([s.service_ms["p99"] for s in runs])
        row["late_p99"] = median_or_none([s.lateness_ms["p99"] for s in runs])
        for key in ("p50", "p99"):
            diffs = [
                s.latency_ms[key] - by_run_direct[s.run].latency_ms[key]
                for s in runs
                if s.run in by_run_direct
            ]
            row[f"added_{key}"] = median_or_none(diffs) if t != "direct" else None
        row["cpu_us_per_req"] = median_or_none(
            [s.cpu_us_per_req for s in runs if s.cpu_us_per_req is not None]
        )
        row["rss_mib"] = max(s.rss_bytes for s in runs) / 2**20
        row["errors"] = sum(s.errors for s in runs)
        rows.append(row)
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    headers = [
        "target", "req/s", "p50 ms", "p90 ms", "p99 ms", "p99.9 ms", "max ms",
        "added p50", "added p99", "svc p50", "svc p99", "late p99", "CPU us/req",
        "RSS MiB", "errors",
    ]  # fmt: skip
    table = [
        [
            r["target"],
            fmt(r["rate"], ",.0f"),
            fmt(r["p50"], ".3f"),
            fmt(r["p90"], ".3f"),
            fmt(r["p99"], ".3f"),
            fmt(r["p99.9"], ".3f"),
            fmt(r["max"], ".2f"),
            fmt(r["added_p50"], "+.3f"),
            fmt(r["added_p99"], "+.3f"),
            fmt(r["svc_p50"], ".3f"),
            fmt(r["svc_p99"], ".3f"),
            fmt(r["late_p99"], ".3f"),
            fmt(r["cpu_us_per_req"], ".1f"),
            fmt(r["rss_mib"], ".1f"),
            str(r["errors"]),
        ]
        for r in rows
    ]
    print_rows(headers, table)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="open-loop latency at a fixed rate, added over direct")
    p.add_argument("--rate", type=float, default=2000, help="requests per second (default 2000)")
    p.add_argument("--duration", type=float, default=15, help="measured seconds per run")
    p.add_argument("--warmup", type=float, default=2, help="unmeasured seconds before each run")
    p.add_argument("--runs", type=int, default=3, help="interleaved runs (default 3)")
    p.add_argument("--connections", type=int, default=32, help="keep-alive connections")
    add_target_args(p, TARGETS)
    args = p.parse_args(argv)
    if args.rate <= 0 or args.duration <= 0 or args.runs < 1 or args.connections < 1:
        p.error("--rate, --duration, --runs and --connections must be positive")
    if "direct" not in args.targets:
        p.error("--targets must include direct (the baseline)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    install_signal_handlers()
    need_cpus(CLIENT_CPU, PROXY_CPU)
    ensure_tools(["nginx", "haproxy", "taskset"])
    nginx, haproxy = which("nginx"), which("haproxy")
    assert nginx is not None and haproxy is not None

    base = Path(tempfile.mkdtemp(prefix="bench_latency_"))
    servers = Servers()
    skipped: dict[str, str] = {}
    failed: dict[str, str] = {}
    try:
        upstream = servers.add(make_upstream(base, nginx))
        upstream.start()
        try:
            wait_ready(upstream, args.start_timeout)
        except TargetFailed as exc:
            raise BenchError(f"upstream did not start: {exc}") from exc
        live: dict[str, Server] = {"direct": upstream}
        factories = {
            "nginx": lambda: make_nginx_proxy(base, nginx, upstream.port),
            "haproxy": lambda: make_haproxy(base, haproxy, upstream.port),
            "bgproxy": lambda: make_bgproxy(base, upstream.port),
        }
        for name in args.targets:
            if name != "direct":
                srv = servers.add(factories[name]())
                if start_or_skip(
                    srv, lambda s: wait_ready(s, args.start_timeout), skipped, str(PROXY_CPU)
                ):
                    live[name] = srv
        targets = [t for t in args.targets if t in live]
        pin_self(CLIENT_CPU)  # the generator shares CPU 0 with the upstream, like wrk
        per_run = args.warmup + args.duration
        log(
            f"{args.runs} runs x {len(targets)} targets x {per_run:g}s at {args.rate:g} req/s, "
            f"~{args.runs * len(targets) * (per_run + 1) / 60:.1f} min"
        )
        samples: list[Sample] = []
        for run in range(1, args.runs + 1):
            for t in targets:
                if t in failed:
                    continue
                srv = live[t]
                if not srv.alive():
                    why = srv.fail("died during the benchmark").args[0]
                    if t == "direct":
                        raise BenchError(why)
                    failed[t] = why
                    log(f"DROPPING {t}: {why}")
                    continue
                try:
                    s = measure(
                        srv, run, t, args.rate, args.connections, args.warmup, args.duration
                    )
                except OSError as exc:
                    failed[t] = f"load generator could not connect: {exc}"
                    log(f"DROPPING {t}: {failed[t]}")
                    continue
                samples.append(s)
                log(
                    f"run {run}/{args.runs} {t:8} {s.rate_achieved:7,.0f} req/s  "
                    f"p50 {s.latency_ms['p50']:.3f}  p99 {s.latency_ms['p99']:.3f}  "
                    f"max {s.latency_ms['max']:.2f} ms  late p99 {s.lateness_ms['p99']:.3f} ms  "
                    f"errors {s.errors}"
                )
        rows = summarize(samples, targets)
        ticker = samples[0].ticker if samples else "?"
        print()
        print(
            f"open loop at {args.rate:g} req/s, {args.connections} keep-alive connections, "
            f"GET /small, {args.runs} runs x {args.duration:g}s (+{args.warmup:g}s warm-up); "
            f"medians over runs; latency from the scheduled send time ({ticker}); "
            f"generator+upstream on CPU {CLIENT_CPU}, proxy on CPU {PROXY_CPU}"
        )
        print_table(rows)
        print()
        for r in rows:
            if r["target"] == "bgproxy" and r["added_p50"] is not None:
                verdict = "PASS" if r["added_p50"] <= 0.3 else "FAIL"
                print(
                    f"bgproxy added p50 {r['added_p50'] * 1e3:+.0f} us, added p99 "
                    f"{r['added_p99'] * 1e3:+.0f} us over direct (target: <= +300 us p50): "
                    f"{verdict}"
                )
        for name, why in skipped.items():
            print(f"skipped {name}: {why.splitlines()[0]}")
        for name, why in failed.items():
            print(f"dropped {name}: {why.splitlines()[0]}")
        if args.json:
            write_json(
                args.json,
                {
                    "params": {
                        "rate": args.rate,
                        "duration_s": args.duration,
                        "warmup_s": args.warmup,
                        "runs": args.runs,
                        "connections": args.connections,
                        "targets": targets,
                        "path": "/small",
                        "client_cpu": CLIENT_CPU,
                        "proxy_cpu": PROXY_CPU,
                        "ticker": ticker,
                    },
                    "env": env_info(
                        nginx=tool_version([nginx, "-v"]), haproxy=tool_version([haproxy, "-v"])
                    ),
                    "skipped": skipped,
                    "failed": failed,
                    "summary": rows,
                    "raw": [asdict(s) for s in samples],
                },
            )
        return 0
    finally:
        servers.stop_all()
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    run_main(main)
