#!/usr/bin/env python3
"""HTTP throughput benchmark: bgproxy vs nginx vs HAProxy vs a bare uvloop relay vs direct.

One command starts everything it needs, runs wrk against each target,
prints a table and cleans up:

    python benchmarks/bench_http.py [--runs 5] [--duration 10] [--connections 50]
        [--only small,64k] [--modes keepalive,close]
        [--targets direct,nginx,haproxy,uvloop,bgproxy] [--json out.json]

``uvloop`` is the floor for a proxy built on uvloop (``serve_uvloop_floor`` in
_common.py): pooled upstream connections and one callback per read, no proxy
logic at all. bgproxy against it is the cost of bgproxy's own work; uvloop against
nginx is what the event loop costs before any of it.

Layout (2 cores): the upstream nginx and the wrk client share CPU 0, every
proxy under test runs alone on CPU 1, so each proxy gets one whole core.
Targets are interleaved round-robin within each run so that machine noise
hits all of them alike; ratios are computed per run (paired) and then the
median is taken.  See benchmarks/README.md for the meaning of the columns.

Runs as root on Debian; installs nginx-light, haproxy, wrk with apt-get if
they are missing.  Python stdlib only.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from _common import (
    BODIES,
    CLIENT_CPU,
    PROXY_CPU,
    TIMES,
    BenchError,
    Server,
    Servers,
    TargetFailed,
    add_target_args,
    ensure_tools,
    env_info,
    fmt,
    install_signal_handlers,
    log,
    make_bgproxy,
    make_haproxy,
    make_nginx_proxy,
    make_upstream,
    make_uvloop_floor,
    median_or_none,
    need_cpus,
    paired_ratio,
    parse_list,
    print_rows,
    run_main,
    run_wrk,
    start_or_skip,
    tool_version,
    tree_cpu_seconds,
    tree_rss_bytes,
    wait_ready,
    which,
    write_json,
)

MODES = ("keepalive", "close")
TARGETS = ("direct", "nginx", "haproxy", "uvloop", "bgproxy")
# The access log's cost: each proxy writing a JSON (or combined) log to a file, set
# beside the same proxy without one (issue 18; not run unless named in --targets).
LOG_TARGETS = ("nginx-log", "bgproxy-json", "bgproxy-combined")
LOG_BASE = {"nginx-log": "nginx", "bgproxy-json": "bgproxy", "bgproxy-combined": "bgproxy"}
PEERS = ("direct", "nginx", "haproxy", "uvloop")  # baselines that ratios are computed against


# -------------------------------------------------------------------- results


@dataclass
class RunSample:
    run: int
    rps: float
    requests: int
    p50_ms: float
    p99_ms: float
    errors: int
    error_detail: dict[str, int]
    cpu_seconds: float
    cpu_us_per_req: float | None
    rss_bytes: int
    percentiles_ms: dict[str, float]


def measure(
    srv: Server,
    run: int,
    path: str,
    mode: str,
    duration: int,
    conns: int,
    threads: int = 1,
    cpu: int | None = CLIENT_CPU,
) -> RunSample:
    """One wrk run against srv, with the CPU time and RSS of srv's process tree."""
    cpu0 = tree_cpu_seconds(srv.pid)
    res = run_wrk(srv.port, path, mode, duration, conns, threads, cpu, srv.scheme)
    cpu_s = tree_cpu_seconds(srv.pid) - cpu0
    return RunSample(
        run=run,
        rps=res.rps,
        requests=res.requests,
        p50_ms=res.p50_ms,
        p99_ms=res.p99_ms,
        errors=res.errors,
        error_detail={
            "non_2xx_3xx": res.non_2xx_3xx,
            "connect": res.sock_connect,
            "read": res.sock_read,
            "write": res.sock_write,
            "timeout": res.sock_timeout,
        },
        cpu_seconds=cpu_s,
        cpu_us_per_req=cpu_s / res.requests * 1e6 if res.requests else None,
        rss_bytes=tree_rss_bytes(srv.pid),
        percentiles_ms=res.percentiles_ms,
    )


