#!/usr/bin/env python3
"""HTTP throughput benchmark: bgproxy vs nginx vs HAProxy vs direct.

One command starts everything it needs, runs wrk against each target,
prints a table and cleans up:

    python benchmarks/bench_http.py [--runs 5] [--duration 10] [--connections 50]
        [--only small,64k] [--modes keepalive,close]
        [--targets direct,nginx,haproxy,bgproxy] [--json out.json]

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
import http.client
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent

CLIENT_CPU = 0  # wrk + upstream nginx
PROXY_CPU = 1  # the proxy under test

SMALL_BODY = b"Hello, world!"  # 13 bytes
BIG_BODY_SIZE = 65536
TIMES = "\N{MULTIPLICATION SIGN}"

BODIES: dict[str, tuple[str, int]] = {
    # name -> (path, expected body length)
    "small": ("/small", len(SMALL_BODY)),
    "64k": ("/64k", BIG_BODY_SIZE),
}
MODES = ("keepalive", "close")
TARGETS = ("direct", "nginx", "haproxy", "bgproxy")
PEERS = ("direct", "nginx", "haproxy")  # baselines that ratios are computed against

# executable -> Debian package(s) to try, in order
TOOL_PACKAGES: dict[str, tuple[str, ...]] = {
    "nginx": ("nginx-light", "nginx"),
    "haproxy": ("haproxy",),
    "wrk": ("wrk",),
    "taskset": ("util-linux",),
}
SBIN_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

CLK_TCK = os.sysconf("SC_CLK_TCK")


class BenchError(RuntimeError):
    """A fatal, clearly explained setup failure."""


class TargetFailed(RuntimeError):
    """A target could not be started or does not serve correctly."""


# --------------------------------------------------------------------------- helpers


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def which(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path=SBIN_PATH)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no output)"
    out = "\n".join(text.rstrip().splitlines()[-lines:])
    return out or "(empty)"


def ensure_tools() -> None:
    """Install nginx / haproxy / wrk / taskset with apt-get if any is missing."""
    missing = [tool for tool in TOOL_PACKAGES if which(tool) is None]
    if not missing:
        return
    if os.geteuid() != 0 or which("apt-get") is None:
        raise BenchError(f"missing tools {missing} and cannot apt-get install them (need root)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    log(f"installing missing tools: {', '.join(missing)} (apt-get update once, then install)")
    subprocess.run(["apt-get", "update"], check=True, env=env)
    for tool in missing:
        for pkg in TOOL_PACKAGES[tool]:
            rc = subprocess.run(["apt-get", "install", "-y", pkg], env=env).returncode
            if rc == 0 and which(tool):
                break
        else:
            raise BenchError(f"could not install {tool} (tried {TOOL_PACKAGES[tool]})")


def tool_version(cmd: list[str]) -> str:
    try:
        cp = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    text = (cp.stdout + cp.stderr).strip()
    return text.splitlines()[0] if text else "unknown"


# ------------------------------------------------------------------ /proc accounting


def _read_stat(pid: int) -> tuple[int, int] | None:
    """Return (ppid, utime+stime+cutime+cstime in ticks) or None if gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # comm may contain spaces / parentheses: split after the last ')'
    fields = raw[raw.rfind(")") + 2 :].split()
    # fields[0] is state (field 3); utime is field 14 -> index 11
    ppid = int(fields[1])
    ticks = int(fields[11]) + int(fields[12]) + int(fields[13]) + int(fields[14])
    return ppid, ticks


