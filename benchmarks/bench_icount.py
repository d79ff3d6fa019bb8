#!/usr/bin/env python3
"""User-space instructions per proxied request, counted by callgrind.

Throughput on a shared 2-CPU machine moves 10-30 % from run to run; an instruction
count does not: callgrind counts what bgproxy's process executes (Python, the compiled
modules, uvloop, llhttp, libc), the same for the same code and inputs whatever else the
machine does. That makes it the number to compare two versions of the hot path by.

It starts an nginx upstream, then bgproxy under ``valgrind --tool=callgrind`` three times:
twice stopped right after it answers ``/status`` (start-up and shutdown alone; the lower
count is kept) and once after ``--requests`` small GETs over ``--connections`` connections,
kept alive or (``--mode close``) a new connection per request. The difference divided by
the requests is the cost per request. ``--build python`` measures the
pure-Python fallback (``BGPROXY_PURE_PYTHON=1``).

    python benchmarks/bench_icount.py                    # both builds, 10,000 requests
    python benchmarks/bench_icount.py --build compiled --requests 20000
    python benchmarks/bench_icount.py --mode close       # a new connection per request
    python benchmarks/bench_icount.py --tls              # over the HTTPS listener
    python benchmarks/bench_icount.py --tls --mode close --requests 1000   # handshakes
    python benchmarks/bench_icount.py --target uvloop --tls  # bench_http's bare relay
    python benchmarks/bench_icount.py --target fdtls         # ... on _fdtls.py's TLS
    python benchmarks/bench_icount.py --target nginx --tls   # nginx, as bench_tls runs it

``--target`` counts a peer instead of bgproxy: the bare uvloop relay of bench_http.py and
bench_tls.py (plain, or with ``--tls`` over uvloop's TLS; ``fdtls`` is always TLS, with
OpenSSL on the socket), or nginx with one worker (plain or ``--tls``), so that what the
event loop, the TLS layer and nginx cost can be set beside bgproxy's count.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.client
import os
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from _common import (
    REPO_ROOT,
    BenchError,
    Servers,
    ensure_tools,
    env_info,
    free_port,
    http_json,
    log,
    make_nginx_proxy,
    make_upstream,
    print_rows,
    self_signed,
    unverified_tls,
    wait_ready,
    which,
    write_json,
)

REQUEST = b"GET /small HTTP/1.1\r\nHost: bench\r\nUser-Agent: bench\r\nAccept: */*\r\n\r\n"
CLOSE_REQUEST = REQUEST[:-2] + b"Connection: close\r\n\r\n"


async def load(
    port: int,
    requests: int,
    connections: int,
    close: bool = False,
    tls: ssl.SSLContext | None = None,
) -> None:
    name = "bench" if tls else None

    async def keepalive(n: int) -> None:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=tls, server_hostname=name
        )
        for _ in range(n):
            writer.write(REQUEST)
            head = await reader.readuntil(b"\r\n\r\n")
            i = head.lower().index(b"content-length:")
            await reader.readexactly(int(head[i + 15 : head.index(b"\r\n", i)]))
        writer.close()

    async def new_connections(n: int) -> None:
        for _ in range(n):
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, ssl=tls, server_hostname=name
            )
            writer.write(CLOSE_REQUEST)
            head = await reader.readuntil(b"\r\n\r\n")
            if not head.startswith(b"HTTP/1.1 200 "):
                raise BenchError("a request through bgproxy failed")
            i = head.lower().index(b"content-length:")
            await reader.readexactly(int(head[i + 15 : head.index(b"\r\n", i)]))
            writer.close()

    one = new_connections if close else keepalive
    await asyncio.gather(*(one(requests // connections) for _ in range(connections)))


def load_resumed(port: int, requests: int, connections: int, tls: ssl.SSLContext) -> None:
    """A new connection per request, each resuming the TLS session of the one before
    (as wrk does): blocking clients in threads, as asyncio cannot offer a session."""

    def client(n: int) -> None:
        session = None
        for _ in range(n):
            with socket.create_connection(("127.0.0.1", port)) as raw:
                with tls.wrap_socket(raw, server_hostname="bench", session=session) as conn:
                    conn.sendall(CLOSE_REQUEST)
                    data = b""
                    with contextlib.suppress(ssl.SSLEOFError):
                        while chunk := conn.recv(65536):
                            data += chunk
                    if not data.startswith(b"HTTP/1.1 200 "):
                        raise BenchError("a request failed")
                    session = conn.session

    with ThreadPoolExecutor(connections) as pool:
        for done in [pool.submit(client, requests // connections) for _ in range(connections)]:
            done.result()


def run_load(
    port: int, requests: int, connections: int, close: bool, tls: ssl.SSLContext | None,
    resume: bool,
) -> None:  # fmt: skip
    if close and tls is not None and resume:
        load_resumed(port, requests, connections, tls)
    else:
        asyncio.run(load(port, requests, connections, close, tls))


def wait_listening(port: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise BenchError(f"nothing listens on {port}") from None
            time.sleep(0.3)


def pools_yaml(target: str, indent: str) -> str:
    return "".join(f'{indent}{c}: {{ targets: ["{target}"] }}\n' for c in ("blue", "green"))


def count(
    base: Path,
    up_port: int,
    build: str,
    requests: int,
    connections: int,
    close: bool = False,
    services: int = 1,
    health_interval: str = "2s",
    tls: bool = False,
    access_log: str = "off",
    resume: bool = False,
) -> int:
    """Instructions bgproxy executed for start-up, ``requests`` requests and shutdown.
    With ``services`` > 1, the requests' Host is claimed by the last of that many services
    (each of the others claims a Host of its own), so every request is matched."""
    port, admin_port = free_port(), free_port()
    conf = base / f"bgproxy-{build}-{requests}.yaml"
    target = f"http://127.0.0.1:{up_port}"
    text = f'listen: "127.0.0.1:{port}"\nadmin: {{ listen: "127.0.0.1:{admin_port}" }}\n'
    # Health checks run by the clock, not per request: under callgrind a run takes about a
    # minute, so with many services their rounds would be counted as request cost.
    text += f"health_check: {{ interval: {health_interval} }}\n"
    tls_port = free_port()
    if tls:
        files = self_signed(base)
        text += f'tls: {{ listen: "127.0.0.1:{tls_port}", '
        text += f'certificates: [{{ cert: "{files.cert}", key: "{files.key}" }}] }}\n'
    if access_log != "off":  # a file, as a production edge would write it
        text += f'access_log: {{ destination: "{base / "access.log"}", format: {access_log} }}\n'
    if services > 1:
        text += "services:\n"
        for i in range(services):
            name, host = ("bench", "bench") if i == services - 1 else (f"s{i}", f"s{i}.test")
            text += f'  {name}:\n    hosts: ["{host}"]\n    upstreams:\n'
            text += pools_yaml(target, "      ")
    else:
        text += "upstreams:\n" + pools_yaml(target, "  ")
    conf.write_text(text)
    # Several services and no default: the unscoped /status would ask which one.
    status_path = "/services/bench/status" if services > 1 else "/status"
    out = base / f"callgrind-{build}-{requests}.out"
    env = {k: v for k, v in os.environ.items() if k not in ("BGPROXY_PURE_PYTHON",)}
    env["BGPROXY_LOG_LEVEL"] = "WARNING"
    if build == "python":
        env["BGPROXY_PURE_PYTHON"] = "1"
    cmd = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}"]
    cmd += [sys.executable, "-m", "proxy", "-c", str(conf)]
    with open(base / f"valgrind-{build}-{requests}.log", "wb") as log_file:
        proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=log_file, stderr=log_file)
    try:
        # Start-up is ~50x slower under callgrind, and more again on a busy machine.
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            try:
                status, body = http_json(admin_port, "GET", status_path, timeout=2)
                if status == 200:
                    break
            except (OSError, http.client.HTTPException):
                pass
            if proc.poll() is not None:
                raise BenchError(f"bgproxy under callgrind exited; see {log_file.name}")
            time.sleep(0.3)
        else:
            raise BenchError("bgproxy under callgrind did not start in 600 s")
        if body["hot_path"] != build:
            raise BenchError(f"bgproxy ran the {body['hot_path']} build, not {build}")
        if requests:
            wait_listening(tls_port if tls else port)
            load_port, ctx = (tls_port, unverified_tls()) if tls else (port, None)
            run_load(load_port, requests, connections, close, ctx, resume)
    finally:
        # Under callgrind on a busy machine a SIGINT is sometimes lost (the proxy sat in
        # epoll_wait for minutes; a second one stopped it at once): repeat it.
        for _ in range(10):
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=60)
                break
            except subprocess.TimeoutExpired:
                continue
        else:
            proc.kill()
            raise BenchError("bgproxy under callgrind did not stop on SIGINT")
    for line in out.read_text(errors="replace").splitlines():
        if line.startswith(("summary:", "totals:")):
            return int(line.split()[1])
    raise BenchError(f"no instruction total in {out}")


def count_peer(
    base: Path,
    up_port: int,
    kind: str,
    requests: int,
    connections: int,
    close: bool,
    tls: bool,
    resume: bool = False,
) -> int:
    """``count`` for a peer: the bare relay (``serve_uvloop_floor``; ``kind`` uvloop or
    fdtls) or nginx (1 worker, as bench_http.py and bench_tls.py run it; its master's
    and worker's counts are summed)."""
    out = base / f"callgrind-{kind}-{requests}"
    files = self_signed(base) if tls else None
    valgrind = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}.%p"]
    if kind == "nginx":
        nginx = which("nginx")
        assert nginx is not None
        srv = make_nginx_proxy(base, nginx, up_port, None, tls=files, name=f"nginx-{requests}")
        cmd, port, stop = valgrind + srv.cmd, srv.port, signal.SIGQUIT
    else:
        port = free_port()
        helper = "fdtls-floor" if kind == "fdtls" else "uvloop-floor"
        cmd = [*valgrind, sys.executable, str(Path(__file__).with_name("_common.py")), helper]
        cmd += [str(port), str(up_port)] + ([str(files.cert), str(files.key)] if files else [])
        stop = signal.SIGTERM  # the relay has no SIGINT handler; valgrind dumps on SIGTERM
    with open(base / f"valgrind-{kind}-{requests}.log", "wb") as log_file:
        proc = subprocess.Popen(cmd, cwd=base, stdout=log_file, stderr=log_file)
    try:
        wait_listening(port, 600)
        time.sleep(1)  # nginx's worker starts after its master listens
        if requests:
            ctx = unverified_tls() if tls else None
            run_load(port, requests, connections, close, ctx, resume)
    finally:
        proc.send_signal(stop)
        proc.wait(timeout=600)
        time.sleep(2)  # nginx's worker exits (and is dumped) after its master
    total = 0
    for path in base.glob(f"{out.name}.*"):  # one file per process
        for line in path.read_text(errors="replace").splitlines():
            if line.startswith(("summary:", "totals:")):
                total += int(line.split()[1])
                break
    if not total:
        raise BenchError(f"no instruction total in {out}.*")
    return total


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=10_000)
    p.add_argument("--connections", type=int, default=10)
    p.add_argument("--build", choices=("both", "compiled", "python"), default="both")
    p.add_argument(
        "--mode",
        choices=("keepalive", "close"),
        default="keepalive",
        help="close: a new connection per request (Connection: close)",
    )
    p.add_argument(
        "--services", type=int, default=1, help="configure this many services (Host routing)"
    )
    p.add_argument(
        "--health-interval",
        default="2s",
        help="health_check.interval of the measured proxy (e.g. 1h to leave checks out)",
    )
    p.add_argument(
        "--tls",
        action="store_true",
        help="over the HTTPS listener (ECDSA P-256; with --mode close, a handshake each)",
    )
    p.add_argument(
        "--access-log",
        choices=("off", "json", "combined"),
        default="off",
        help="write an access log to a file in this format (both counts: start-up and load)",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="with --tls --mode close: each connection resumes the last one's session (as wrk)",
    )
    p.add_argument(
        "--target",
        choices=("bgproxy", "uvloop", "fdtls", "nginx"),
        default="bgproxy",
        help="count a peer instead: the bare relay (fdtls: TLS on the socket) or nginx",
    )
    p.add_argument("--json", type=Path)
    p.add_argument(
        "--keep",
        type=Path,
        help="work in this directory and keep it: callgrind's output files for callgrind_annotate",
    )
    args = p.parse_args(argv)
    if args.target == "fdtls":
        args.tls = True
    ensure_tools(["nginx"])
    if which("valgrind") is None:
        subprocess.run(["apt-get", "install", "-y", "valgrind"], check=True)
    builds = ["compiled", "python"] if args.build == "both" else [args.build]
    if args.target != "bgproxy":
        builds = [args.target]
    servers = Servers()
    rows = []
    results = {}
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
    keep = contextlib.nullcontext(str(args.keep.resolve())) if args.keep else None
    with keep or tempfile.TemporaryDirectory(prefix="bench_icount_") as tmp:
        base = Path(tmp)
        try:
            nginx = which("nginx")
            assert nginx is not None
            upstream = servers.add(make_upstream(base, nginx))
            upstream.start()
            wait_ready(upstream, 20)
            # Bytecode written now, not inside the first counted start-up.
            subprocess.run(
                [sys.executable, "-m", "compileall", "-q", "proxy", "admin", "config"],
                cwd=REPO_ROOT,
                check=False,
            )
            for build in builds:
                log(f"{build}: start-up alone twice, then {args.requests:,} requests (slow)")
                # The lower of two start-ups: one once came out 85M instructions (8.5k per
                # request) higher than usual, which a single baseline would have credited
                # to the requests.
                if args.target != "bgproxy":
                    close = args.mode == "close"
                    idle, busy = (
                        count_peer(base, upstream.port, args.target, n, args.connections,
                                    close, args.tls, args.resume)
                        for n in (0, args.requests)
                    )  # fmt: skip
                    per = (busy - idle) / args.requests
                    results[build] = {"startup": idle, "total": busy, "per_request": per}
                    rows.append([build, f"{args.requests:,}", f"{idle:,}", f"{busy:,}",
                                 f"{per:,.0f}"])  # fmt: skip
                    continue
                idles = [
                    count(
                        base,
                        upstream.port,
                        build,
                        0,
                        args.connections,
                        False,
                        args.services,
                        args.health_interval,
                        args.tls,
                        args.access_log,
                        args.resume,
                    )
                    for _ in "ab"
                ]
                idle = min(idles)
                log(f"{build}: start-up alone {idles[0]:,} and {idles[1]:,}")
                close = args.mode == "close"
                busy = count(
                    base,
                    upstream.port,
                    build,
                    args.requests,
                    args.connections,
                    close,
                    args.services,
                    args.health_interval,
                    args.tls,
                    args.access_log,
                    args.resume,
                )
                per = (busy - idle) / args.requests
                results[build] = {"startup": idle, "total": busy, "per_request": per}
                rows.append([build, f"{args.requests:,}", f"{idle:,}", f"{busy:,}", f"{per:,.0f}"])
                log(f"{build}: {per:,.0f} instructions per request")
        finally:
            servers.stop_all()
    print()
    how = "a new connection each" if args.mode == "close" else "keep-alive"
    svcs = f", {args.services} services" if args.services > 1 else ""
    logs = f", access log {args.access_log} to a file" if args.access_log != "off" else ""
    tls = (", over TLS" + (", sessions resumed" if args.resume else "")) if args.tls else ""
    print(f"small GETs, {how}, {args.connections} at a time, nginx upstream{svcs}{logs}{tls}")
    print_rows(["build", "requests", "instr start+stop", "instr total", "instr/request"], rows)
    if len(results) == 2:
        ratio = results["compiled"]["per_request"] / results["python"]["per_request"]
        print(f"\ncompiled/python instructions per request: {ratio:.2f}")
    if args.json:
        write_json(
            args.json,
            {"env": env_info(), "args": vars(args) | {"json": None, "keep": None}, **results},
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