def summarize(
    samples: dict[tuple[str, str, str], list[RunSample]],
    bodies: list[str],
    modes: list[str],
    targets: list[str],
    peers: tuple[str, ...] = PEERS,
) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for body in bodies:
        for mode in modes:
            for target in targets:
                runs = samples.get((body, mode, target), [])
                if not runs:
                    continue
                row: dict[str, Any] = {
                    "body": body,
                    "mode": mode,
                    "target": target,
                    "runs": len(runs),
                    "rps": median_or_none([r.rps for r in runs]),
                    "p50_ms": median_or_none([r.p50_ms for r in runs]),
                    "p99_ms": median_or_none([r.p99_ms for r in runs]),
                    "cpu_us_per_req": median_or_none(
                        [r.cpu_us_per_req for r in runs if r.cpu_us_per_req is not None]
                    ),
                    "rss_mib": max(r.rss_bytes for r in runs) / 2**20,
                    "errors": sum(r.errors for r in runs),
                }
                for peer in peers:
                    peer_runs = samples.get((body, mode, peer), [])
                    row[f"vs_{peer}"] = paired_ratio(runs, peer_runs, "rps")
                    row[f"p99_vs_{peer}"] = paired_ratio(runs, peer_runs, "p99_ms")
                rows.append(row)
    return rows


def print_table(rows: list[dict[str, Any]], peers: tuple[str, ...] = PEERS) -> None:
    headers = [
        "body", "mode", "target", "req/s", "p50 ms", "p99 ms",
        "CPU us/req", "RSS MiB", "errors", *[f"x {p}" for p in peers],
    ]  # fmt: skip
    table = [
        [
            r["body"],
            r["mode"],
            r["target"],
            fmt(r["rps"], ",.0f"),
            fmt(r["p50_ms"], ".3f"),
            fmt(r["p99_ms"], ".3f"),
            fmt(r["cpu_us_per_req"], ".1f"),
            fmt(r["rss_mib"], ".1f"),
            str(r["errors"]),
            *[fmt(r[f"vs_{p}"], ".2f") for p in peers],
        ]
        for r in rows
    ]
    print_rows(headers, table, left=3)


def print_summary(rows: list[dict[str, Any]]) -> None:
    for r in rows:
        if r["target"] != "bgproxy":
            continue
        parts = [
            f"bgproxy/{peer} {r['body']} {r['mode']}: {r[f'vs_{peer}']:.2f}{TIMES}"
            f" (p99 {r[f'p99_vs_{peer}']:.2f}{TIMES})"
            for peer in ("nginx", "haproxy", "uvloop", "direct")
            if r.get(f"vs_{peer}") is not None and r.get(f"p99_vs_{peer}") is not None
        ]
        if parts:
            print(" | ".join(parts))


def logged_bgproxy(base: Path, up_port: int, fmt_: str) -> Server:
    """bgproxy writing its access log in ``fmt_`` to a file."""
    log_file = base / f"bgproxy-{fmt_}.log"
    extra = f'access_log: {{ destination: "{log_file}", format: {fmt_} }}\n'
    return make_bgproxy(base, up_port, name=f"bgproxy-{fmt_}", extra_yaml=extra)


def print_log_cost(
    samples: dict[tuple[str, str, str], list[RunSample]],
    bodies: list[str],
    modes: list[str],
    targets: list[str],
) -> None:
    """Throughput with an access log over throughput without, per proxy (paired runs)."""
    for body in bodies:
        for mode in modes:
            parts = []
            for target in LOG_TARGETS:
                base = LOG_BASE[target]
                if target in targets and base in targets:
                    ratio = paired_ratio(
                        samples.get((body, mode, target), []),
                        samples.get((body, mode, base), []),
                        "rps",
                    )
                    if ratio is not None:
                        parts.append(f"{target}/{base} {ratio:.3f}{TIMES}")
            if parts:
                print(f"access log cost, {body} {mode}: " + " | ".join(parts))


