#!/usr/bin/env python3
"""Fleet flip propagation: how long until every bgproxy instance serves the new color.

One command starts everything it needs on loopback — a redis-server (no
persistence), a blue and a green upstream, and N bgproxy processes sharing the
routing state through that Redis — then flips the live color through instance
A's admin API, over and over, and prints a table:

    python benchmarks/bench_fleet.py [--instances 4] [--flips 100] [--workers 1]
        [--json out.json]

For each flip, pollers on every other instance send requests back to back on a
keep-alive connection (the data plane, as a client sees it) and note when the
first response from the new color arrives; propagation is that moment minus the
moment the switch request was sent. "fleet" is the slowest instance of each
flip. "admin call" is how long A took to answer, which includes waiting until
every live instance reported the new generation. Needs ``redis-server`` on PATH.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def upstream_main(color: str, port: int) -> None:
    """A minimal upstream that names its color (run as a child process)."""
    from aiohttp import web

    async def handle(request: web.Request) -> web.Response:
        return web.Response(text=color, headers={"X-Upstream": color})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


class Procs:
    """Child processes, each in its own process group, stopped on exit."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, args: list[str], log: Path) -> subprocess.Popen[bytes]:
        with log.open("wb") as out:
            proc = subprocess.Popen(
                args, stdout=out, stderr=subprocess.STDOUT, cwd=REPO_ROOT, start_new_session=True
            )
        self.procs.append(proc)
        return proc

    def stop(self) -> None:
        for proc in reversed(self.procs):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 5
        for proc in reversed(self.procs):
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