def process_tree(root: int) -> list[int]:
    """root and all of its live descendants."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        st = _read_stat(int(entry))
        if st is not None:
            children.setdefault(st[0], []).append(int(entry))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


def tree_cpu_seconds(root: int) -> float:
    total = 0
    for pid in process_tree(root):
        st = _read_stat(pid)
        if st is not None:
            total += st[1]
    return total / CLK_TCK


def tree_rss_bytes(root: int) -> int:
    total = 0
    for pid in process_tree(root):
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        m = re.search(r"^VmRSS:\s+(\d+)\s+kB", status, re.MULTILINE)
        if m:
            total += int(m.group(1)) * 1024
    return total


# --------------------------------------------------------------------- servers


@dataclass
class Server:
    name: str
    cmd: list[str]
    port: int
    log_path: Path
    cwd: Path | None = None
    env: dict[str, str] | None = None
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log_path, "wb") as out:
            self.proc = subprocess.Popen(
                self.cmd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.cwd,
                env=self.env,
                start_new_session=True,  # own process group: clean kill, no stray SIGINT
            )

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if self.proc is None:
            return
        pgid = self.proc.pid  # == pid because of start_new_session
        for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, sig)
            try:
                self.proc.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
        # group members may outlive the leader by a moment (e.g. nginx workers)
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            try:
                os.killpg(pgid, 0)
            except (ProcessLookupError, PermissionError):
                break
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signal.SIGKILL)
            time.sleep(0.05)
        self.proc = None

    def fail(self, why: str) -> TargetFailed:
        return TargetFailed(
            f"{self.name}: {why}\n--- {self.name} output ---\n{tail(self.log_path)}"
        )


def http_get(port: int, path: str, timeout: float = 2.0) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def wait_ready(server: Server, timeout: float) -> None:
    """Poll until the server answers GET /small with 200 + the right body, then
    check /64k once.  Raises TargetFailed (with the server's output) otherwise."""
    deadline = time.monotonic() + timeout
    last_err = "no attempt"
    while True:
        if not server.alive():
            rc = server.proc.returncode if server.proc else None
            raise server.fail(f"exited during startup (exit code {rc})")
        try:
            status, body = http_get(server.port, "/small", timeout=1.0)
            if status == 200 and body == SMALL_BODY:
                break
            last_err = f"GET /small -> {status} {body[:80]!r}"
        except (OSError, http.client.HTTPException) as exc:
            last_err = f"GET /small -> {type(exc).__name__}: {exc}"
        if time.monotonic() > deadline:
            raise server.fail(f"not ready after {timeout:.0f}s (last: {last_err})")
        time.sleep(0.1)
    try:
        status, body = http_get(server.port, "/64k", timeout=5.0)
    except (OSError, http.client.HTTPException) as exc:
        raise server.fail(f"GET /64k failed: {exc}") from exc
    if status != 200 or len(body) != BIG_BODY_SIZE:
        raise server.fail(f"GET /64k -> {status}, {len(body)} bytes (want 200, {BIG_BODY_SIZE})")


def nginx_temp_paths(nginx: str, tmp: Path) -> str:
    """temp-path directives pointing into tmp, only for modules compiled in."""
    info = subprocess.run([nginx, "-V"], capture_output=True, text=True).stderr
    lines = [f"client_body_temp_path {tmp}/client_body;"]
    for mod in ("proxy", "fastcgi", "uwsgi", "scgi"):
        if f"--without-http_{mod}_module" not in info:
            lines.append(f"{mod}_temp_path {tmp}/{mod};")
    return "\n    ".join(lines)


def nginx_conf(tmp: Path, temp_paths: str, server_block: str, extra_http: str = "") -> str:
    user = "user root;" if os.geteuid() == 0 else ""  # workers must read files in tmp
    return f"""{user}
daemon off;
master_process on;
worker_processes 1;
worker_rlimit_nofile 65536;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
events {{
    worker_connections 16384;
    multi_accept on;
}}
http {{
    access_log off;
    server_tokens off;
    default_type application/octet-stream;
    sendfile on;
    tcp_nopush on;
    tcp_nodelay on;
    keepalive_requests 1000000000;
    keepalive_timeout 300s;
    {temp_paths}
    {extra_http}
    {server_block}
}}
"""


def make_upstream(base: Path, nginx: str, temp_paths_of: Callable[[Path], str]) -> Server:
    tmp = base / "upstream"
    (tmp / "www").mkdir(parents=True)
    (tmp / "www" / "64k").write_bytes(bytes(range(256)) * (BIG_BODY_SIZE // 256))
    port = free_port()
    server = f"""server {{
        listen 127.0.0.1:{port} reuseport backlog=4096;
        root {tmp}/www;
        location = /small {{
            default_type text/plain;
            return 200 "{SMALL_BODY.decode()}";
        }}
        location = /64k {{
            default_type application/octet-stream;
        }}
    }}"""
    conf = tmp / "nginx.conf"
    conf.write_text(nginx_conf(tmp, temp_paths_of(tmp), server))
    cmd = ["taskset", "-c", str(CLIENT_CPU), nginx, "-p", str(tmp), "-c", str(conf)]
    cmd += ["-e", str(tmp / "error.log")]
    return Server("upstream", cmd, port, tmp / "stdout.log")


def make_nginx_proxy(
    base: Path, nginx: str, temp_paths_of: Callable[[Path], str], up_port: int
) -> Server:
    tmp = base / "nginx-proxy"
    tmp.mkdir(parents=True)
    port = free_port()
    upstream = f"""upstream backend {{
        server 127.0.0.1:{up_port};
        keepalive 64;
        keepalive_requests 1000000000;
        keepalive_timeout 300s;
    }}"""
    server = f"""server {{
        listen 127.0.0.1:{port} reuseport backlog=4096;
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffer_size 8k;
            proxy_buffers 16 8k;
            proxy_max_temp_file_size 0;
        }}
    }}"""
    conf = tmp / "nginx.conf"
    conf.write_text(nginx_conf(tmp, temp_paths_of(tmp), server, upstream))
    cmd = ["taskset", "-c", str(PROXY_CPU), nginx, "-p", str(tmp), "-c", str(conf)]
    cmd += ["-e", str(tmp / "error.log")]
    return Server("nginx", cmd, port, tmp / "stdout.log")


def make_haproxy(base: Path, haproxy: str, up_port: int) -> Server:
    tmp = base / "haproxy"
    tmp.mkdir(parents=True)
    port = free_port()
    cfg = f"""global
    nbthread 1
    maxconn 8000

defaults
    mode http
    option http-keep-alive
    http-reuse always
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    timeout http-request 10s
    timeout http-keep-alive 60s

frontend fe
    bind 127.0.0.1:{port}
    default_backend be

backend be
    server up1 127.0.0.1:{up_port}
"""
    conf = tmp / "haproxy.cfg"
    conf.write_text(cfg)
    cmd = ["taskset", "-c", str(PROXY_CPU), haproxy, "-db", "-f", str(conf)]
    return Server("haproxy", cmd, port, tmp / "stdout.log")


def make_bgproxy(base: Path, up_port: int) -> Server:
    tmp = base / "bgproxy"
    tmp.mkdir(parents=True)
    port, admin_port = free_port(), free_port()
    target = f"http://127.0.0.1:{up_port}"
    cfg = (
        f'listen: "127.0.0.1:{port}"\n'
        f'admin: {{ listen: "127.0.0.1:{admin_port}" }}\n'
        "upstreams:\n"
        f'  blue: {{ targets: ["{target}"] }}\n'
        f'  green: {{ targets: ["{target}"] }}\n'
    )
    conf = tmp / "bgproxy.yaml"
    conf.write_text(cfg)
    env = {k: v for k, v in os.environ.items() if k != "BGPROXY_ADMIN_TOKEN"}
    exe = shutil.which("bgproxy")
    taskset = ["taskset", "-c", str(PROXY_CPU)]
    if exe:
        cmd = [*taskset, exe, "serve", "-c", str(conf)]
    else:
        log("bgproxy not on PATH; falling back to `python -m proxy -c FILE`")
        cmd = [*taskset, sys.executable, "-m", "proxy", "-c", str(conf)]
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return Server("bgproxy", cmd, port, tmp / "stdout.log", cwd=REPO_ROOT, env=env)


# ------------------------------------------------------------------------ wrk

_UNITS_MS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}


def _ms(value: str, unit: str) -> float:
    return float(value) * _UNITS_MS[unit]


@dataclass
class WrkResult:
    rps: float
    requests: int
    p50_ms: float
    p99_ms: float
    non_2xx_3xx: int = 0
    sock_connect: int = 0
    sock_read: int = 0
    sock_write: int = 0
    sock_timeout: int = 0
    percentiles_ms: dict[str, float] = field(default_factory=dict)

    @property
    def errors(self) -> int:
        return (
            self.non_2xx_3xx
            + self.sock_connect
            + self.sock_read
            + self.sock_write
            + self.sock_timeout
        )


def parse_wrk(out: str) -> WrkResult:
    pct = {
        m.group(1): _ms(m.group(2), m.group(3))
        for m in re.finditer(r"^\s*(\d+)%\s+([\d.]+)(us|ms|s|m|h)\s*$", out, re.MULTILINE)
    }
    rps = re.search(r"^Requests/sec:\s+([\d.]+)", out, re.MULTILINE)
    reqs = re.search(r"^\s*(\d+) requests in", out, re.MULTILINE)
    if rps is None or reqs is None or "50" not in pct or "99" not in pct:
        raise ValueError(f"cannot parse wrk output:\n{out}")
    res = WrkResult(
        rps=float(rps.group(1)),
        requests=int(reqs.group(1)),
        p50_ms=pct["50"],
        p99_ms=pct["99"],
        percentiles_ms=pct,
    )
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if sock:
        res.sock_connect, res.sock_read, res.sock_write, res.sock_timeout = map(int, sock.groups())
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    if non2xx:
        res.non_2xx_3xx = int(non2xx.group(1))
    return res


def run_wrk(port: int, path: str, mode: str, duration: int, connections: int) -> WrkResult:
    cmd = ["taskset", "-c", str(CLIENT_CPU), "wrk", "-t1", f"-c{connections}"]
    cmd += [f"-d{duration}s", "--latency"]
    if mode == "close":
        cmd += ["-H", "Connection: close"]
    cmd.append(f"http://127.0.0.1:{port}{path}")
    try:
        cp = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 60)
    except subprocess.TimeoutExpired as exc:
        raise RuntimeError(f"wrk did not finish within {duration + 60}s") from exc
    if cp.returncode != 0:
        raise RuntimeError(f"wrk failed ({cp.returncode}): {cp.stderr or cp.stdout}")
    return parse_wrk(cp.stdout)


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


def measure(srv: Server, run: int, path: str, mode: str, duration: int, conns: int) -> RunSample:
    """One wrk run against srv, with the CPU time and RSS of srv's process tree."""
    cpu0 = tree_cpu_seconds(srv.pid)
    res = run_wrk(srv.port, path, mode, duration, conns)
    cpu = tree_cpu_seconds(srv.pid) - cpu0
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
        cpu_seconds=cpu,
        cpu_us_per_req=cpu / res.requests * 1e6 if res.requests else None,
        rss_bytes=tree_rss_bytes(srv.pid),
        percentiles_ms=res.percentiles_ms,
    )