# ----------------------------------------------------------------------- runs


@dataclass
class Matrix:
    """Everything one interleaved series of wrk runs produced."""

    samples: dict[tuple[str, str, str], list[RunSample]]
    failed: dict[str, str]  # target -> why it was dropped mid-benchmark
    wrk_failures: list[str]


def run_matrix(
    live: dict[str, Server],
    targets: list[str],
    bodies: list[str],
    modes: list[str],
    runs: int,
    duration: int,
    connections: int,
    warmup: int,
    threads: int = 1,
    cpu: int | None = CLIENT_CPU,
) -> Matrix:
    """wrk against every target, interleaved run by run, for each (body, mode).

    ``live["direct"]`` dying is fatal; a proxy that dies is dropped and noted."""
    m = Matrix({}, {}, [])
    total = len(bodies) * len(modes) * runs * len(targets)
    eta = total * duration + len(bodies) * len(modes) * len(targets) * warmup
    log(f"{total} wrk runs, ~{eta / 60:.1f} min")
    for body in bodies:
        path = BODIES[body][0]
        for mode in modes:
            if warmup > 0:
                for t in targets:
                    if t not in m.failed:
                        with contextlib.suppress(RuntimeError, ValueError, OSError):
                            w = live[t]
                            run_wrk(w.port, path, mode, warmup, connections, threads, cpu, w.scheme)
            for run in range(1, runs + 1):
                for t in targets:
                    if t in m.failed:
                        continue
                    srv = live[t]
                    if not srv.alive():
                        why = srv.fail("died during the benchmark").args[0]
                        if t == "direct":
                            raise BenchError(why)
                        m.failed[t] = why
                        log(f"DROPPING {t}: {why}")
                        continue
                    try:
                        sample = measure(srv, run, path, mode, duration, connections, threads, cpu)
                    except (RuntimeError, ValueError, OSError) as exc:
                        note = f"run {run} {body} {mode} {t}: wrk failed: {exc}"
                        m.wrk_failures.append(note)
                        log(note)
                        continue
                    m.samples.setdefault((body, mode, t), []).append(sample)
                    log(
                        f"run {run}/{runs} {body:5} {mode:9} {t:8} "
                        f"{sample.rps:>10,.0f} req/s  p50 {sample.p50_ms:.3f} ms  "
                        f"p99 {sample.p99_ms:.3f} ms  cpu {sample.cpu_seconds:.2f}s  "
                        f"errors {sample.errors}"
                    )
    return m


def raw_samples(samples: dict[tuple[str, str, str], list[RunSample]]) -> list[dict[str, Any]]:
    return [
        {"body": b, "mode": m, "target": t, **asdict(s)}
        for (b, m, t), runs in samples.items()
        for s in runs
    ]


def print_notes(skipped: dict[str, str], m: Matrix) -> None:
    for name, why in skipped.items():
        print(f"skipped {name}: {why.splitlines()[0]}")
    for name, why in m.failed.items():
        print(f"dropped {name} mid-benchmark: {why.splitlines()[0]}")
    for note in m.wrk_failures:
        print(note.splitlines()[0])


