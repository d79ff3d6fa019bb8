#!/usr/bin/env python3
"""Memory per idle connection: RSS per idle WebSocket and per idle keep-alive client.

One command starts everything it needs, opens N idle connections through each
target, prints a table and cleans up:

    python benchmarks/bench_memory.py [--connections 10000] [--batch 250]
        [--kinds ws,http] [--targets bgproxy,nginx,haproxy] [--json out.json]

For each target and kind a fresh proxy process is started (CPU 1), warmed up
with a few connections, and its RSS (the process and its children, from
``/proc``) is taken as the baseline. Then this process (CPU 0, ``RLIMIT_NOFILE``
raised with ``setrlimit``) opens N connections in batches, pausing at N/4, N/2,
3N/4 and N to let the proxy settle and read its RSS again:

* ``ws``: a WebSocket handshake through the proxy to an aiohttp echo upstream
  (CPU 0), then nothing: an idle relayed WebSocket (client leg + upstream leg);
* ``http``: one ``GET /small`` on each new keep-alive connection (one at a time,
  so the proxy's upstream pool stays small), then nothing: an idle client
  connection.

"KiB/conn" is (RSS at N - baseline) / N; "slope" is the least-squares slope over
the checkpoints (less sensitive to one-off allocations). At the end a sample of
the connections is checked to still work (an echo, a second request), bgproxy's
``/status`` must count the N WebSockets, then everything is closed and the RSS
and file descriptors left are reported (a leak check: fds must return to the
baseline; RSS may stay up because Python's allocator keeps freed arenas).

If N connections cannot be opened (limits), the largest count reached is used
and the output says so.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import resource
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
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
    WsClientProtocol,
    add_target_args,
    ensure_tools,
    env_info,
    fmt,
    get_request,
    helper_server,
    http_json,
    install_signal_handlers,
    log,
    make_bgproxy,
    make_haproxy,
    make_nginx_proxy,
    make_upstream,
    need_cpus,
    open_http,
    open_ws,
    parse_list,
    pin_self,
    print_rows,
    raise_nofile,
    run_async,
    run_main,
    start_or_skip,
    tool_version,
    tree_fds,
    tree_rss_bytes,
    tree_tcp_peers,
    wait_http,
    wait_ready,
    which,
    write_json,
    ws_masked_frame,
)

TARGETS = ("bgproxy", "nginx", "haproxy")
KINDS = ("ws", "http")
KIB = 1024


@dataclass
class Result:
    target: str
    kind: str
    requested: int
    opened: int
    open_failures: int
    first_failure: str
    baseline_rss: int
    checkpoints: list[tuple[int, int]] = field(default_factory=list)  # (connections, rss)
    kib_per_conn: float | None = None
    slope_kib: float | None = None
    fds_baseline: int = 0
    fds_at_n: int = 0
    fds_after_close: int = 0
    socks_at_n: tuple[int, int] = (0, 0)  # (client legs, upstream legs)
    # connections the proxy still holds after the clients closed theirs
    left_clean: int = 0  # closed with a close frame (ws) / a FIN (http)
    left_abrupt: int = 0  # ws only: a FIN without a close frame (client vanished)
    left_upstream: int = 0
    rss_after_close: int = 0
    open_seconds: float = 0.0
    sample_ok: int = 0
    sample_checked: int = 0
    status_websockets: int | None = None
    status_websockets_after_close: int | None = None
    settle: float = 1.5


def slope(points: list[tuple[int, int]]) -> float | None:
    if len(points) < 2:
        return None
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    den = sum((x - mx) ** 2 for x, _ in points)
    if den == 0:
        return None
    return sum((x - mx) * (y - my) for x, y in points) / den


async def request_once(proto: HttpClientProtocol, req: bytes, timeout: float = 10.0) -> bool:
    fut: asyncio.Future[bool] = asyncio.get_running_loop().create_future()

    def done(status: int, head: bytes, body: bytes) -> None:
        if not fut.done():
            fut.set_result(status == 200 and body == SMALL_BODY)

    proto.send(req, done)
    try:
        return await asyncio.wait_for(fut, timeout)
    except TimeoutError:
        return False


def local_port(proto: Any) -> int:
    return int(proto.transport.get_extra_info("sockname")[1])


CLOSE_FRAME = ws_masked_frame(b"\x03\xe8", opcode=0x8)  # 1000, normal closure


async def close_ws(protos: list[WsClientProtocol], wait: float) -> None:
    """The WebSocket closing handshake: send a close frame, give the peer ``wait``
    seconds to answer and close the TCP connection."""
    for p in protos:
        if p.transport is not None and not p.closed:
            p.transport.write(CLOSE_FRAME)
    for _ in range(max(1, int(wait / 0.05))):
        if all(p.closed for p in protos):
            return
        await asyncio.sleep(0.05)


async def echo_once(proto: WsClientProtocol, timeout: float = 10.0) -> bool:
    fut: asyncio.Future[bool] = asyncio.get_running_loop().create_future()

    def on_echo(p: WsClientProtocol) -> None:
        if not fut.done():
            fut.set_result(True)

    proto.on_echo = on_echo
    proto.send_message()
    try:
        return await asyncio.wait_for(fut, timeout)
    except TimeoutError:
        return False
    finally:
        proto.on_echo = None


def ws_count(srv: Server) -> int | None:
    if srv.admin_port is None:
        return None
    code, st = http_json(srv.admin_port, "GET", "/status")
    if code != 200 or not isinstance(st, dict):
        return None
    return sum(int(st["colors"][c]["websockets"]) for c in ("blue", "green"))


async def hold(srv: Server, kind: str, n: int, batch: int, settle: float, sample: int) -> Result:
    port = srv.port
    req = get_request("/small", port)
    res = Result(srv.name, kind, n, 0, 0, "", 0, settle=settle)
    protos: list[Any] = []

    async def open_one() -> Any:
        if kind == "ws":
            return await open_ws(port, "/ws", b"ping", timeout=30)
        return await open_http(port)

    # warm-up: allocate what the first connections allocate (pools, buffers), then close
    warm = [await open_one() for _ in range(20)]
    for p in warm:
        if kind == "ws":
            await echo_once(p)
        else:
            await request_once(p, req)
    if kind == "ws":
        await close_ws(warm, settle)
    for p in warm:
        if p.transport is not None:
            p.transport.close()
    await asyncio.sleep(settle)
    res.baseline_rss = tree_rss_bytes(srv.pid)
    res.fds_baseline = tree_fds(srv.pid)
    res.checkpoints.append((0, res.baseline_rss))
    marks = sorted({max(1, n * k // 4) for k in (1, 2, 3, 4)})
    t0 = time.monotonic()
    stop = False
    for mark in marks:
        while len(protos) < mark and not stop:
            want = min(batch, mark - len(protos))
            got = await asyncio.gather(*(open_one() for _ in range(want)), return_exceptions=True)
            fresh = [g for g in got if not isinstance(g, BaseException)]
            errs = [g for g in got if isinstance(g, BaseException)]
            if errs:
                res.open_failures += len(errs)
                res.first_failure = res.first_failure or repr(errs[0])[:200]
                if len(errs) == len(got):
                    stop = True  # nothing opens any more: use what we have
            if kind == "http":
                for p in fresh:
                    if not await request_once(p, req):
                        res.open_failures += 1
                        res.first_failure = res.first_failure or "first request failed"
                        if p.transport is not None:
                            p.transport.close()
                        continue
                    protos.append(p)
            else:
                protos.extend(fresh)
        await asyncio.sleep(settle)
        live = [p for p in protos if not p.closed]
        res.checkpoints.append((len(live), tree_rss_bytes(srv.pid)))
        log(
            f"  {srv.name} {kind}: {len(live):,} idle connections, "
            f"RSS {res.checkpoints[-1][1] / 2**20:.1f} MiB"
        )
        if stop:
            break
    res.open_seconds = time.monotonic() - t0
    await asyncio.sleep(settle)
    live = [p for p in protos if not p.closed]
    res.opened = len(live)
    rss_n = tree_rss_bytes(srv.pid)
    res.checkpoints[-1] = (res.opened, rss_n)
    res.fds_at_n = tree_fds(srv.pid)
    peers, other = tree_tcp_peers(srv.pid, port)
    res.socks_at_n = (len(peers), other)
    if res.opened:
        res.kib_per_conn = (rss_n - res.baseline_rss) / res.opened / KIB
    sl = slope(res.checkpoints)
    res.slope_kib = sl / KIB if sl is not None else None
    if kind == "ws":
        res.status_websockets = ws_count(srv)
    # do they still work?
    step = max(1, len(live) // sample)
    checked = live[::step][:sample]
    oks = await asyncio.gather(
        *((echo_once(p) if kind == "ws" else request_once(p, req)) for p in checked)
    )
    res.sample_checked, res.sample_ok = len(checked), sum(oks)
    # close: ws half with a close frame (then FIN), half with a bare FIN; http with a FIN
    live = [p for p in protos if not p.closed and p.transport is not None]
    half = len(live) // 2 if kind == "ws" else len(live)
    clean_ports = {local_port(p) for p in live[:half]}
    abrupt_ports = {local_port(p) for p in live[half:]}
    if kind == "ws":
        await close_ws(live[:half], settle)
    for p in protos:
        if p.transport is not None:
            p.transport.close()
    await asyncio.sleep(max(2.0, settle * 2))
    res.rss_after_close = tree_rss_bytes(srv.pid)
    res.fds_after_close = tree_fds(srv.pid)
    peers, res.left_upstream = tree_tcp_peers(srv.pid, port)
    res.left_clean = len(clean_ports.intersection(peers))
    res.left_abrupt = len(abrupt_ports.intersection(peers))
    if kind == "ws":
        res.status_websockets_after_close = ws_count(srv)
    return res


def print_table(results: list[Result]) -> None:
    headers = [
        "target", "kind", "conns", "base MiB", "RSS@N MiB", "KiB/conn", "slope KiB",
        "fds base/N/after", "socks@N cli/up", "left clean/abrupt/up", "after close MiB",
        "sample ok", "status ws",
    ]  # fmt: skip
    rows = []
    for r in results:
        rows.append(
            [
                r.target,
                r.kind,
                f"{r.opened:,}" + ("" if r.opened >= r.requested else f" of {r.requested:,}"),
                fmt(r.baseline_rss / 2**20, ".1f"),
                fmt(r.checkpoints[-1][1] / 2**20, ".1f"),
                fmt(r.kib_per_conn, ".1f"),
                fmt(r.slope_kib, ".1f"),
                f"{r.fds_baseline}/{r.fds_at_n}/{r.fds_after_close}",
                f"{r.socks_at_n[0]}/{r.socks_at_n[1]}",
                f"{r.left_clean}/{r.left_abrupt if r.kind == 'ws' else '-'}/{r.left_upstream}",
                fmt(r.rss_after_close / 2**20, ".1f"),
                f"{r.sample_ok}/{r.sample_checked}",
                "-"
                if r.status_websockets is None
                else f"{r.status_websockets}->{r.status_websockets_after_close}",
            ]
        )
    print_rows(headers, rows, left=2)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="RSS per idle WebSocket / keep-alive connection")
    p.add_argument("--connections", type=int, default=10000, help="N (default 10000)")
    p.add_argument("--batch", type=int, default=250, help="connections opened concurrently")
    p.add_argument("--settle", type=float, default=1.5, help="seconds to wait before an RSS read")
    p.add_argument("--sample", type=int, default=100, help="connections checked at the end")
    p.add_argument(
        "--kinds", type=lambda v: parse_list(v, KINDS, "--kinds"), default=list(KINDS),
        help="ws,http",
    )  # fmt: skip
    add_target_args(p, TARGETS)
    args = p.parse_args(argv)
    if args.connections < 1 or args.batch < 1:
        p.error("--connections and --batch must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    install_signal_handlers()
    need_cpus(CLIENT_CPU, PROXY_CPU)
    ensure_tools(["nginx", "haproxy", "taskset"])
    nginx, haproxy = which("nginx"), which("haproxy")
    assert nginx is not None and haproxy is not None
    # One fd per connection in this process and in the upstream, two in the proxy (client
    # leg + upstream leg of a WebSocket). Children inherit the limit. Without
    # CAP_SYS_RESOURCE the hard limit cannot be raised: then N is capped to fit it.
    notes: list[str] = []
    want = 2 * args.connections + 512
    limit = raise_nofile(want)
    n = args.connections
    if limit < want:
        n = (limit - 512) // 2
        note = (
            f"RLIMIT_NOFILE hard limit is {limit} (cannot raise it here), so a proxy "
            f"can hold at most ~{n:,} relayed WebSockets: using N = {n:,} instead of "
            f"{args.connections:,}"
        )
        log(note)
        notes.append(note)
    wc = 2 * n + 256  # nginx worker_connections (both legs count); haproxy maxconn is per side

    base = Path(tempfile.mkdtemp(prefix="bench_memory_"))
    servers = Servers()
    results: list[Result] = []
    skipped: dict[str, str] = {}
    try:
        echo = servers.add(helper_server(base, "echo", "ws-echo", CLIENT_CPU))
        upstream = servers.add(make_upstream(base, nginx))
        echo.start()
        upstream.start()
        try:
            wait_http(echo, args.start_timeout, "/health")
            wait_ready(upstream, args.start_timeout)
        except TargetFailed as exc:
            raise BenchError(f"upstream did not start: {exc}") from exc
        pin_self(CLIENT_CPU)
        for kind in args.kinds:
            up = echo if kind == "ws" else upstream
            for target in args.targets:
                sub = base / f"{target}-{kind}"
                sub.mkdir()
                if target == "bgproxy":
                    srv = make_bgproxy(sub, up.port)
                elif target == "nginx":
                    srv = make_nginx_proxy(
                        sub, nginx, up.port, websocket=kind == "ws", worker_connections=wc
                    )
                else:
                    srv = make_haproxy(sub, haproxy, up.port, maxconn=n + 128)
                servers.add(srv)
                key = f"{target} {kind}"
                path = "/health" if kind == "ws" else "/small"

                def ready(s: Server, path: str = path) -> None:
                    wait_http(s, args.start_timeout, path)

                if not start_or_skip(srv, ready, skipped, str(PROXY_CPU)):
                    skipped[key] = skipped.pop(srv.name)
                    continue
                try:
                    res: Result = run_async(
                        hold(srv, kind, n, args.batch, args.settle, args.sample)
                    )
                except (OSError, TimeoutError) as exc:
                    skipped[key] = f"failed: {exc}"
                    log(f"{key}: {skipped[key]}")
                    srv.stop()
                    continue
                if not srv.alive():
                    skipped[key] = srv.fail("died during the benchmark").args[0]
                results.append(res)
                log(
                    f"{key}: {res.opened:,} idle, {fmt(res.kib_per_conn, '.1f')} KiB/conn "
                    f"(slope {fmt(res.slope_kib, '.1f')}), fds {res.fds_baseline}->"
                    f"{res.fds_at_n}->{res.fds_after_close}"
                )
                srv.stop()
        print()
        print(
            f"idle connections held open through each proxy (proxy on CPU {PROXY_CPU}, "
            f"clients + upstreams on CPU {CLIENT_CPU}); RSS of the proxy's process tree; "
            f"RLIMIT_NOFILE {resource.getrlimit(resource.RLIMIT_NOFILE)[0]}"
        )
        print_table(results)
        print()
        for note in notes:
            print(note)
        for r in results:
            if r.target == "bgproxy" and r.kind == "ws" and r.kib_per_conn is not None:
                ok = r.kib_per_conn <= 20.0
                print(
                    f"bgproxy: {r.kib_per_conn:.1f} KiB per idle WebSocket at {r.opened:,} "
                    f"(target <= 20 KiB): {'PASS' if ok else 'FAIL'}"
                )
            if r.opened < r.requested:
                print(
                    f"{r.target} {r.kind}: only {r.opened:,} of {r.requested:,} opened "
                    f"({r.open_failures} failures; first: {r.first_failure})"
                )
            if r.left_clean or r.left_abrupt or (r.kind == "ws" and r.left_upstream):
                print(
                    f"{r.target} {r.kind}: LEAK: {max(2.0, r.settle * 2):g}s after the clients "
                    f"closed, the proxy still holds {r.left_clean} client connections closed "
                    f"cleanly, {r.left_abrupt} closed without a close frame and "
                    f"{r.left_upstream} upstream connections (fds {r.fds_baseline} before, "
                    f"{r.fds_after_close} after)"
                )
            if r.status_websockets is not None and r.status_websockets != r.opened:
                print(
                    f"{r.target} {r.kind}: /status counts {r.status_websockets} WebSockets, "
                    f"{r.opened} are open"
                )
            if r.status_websockets_after_close:
                print(
                    f"{r.target} {r.kind}: /status still counts "
                    f"{r.status_websockets_after_close} WebSockets after all closed"
                )
            if r.sample_ok < r.sample_checked:
                print(
                    f"{r.target} {r.kind}: only {r.sample_ok}/{r.sample_checked} idle "
                    "connections still worked at the end"
                )
        for name, why in skipped.items():
            print(f"skipped {name}: {why.splitlines()[0]}")
        if args.json:
            write_json(
                args.json,
                {
                    "params": {
                        "connections": args.connections,
                        "batch": args.batch,
                        "settle_s": args.settle,
                        "kinds": args.kinds,
                        "targets": args.targets,
                        "rlimit_nofile": resource.getrlimit(resource.RLIMIT_NOFILE)[0],
                    },
                    "env": env_info(
                        nginx=tool_version([nginx, "-v"]), haproxy=tool_version([haproxy, "-v"])
                    ),
                    "skipped": skipped,
                    "notes": notes,
                    "connections_used": n,
                    "results": [asdict(r) for r in results],
                },
            )
        return 0
    finally:
        with contextlib.suppress(Exception):
            servers.stop_all()
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    run_main(main)