def median_or_none(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def summarize(
    samples: dict[tuple[str, str, str], list[RunSample]],
    bodies: list[str],
    modes: list[str],
    targets: list[str],
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
                for peer in PEERS:
                    base = {r.run: r.rps for r in samples.get((body, mode, peer), [])}
                    ratios = [r.rps / base[r.run] for r in runs if base.get(r.run)]
                    row[f"vs_{peer}"] = median_or_none(ratios)
                rows.append(row)
    return rows


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_table(rows: list[dict[str, Any]]) -> None:
    headers = [
        "body", "mode", "target", "req/s", "p50 ms", "p99 ms",
        "CPU us/req", "RSS MiB", "errors", "x direct", "x nginx", "x haproxy",
    ]  # fmt: skip
    table = [headers]
    for r in rows:
        table.append(
            [
                r["body"],
                r["mode"],
                r["target"],
                _fmt(r["rps"], ",.0f"),
                _fmt(r["p50_ms"], ".3f"),
                _fmt(r["p99_ms"], ".3f"),
                _fmt(r["cpu_us_per_req"], ".1f"),
                _fmt(r["rss_mib"], ".1f"),
                str(r["errors"]),
                _fmt(r["vs_direct"], ".2f"),
                _fmt(r["vs_nginx"], ".2f"),
                _fmt(r["vs_haproxy"], ".2f"),
            ]
        )
    widths = [max(len(row[i]) for row in table) for i in range(len(headers))]
    left = {0, 1, 2}
    for i, row in enumerate(table):
        cells = [
            c.ljust(w) if j in left else c.rjust(w)
            for j, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        print("  ".join(cells).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))


def print_summary(rows: list[dict[str, Any]]) -> None:
    for r in rows:
        if r["target"] != "bgproxy":
            continue
        parts = [
            f"bgproxy/{peer} {r['body']} {r['mode']}: {r[f'vs_{peer}']:.2f}{TIMES}"
            for peer in ("nginx", "haproxy", "direct")
            if r[f"vs_{peer}"] is not None
        ]
        if parts:
            print(" | ".join(parts))


# ----------------------------------------------------------------------- main


def parse_list(value: str, allowed: tuple[str, ...] | list[str], what: str) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in items if v not in allowed]
    if bad or not items:
        raise argparse.ArgumentTypeError(f"{what}: {bad or value!r} not in {list(allowed)}")
    return [a for a in allowed if a in items]  # canonical order


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
    p.add_argument(
        "--targets", type=lambda v: parse_list(v, TARGETS, "--targets"), default=list(TARGETS),
        help="targets: direct,nginx,haproxy,bgproxy",
    )  # fmt: skip
    p.add_argument(
        "--start-timeout", type=float, default=20, help="seconds to wait for each server"
    )
    p.add_argument("--json", type=Path, help="write all raw numbers to this file")
    args = p.parse_args(argv)
    if args.runs < 1 or args.duration <= 0 or args.connections < 1:
        p.error("--runs, --duration and --connections must be positive")
    return args


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if inherited as ignored
    signal.signal(signal.SIGTERM, _on_sigterm)
    if not {CLIENT_CPU, PROXY_CPU} <= os.sched_getaffinity(0):
        raise BenchError(f"need CPUs {CLIENT_CPU} and {PROXY_CPU}; have {os.sched_getaffinity(0)}")
    ensure_tools()
    nginx, haproxy = which("nginx"), which("haproxy")
    assert nginx is not None and haproxy is not None
    os.environ["PATH"] = os.environ.get("PATH", "") + os.pathsep + SBIN_PATH

    base = Path(tempfile.mkdtemp(prefix="bench_http_"))
    servers: list[Server] = []
    skipped: dict[str, str] = {}  # did not start
    failed: dict[str, str] = {}  # died mid-benchmark
    wrk_failures: list[str] = []
    try:

        def temp_paths_of(tmp: Path) -> str:
            return nginx_temp_paths(nginx, tmp)

        upstream = make_upstream(base, nginx, temp_paths_of)
        servers.append(upstream)
        upstream.start()
        try:
            wait_ready(upstream, args.start_timeout)
        except TargetFailed as exc:
            raise BenchError(f"upstream did not start: {exc}") from exc
        log(f"upstream nginx ready on :{upstream.port} (pid {upstream.pid}, CPU {CLIENT_CPU})")

        live: dict[str, Server] = {"direct": upstream}
        factories = {
            "nginx": lambda: make_nginx_proxy(base, nginx, temp_paths_of, upstream.port),
            "haproxy": lambda: make_haproxy(base, haproxy, upstream.port),
            "bgproxy": lambda: make_bgproxy(base, upstream.port),
        }
        for name in args.targets:
            if name == "direct":
                continue
            srv = factories[name]()
            servers.append(srv)
            try:
                srv.start()
                wait_ready(srv, args.start_timeout)
            except (TargetFailed, OSError) as exc:
                skipped[name] = str(exc)
                log(f"SKIPPING {name}: {exc}")
                srv.stop()
                continue
            live[name] = srv
            log(f"{name} ready on :{srv.port} (pid {srv.pid}, CPU {PROXY_CPU})")
        targets = [t for t in args.targets if t in live]
        if not targets:
            raise BenchError("no target started")

        samples: dict[tuple[str, str, str], list[RunSample]] = {}
        total = len(args.only) * len(args.modes) * args.runs * len(targets)
        eta = total * args.duration + len(args.only) * len(args.modes) * len(targets) * args.warmup
        log(f"{total} wrk runs, ~{eta / 60:.1f} min")
        for body in args.only:
            path = BODIES[body][0]
            for mode in args.modes:
                if args.warmup > 0:
                    for t in targets:
                        if t not in failed:
                            with contextlib.suppress(RuntimeError, ValueError, OSError):
                                run_wrk(live[t].port, path, mode, args.warmup, args.connections)
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
                            sample = measure(srv, run, path, mode, args.duration, args.connections)
                        except (RuntimeError, ValueError, OSError) as exc:
                            note = f"run {run} {body} {mode} {t}: wrk failed: {exc}"
                            wrk_failures.append(note)
                            log(note)
                            continue
                        samples.setdefault((body, mode, t), []).append(sample)
                        log(
                            f"run {run}/{args.runs} {body:5} {mode:9} {t:8} "
                            f"{sample.rps:>10,.0f} req/s  p50 {sample.p50_ms:.3f} ms  "
                            f"p99 {sample.p99_ms:.3f} ms  cpu {sample.cpu_seconds:.2f}s  "
                            f"errors {sample.errors}"
                        )

        rows = summarize(samples, args.only, args.modes, targets)
        print()
        print(
            f"runs={args.runs} duration={args.duration:g}s connections={args.connections} "
            f"(medians; ratios paired per run; upstream+wrk on CPU {CLIENT_CPU}, "
            f"proxy on CPU {PROXY_CPU})"
        )
        print_table(rows)
        print()
        print_summary(rows)
        for name, why in skipped.items():
            print(f"skipped {name}: {why.splitlines()[0]}")
        for name, why in failed.items():
            print(f"dropped {name} mid-benchmark: {why.splitlines()[0]}")
        for note in wrk_failures:
            print(note.splitlines()[0])

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
                "env": {
                    "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    "host": platform.node(),
                    "kernel": platform.release(),
                    "python": sys.version.split()[0],
                    "nginx": tool_version([nginx, "-v"]),
                    "haproxy": tool_version([haproxy, "-v"]),
                    "wrk": tool_version(["wrk", "-v"]),
                    "bgproxy_cmd": live["bgproxy"].cmd if "bgproxy" in live else None,
                },
                "skipped": skipped,
                "failed": failed,
                "wrk_failures": wrk_failures,
                "summary": rows,
                "raw": [
                    {"body": b, "mode": m, "target": t, **asdict(s)}
                    for (b, m, t), runs in samples.items()
                    for s in runs
                ],
            }
            args.json.write_text(json.dumps(doc, indent=2) + "\n")
            log(f"wrote {args.json}")
        return 0
    finally:
        for srv in reversed(servers):
            srv.stop()
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        log("interrupted; cleaned up")
        sys.exit(130)
    except BenchError as exc:
        log(f"error: {exc}")
        sys.exit(2)