# ----------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="HTTP throughput benchmark: bgproxy vs nginx vs haproxy vs direct",
    )
    p.add_argument("--runs", type=int, default=5, help="interleaved runs per case (default 5)")
    p.add_argument("--duration", type=int, default=10, help="seconds per wrk run (default 10)")
    p.add_argument("--connections", type=int, default=50, help="wrk connections (default 50)")
    p.add_argument(
        "--warmup", type=int, default=1, help="seconds of warm-up per target per case (0=off)"
    )
    p.add_argument(
        "--only", type=lambda v: parse_list(v, list(BODIES), "--only"), default=list(BODIES),
        help="bodies: small,64k",
    )  # fmt: skip
    p.add_argument(
        "--modes", type=lambda v: parse_list(v, MODES, "--modes"), default=list(MODES),
        help="modes: keepalive,close",
    )  # fmt: skip
    add_target_args(p, TARGETS + LOG_TARGETS, default=TARGETS)
    args = p.parse_args(argv)
    if args.runs < 1 or args.duration <= 0 or args.connections < 1:
        p.error("--runs, --duration and --connections must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    install_signal_handlers()
    need_cpus(CLIENT_CPU, PROXY_CPU)
    ensure_tools()
    nginx, haproxy = which("nginx"), which("haproxy")
    assert nginx is not None and haproxy is not None

    base = Path(tempfile.mkdtemp(prefix="bench_http_"))
    servers = Servers()
    skipped: dict[str, str] = {}  # did not start
    try:
        upstream = servers.add(make_upstream(base, nginx))
        upstream.start()
        try:
            wait_ready(upstream, args.start_timeout)
        except TargetFailed as exc:
            raise BenchError(f"upstream did not start: {exc}") from exc
        log(f"upstream nginx ready on :{upstream.port} (pid {upstream.pid}, CPU {CLIENT_CPU})")

        live: dict[str, Server] = {"direct": upstream}
        factories = {
            "nginx": lambda: make_nginx_proxy(base, nginx, upstream.port),
            "haproxy": lambda: make_haproxy(base, haproxy, upstream.port),
            "uvloop": lambda: make_uvloop_floor(base, upstream.port),
            "bgproxy": lambda: make_bgproxy(base, upstream.port),
            "nginx-log": lambda: make_nginx_proxy(
                base, nginx, upstream.port, access_log=True, name="nginx-log"
            ),
            "bgproxy-json": lambda: logged_bgproxy(base, upstream.port, "json"),
            "bgproxy-combined": lambda: logged_bgproxy(base, upstream.port, "combined"),
        }
        for name in args.targets:
            if name == "direct":
                continue
            srv = servers.add(factories[name]())
            if start_or_skip(
                srv, lambda s: wait_ready(s, args.start_timeout), skipped, str(PROXY_CPU)
            ):
                live[name] = srv
        targets = [t for t in args.targets if t in live]
        if not targets:
            raise BenchError("no target started")

        m = run_matrix(
            live, targets, args.only, args.modes, args.runs, args.duration,
            args.connections, args.warmup,
        )  # fmt: skip
        rows = summarize(m.samples, args.only, args.modes, targets)
        print()
        print(
            f"runs={args.runs} duration={args.duration:g}s connections={args.connections} "
            f"(medians; ratios paired per run; upstream+wrk on CPU {CLIENT_CPU}, "
            f"proxy on CPU {PROXY_CPU})"
        )
        print_table(rows)
        print()
        print_summary(rows)
        print_log_cost(m.samples, args.only, args.modes, targets)
        print_notes(skipped, m)

        if args.json:
            doc = {
                "params": {
                    "runs": args.runs,
                    "duration_s": args.duration,
                    "connections": args.connections,
                    "warmup_s": args.warmup,
                    "bodies": args.only,
                    "modes": args.modes,
                    "targets": targets,
                    "client_cpu": CLIENT_CPU,
                    "proxy_cpu": PROXY_CPU,
                },
                "env": env_info(
                    nginx=tool_version([nginx, "-v"]),
                    haproxy=tool_version([haproxy, "-v"]),
                    wrk=tool_version(["wrk", "-v"]),
                    bgproxy_cmd=live["bgproxy"].cmd if "bgproxy" in live else None,
                ),
                "skipped": skipped,
                "failed": m.failed,
                "wrk_failures": m.wrk_failures,
                "summary": rows,
                "raw": raw_samples(m.samples),
            }
            write_json(args.json, doc)
        return 0
    finally:
        servers.stop_all()
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    run_main(main)
