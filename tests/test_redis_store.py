"""RedisStateStore against a real redis-server: compare-and-set, propagation, outages."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from redis.asyncio import Redis

from conftest import RedisServer
from proxy.redis_store import RedisStateStore
from proxy.state import (
    Color,
    Event,
    GenerationMismatch,
    RoutingState,
    StoreUnavailable,
    switch_to,
)

OpenStore = Callable[..., Awaitable[RedisStateStore]]


@pytest.fixture
async def open_store(redis_server: RedisServer) -> AsyncIterator[OpenStore]:
    """``await open_store(seed_color, **kw)``: a started store, closed after the test."""
    stores: list[RedisStateStore] = []

    async def start(color: Color = Color.BLUE, **kw: object) -> RedisStateStore:
        url = str(kw.pop("url", redis_server.url()))
        store = RedisStateStore(url, "t", RoutingState.initial(color), **kw)  # type: ignore[arg-type]
        stores.append(store)
        await store.start(connect_timeout=5)
        return store

    yield start
    for store in reversed(stores):
        await store.close()


def event_for(state: RoutingState, action: str = "switch") -> Event:
    return Event(
        at=state.changed_at,
        generation=state.generation,
        action=action,
        from_=None,
        to=state.active.value,
        trigger="manual",
        reason=None,
        actor="test",
    )


async def flip(store: RedisStateStore) -> RoutingState:
    current = store.snapshot()
    new = switch_to(current, current.active.other, time.time())
    assert new is not None
    return await store.compare_and_set(current.generation, new, event_for(new))


async def until(check: Callable[[], bool], timeout: float = 5.0) -> float:
    """Seconds until ``check()`` holds. State arriving from another process (Redis) has no
    local event to wait on, so this looks every 5 ms, bounded by ``timeout``."""
    start = time.monotonic()
    async with asyncio.timeout(timeout):
        while True:
            if check():
                return time.monotonic() - start
            await asyncio.sleep(0.005)


async def until_async(check: Callable[[], Awaitable[bool]], timeout: float = 5.0) -> float:
    start = time.monotonic()
    async with asyncio.timeout(timeout):
        while True:
            if await check():
                return time.monotonic() - start
            await asyncio.sleep(0.02)


async def test_first_store_seeds_from_config_later_ones_load_it(
    open_store: OpenStore, redis_server: RedisServer
) -> None:
    a = await open_store(Color.GREEN)
    b = await open_store(Color.BLUE)  # its config says blue: the stored state wins
    assert a.snapshot().active is Color.GREEN and a.snapshot().generation == 1
    assert b.snapshot() == a.snapshot()
    async with Redis.from_url(redis_server.url(), decode_responses=True) as r:
        stored = json.loads(await r.get("t:state"))
    assert stored["active"] == "green" and stored["generation"] == 1


async def test_a_write_reaches_the_other_store_and_its_listeners(open_store: OpenStore) -> None:
    a, b = await open_store(), await open_store()
    seen: list[tuple[int, int, str | None]] = []
    b.add_listener(
        lambda old, new, e: seen.append((old.generation, new.generation, e and e.action))
    )
    new = await flip(a)
    took = await until(lambda: b.snapshot().generation == new.generation)
    print(f"\npub/sub propagation: {took * 1000:.1f} ms")
    assert b.snapshot().active is Color.GREEN
    assert seen == [(1, 2, "switch")]  # the other instance's listeners get the event too
    assert [e.generation for e in await b.events(10)] == [2]


async def test_racing_writers_exactly_one_wins_every_time(open_store: OpenStore) -> None:
    a, b = await open_store(), await open_store()
    for _ in range(20):
        await until(lambda: a.snapshot() == b.snapshot())
        results = await asyncio.gather(flip(a), flip(b), return_exceptions=True)
        wins = [r for r in results if isinstance(r, RoutingState)]
        losses = [r for r in results if isinstance(r, GenerationMismatch)]
        assert len(wins) == 1 and len(losses) == 1, results
    assert (await a.events(1))[0].generation == 21


async def test_events_are_capped_newest_first(open_store: OpenStore) -> None:
    a = await open_store(max_events=5)
    for _ in range(8):
        await flip(a)
    assert [e.generation for e in await a.events(100)] == [9, 8, 7, 6, 5]


async def test_an_older_generation_is_never_applied(
    open_store: OpenStore, redis_server: RedisServer
) -> None:
    a = await open_store()
    await flip(a)
    await flip(a)
    old = RoutingState.initial(Color.BLUE)
    async with Redis.from_url(redis_server.url()) as r:
        await r.publish("t:changes", json.dumps(old.to_dict()))
    await asyncio.sleep(0.2)
    assert a.snapshot().generation == 3


async def test_lost_pubsub_is_caught_up_by_the_periodic_reread(
    open_store: OpenStore, redis_server: RedisServer
) -> None:
    a, b = await open_store(), await open_store()
    seen: list[str | None] = []
    b.add_listener(lambda old, new, e: seen.append(e and e.action))
    async with Redis.from_url(redis_server.url()) as r:
        # Kill every pub/sub connection, then write before they can resubscribe.
        await r.execute_command("CLIENT", "KILL", "TYPE", "pubsub")
        new = await flip(a)
        took = await until(lambda: b.snapshot().generation == new.generation, timeout=3)
        print(f"\ncaught up without pub/sub in {took * 1000:.0f} ms")
        # Learnt by re-reading, the change still reaches b's listeners with its event
        # (the rollback watch and the hooks start from it).
        assert seen == ["switch"]
        # ...and the subscription is back: the next change arrives by pub/sub again.

        async def resubscribed() -> bool:
            return bool(await r.pubsub_numsub("t:changes") == [(b"t:changes", 2)])

        await until_async(resubscribed)


async def test_redis_restarted_empty_is_reseeded_with_the_newest_snapshot(
    open_store: OpenStore, redis_server: RedisServer
) -> None:
    a, b = await open_store(), await open_store()
    await flip(a)
    await until(lambda: b.snapshot().generation == 2)
    await redis_server.restart()  # no persistence: empty
    async with Redis.from_url(redis_server.url(), decode_responses=True) as r:

        async def reseeded() -> bool:
            return await r.exists("t:state") == 1

        took = await until_async(reseeded)
        print(f"\nre-seeded {took * 1000:.0f} ms after the restart")
        stored = json.loads(await r.get("t:state"))
    await until(lambda: a.available and b.available, timeout=5)
    assert (stored["generation"], stored["active"]) == (2, "green")
    assert a.snapshot().active is Color.GREEN and b.snapshot().active is Color.GREEN
    await flip(b)  # and writes work again
    await until(lambda: a.snapshot().generation == 3)


async def test_stalled_redis_fails_writes_fast_and_keeps_the_snapshot(
    open_store: OpenStore, redis_server: RedisServer
) -> None:
    a = await open_store()
    redis_server.pause()
    try:
        started = time.monotonic()
        with pytest.raises(StoreUnavailable) as info:
            await flip(a)
        took = time.monotonic() - started
        assert took < 1.5, took
        assert redis_server.url() in str(info.value)
        assert not a.available
        assert a.snapshot().generation == 1  # still serving the last snapshot
        started = time.monotonic()
        with pytest.raises(StoreUnavailable):
            await flip(a)  # known down: refused without waiting
        assert time.monotonic() - started < 0.05
    finally:
        redis_server.resume()
    await until(lambda: a.available, timeout=5)
    await flip(a)


async def test_unreachable_redis_gives_up_after_connect_timeout(
    redis_server: RedisServer,
) -> None:
    url = redis_server.url()
    await redis_server.kill()
    store = RedisStateStore(url, "t", RoutingState.initial(Color.BLUE))
    started = time.monotonic()
    try:
        with pytest.raises(StoreUnavailable) as info:
            await store.start(connect_timeout=0.6)
    finally:
        await store.close()
    assert 0.5 < time.monotonic() - started < 2.0
    assert url in str(info.value) and "0.6s" in str(info.value)


async def test_password_and_db_from_the_url() -> None:
    server = RedisServer("--requirepass", "s3cret")
    await server.start()
    try:
        url = server.url(db=3, password="s3cret")
        store = RedisStateStore(url, "t", RoutingState.initial(Color.GREEN))
        with contextlib.suppress(Exception):
            await store.start(connect_timeout=2)
        try:
            assert store.available and "s3cret" not in store.url and ":***@" in store.url
            async with Redis.from_url(url, decode_responses=True) as r:
                assert json.loads(await r.get("t:state"))["active"] == "green"
            async with Redis.from_url(server.url(db=0, password="s3cret")) as r:
                assert await r.get("t:state") is None
        finally:
            await store.close()
        bad = RedisStateStore(server.url(password="wrong"), "t", RoutingState.initial(Color.BLUE))
        started = time.monotonic()
        with pytest.raises(StoreUnavailable, match="credentials"):
            await bad.start(connect_timeout=5)  # not retried: it will not get better
        await bad.close()
        assert time.monotonic() - started < 1
    finally:
        await server.kill()