async def wait_http(url: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as s:
        while time.monotonic() < deadline:
            with contextlib.suppress(aiohttp.ClientError, OSError):
                async with s.get(url) as r:
                    if r.status < 500:
                        return
            await asyncio.sleep(0.05)
    raise RuntimeError(f"{url} did not answer within {timeout:g}s")


async def wait_redis(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"PING\r\n")
            ok = (await reader.readline()).startswith(b"+PONG")
            writer.close()
            if ok:
                return
        await asyncio.sleep(0.02)
    raise RuntimeError("redis-server did not start")


async def first_new_color(
    session: aiohttp.ClientSession, url: str, color: str, stop: asyncio.Event
) -> float | None:
    """perf_counter() of the first response served by ``color`` (None if stopped first)."""
    while not stop.is_set():
        async with session.get(url) as r:
            await r.read()
            if r.headers.get("X-Bg-Color") == color:
                return time.perf_counter()
        # Paced, not flat out: saturating the CPUs would measure the scheduler instead.
        await asyncio.sleep(0.001)
    return None


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def run(args: argparse.Namespace, tmp: Path, procs: Procs) -> dict[str, Any]:
    redis_port = free_port()
    redis_bin = shutil.which("redis-server")
    if redis_bin is None:
        raise SystemExit(
            "bench_fleet: redis-server is not installed (apt-get install redis-server)"
        )
    redis_args = ["--port", str(redis_port), "--bind", "127.0.0.1", "--save", ""]
    procs.start([redis_bin, *redis_args, "--appendonly", "no"], tmp / "redis.log")
    await wait_redis(redis_port)
    ups = {}
    for color in ("blue", "green"):
        port = free_port()
        procs.start(
            [sys.executable, __file__, "--upstream", color, str(port)], tmp / f"{color}.log"
        )
        ups[color] = f"http://127.0.0.1:{port}"
    for url in ups.values():
        await wait_http(url)

    instances = []
    for i in range(args.instances):
        port, admin = free_port(), free_port()
        cfg = {
            "listen": f"127.0.0.1:{port}",
            "admin": {"listen": f"127.0.0.1:{admin}"},
            "upstreams": {c: {"targets": [u]} for c, u in ups.items()},
            "rollback": {"enabled": False},
            "state": {"backend": "redis", "redis_url": f"redis://127.0.0.1:{redis_port}/0"},
        }
        path = tmp / f"bgproxy-{i}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        cmd = [sys.executable, "-m", "proxy", "-c", str(path), "--workers", str(args.workers)]
        procs.start(cmd, tmp / f"bgproxy-{i}.log")
        instances.append((f"http://127.0.0.1:{port}/", f"http://127.0.0.1:{admin}"))
    for _, admin_url in instances:
        await wait_http(admin_url + "/readyz", 60)

    (_, admin_a), others = instances[0], instances[1:]
    per_instance: list[float] = []
    fleet: list[float] = []
    admin_calls: list[float] = []
    lagging = 0
    async with aiohttp.ClientSession() as control:
        async with control.get(admin_a + "/status") as r:
            status = await r.json()
        expected_ids = args.instances * args.workers
        while len(status["instances"]) < expected_ids:
            await asyncio.sleep(0.1)
            async with control.get(admin_a + "/status") as r:
                status = await r.json()
        color = status["active"]
        sessions = [aiohttp.ClientSession() for _ in others]
        try:
            for _ in range(args.flips):
                color = "green" if color == "blue" else "blue"
                stop = asyncio.Event()
                pollers = [
                    asyncio.create_task(first_new_color(s, url, color, stop))
                    for s, (url, _) in zip(sessions, others, strict=True)
                ]
                await asyncio.sleep(0.005)  # pollers are sending before the switch is
                t0 = time.perf_counter()
                async with control.post(admin_a + "/switch", json={"color": color}) as r:
                    body = await r.json()
                    if r.status != 200:
                        raise RuntimeError(f"switch refused: {r.status} {body}")
                admin_calls.append(time.perf_counter() - t0)
                lagging += len(body.get("lagging", []))
                try:
                    async with asyncio.timeout(10):
                        seen = await asyncio.gather(*pollers)
                finally:
                    stop.set()
                times = [t - t0 for t in seen if t is not None]
                per_instance.extend(times)
                fleet.append(max(times))
                await asyncio.sleep(args.pause)
        finally:
            for s in sessions:
                await s.close()
    return {
        "instances": args.instances,
        "workers": args.workers,
        "flips": args.flips,
        "lagging_reported": lagging,
        "per_instance_ms": [t * 1000 for t in per_instance],
        "fleet_ms": [t * 1000 for t in fleet],
        "admin_call_ms": [t * 1000 for t in admin_calls],
    }


def print_table(result: dict[str, Any]) -> None:
    print(
        f"\nflip propagation, {result['instances']} instances x {result['workers']} worker(s), "
        f"{result['flips']} flips through instance A's admin API (ms)\n"
    )
    print(f"{'measure':<34}{'p50':>8}{'p99':>8}{'max':>8}{'mean':>8}")
    rows = [
        ("each other instance serves it", result["per_instance_ms"]),
        ("whole fleet serves it (slowest)", result["fleet_ms"]),
        ("admin call answered (all applied)", result["admin_call_ms"]),
    ]
    for name, values in rows:
        print(
            f"{name:<34}{pct(values, 0.5):>8.1f}{pct(values, 0.99):>8.1f}"
            f"{max(values):>8.1f}{statistics.fmean(values):>8.1f}"
        )
    print(f"\nlaggards named by the admin API: {result['lagging_reported']}")


def main(argv: list[str] | None = None) -> int:
    if argv is None and len(sys.argv) == 4 and sys.argv[1] == "--upstream":
        upstream_main(sys.argv[2], int(sys.argv[3]))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=4)
    parser.add_argument("--flips", type=int, default=100)
    parser.add_argument("--workers", type=int, default=1, help="--workers of each instance")
    parser.add_argument("--pause", type=float, default=0.05, help="seconds between flips")
    parser.add_argument("--json", type=Path, help="write the raw figures here")
    args = parser.parse_args(argv)
    if args.instances < 2:
        parser.error("--instances must be at least 2")
    procs = Procs()
    with tempfile.TemporaryDirectory(prefix="bench-fleet-") as tmp:
        try:
            result = asyncio.run(run(args, Path(tmp), procs))
        finally:
            procs.stop()
    print_table(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
