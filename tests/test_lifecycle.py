"""The proxy as a process: graceful shutdown on SIGTERM, reload on SIGHUP, bad starts."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import yaml

from conftest import ProxyProcess, Upstream, free_port, start_upstream


def write_config(
    path: Path, port: int, admin_port: int, blue: list[str], green: list[str], **extra: object
) -> None:
    data = {
        "listen": f"127.0.0.1:{port}",
        "admin": {"listen": f"127.0.0.1:{admin_port}"},
        "upstreams": {"blue": {"targets": blue}, "green": {"targets": green}},
        **extra,
    }
    path.write_text(yaml.safe_dump(data))


async def serving(tmp_path: Path, ups: dict[str, Upstream], **extra: object) -> ProxyProcess:
    """``python -m proxy`` on free ports, blue and green on their upstreams, started."""
    cfg = tmp_path / "bgproxy.yaml"
    write_config(cfg, free_port(), free_port(), [ups["blue"].url], [ups["green"].url], **extra)
    p = ProxyProcess(cfg)
    await p.start()
    return p


@pytest.fixture
async def ups() -> AsyncIterator[dict[str, Upstream]]:
    u = {
        "blue": await start_upstream("blue"),
        "blue2": await start_upstream("blue2"),
        "green": await start_upstream("green"),
    }
    yield u
    for up in u.values():
        await up.runner.cleanup()


async def test_sigterm_finishes_requests_closes_websockets_1001_and_exits_0(
    tmp_path: Path, ups: dict[str, Upstream]
) -> None:
    p = await serving(tmp_path, ups, drain={"timeout": "5s"})
    try:
        async with aiohttp.ClientSession() as s:
            ws = await s.ws_connect(p.url + "/ws")
            slow = asyncio.create_task(s.get(p.url + "/slow?s=1"))
            await asyncio.sleep(0.2)  # let the slow request reach the upstream
            started = time.monotonic()
            p.signal(signal.SIGTERM)
            msg = await ws.receive(timeout=3)
            assert msg.type == aiohttp.WSMsgType.TEXT
            assert json.loads(msg.data)["type"] == "reconnect"
            closing = await ws.receive(timeout=3)
            assert closing.type == aiohttp.WSMsgType.CLOSE and closing.data == 1001
            async with aiohttp.ClientSession() as s2, s2.get(p.admin_url + "/readyz") as r:
                assert r.status == 503
            resp = await slow
            assert resp.status == 200 and "blue slow" in await resp.text()
            assert resp.headers.get("Connection", "").lower() == "close"
            resp.release()
            await ws.close()
        assert p.proc is not None
        code = await asyncio.wait_for(p.proc.wait(), 6)
        assert code == 0
        assert time.monotonic() - started < 5.5
    finally:
        await p.stop()


async def test_sighup_reloads_targets_without_failing_a_request(
    tmp_path: Path, ups: dict[str, Upstream]
) -> None:
    p = await serving(tmp_path, ups)
    cfg = p.path
    try:
        async with aiohttp.ClientSession() as s:
            await s.post(p.admin_url + "/weights", json={"blue": 100, "green": 0})
            async with s.get(p.admin_url + "/status") as r:
                generation = (await r.json())["generation"]
            seen: list[str] = []
            errors: list[str] = []
            stop = asyncio.Event()

            async def load() -> None:
                while not stop.is_set():
                    try:
                        async with s.get(p.url + "/x") as r:
                            if r.status != 200:
                                errors.append(str(r.status))
                            seen.append((await r.json())["color"])
                    except aiohttp.ClientError as exc:
                        errors.append(repr(exc))

            workers = [asyncio.create_task(load()) for _ in range(8)]
            await asyncio.sleep(0.3)
            data = yaml.safe_load(cfg.read_text())
            data["upstreams"]["blue"]["targets"] = [ups["blue2"].url]
            cfg.write_text(yaml.safe_dump(data))
            p.signal(signal.SIGHUP)
            for _ in range(300):
                if seen and seen[-1] == "blue2":
                    break
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.3)
            # An invalid file is rejected and the running config kept.
            cfg.write_text("upstreams: {blue: {targets: []}}\nbogus: 1\n")
            p.signal(signal.SIGHUP)
            await asyncio.sleep(0.3)
            stop.set()
            await asyncio.gather(*workers)
            assert errors == []
            assert "blue" in seen and seen[-1] == "blue2"
            async with s.get(p.admin_url + "/status") as r:
                status = await r.json()
            assert status["generation"] == generation  # routing state kept
            assert [t["url"] for t in status["colors"]["blue"]["targets"]] == [ups["blue2"].url]
    finally:
        await p.stop()
    assert p.proc is not None and p.proc.stderr is not None
    log = (await p.proc.stderr.read()).decode()
    assert "reload rejected" in log and "bogus" in log


async def test_serve_exits_2_listing_config_errors(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("listen: nowhere\nupstreams: {blue: {targets: [ftp://x]}}\n")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "-c", str(cfg), stderr=asyncio.subprocess.PIPE
    )
    _, err = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode == 2
    text = err.decode()
    assert "listen" in text and "upstreams.blue.targets[0]" in text and "upstreams.green" in text


async def test_serve_exits_nonzero_when_port_taken(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cfg = tmp_path / "c.yaml"
        write_config(cfg, port, free_port(), ["http://127.0.0.1:9"], ["http://127.0.0.1:9"])
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "proxy", "-c", str(cfg), stderr=asyncio.subprocess.PIPE
        )
        _, err = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode == 1
    assert "listen" in err.decode() and str(port) in err.decode()


async def test_request_durations_are_timed_finer_than_uvloops_millisecond_clock(
    tmp_path: Path, ups: dict[str, Upstream]
) -> None:
    # The process runs on uvloop, whose loop.time() counts whole milliseconds: timed by
    # it, fast requests would land in 0 or 1 ms, never in the 1.5 or 2.5 ms buckets.
    p = await serving(tmp_path, ups)
    try:
        async with aiohttp.ClientSession() as s:
            for _ in range(5):
                async with s.get(p.url + "/x") as r:
                    assert r.status == 200
            async with s.get(p.admin_url + "/metrics") as r:
                text = await r.text()
        prefix = 'bgproxy_request_duration_seconds_sum{color="blue",service="default"} '
        total = next(float(line[len(prefix) :]) for line in text.splitlines()
                     if line.startswith(prefix))  # fmt: skip
        assert total > 0
        ms = total * 1000
        assert abs(ms - round(ms)) > 1e-4, f"{total!r} s is a whole number of milliseconds"
    finally:
        await p.stop()
