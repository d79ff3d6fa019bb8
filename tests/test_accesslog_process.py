"""The access log of bgproxy run as users run it: a real ``mv`` and ``SIGUSR1`` rotate
the file, workers under load share one file without tearing a line, an unwritable
destination is counted in the metrics, and a destination that cannot be opened is a
start-up error naming the key."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import aiohttp
import yaml

from conftest import ProxyProcess, Upstream, free_port

ROOT = Path(__file__).resolve().parent.parent


def write_config(path: Path, ups: dict[str, Upstream], destination: str, **more: object) -> Path:
    data = {
        "listen": f"127.0.0.1:{free_port()}",
        "admin": {"listen": f"127.0.0.1:{free_port()}"},
        "upstreams": {
            "blue": {"targets": [ups["blue"].url]},
            "green": {"targets": [ups["green"].url]},
        },
        "access_log": {"destination": destination, **more},
    }
    path.write_text(yaml.safe_dump(data))
    return path


async def get_all(url: str, paths: list[str], concurrency: int = 1) -> None:
    sem = asyncio.Semaphore(concurrency)
    async with aiohttp.ClientSession() as session:

        async def one(p: str) -> None:
            async with sem, session.get(url + p) as resp:
                await resp.read()
                assert resp.status == 200

        await asyncio.gather(*(one(p) for p in paths))


def _lines(path: Path) -> bytes | None:
    return path.read_bytes() if path.exists() else None


async def read_targets(path: Path, want: int, timeout: float = 5.0) -> list[str]:
    """The targets logged in ``path`` once it holds ``want`` lines (lines reach the file
    within a few milliseconds: poll briefly)."""
    data = None
    for _ in range(int(timeout / 0.02)):
        data = _lines(path)
        if data is not None and data.count(b"\n") >= want:
            return [json.loads(line)["target"] for line in data.splitlines()]
        await asyncio.sleep(0.02)
    raise AssertionError(f"{path}: {data!r}, not {want} lines")


async def _all_logged(path: Path, targets: list[str], timeout: float = 0.5) -> bool:
    for _ in range(int(timeout / 0.02)):
        data = _lines(path)
        if data is not None and set(targets) <= {
            json.loads(line)["target"] for line in data.splitlines()
        }:
            return True
        await asyncio.sleep(0.02)
    return False


async def test_logrotate_mv_then_sigusr1_moves_writing_to_the_new_file(
    tmp_path: Path, upstreams: dict[str, Upstream]
) -> None:
    log = tmp_path / "access.log"
    proc = ProxyProcess(write_config(tmp_path / "c.yaml", upstreams, str(log)))
    await proc.start()
    try:
        await get_all(proc.url, ["/one", "/two"])
        assert await read_targets(log, 2) == ["/one", "/two"]
        mv = await asyncio.create_subprocess_exec("mv", str(log), str(tmp_path / "access.log.1"))
        assert await mv.wait() == 0
        await get_all(proc.url, ["/three"])  # still into the moved file, as with nginx
        proc.signal(signal.SIGUSR1)
        await read_targets(tmp_path / "access.log.1", 3)
        # The reopen happens in the signal's loop turn; the new file appears then.
        await read_targets(log, 0)
        await get_all(proc.url, ["/four"])
        assert await read_targets(log, 1) == ["/four"]
        assert await read_targets(tmp_path / "access.log.1", 3) == ["/one", "/two", "/three"]
    finally:
        await proc.stop()


async def test_workers_under_load_share_one_file_line_by_line(
    tmp_path: Path, upstreams: dict[str, Upstream]
) -> None:
    log = tmp_path / "access.log"
    proc = ProxyProcess(write_config(tmp_path / "c.yaml", upstreams, str(log)), "--workers", "3")
    await proc.start()
    try:
        # Long targets: a few lines fill a 4 KiB piece, so torn writes would show.
        paths = [f"/{i}/" + "p" * (300 + i % 500) for i in range(800)]
        await get_all(proc.url, paths, concurrency=30)
        logged = await read_targets(log, len(paths), timeout=15)  # json.loads: no torn line
        assert sorted(logged) == sorted(paths)
        _, status = await proc.admin("GET", "/status")
        assert len({i["pid"] for i in status["instances"]}) == 3

        # Rotation: the supervisor forwards SIGUSR1 and each worker reopens its own file.
        # Until all have, a worker still writes to the moved file; no line is lost.
        rotated = tmp_path / "access.log.1"
        mv = await asyncio.create_subprocess_exec("mv", str(log), str(rotated))
        assert await mv.wait() == 0
        proc.signal(signal.SIGUSR1)
        sent = list(paths)
        for round_ in range(100):
            batch = [f"/r{round_}/{i}" for i in range(30)]
            await get_all(proc.url, batch, concurrency=10)
            sent += batch
            # A worker writes its lines a few milliseconds after the responses: poll.
            if await _all_logged(log, batch):
                break
        else:
            raise AssertionError("the workers never reopened the log")
        both = await read_targets(rotated, 0) + await read_targets(log, 0)
        assert sorted(both) == sorted(sent)  # every line once, in one file or the other
    finally:
        await proc.stop()


async def test_an_unwritable_destination_is_counted_not_fatal(
    tmp_path: Path, upstreams: dict[str, Upstream]
) -> None:
    proc = ProxyProcess(write_config(tmp_path / "c.yaml", upstreams, "/dev/full"))
    await proc.start()
    try:
        await get_all(proc.url, [f"/x{i}" for i in range(25)])

        async def dropped() -> float:
            async with aiohttp.ClientSession() as s, s.get(proc.admin_url + "/metrics") as r:
                for line in (await r.text()).splitlines():
                    if line.startswith("bgproxy_access_log_dropped_total "):
                        return float(line.split()[1])
            raise AssertionError("no bgproxy_access_log_dropped_total")

        for _ in range(100):
            if await dropped() >= 25:
                break
            await asyncio.sleep(0.05)
        assert await dropped() == 25
    finally:
        await proc.stop()


def test_a_destination_that_cannot_be_opened_stops_serve_naming_the_key(
    tmp_path: Path, upstreams: dict[str, Upstream]
) -> None:
    cfg = write_config(tmp_path / "c.yaml", upstreams, str(tmp_path / "missing" / "a.log"))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "proxy", "-c", str(cfg)],
        capture_output=True, text=True, timeout=30, env=env, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode != 0
    assert "access_log.destination: cannot open" in done.stderr
    assert "No such file or directory" in done.stderr
