#!/usr/bin/env python3
"""Two cores, two processes: ``bgproxy serve --workers 2`` vs nginx with 2 workers.

One command starts everything it needs, runs ``wrk -t2`` against each target,
prints a table and cleans up:

    python benchmarks/bench_workers.py [--runs 3] [--duration 10] [--connections 100]
        [--only small,64k] [--modes keepalive,close]
        [--targets direct,nginx,haproxy,bgproxy] [--upstream-workers 2] [--json out.json]

Nothing is pinned: the upstream nginx, wrk (2 threads) and the proxy under test
all share both CPUs, as they would on a real 2-core host. The proxies are
nginx (``worker_processes 2``), HAProxy (``nbthread 2``) and bgproxy
(``--workers 2``); ``bgproxy1`` (one process, unpinned) can be added to show the
scaling. The runs, medians and paired ratios are those of bench_http.py, whose
code this command reuses.

If ``bgproxy serve`` has no ``--workers`` option, or it does not start or serve
with it, the script says so in its output and JSON and still measures the others.
It also reports how the CPU time spread over bgproxy's processes, which shows
whether both workers really served.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import tempfile
from pathlib import Path
from typing import Any

from _common import (
    BODIES,
    BenchError,
    Server,
    Servers,
    TargetFailed,
    add_target_args,
    bgproxy_workers_flag,
    ensure_tools,
    env_info,
    http_get,
    install_signal_handlers,
    log,
    make_bgproxy,
    make_haproxy,
    make_nginx_proxy,
    make_upstream,
    parse_list,
    pid_cpu_seconds,
    process_tree,
    run_main,
    start_or_skip,
    tool_version,
    wait_ready,
    which,
    write_json,
)
from bench_http import MODES, print_notes, print_summary, print_table, raw_samples, run_matrix
from bench_http import summarize as summarize_http

TARGETS = ("direct", "nginx", "haproxy", "bgproxy", "bgproxy1")
PEERS = ("direct", "nginx", "haproxy")
WORKERS = 2


def check_workers(srv: Server, port: int) -> str | None:
    """None when bgproxy runs >= 2 child processes and answers new connections; else why not."""
    kids = [p for p in process_tree(srv.pid) if p != srv.pid]
    if len(kids) < WORKERS:
        return f"only {len(kids)} child process(es) under the supervisor (want {WORKERS} workers)"
    for i in range(40):  # new connections: SO_REUSEPORT spreads them over the workers
        try:
            status, _ = http_get(port, "/small", timeout=2.0)
        except OSError as exc:
            return f"GET /small on a new connection #{i} failed: {exc}"
        if status != 200:
            return f"GET /small on a new connection #{i} -> {status}"
    return None


def cpu_split(pids: list[int], before: dict[int, float]) -> dict[int, float]:
    return {p: pid_cpu_seconds(p) - before.get(p, 0.0) for p in pids}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="bgproxy --workers 2 vs nginx (2 workers) vs haproxy (2 threads), unpinned",
    )
    p.add_argument("--runs", type=int, default=3, help="interleaved runs per case (default 3)")
    p.add_argument("--duration", type=int, default=10, help="seconds per wrk run (default 10)")
    p.add_argument("--connections", type=int, default=100, help="wrk connections (default 100)")
    p.add_argument("--threads", type=int, default=2, help="wrk threads (default 2)")
    p.add_argument(
        "--warmup", type=int, default=1, help="seconds of warm-up per target per case (0=off)"
    )
    p.add_argument(
        "--upstream-workers", type=int, default=2, help="upstream nginx worker_processes"
    )
    p.add_argument(
        "--only", type=lambda v: parse_list(v, list(BODIES), "--only"), default=list(BODIES),
        help="bodies: small,64k",
    )  # fmt: skip
    p.add_argument(
        "--modes", type=lambda v: parse_list(v, MODES, "--modes"), default=["keepalive"],
        help="modes: keepalive,close (default keepalive)",
    )  # fmt: skip
    add_target_args(
        p, TARGETS, start_timeout=30, default=["direct", "nginx", "haproxy", "bgproxy"]
    )
    args = p.parse_args(argv)
    if args.runs < 1 or args.duration <= 0 or args.connections < 1 or args.threads < 1:
        p.error("--runs, --duration, --connections and --threads must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    install_signal_handlers()
    ensure_tools()
    nginx, haproxy = which("nginx"), which("haproxy")
    assert nginx is not None and haproxy is not None

    base = Path(tempfile.mkdtemp(prefix="bench_workers_"))
    servers = Servers()
    skipped: dict[str, str] = {}
    workers_status: dict[str, Any] = {"requested": WORKERS}
    try:
        upstream = servers.add(make_upstream(base, nginx, cpu=None, workers=args.upstream_workers))
        upstream.start()
        try:
            wait_ready(upstream, args.start_timeout)
        except TargetFailed as exc:
            raise BenchError(f"upstream did not start: {exc}") from exc
        log(f"upstream nginx ready on :{upstream.port} ({args.upstream_workers} workers, unpinned)")

        def ready(s: Server) -> None:
            wait_ready(s, args.start_timeout)

        live: dict[str, Server] = {"direct": upstream}
        for name in args.targets:
            if name == "direct":
                continue
            if name == "nginx":
                srv = make_nginx_proxy(base, nginx, upstream.port, cpu=None, workers=WORKERS)
            elif name == "haproxy":
                srv = make_haproxy(base, haproxy, upstream.port, cpu=None, threads=WORKERS)
            elif name == "bgproxy1":
                srv = make_bgproxy(base, upstream.port, cpu=None, workers=1, name="bgproxy1")
            else:
                if not bgproxy_workers_flag():
                    why = "`bgproxy serve --help` has no --workers option (not implemented yet)"
                    skipped["bgproxy"] = why
                    workers_status["available"] = False
                    workers_status["reason"] = why
                    log(f"SKIPPING bgproxy: {why}")
                    continue
                srv = make_bgproxy(base, upstream.port, cpu=None, workers=WORKERS)
            servers.add(srv)
            if not start_or_skip(srv, ready, skipped, "unpinned"):
                if name == "bgproxy":
                    workers_status["available"] = False
                    workers_status["reason"] = (
                        "bgproxy --workers 2 did not start or serve: "
                        + skipped["bgproxy"].splitlines()[0]
                    )
                continue
            if name == "bgproxy":
                broken = check_workers(srv, srv.port)
                if broken is not None:
                    skipped["bgproxy"] = f"--workers {WORKERS} does not work: {broken}"
                    workers_status.update(available=False, reason=skipped["bgproxy"])
                    log(f"SKIPPING bgproxy: {skipped['bgproxy']}")
                    srv.stop()
                    continue
                workers_status["available"] = True
            live[name] = srv
        targets = [t for t in args.targets if t in live]
        if not targets:
            raise BenchError("no target started")

        bg_pids: list[int] = []
        bg_before: dict[int, float] = {}
        if "bgproxy" in live:
            bg_pids = process_tree(live["bgproxy"].pid)
            bg_before = {p: pid_cpu_seconds(p) for p in bg_pids}

        m = run_matrix(
            live, targets, args.only, args.modes, args.runs, args.duration,
            args.connections, args.warmup, threads=args.threads, cpu=None,
        )  # fmt: skip
        if bg_pids:
            split = cpu_split(bg_pids, bg_before)
            total = sum(split.values()) or 1.0
            sup = live["bgproxy"].pid
            workers_status["cpu_seconds_by_pid"] = {
                ("supervisor " if p == sup else "worker ") + str(p): round(v, 2)
                for p, v in split.items()
            }
            busy = [p for p, v in split.items() if p != sup and v / total > 0.1]
            workers_status["workers_serving"] = len(busy)

        rows = summarize_http(m.samples, args.only, args.modes, targets, PEERS)
        print()
        print(
            f"runs={args.runs} duration={args.duration:g}s connections={args.connections} "
            f"wrk threads={args.threads}; nothing pinned (2 CPUs shared by wrk, upstream "
            f"nginx ({args.upstream_workers} workers) and the proxy); medians, ratios paired "
            "per run"
        )
        print_table(rows, PEERS)
        print()
        print_summary(rows)
        if workers_status.get("available"):
            split_txt = ", ".join(
                f"{k} {v:.1f}s" for k, v in workers_status["cpu_seconds_by_pid"].items()
            )
            print(
                f"bgproxy --workers {WORKERS}: {workers_status['workers_serving']} worker "
                f"processes did >10% of the work each (CPU: {split_txt})"
            )
        elif "bgproxy" in args.targets:
            print(
                f"bgproxy --workers {WORKERS}: NOT MEASURED - "
                f"{workers_status.get('reason', 'unknown')}"
            )
        print_notes({k: v for k, v in skipped.items() if k != "bgproxy"}, m)

        if args.json:
            write_json(
                args.json,
                {
                    "params": {
                        "runs": args.runs,
                        "duration_s": args.duration,
                        "connections": args.connections,
                        "wrk_threads": args.threads,
                        "warmup_s": args.warmup,
                        "upstream_workers": args.upstream_workers,
                        "bodies": args.only,
                        "modes": args.modes,
                        "targets": targets,
                        "pinned": False,
                    },
                    "env": env_info(
                        nginx=tool_version([nginx, "-v"]),
                        haproxy=tool_version([haproxy, "-v"]),
                        wrk=tool_version(["wrk", "-v"]),
                    ),
                    "bgproxy_workers": workers_status,
                    "skipped": skipped,
                    "failed": m.failed,
                    "wrk_failures": m.wrk_failures,
                    "summary": rows,
                    "raw": raw_samples(m.samples),
                },
            )
        return 0
    finally:
        with contextlib.suppress(Exception):
            servers.stop_all()
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    run_main(main)
