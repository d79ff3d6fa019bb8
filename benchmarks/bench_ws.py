#!/usr/bin/env python3
"""WebSocket relay: messages/s and round-trip latency through bgproxy vs direct.

One command starts everything it needs, runs the clients against each target,
prints a table and cleans up:

    python benchmarks/bench_ws.py [--clients 50] [--duration 10] [--runs 3] [--size 32]
        [--targets direct,nginx,haproxy,uvloop,bgproxy] [--json out.json]

The upstream is an aiohttp WebSocket echo server (on CPU 0). N clients each
open one WebSocket (through the target) and ping-pong a small text message as
fast as they can: send, wait for the echo, send again. The clients are a raw
asyncio client in this process (pre-masked frame, no per-message parsing
beyond the frame header) on CPU 0; the proxy under test runs alone on CPU 1.
bgproxy relays any ``Upgrade: websocket`` request to the active color; nginx
(with ``Upgrade``/``Connection`` forwarded) and HAProxy are peers, and ``uvloop``
(``serve_uvloop_floor`` in _common.py) is the floor: after the handshake it copies
bytes both ways with no frame tracking, the least any uvloop relay can do.

Columns: msgs/s = round trips per second over all clients; p50/p99 = round-trip
time of one message; "proxy CPU %" = the proxy's CPU time over the run's wall
time (near 100 %: the proxy is the bottleneck; lower: CPU 0, i.e. the client
and the echo server, is); CPU us/msg = proxy CPU per round trip (both
directions). Ratios are paired per run, medians over the runs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shutil
import tempfile
import time
from array import array
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from _common import (
    CLIENT_CPU,
    PROXY_CPU,
    BenchError,
    Server,
    Servers,
    TargetFailed,
    WsClientProtocol,
    add_target_args,
    ensure_tools,
    env_info,
    fmt,
    helper_server,
    install_signal_handlers,
    log,
    make_bgproxy,
    make_haproxy,
    make_nginx_proxy,
    make_uvloop_floor,
    median_or_none,
    need_cpus,
    open_ws,
    paired_ratio,
    percentile,
    pin_self,
    print_rows,
    run_async,
    run_main,
    start_or_skip,
    tool_version,
    tree_cpu_seconds,
    tree_rss_bytes,
    wait_http,
    which,
    write_json,
)

TARGETS = ("direct", "nginx", "haproxy", "uvloop", "bgproxy")
PEERS = ("direct", "nginx", "haproxy", "uvloop")


@dataclass
class PingPong:
    messages: int
    rtt_ms: list[float]  # sorted
    errors: int  # wrong echoes, unexpected frames, lost connections
    failed_handshakes: int


async def ping_pong(port: int, clients: int, size: int, warmup: float, duration: float) -> PingPong:
    payload = (b"0123456789abcdef" * (size // 16 + 1))[:size]
    protos: list[WsClientProtocol] = []
    failed = 0
    results = await asyncio.gather(
        *(open_ws(port, "/ws", payload) for _ in range(clients)), return_exceptions=True
    )
    for r in results:
        if isinstance(r, WsClientProtocol):
            protos.append(r)
        else:
            failed += 1
    if not protos:
        raise ConnectionError(f"no WebSocket handshake succeeded: {results[0]!r}")
    rtts = array("d")
    counting = [False]
    lost = [0]

    def on_echo(p: WsClientProtocol) -> None:
        now = time.perf_counter()
        if counting[0]:
            rtts.append((now - p.sent_at) * 1e3)
        p.send_message()

    def on_lost(p: WsClientProtocol) -> None:
        lost[0] += 1

    for p in protos:
        p.on_echo = on_echo
        p.on_lost = on_lost
        p.send_message()
    await asyncio.sleep(warmup)
    counting[0] = True
    await asyncio.sleep(duration)
    counting[0] = False
    for p in protos:
        p.on_echo = None
        p.on_lost = None
        if p.transport is not None:
            p.transport.abort()
    await asyncio.sleep(0.05)
    errors = lost[0] + sum(len(p.extra) for p in protos)
    return PingPong(len(rtts), sorted(rtts), errors, failed)


@dataclass
class Sample:
    run: int
    target: str
    msgs_per_s: float
    p50_ms: float
    p99_ms: float
    max_ms: float
    errors: int
    failed_handshakes: int
    cpu_seconds: float
    cpu_pct: float
    cpu_us_per_msg: float | None
    rss_bytes: int


def measure(
    srv: Server, run: int, target: str, clients: int, size: int, warmup: float, duration: float
) -> Sample:
    t0 = time.monotonic()
    cpu0 = tree_cpu_seconds(srv.pid)
    res: PingPong = run_async(ping_pong(srv.port, clients, size, warmup, duration))
    cpu = tree_cpu_seconds(srv.pid) - cpu0
    wall = time.monotonic() - t0
    total_msgs = res.messages * wall / duration
    return Sample(
        run=run,
        target=target,
        msgs_per_s=res.messages / duration,
        p50_ms=percentile(res.rtt_ms, 50),
        p99_ms=percentile(res.rtt_ms, 99),
        max_ms=res.rtt_ms[-1] if res.rtt_ms else float("nan"),
        errors=res.errors,
        failed_handshakes=res.failed_handshakes,
        cpu_seconds=cpu,
        cpu_pct=100 * cpu / wall,
        cpu_us_per_msg=cpu / total_msgs * 1e6 if total_msgs else None,
        rss_bytes=tree_rss_bytes(srv.pid),
    )


def summarize(samples: list[Sample], targets: list[str]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for t in targets:
        runs = [s for s in samples if s.target == t]
        if not runs:
            continue
        row: dict[str, Any] = {
            "target": t,
            "runs": len(runs),
            "msgs_per_s": median_or_none([s.msgs_per_s for s in runs]),
            "p50_ms": median_or_none([s.p50_ms for s in runs]),
            "p99_ms": median_or_none([s.p99_ms for s in runs]),
            "max_ms": median_or_none([s.max_ms for s in runs]),
            "cpu_pct": median_or_none([s.cpu_pct for s in runs]) if t != "direct" else None,
            "cpu_us_per_msg": median_or_none(
                [s.cpu_us_per_msg for s in runs if s.cpu_us_per_msg is not None]
            ),
            "rss_mib": max(s.rss_bytes for s in runs) / 2**20,
            "errors": sum(s.errors + s.failed_handshakes for s in runs),
        }
        for peer in PEERS:
            peer_runs = [s for s in samples if s.target == peer]
            row[f"vs_{peer}"] = paired_ratio(runs, peer_runs, "msgs_per_s")
            row[f"p99_vs_{peer}"] = paired_ratio(runs, peer_runs, "p99_ms")
        rows.append(row)
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    headers = [
        "target", "msgs/s", "p50 ms", "p99 ms", "max ms", "proxy CPU %", "CPU us/msg",
        "RSS MiB", "errors", "x direct", "x nginx", "x haproxy", "x uvloop", "p99 x direct",
    ]  # fmt: skip
    table = [
        [
            r["target"],
            fmt(r["msgs_per_s"], ",.0f"),
            fmt(r["p50_ms"], ".3f"),
            fmt(r["p99_ms"], ".3f"),
            fmt(r["max_ms"], ".2f"),
            fmt(r["cpu_pct"], ".0f"),
            fmt(r["cpu_us_per_msg"], ".1f"),
            fmt(r["rss_mib"], ".1f"),
            str(r["errors"]),
            fmt(r["vs_direct"], ".2f"),
            fmt(r["vs_nginx"], ".2f"),
            fmt(r["vs_haproxy"], ".2f"),
            fmt(r["vs_uvloop"], ".2f"),
            fmt(r["p99_vs_direct"], ".2f"),
        ]
        for r in rows
    ]
    print_rows(headers, table)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="WebSocket relay throughput and latency")
    p.add_argument("--clients", type=int, default=50, help="WebSocket clients (default 50)")
    p.add_argument("--duration", type=float, default=10, help="measured seconds per run")
    p.add_argument("--warmup", type=float, default=1, help="unmeasured seconds before each run")
    p.add_argument("--runs", type=int, default=3, help="interleaved runs (default 3)")
    p.add_argument("--size", type=int, default=32, help="message bytes, < 126 (default 32)")
    add_target_args(p, TARGETS)
    args = p.parse_args(argv)
    if args.clients < 1 or args.duration <= 0 or args.runs < 1 or not 0 < args.size < 126:
        p.error("--clients, --duration, --runs must be positive and 0 < --size < 126")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    install_signal_handlers()
    need_cpus(CLIENT_CPU, PROXY_CPU)
    ensure_tools(["nginx", "haproxy", "taskset"])
    nginx, haproxy = which("nginx"), which("haproxy")
    assert nginx is not None and haproxy is not None

    base = Path(tempfile.mkdtemp(prefix="bench_ws_"))
    servers = Servers()
    skipped: dict[str, str] = {}
    failed: dict[str, str] = {}
    try:
        echo = servers.add(helper_server(base, "echo", "ws-echo", CLIENT_CPU))
        echo.start()
        try:
            wait_http(echo, args.start_timeout, "/health")
        except TargetFailed as exc:
            raise BenchError(f"echo upstream did not start: {exc}") from exc
        log(f"echo upstream (aiohttp) ready on :{echo.port} (CPU {CLIENT_CPU})")

        def ready(s: Server) -> None:
            wait_http(s, args.start_timeout, "/health")
            try:
                run_async(ping_pong(s.port, 1, args.size, 0.0, 0.2))
            except (OSError, TimeoutError) as exc:
                raise s.fail(f"WebSocket through it failed: {exc}") from exc

        live: dict[str, Server] = {"direct": echo}
        factories = {
            "nginx": lambda: make_nginx_proxy(base, nginx, echo.port, websocket=True),
            "haproxy": lambda: make_haproxy(base, haproxy, echo.port),
            "uvloop": lambda: make_uvloop_floor(base, echo.port),
            "bgproxy": lambda: make_bgproxy(base, echo.port),
        }
        for name in args.targets:
            if name != "direct":
                srv = servers.add(factories[name]())
                if start_or_skip(srv, ready, skipped, str(PROXY_CPU)):
                    live[name] = srv
        targets = [t for t in args.targets if t in live]
        pin_self(CLIENT_CPU)
        log(
            f"{args.runs} runs x {len(targets)} targets x {args.warmup + args.duration:g}s, "
            f"{args.clients} clients"
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
                    s = measure(srv, run, t, args.clients, args.size, args.warmup, args.duration)
                except (OSError, TimeoutError) as exc:
                    failed[t] = f"clients could not connect: {exc}"
                    log(f"DROPPING {t}: {failed[t]}")
                    continue
                samples.append(s)
                log(
                    f"run {run}/{args.runs} {t:8} {s.msgs_per_s:9,.0f} msgs/s  "
                    f"p50 {s.p50_ms:.3f}  p99 {s.p99_ms:.3f} ms  proxy CPU {s.cpu_pct:.0f}%  "
                    f"errors {s.errors + s.failed_handshakes}"
                )
        rows = summarize(samples, targets)
        print()
        print(
            f"{args.clients} WebSocket clients ping-ponging {args.size}-byte text messages, "
            f"{args.runs} runs x {args.duration:g}s; medians, ratios paired per run; "
            f"clients + aiohttp echo upstream on CPU {CLIENT_CPU}, proxy on CPU {PROXY_CPU}"
        )
        print_table(rows)
        print()
        for r in rows:
            if r["target"] == "bgproxy" and r["vs_direct"] is not None:
                verdict = "PASS" if r["vs_direct"] >= 0.9 else "FAIL"
                print(
                    f"bgproxy/direct msgs/s {r['vs_direct']:.2f}x, p99 "
                    f"{r['p99_vs_direct']:.2f}x direct (target: >= 0.9x msgs/s): {verdict}"
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
                        "clients": args.clients,
                        "duration_s": args.duration,
                        "warmup_s": args.warmup,
                        "runs": args.runs,
                        "size": args.size,
                        "targets": targets,
                        "client_cpu": CLIENT_CPU,
                        "proxy_cpu": PROXY_CPU,
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
        with contextlib.suppress(Exception):
            servers.stop_all()
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    run_main(main)
