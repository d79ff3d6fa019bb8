#!/usr/bin/env python3
"""Flip under load: a blue/green switch every second at saturation; is any request hurt?

One command starts everything it needs, loads bgproxy while flipping it, checks
every single response, prints a table with PASS/FAIL and cleans up:

    python benchmarks/bench_flip.py [--duration 60] [--interval 1] [--connections 64]
        [--window 0.2] [--json out.json]

Upstreams: one nginx (CPU 0) with two ports; the blue one answers every request
with ``200 blue``, the green one with ``200 green``. bgproxy (CPU 1) has blue
and green pointing at them, default config otherwise. The load generator (CPU
0, this process) keeps ``--connections`` keep-alive connections busy back to
back (closed loop, as wrk does) and records for every request the time it was
written, the time its response was complete, the status, the body's color and
the ``X-Bg-Color`` header. In the same event loop, a switcher calls ``POST
/switch`` on the admin API every ``--interval`` seconds with the other color.

Checks, over every request:

* errors: a status other than 200, a body that is not a color, a lost
  connection or a request never answered; must be 0;
* stale: a response from the color that was live *before* the last switch call
  that had returned when the request was written (requests written while a switch
  call was in progress may get either color); must be 0;
* mislabelled: ``X-Bg-Color`` naming another color than the body;
* p99 latency of requests written during a flip (from the switch call until
  ``--window`` after it returned) vs the steady-state p99 (all others); must be
  < 2x.

Afterwards it checks ``/status`` (nothing left in flight) and ``/events`` (one
manual switch event per switch, no automatic rollback).
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import shutil
import tempfile
import time
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from _common import (
    CLIENT_CPU,
    PROXY_CPU,
    BenchError,
    HttpClientProtocol,
    Servers,
    TargetFailed,
    ensure_tools,
    env_info,
    fmt,
    get_request,
    http_json,
    install_signal_handlers,
    log,
    make_bgproxy,
    make_color_upstreams,
    need_cpus,
    open_http,
    percentile,
    pin_self,
    print_rows,
    run_async,
    run_main,
    tool_version,
    tree_cpu_seconds,
    tree_rss_bytes,
    wait_http,
    which,
    write_json,
)

COLORS = ("blue", "green")
# outcome codes stored per request
BLUE, GREEN, ERR_STATUS, ERR_BODY, ERR_LOST = 0, 1, 2, 3, 4
COLOR_CODE = {b"blue": BLUE, b"green": GREEN}


@dataclass
class Switch:
    color: str
    called: float
    returned: float
    status: int
    generation: int | None
    detail: str = ""


@dataclass
class Recording:
    sent: array[float] = field(default_factory=lambda: array("d"))
    done: array[float] = field(default_factory=lambda: array("d"))
    outcome: array[int] = field(default_factory=lambda: array("b"))
    header: array[int] = field(default_factory=lambda: array("b"))  # -1: no header
    switches: list[Switch] = field(default_factory=list)
    never_answered: int = 0
    start: float = 0.0
    end: float = 0.0


class Conn:
    """One closed-loop keep-alive connection: next request as soon as a response is in."""

    __slots__ = ("load", "proto", "sent")

    def __init__(self, load: Load, proto: HttpClientProtocol) -> None:
        self.load = load
        self.proto = proto
        self.sent = 0.0

    def go(self) -> None:
        self.sent = time.monotonic()
        self.proto.send(self.load.request, self.done)

    def done(self, status: int, head: bytes, body: bytes) -> None:
        now = time.monotonic()
        rec = self.load.rec
        rec.sent.append(self.sent)
        rec.done.append(now)
        if status == 0:
            rec.outcome.append(ERR_LOST)
            rec.header.append(-1)
            self.load.reconnect()
            return
        code = COLOR_CODE.get(body, ERR_BODY)
        rec.outcome.append(code if status == 200 else ERR_STATUS)
        i = head.find(b"\r\nX-Bg-Color: ")
        if i < 0:
            i = head.lower().find(b"\r\nx-bg-color: ")
        if i >= 0:
            j = head.find(b"\r\n", i + 2)
            rec.header.append(COLOR_CODE.get(head[i + 14 : j].strip(), ERR_BODY))
        else:
            rec.header.append(-1)
        if self.load.running:
            self.go()
        else:
            self.load.note_idle()


class Load:
    def __init__(self, port: int, admin_port: int, connections: int) -> None:
        self.port = port
        self.admin_port = admin_port
        self.request = get_request("/", port)
        self.connections = connections
        self.rec = Recording()
        self.running = False
        self.idle = 0
        self.conns: list[Conn] = []
        self.tasks: set[asyncio.Task[None]] = set()
        self.all_idle = asyncio.Event()

    def note_idle(self) -> None:
        self.idle += 1
        if self.idle >= len(self.conns):
            self.all_idle.set()

    def reconnect(self) -> None:
        if not self.running:
            self.note_idle()
            return
        task = asyncio.get_running_loop().create_task(self._reconnect())
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _reconnect(self) -> None:
        while self.running:
            try:
                conn = Conn(self, await open_http(self.port))
            except OSError:
                await asyncio.sleep(0.05)
                continue
            self.conns.append(conn)
            conn.go()
            return
        self.note_idle()

    async def switcher(
        self, session: aiohttp.ClientSession, first: float, interval: float, end: float
    ) -> None:
        url = f"http://127.0.0.1:{self.admin_port}/switch"
        i = 0
        color = "green"
        while True:
            at = first + i * interval
            if at >= end:
                return
            await asyncio.sleep(max(0.0, at - time.monotonic()))
            called = time.monotonic()
            status, gen, detail = 0, None, ""
            try:
                async with session.post(url, json={"color": color, "reason": "bench"}) as resp:
                    status = resp.status
                    body = await resp.json(content_type=None)
                    if isinstance(body, dict):
                        gen = body.get("generation")
                        if status != 200:
                            detail = str(body)[:200]
            except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                detail = f"{type(exc).__name__}: {exc}"
            returned = time.monotonic()
            self.rec.switches.append(Switch(color, called, returned, status, gen, detail))
            i += 1
            color = "blue" if color == "green" else "green"

    async def run(self, warmup: float, duration: float, interval: float) -> Recording:
        for _ in range(self.connections):
            self.conns.append(Conn(self, await open_http(self.port)))
        timeout = aiohttp.ClientTimeout(total=30)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            self.running = True
            self.rec.start = time.monotonic()
            for c in self.conns:
                c.go()
            first = self.rec.start + warmup
            end = first + duration
            await self.switcher(session, first, interval, end)
            await asyncio.sleep(max(0.0, end - time.monotonic()))
            self.running = False
            self.rec.end = time.monotonic()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.all_idle.wait(), 10)
        in_flight = sum(1 for c in self.conns if c.proto.on_done is not None)
        self.rec.never_answered = in_flight
        for c in self.conns:
            if c.proto.transport is not None:
                c.proto.transport.close()
        for t in self.tasks:
            t.cancel()
        return self.rec


# ------------------------------------------------------------------ analysis


def analyze(rec: Recording, window: float, initial: str = "blue") -> dict[str, Any]:
    sw = [s for s in rec.switches if s.status == 200]
    called = [s.called for s in sw]
    returned = [s.returned for s in sw]
    n = len(rec.sent)
    stale = errors = mislabelled = 0
    stale_examples: list[dict[str, Any]] = []
    flip_lat: list[float] = []
    steady_lat: list[float] = []
    # which requests were written inside a flip window
    win_start = [s.called for s in sw]
    win_end = [s.returned + window for s in sw]
    by_kind = {ERR_STATUS: 0, ERR_BODY: 0, ERR_LOST: 0}
    for i in range(n):
        s, d, o, h = rec.sent[i], rec.done[i], rec.outcome[i], rec.header[i]
        if o >= ERR_STATUS:
            errors += 1
            by_kind[o] += 1
            continue
        if h != -1 and h != o:
            mislabelled += 1
        k = bisect.bisect_right(returned, s) - 1  # last switch returned before the write
        j = bisect.bisect_right(called, s) - 1  # last switch called before the write
        if j == k:  # no switch in progress: exactly one color is right
            want = COLOR_CODE[(sw[k].color if k >= 0 else initial).encode()]
            if o != want:
                stale += 1
                if len(stale_examples) < 10:
                    prev = sw[k - 1].returned if k >= 1 else None
                    stale_examples.append(
                        {
                            "sent_after_switch_returned_ms": (s - sw[k].returned) * 1e3
                            if k >= 0
                            else None,
                            "latency_ms": (d - s) * 1e3,
                            "expected": COLORS[want],
                            "got": COLORS[o],
                            "switch_index": k,
                            "previous_switch_returned_ms_before": (s - prev) * 1e3
                            if prev
                            else None,
                        }
                    )
        w = bisect.bisect_right(win_start, s) - 1
        lat = (d - s) * 1e3
        if w >= 0 and s < win_end[w]:
            flip_lat.append(lat)
        else:
            steady_lat.append(lat)
    flip_lat.sort()
    steady_lat.sort()
    total_time = rec.end - rec.start
    flip_time = sum(min(e, rec.end) - st for st, e in zip(win_start, win_end, strict=True))
    steady_time = total_time - flip_time
    call_ms = sorted((s.returned - s.called) * 1e3 for s in rec.switches)
    p99_flip = percentile(flip_lat, 99)
    p99_steady = percentile(steady_lat, 99)
    return {
        "requests": n,
        "rps": n / total_time if total_time else 0.0,
        "errors": errors + rec.never_answered,
        "errors_by_kind": {
            "status": by_kind[ERR_STATUS],
            "body": by_kind[ERR_BODY],
            "lost_connection": by_kind[ERR_LOST],
            "never_answered": rec.never_answered,
        },
        "stale": stale,
        "stale_examples": stale_examples,
        "mislabelled": mislabelled,
        "switches": len(rec.switches),
        "switches_ok": len(sw),
        "switch_failures": [
            {"color": s.color, "status": s.status, "detail": s.detail}
            for s in rec.switches
            if s.status != 200
        ],
        "switch_call_ms": {
            "p50": percentile(call_ms, 50),
            "p99": percentile(call_ms, 99),
            "max": call_ms[-1] if call_ms else float("nan"),
        },
        "flip": {
            "requests": len(flip_lat),
            "rps": len(flip_lat) / flip_time if flip_time > 0 else None,
            "p50_ms": percentile(flip_lat, 50),
            "p99_ms": p99_flip,
            "max_ms": flip_lat[-1] if flip_lat else float("nan"),
        },
        "steady": {
            "requests": len(steady_lat),
            "rps": len(steady_lat) / steady_time if steady_time > 0 else None,
            "p50_ms": percentile(steady_lat, 50),
            "p99_ms": p99_steady,
            "max_ms": steady_lat[-1] if steady_lat else float("nan"),
        },
        "p99_ratio": p99_flip / p99_steady if p99_steady else None,
    }


def after_checks(admin_port: int, switches: int) -> dict[str, Any]:
    """In-flight counts settle to 0; one manual switch event per switch; no auto rollback."""
    out: dict[str, Any] = {}
    deadline = time.monotonic() + 5
    status: Any = None
    while time.monotonic() < deadline:
        code, status = http_json(admin_port, "GET", "/status")
        if code == 200 and isinstance(status, dict):
            infl = {c: status["colors"][c]["in_flight"] for c in COLORS}
            out["in_flight_after"] = infl
            if not any(infl.values()):
                break
        time.sleep(0.2)
    if isinstance(status, dict):
        out["generation"] = status.get("generation")
        out["drain"] = status.get("drain")
        out["rollback"] = status.get("rollback")
    code, ev = http_json(admin_port, "GET", f"/events?limit={switches + 50}")
    if code == 200 and isinstance(ev, dict):
        events = ev.get("events", [])
        out["events"] = len(events)
        out["auto_events"] = [e for e in events if e.get("trigger") == "auto"][:5]
        out["manual_switch_events"] = sum(
            1 for e in events if e.get("action") == "switch" and e.get("trigger") == "manual"
        )
    return out


def print_report(res: dict[str, Any], after: dict[str, Any], window: float) -> bool:
    f, st = res["flip"], res["steady"]
    headers = ["phase", "requests", "req/s", "p50 ms", "p99 ms", "max ms"]
    rows = [
        [
            name,
            f"{d['requests']:,}",
            fmt(d["rps"], ",.0f"),
            fmt(d["p50_ms"], ".3f"),
            fmt(d["p99_ms"], ".3f"),
            fmt(d["max_ms"], ".2f"),
        ]
        for name, d in ((f"flip (+{window * 1e3:.0f} ms)", f), ("steady", st))
    ]
    print_rows(headers, rows)
    print()
    sc = res["switch_call_ms"]
    print(
        f"switches: {res['switches_ok']}/{res['switches']} accepted; admin call p50 "
        f"{sc['p50']:.1f} ms, p99 {sc['p99']:.1f} ms, max {sc['max']:.1f} ms"
    )
    ratio = res["p99_ratio"]
    stale_infl = after.get("in_flight_after", {})
    checks = [
        ("errors", res["errors"], res["errors"] == 0, "0"),
        ("stale responses", res["stale"], res["stale"] == 0, "0"),
        ("mislabelled X-Bg-Color", res["mislabelled"], res["mislabelled"] == 0, "0"),
        (
            "p99 flip / steady",
            fmt(ratio, ".2f"),
            ratio is not None and ratio < 2.0,
            "< 2.00",
        ),
        (
            "switch calls accepted",
            f"{res['switches_ok']}/{res['switches']}",
            res["switches_ok"] == res["switches"] and res["switches"] > 0,
            "all",
        ),
        (
            "in flight after the run",
            str(stale_infl),
            bool(stale_infl) and not any(stale_infl.values()),
            "0",
        ),
        (
            "manual switch events",
            after.get("manual_switch_events", "?"),
            after.get("manual_switch_events", 0) >= res["switches_ok"],
            f">= {res['switches_ok']}",
        ),
        (
            "automatic rollbacks",
            len(after.get("auto_events", [])),
            not after.get("auto_events"),
            "0",
        ),
    ]
    print()
    print_rows(
        ["check", "measured", "target", "result"],
        [[c, str(v), t, "PASS" if ok else "FAIL"] for c, v, ok, t in checks],
    )
    passed = all(ok for _, _, ok, _ in checks)
    print()
    print(f"overall: {'PASS' if passed else 'FAIL'}")
    if res["errors"]:
        print(f"errors by kind: {res['errors_by_kind']}")
    if res["stale_examples"]:
        print("stale examples (first few):")
        for ex in res["stale_examples"][:5]:
            print(f"  {ex}")
    for fl in res["switch_failures"][:5]:
        print(f"switch failure: {fl}")
    return passed


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="flip bgproxy every second under saturation load")
    p.add_argument("--duration", type=float, default=60, help="seconds of flipping (default 60)")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between switches")
    p.add_argument("--warmup", type=float, default=2, help="seconds of load before the first flip")
    p.add_argument("--connections", type=int, default=64, help="keep-alive connections")
    p.add_argument("--window", type=float, default=0.2, help="flip window after each switch (s)")
    p.add_argument("--start-timeout", type=float, default=20, help="seconds to wait per server")
    p.add_argument("--json", type=Path, help="write the results to this file")
    args = p.parse_args(argv)
    if args.duration <= 0 or args.interval <= 0 or args.connections < 1 or args.window < 0:
        p.error("--duration, --interval, --connections must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    install_signal_handlers()
    need_cpus(CLIENT_CPU, PROXY_CPU)
    ensure_tools(["nginx", "taskset"])
    nginx = which("nginx")
    assert nginx is not None

    base = Path(tempfile.mkdtemp(prefix="bench_flip_"))
    servers = Servers()
    try:
        colors = servers.add(make_color_upstreams(base, nginx))
        colors.start()
        for c in COLORS:

            def answers(status: int, body: bytes, color: str = c) -> bool:
                return status == 200 and body == color.encode()

            try:
                wait_http(colors, args.start_timeout, "/", answers, port=colors.extra_ports[c])
            except TargetFailed as exc:
                raise BenchError(f"color upstreams did not start: {exc}") from exc
        bg = servers.add(
            make_bgproxy(base, colors.extra_ports["blue"], green_port=colors.extra_ports["green"])
        )
        bg.start()
        try:
            wait_http(bg, args.start_timeout, "/", lambda st, b: st == 200 and b == b"blue")
        except TargetFailed as exc:
            raise BenchError(f"bgproxy did not start: {exc}") from exc
        assert bg.admin_port is not None
        code, st = http_json(bg.admin_port, "GET", "/status")
        if code != 200 or not isinstance(st, dict) or st.get("active") != "blue":
            raise BenchError(f"bgproxy admin /status -> {code} {st!r:.200}")
        gen0 = st.get("generation")
        log(f"bgproxy ready on :{bg.port} (admin :{bg.admin_port}, CPU {PROXY_CPU}), active blue")
        pin_self(CLIENT_CPU)
        log(
            f"load: {args.connections} connections for {args.warmup + args.duration:g}s, "
            f"a switch every {args.interval:g}s"
        )
        cpu0 = tree_cpu_seconds(bg.pid)
        rec: Recording = run_async(
            Load(bg.port, bg.admin_port, args.connections).run(
                args.warmup, args.duration, args.interval
            )
        )
        cpu = tree_cpu_seconds(bg.pid) - cpu0
        if not bg.alive():
            raise BenchError(bg.fail("died during the benchmark").args[0])
        res = analyze(rec, args.window)
        after = after_checks(bg.admin_port, len(rec.switches))
        after["generation_before"] = gen0
        wall = rec.end - rec.start
        res["proxy_cpu_pct"] = 100 * cpu / wall if wall else None
        res["proxy_cpu_us_per_req"] = cpu / res["requests"] * 1e6 if res["requests"] else None
        res["proxy_rss_mib"] = tree_rss_bytes(bg.pid) / 2**20
        print()
        print(
            f"flip under load: {args.connections} closed-loop keep-alive connections, "
            f"{wall:.1f}s, a switch every {args.interval:g}s ({res['switches']} switches); "
            f"{res['requests']:,} requests, {res['rps']:,.0f} req/s; bgproxy on CPU "
            f"{PROXY_CPU} at {fmt(res['proxy_cpu_pct'], '.0f')}% CPU, "
            f"{fmt(res['proxy_cpu_us_per_req'], '.1f')} us/req; load + upstreams on CPU "
            f"{CLIENT_CPU}"
        )
        passed = print_report(res, after, args.window)
        if args.json:
            write_json(
                args.json,
                {
                    "params": {
                        "duration_s": args.duration,
                        "interval_s": args.interval,
                        "warmup_s": args.warmup,
                        "connections": args.connections,
                        "window_s": args.window,
                        "client_cpu": CLIENT_CPU,
                        "proxy_cpu": PROXY_CPU,
                    },
                    "env": env_info(nginx=tool_version([nginx, "-v"])),
                    "passed": passed,
                    "result": res,
                    "after": after,
                    "switches": [vars(s) for s in rec.switches],
                },
            )
        return 0 if passed else 1
    finally:
        with contextlib.suppress(Exception):
            servers.stop_all()
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    run_main(main)
