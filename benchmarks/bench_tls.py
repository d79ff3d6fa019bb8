#!/usr/bin/env python3
"""HTTPS throughput benchmark: bgproxy's TLS listener vs nginx vs HAProxy vs uvloop's TLS.

One command starts everything it needs, runs wrk over https against each target,
prints a table and cleans up:

    python benchmarks/bench_tls.py [--runs 5] [--duration 10] [--connections 50]
        [--cases small-keepalive,64k-keepalive,small-close]
        [--targets nginx,haproxy,uvloop,bgproxy] [--json out.json]

Every target terminates TLS with the same ECDSA P-256 certificate (generated at
start) and offers the same suites (``TLS_CIPHERS``: bgproxy's TLS 1.2 list, OpenSSL's
TLS 1.3 defaults) and relays plain HTTP to the same upstream nginx:

- ``nginx``: 1 worker, ``ssl_session_cache shared:SSL:10m``, tickets on;
- ``haproxy``: 1 thread, its session cache and tickets (on by default);
- ``uvloop``: the bare relay of bench_http.py (``serve_uvloop_floor``) on uvloop's
  TLS, with the server context bgproxy builds: what any uvloop proxy pays for TLS
  before doing any work of its own;
- ``bgproxy``: 1 process, its ``tls.listen`` listener (OpenSSL on the socket,
  proxy/tlsfd.py);
- ``fdtls`` (only when named in ``--targets``): the bare relay with OpenSSL reading and
  writing the socket itself, no memory BIOs (``_fdtls.py``, the prototype of bgproxy's
  transport): the floor for bgproxy's TLS as ``uvloop`` is for uvloop's.

Cases: ``small-keepalive`` and ``64k-keepalive`` (13 B and 64 KiB bodies, keep-alive),
``small-close`` (``Connection: close``: a TLS handshake per request, TLS 1.3). What the
handshake is depends on the client: wrk keeps the session of its last connection
(``SSL_clear``), so its new connections resume it where the server allows (all four
do: the table's header says what each negotiated).

Layout and method are bench_http.py's (whose run loop and table this reuses): upstream
nginx and wrk share CPU 0, each proxy runs alone on CPU 1, targets are interleaved run
by run, ratios are paired per run and the medians are shown.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
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
    install_signal_handlers,
    log,
    make_bgproxy,
    make_haproxy,
    make_nginx_proxy,
    make_upstream,
    make_uvloop_floor,
    need_cpus,
    parse_list,
    run_main,
    self_signed,
    start_or_skip,
    tls_session,
    tool_version,
    wait_ready,
    which,
    write_json,
)
from bench_http import RunSample, print_notes, print_table, raw_samples, run_matrix, summarize

CASES: dict[str, tuple[str, str]] = {
    "small-keepalive": ("small", "keepalive"),
    "64k-keepalive": ("64k", "keepalive"),
    "small-close": ("small", "close"),
    "64k-close": ("64k", "close"),
}
DEFAULT_CASES = ("small-keepalive", "64k-keepalive", "small-close")
TARGETS = ("nginx", "haproxy", "uvloop", "bgproxy")
EXTRA_TARGETS = ("fdtls",)
PEERS = ("nginx", "haproxy", "uvloop")


def print_summary(rows: list[dict[str, Any]]) -> None:
    """bgproxy and the floor against nginx, and bgproxy against the floor."""
    for r in rows:
        if r["target"] not in ("bgproxy", "uvloop", "fdtls"):
            continue
        peers = ("nginx", "uvloop") if r["target"] != "uvloop" else ("nginx",)
        parts = [
            f"{r['target']}/{peer} {r['body']} {r['mode']}: {r[f'vs_{peer}']:.2f}{TIMES}"
            f" (p99 {r[f'p99_vs_{peer}']:.2f}{TIMES})"
            for peer in peers
            if r.get(f"vs_{peer}") is not None and r.get(f"p99_vs_{peer}") is not None
        ]
        if parts:
            print(" | ".join(parts))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="HTTPS throughput benchmark: bgproxy vs nginx vs haproxy vs uvloop TLS"
    )
    p.add_argument("--runs", type=int, default=5, help="interleaved runs per case (default 5)")
    p.add_argument("--duration", type=int, default=10, help="seconds per wrk run (default 10)")
    p.add_argument("--connections", type=int, default=50, help="wrk connections (default 50)")
    p.add_argument(
        "--warmup", type=int, default=1, help="seconds of warm-up per target per case (0=off)"
    )
    p.add_argument(
        "--cases", type=lambda v: parse_list(v, list(CASES), "--cases"),
        default=list(DEFAULT_CASES), help=f"cases: {','.join(CASES)}",
    )  # fmt: skip
    add_target_args(p, TARGETS + EXTRA_TARGETS, default=TARGETS)
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

    base = Path(tempfile.mkdtemp(prefix="bench_tls_"))
    servers = Servers()
    skipped: dict[str, str] = {}
    try:
        files = self_signed(base)
        upstream = servers.add(make_upstream(base, nginx))
        upstream.start()
        try:
            wait_ready(upstream, args.start_timeout)
        except TargetFailed as exc:
            raise BenchError(f"upstream did not start: {exc}") from exc
        log(f"upstream nginx ready on :{upstream.port} (pid {upstream.pid}, CPU {CLIENT_CPU})")

        factories = {
            "nginx": lambda: make_nginx_proxy(base, nginx, upstream.port, tls=files),
            "haproxy": lambda: make_haproxy(base, haproxy, upstream.port, tls=files),
            "uvloop": lambda: make_uvloop_floor(base, upstream.port, tls=files),
            "bgproxy": lambda: make_bgproxy(base, upstream.port, tls=files),
            "fdtls": lambda: make_uvloop_floor(
                base, upstream.port, tls=files, kind="fdtls-floor", name="fdtls"
            ),
        }
        live: dict[str, Server] = {}
        sessions: dict[str, str] = {}
        for name in args.targets:
            srv = servers.add(factories[name]())
            if start_or_skip(
                srv, lambda s: wait_ready(s, args.start_timeout), skipped, str(PROXY_CPU)
            ):
                live[name] = srv
                sessions[name] = tls_session(srv.port)
                log(f"{name}: {sessions[name]}")
        targets = [t for t in args.targets if t in live]
        if not targets:
            raise BenchError("no target started")

        # bench_http's loop runs bodies x modes; the cases are chosen pairs of them.
        samples: dict[tuple[str, str, str], list[RunSample]] = {}
        notes = []
        for case in args.cases:
            body, mode = CASES[case]
            m = run_matrix(
                live, targets, [body], [mode], args.runs, args.duration,
                args.connections, args.warmup,
            )  # fmt: skip
            samples.update(m.samples)
            notes.append(m)
        bodies = [b for b in BODIES if any(CASES[c][0] == b for c in args.cases)]
        modes = [md for md in ("keepalive", "close") if any(CASES[c][1] == md for c in args.cases)]
        rows = summarize(samples, bodies, modes, targets, PEERS)
        print()
        print(
            f"https, runs={args.runs} duration={args.duration:g}s "
            f"connections={args.connections} (medians; ratios paired per run; upstream+wrk "
            f"on CPU {CLIENT_CPU}, proxy on CPU {PROXY_CPU}); ECDSA P-256 certificate"
        )
        print("negotiated: " + "; ".join(f"{t} {sessions[t]}" for t in targets))
        print_table(rows, PEERS)
        print()
        print_summary(rows)
        for m in notes:
            print_notes(skipped, m)
            skipped = {}

        if args.json:
            doc = {
                "params": {
                    "runs": args.runs,
                    "duration_s": args.duration,
                    "connections": args.connections,
                    "warmup_s": args.warmup,
                    "cases": args.cases,
                    "targets": targets,
                    "client_cpu": CLIENT_CPU,
                    "proxy_cpu": PROXY_CPU,
                },
                "env": env_info(
                    nginx=tool_version([nginx, "-v"]),
                    haproxy=tool_version([haproxy, "-v"]),
                    wrk=tool_version(["wrk", "-v"]),
                    bgproxy_cmd=live["bgproxy"].cmd if "bgproxy" in live else None,
                    negotiated=sessions,
                ),
                "skipped": skipped,
                "summary": rows,
                "raw": raw_samples(samples),
            }
            write_json(args.json, doc)
        return 0
    finally:
        servers.stop_all()
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    run_main(main)
