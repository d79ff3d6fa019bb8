"""Weighted splits, sticky clients, and switch atomicity under concurrent load."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import aiohttp

from conftest import Proxy


async def set_weights(proxy: Proxy, blue: int, green: int) -> None:
    code, s = await proxy.admin("POST", "/weights", {"blue": blue, "green": green})
    assert code == 200, s


async def test_weighted_split_over_fresh_clients(proxy: Proxy) -> None:
    await set_weights(proxy, 80, 20)
    n = 600
    colors: list[str] = []
    cookies: list[list[str]] = []
    sem = asyncio.Semaphore(40)
    # No cookie jar: every request is a fresh client.
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as session:

        async def one(i: int) -> None:
            async with sem, session.get(proxy.url + f"/w{i}") as resp:
                await resp.read()
                assert resp.status == 200
                color = resp.headers["X-Bg-Color"]
                colors.append(color)
                cookies.append(resp.headers.getall("Set-Cookie", []))
                assert (await resp.json())["color"] == color

        await asyncio.gather(*(one(i) for i in range(n)))

    share = colors.count("green") / n
    assert 0.12 <= share <= 0.28, share
    for color, set_cookie in zip(colors, cookies, strict=True):
        sticky = [c for c in set_cookie if c.startswith("bg_sticky=")]
        assert len(sticky) == 1, set_cookie
        # The client's bucket: blue's share (80%) of 10000 is blue's.
        bucket = int(sticky[0].split(";")[0].removeprefix("bg_sticky="))
        assert (bucket < 8000) == (color == "blue"), (bucket, color)


async def test_sticky_client_stays_on_its_color(proxy: Proxy) -> None:
    await set_weights(proxy, 50, 50)
    # A browser-like client that keeps its cookie (unsafe: the host is an IP address).
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as session:
        async with session.get(proxy.url + "/first") as resp:
            await resp.read()
            first = resp.headers["X-Bg-Color"]
            assert resp.headers.getall("Set-Cookie", [])
        for i in range(50):
            async with session.get(proxy.url + f"/again{i}") as resp:
                await resp.read()
                assert resp.headers["X-Bg-Color"] == first, i
                assert not [
                    c for c in resp.headers.getall("Set-Cookie", []) if c.startswith("bg_sticky=")
                ]

    # A cookie naming either color (as older versions set it) is honoured under a split.
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as session:
        for color in ("blue", "green"):
            for _ in range(20):
                async with session.get(
                    proxy.url + "/", headers={"Cookie": f"bg_sticky={color}"}
                ) as resp:
                    await resp.read()
                    assert resp.headers["X-Bg-Color"] == color

        # Once green's weight is 0 (a switch to blue), the sticky cookie no longer counts.
        code, _ = await proxy.admin("POST", "/switch", {"color": "blue"})
        assert code == 200
        for _ in range(10):
            async with session.get(proxy.url + "/", headers={"Cookie": "bg_sticky=green"}) as resp:
                await resp.read()
                assert resp.headers["X-Bg-Color"] == "blue"
                assert not resp.headers.getall("Set-Cookie", [])


@dataclass
class Sample:
    sent: float
    color: str | None
    status: int | None
    error: str | None = None


async def test_switch_is_atomic_under_load(proxy: Proxy) -> None:
    loop = asyncio.get_running_loop()
    samples: list[Sample] = []
    stop = asyncio.Event()
    progress = asyncio.Event()
    completed = 0

    async def worker(session: aiohttp.ClientSession, wid: int) -> None:
        nonlocal completed
        i = 0
        while not stop.is_set():
            sent = loop.time()
            try:
                async with session.get(proxy.url + f"/load/{wid}/{i}") as resp:
                    await resp.read()
                    samples.append(Sample(sent, resp.headers.get("X-Bg-Color"), resp.status))
            except (aiohttp.ClientError, OSError) as exc:
                samples.append(Sample(sent, None, None, repr(exc)))
            completed += 1
            progress.set()
            i += 1

    async def wait_for_requests(k: int) -> None:
        """Until k more requests completed (an event, not a sleep)."""
        target = completed + k
        while completed < target:
            progress.clear()
            await progress.wait()

    # (started, returned, new color) for every switch call
    switches: list[tuple[float, float, str]] = []
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        workers = [asyncio.create_task(worker(session, w)) for w in range(30)]
        try:
            await wait_for_requests(60)
            color = "blue"
            for _ in range(20):
                color = "green" if color == "blue" else "blue"
                started = loop.time()
                code, s = await proxy.admin("POST", "/switch", {"color": color})
                returned = loop.time()
                assert code == 200 and s["active"] == color
                switches.append((started, returned, color))
                await wait_for_requests(60)
        finally:
            stop.set()
            await asyncio.gather(*workers)

    errors = [s for s in samples if s.error is not None or s.status != 200]
    assert errors == [], errors[:5]
    assert len(samples) >= 20 * 60

    wrong = []
    checked = 0
    for idx, (_, returned, color) in enumerate(switches):
        until = switches[idx + 1][0] if idx + 1 < len(switches) else float("inf")
        for s in samples:
            if returned < s.sent < until:
                checked += 1
                if s.color != color:
                    wrong.append((idx, color, s))
    assert wrong == [], f"{len(wrong)} requests served by the old color, e.g. {wrong[:3]}"
    assert checked >= 20 * 30  # most windows saw traffic

    code, st = await proxy.admin("GET", "/status")
    assert code == 200
    assert st["generation"] == 21
    assert st["colors"]["blue"]["in_flight"] == 0
    assert st["colors"]["green"]["in_flight"] == 0
