"""The routing state shared by a fleet through Redis (``state.backend: redis``).

Keys under ``{prefix}``:

- ``{prefix}:state``      the current ``RoutingState`` as JSON: the one versioned record
- ``{prefix}:events``     the audit trail, newest first, capped (LPUSH + LTRIM)
- ``{prefix}:changes``    pub/sub channel; every accepted write publishes the new record
- ``{prefix}:instance:ID`` one live proxy (JSON), expiring unless its heartbeat renews it
- ``{prefix}:instances``  the set of IDs that may be live (pruned when their key is gone)

Every write is a compare-and-set on the generation run as one Lua script, so two
operators racing get exactly one success. Each instance keeps its own in-memory copy:
``snapshot()`` never awaits Redis. Copies are refreshed from pub/sub *and* from a
periodic re-read, because pub/sub is at-most-once (a message sent while the
subscriber reconnects is lost); an older generation is never applied.

Redis down or stalled: every command has a socket timeout, the instance keeps serving
its last snapshot, ``available`` turns False and writes raise ``StoreUnavailable``.
The re-read loop reconnects with backoff; once a read succeeds the copy is resynced
and writes are accepted again. A store found empty, or behind this instance (Redis
restarted without persistence, or from an old dump), is re-seeded from this
instance's snapshot by a script that only ever raises the stored generation, so
every instance doing it at once converges on the newest snapshot any of them holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
from collections.abc import Callable, Coroutine
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import AuthenticationError, RedisError
from redis.exceptions import ConnectionError as RedisConnectionError

from proxy.redis_scripts import CAS, LEASE, RELEASE, SEED
from proxy.state import (
    Event,
    GenerationMismatch,
    Listener,
    RoutingState,
    StoreUnavailable,
)
from proxy.tasks import Tasks

log = logging.getLogger("bgproxy.redis")

# What "Redis is not answering" looks like from redis-py and the socket layer.
REDIS_DOWN = (RedisError, OSError, TimeoutError)



def safe_url(url: str) -> str:
    """``url`` without its password, for messages and ``/status``."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    user = f"{parts.username}:***@" if parts.username else ":***@"
    return urlunsplit(parts._replace(netloc=user + host))


def _reason(exc: BaseException) -> str:
    # Our own words for the common cases; redis-py's text can be long and nested.
    if isinstance(exc, TimeoutError) or "Timeout" in type(exc).__name__:
        return "did not answer in time"
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text[:200]


async def _wait(event: asyncio.Event, timeout: float) -> None:
    """Until ``event`` is set or ``timeout`` passes; then clear it. A timer sets the event
    (rather than ``asyncio.timeout`` around the wait): a cancel that races the timeout is
    never swallowed, so ``close`` cannot hang on a loop that missed its cancellation."""
    handle = asyncio.get_running_loop().call_later(timeout, event.set)
    try:
        await event.wait()
    finally:
        handle.cancel()
        event.clear()


def _dumps(data: dict[str, Any]) -> str:
    return json.dumps(data, separators=(",", ":"))


def encode_event(event: Event) -> str:
    return _dumps(
        {
            "at": event.at,
            "generation": event.generation,
            "action": event.action,
            "from": event.from_,
            "to": event.to,
            "trigger": event.trigger,
            "reason": event.reason,
            "actor": event.actor,
            "details": event.details,
        }
    )


def decode_event(raw: str | bytes) -> Event:
    d = json.loads(raw)
    return Event(
        at=float(d["at"]),
        generation=int(d["generation"]),
        action=str(d["action"]),
        from_=d.get("from"),
        to=str(d["to"]),
        trigger=str(d.get("trigger", "manual")),
        reason=d.get("reason"),
        actor=str(d.get("actor", "admin")),
        details=dict(d.get("details") or {}),
    )


def _decode_state(raw: str | bytes) -> RoutingState | None:
    try:
        return RoutingState.from_dict(json.loads(raw))
    except (ValueError, KeyError, TypeError):
        log.error("ignoring an unreadable routing state record: %.200r", raw)
        return None


class RedisStateStore:
    """``StateStore`` over Redis. ``start`` connects (or gives up); ``close`` stops."""

    backend = "redis"

    def __init__(
        self,
        url: str,
        prefix: str,
        seed: RoutingState,
        *,
        op_timeout: float = 0.5,
        resync_interval: float = 1.0,
        heartbeat_interval: float = 1.0,
        instance_ttl: float = 5.0,
        max_events: int = 1000,
    ) -> None:
        self.url = safe_url(url)
        self._seed = seed
        self._op_timeout = op_timeout
        self._resync_interval = resync_interval
        self._heartbeat_interval = heartbeat_interval
        self._ttl_ms = int(instance_ttl * 1000)
        self._max_events = max_events
        self._key = f"{prefix}:state"
        self._events_key = f"{prefix}:events"
        self._channel = f"{prefix}:changes"
        self._applied_channel = f"{prefix}:applied"  # "an instance reported a new generation"
        self._instance_prefix = f"{prefix}:instance:"
        self._instances_key = f"{prefix}:instances"
        # One immediate retry on a broken connection only: after a Redis restart every
        # pooled connection is dead and fails once. Never on a timeout: redis-py's default
        # backoff would stretch a stalled Redis into a hung admin write; our loops back off.
        self._redis: Redis = Redis.from_url(
            url,
            socket_timeout=op_timeout,
            socket_connect_timeout=op_timeout,
            retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
            decode_responses=True,
        )
        self._cas = self._redis.register_script(CAS)
        self._seed_script = self._redis.register_script(SEED)
        self._lease_script = self._redis.register_script(LEASE)
        self._release_script = self._redis.register_script(RELEASE)
        self._prefix = prefix
        # Until ``start`` loads the stored state, only metrics and /status read this seed:
        # the data plane starts after it (it never routes by config defaults).
        self._state = seed
        self._listeners: list[Listener] = []
        self._available = False
        self._down_reason = "not connected yet"
        self._tasks = Tasks()
        self._closing = False
        self._wake_resync = asyncio.Event()
        self._wake_heartbeat = asyncio.Event()
        self._instances: list[dict[str, Any]] = []
        self._registered: set[str] = set()
        self._reported: dict[str, int] = {}  # generation each local instance last reported
        self._applied = asyncio.Event()  # replaced after each "applied" message
        # What this process reports as live instances (itself, or its workers).
        self.instance_source: Callable[[], list[dict[str, Any]]] = list

    # -- the StateStore protocol ------------------------------------------------------------

    def snapshot(self) -> RoutingState:
        return self._state

    @property
    def available(self) -> bool:
        return self._available

    @property
    def unavailable_detail(self) -> str:
        gen = self._state.generation
        return (
            f"state store unavailable: Redis at {self.url} {self._down_reason}; writes are "
            f"refused until it is back (traffic keeps flowing on generation {gen})"
        )

    def add_listener(self, listener: Listener) -> None:
        self._listeners.append(listener)

    async def compare_and_set(
        self, expected_generation: int, new: RoutingState, event: Event
    ) -> RoutingState:
        if not self._available:
            raise StoreUnavailable(self.unavailable_detail)
        args: list[str | int] = [expected_generation, _dumps(new.to_dict()), encode_event(event)]
        message = _dumps({"state": new.to_dict(), "event": args[2]})
        args += [self._max_events, self._channel, message]
        keys = [self._key, self._events_key]
        try:
            async with asyncio.timeout(self._op_timeout * 2):
                result = await self._cas(keys=keys, args=args)
                if int(result[0]) == -1:
                    # Emptied under us (restart without persistence): re-seed, then retry once.
                    await self._reseed()
                    result = await self._cas(keys=keys, args=args)
        except REDIS_DOWN as exc:
            self._mark_down(exc)
            raise StoreUnavailable(
                f"Redis at {self.url} {_reason(exc)}; the change was not confirmed "
                "(check /status before retrying)"
            ) from exc
        code = int(result[0])
        if code == 1 or (code == 0 and result[1] == args[1]):
            # (A retried script that had in fact run finds its own record: that is success.)
            self._apply(new, event)
            return new
        current = _decode_state(result[1]) if code == 0 else None
        if current is not None:
            self._apply(current)
        at = current.generation if current else "unknown"
        raise GenerationMismatch(f"state is at generation {at}, not {expected_generation}")

    async def events(self, limit: int) -> list[Event]:
        try:
            async with asyncio.timeout(self._op_timeout * 2):
                raws = await self._redis.lrange(self._events_key, 0, max(0, limit) - 1)
        except REDIS_DOWN as exc:
            self._mark_down(exc)
            raise StoreUnavailable(f"Redis at {self.url} {_reason(exc)}") from exc
        out = []
        for raw in raws:
            with contextlib.suppress(ValueError, KeyError, TypeError):
                out.append(decode_event(raw))
        return out

    # -- the fleet ----------------------------------------------------------------------------

    def instances(self) -> list[dict[str, Any]]:
        """Live instances as of the last heartbeat (no I/O)."""
        return self._instances

    async def fetch_instances(self) -> list[dict[str, Any]]:
        """Live instances, read now."""
        try:
            async with asyncio.timeout(self._op_timeout * 2):
                ids = sorted(str(i) for i in await self._redis.smembers(self._instances_key))
                if not ids:
                    return []
                raws = await self._redis.mget([self._instance_prefix + i for i in ids])
                gone = [i for i, raw in zip(ids, raws, strict=True) if raw is None]
                if gone:
                    await self._redis.srem(self._instances_key, *gone)
        except REDIS_DOWN as exc:
            self._mark_down(exc)
            raise
        live = []
        for raw in raws:
            if raw is not None:
                with contextlib.suppress(ValueError):
                    live.append(json.loads(raw))
        self._instances = live
        return live

    def applied_marker(self) -> asyncio.Event:
        """Set by the next "applied" message from any instance: take it before reading the
        records, then ``wait_applied_message(marker, ...)`` misses nothing in between."""
        return self._applied

    async def wait_applied_message(self, marker: asyncio.Event, timeout: float) -> None:
        """Until ``marker`` is set or ``timeout`` passed (pub/sub may lose the message)."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(marker.wait(), timeout)

    def kick_heartbeat(self) -> None:
        """Report now rather than at the next tick (a new generation was applied)."""
        self._wake_heartbeat.set()

    # -- leases: one instance of the fleet does a job (drives a rollout) -------------------

    async def hold_lease(self, name: str, owner: str, ttl: float) -> bool:
        """Take or renew the lease ``name`` for ``ttl`` seconds; False when another owner
        holds it or Redis is not answering (then nobody can prove they hold it)."""
        if not self._available:
            return False
        try:
            async with asyncio.timeout(self._op_timeout * 2):
                got = await self._lease_script(
                    keys=[f"{self._prefix}:lease:{name}"], args=[owner, int(ttl * 1000)]
                )
        except REDIS_DOWN as exc:
            self._mark_down(exc)
            return False
        return int(got) == 1

    async def release_lease(self, name: str, owner: str) -> None:
        with contextlib.suppress(*REDIS_DOWN):
            async with asyncio.timeout(self._op_timeout):
                await self._release_script(keys=[f"{self._prefix}:lease:{name}"], args=[owner])

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self, connect_timeout: float) -> None:
        """Load the stored state (seeding it when there is none), retrying with backoff for
        ``connect_timeout``; then start the pub/sub, re-read and heartbeat loops."""
        deadline = time.monotonic() + connect_timeout
        delay = 0.1
        while True:
            try:
                async with asyncio.timeout(self._op_timeout * 2):
                    seeded, raw = await self._run_seed(self._seed)
                break
            except AuthenticationError as exc:
                raise StoreUnavailable(f"Redis at {self.url} refused the credentials") from exc
            except REDIS_DOWN as exc:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise StoreUnavailable(
                        f"cannot reach Redis at {self.url} within {connect_timeout:g}s "
                        f"({_reason(exc)})"
                    ) from exc
                self._down_reason = _reason(exc)
                log.warning("waiting for Redis at %s: %s", self.url, self._down_reason)
                await asyncio.sleep(min(delay, left))
                delay = min(delay * 2, 2.0)
        state = _decode_state(raw)
        if state is None:
            raise StoreUnavailable(f"Redis at {self.url} holds an unreadable state at {self._key}")
        self._state = state
        self._available = True
        log.info(
            "routing state %s Redis at %s: generation %d (%s)",
            "seeded into" if seeded else "loaded from",
            self.url,
            state.generation,
            state.active.value,
        )
        self._spawn(self._resync_loop(), "redis-resync")
        self._spawn(self._pubsub_loop(), "redis-pubsub")
        self._wake_heartbeat.set()  # register at once, not a tick later
        self._spawn(self._heartbeat_loop(), "redis-heartbeat")

    async def close(self) -> None:
        self._closing = True  # loops also stop by themselves, should a cancel get lost
        await self._tasks.cancel_all()
        if self._registered and self._available:
            # Leave the fleet at once rather than after the TTL (best effort).
            with contextlib.suppress(*REDIS_DOWN):
                async with asyncio.timeout(self._op_timeout):
                    keys = [self._instance_prefix + i for i in self._registered]
                    await self._redis.delete(*keys)
                    await self._redis.srem(self._instances_key, *self._registered)
        self._available = False
        await self._redis.aclose()

    async def __aenter__(self) -> RedisStateStore:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- applying snapshots -----------------------------------------------------------------

    def _apply(self, new: RoutingState, event: Event | None = None) -> bool:
        """Make ``new`` current if it is newer; listeners run on every applied change."""
        old = self._state
        if new.generation <= old.generation:
            return False
        self._state = new
        for listener in self._listeners:
            try:
                listener(old, new, event)
            except Exception:
                log.exception("state listener failed")
        self._wake_heartbeat.set()
        return True

    def _on_message(self, raw: str) -> None:
        # A change message {"state", "event"}; a re-seed publishes the bare state.
        event = None
        with contextlib.suppress(ValueError, TypeError, KeyError):
            msg = json.loads(raw)
            if isinstance(msg, dict) and "state" in msg:
                event = decode_event(msg["event"])
                raw = _dumps(msg["state"])
        state = _decode_state(raw)
        if state is not None:
            self._apply(state, event)

    def _mark_down(self, exc: BaseException) -> None:
        self._down_reason = _reason(exc)
        if self._available:
            self._available = False
            log.warning(
                "Redis at %s unavailable (%s): serving generation %s, refusing writes",
                self.url,
                self._down_reason,
                self._state.generation,
            )

    async def _run_seed(self, candidate: RoutingState) -> tuple[bool, str]:
        args: list[str | int] = [_dumps(candidate.to_dict()), candidate.generation, self._channel]
        written, raw = await self._seed_script(keys=[self._key], args=args)
        return int(written) == 1, str(raw)

    async def _reseed(self) -> None:
        """Store our snapshot if Redis is empty or behind us; apply what it then holds."""
        mine = self.snapshot()
        seeded, raw = await self._run_seed(mine)
        if seeded:
            log.warning(
                "Redis at %s was empty or behind: re-seeded with generation %d (%s)",
                self.url,
                mine.generation,
                mine.active.value,
            )
            return
        stored = _decode_state(raw)
        if stored is not None:
            self._apply(stored)

    async def _resync(self) -> None:
        raw = await self._redis.get(self._key)
        stored = _decode_state(raw) if raw is not None else None
        if raw is None or (stored is not None and stored.generation < self.snapshot().generation):
            await self._reseed()
        elif stored is not None:
            self._apply(stored, await self._event_for(stored))

    async def _event_for(self, state: RoutingState) -> Event | None:
        """The event that made ``state`` (pushed with it by the CAS script): a change learnt
        by a resync, not pub/sub, reaches the listeners (rollback watch, hooks) with it."""
        if state.generation > self._state.generation:
            for raw in await self._redis.lrange(self._events_key, 0, 4):
                with contextlib.suppress(ValueError, KeyError, TypeError):
                    if (event := decode_event(raw)).generation == state.generation:
                        return event
        return None

    # -- loops ---------------------------------------------------------------------------------

    def _spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> None:
        self._tasks.spawn(coro, name)

    async def _resync_loop(self) -> None:
        failures = 0
        while not self._closing:
            delay = self._resync_interval
            if failures:
                # Backoff with jitter so a fleet does not reconnect in lockstep.
                delay = min(0.1 * 2 ** (failures - 1), 2.0) * random.uniform(0.8, 1.2)
            await _wait(self._wake_resync, delay)
            try:
                async with asyncio.timeout(self._op_timeout * 2):
                    await self._resync()
            except REDIS_DOWN as exc:
                self._mark_down(exc)
                failures += 1
                continue
            failures = 0
            if not self._available:
                self._available = True
                log.info(
                    "Redis at %s is back: resynced at generation %d",
                    self.url,
                    self.snapshot().generation,
                )
                self._wake_heartbeat.set()

    async def _pubsub_loop(self) -> None:
        delay = 0.1
        while not self._closing:
            pubsub = self._redis.pubsub()
            try:
                async with asyncio.timeout(self._op_timeout * 2):
                    await pubsub.subscribe(self._channel, self._applied_channel)
                # Whatever was published while we were not subscribed is only in the record.
                self._wake_resync.set()
                delay = 0.1
                await self._listen(pubsub)
            except REDIS_DOWN as exc:
                log.debug("pub/sub on %s lost (%s); resubscribing", self.url, _reason(exc))
            finally:
                with contextlib.suppress(*REDIS_DOWN):
                    await pubsub.aclose()  # type: ignore[no-untyped-call,unused-ignore]
            await asyncio.sleep(delay * random.uniform(0.8, 1.2))
            delay = min(delay * 2, 2.0)

    async def _listen(self, pubsub: Any) -> None:
        # A silently dead connection delivers nothing; a PING that is not answered exposes it.
        last_rx = time.monotonic()
        pinged = 0.0
        while not self._closing:
            msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
            now = time.monotonic()
            if msg is not None:
                last_rx, pinged = now, 0.0
                if msg.get("type") != "message":
                    continue
                if msg.get("channel") == self._applied_channel:
                    self._applied.set()
                    self._applied = asyncio.Event()
                else:
                    self._on_message(msg["data"])
            elif pinged and now - pinged > 3.0:
                raise TimeoutError("pub/sub connection stopped answering")
            elif not pinged and now - last_rx > 5.0:
                pinged = now
                await pubsub.ping()

    async def _heartbeat_loop(self) -> None:
        while not self._closing:
            await _wait(self._wake_heartbeat, self._heartbeat_interval)
            if not self._available:
                continue
            try:
                await self._beat()
            except REDIS_DOWN as exc:
                self._mark_down(exc)

    async def _beat(self) -> None:
        now = time.time()
        records = [{**r, "last_seen": now} for r in self.instance_source()]
        ids = {str(r["id"]) for r in records}
        reported = {str(r["id"]): int(r.get("generation", 0)) for r in records}
        # Tell waiting writers only when a generation moved, not on every beat.
        moved = any(self._reported.get(i) != g for i, g in reported.items())
        async with asyncio.timeout(self._op_timeout * 2):
            async with self._redis.pipeline(transaction=False) as pipe:
                for record in records:
                    key = self._instance_prefix + str(record["id"])
                    pipe.set(key, _dumps(record), px=self._ttl_ms)
                if ids:
                    pipe.sadd(self._instances_key, *ids)
                # IDs this process reported before and no longer does (a replaced worker).
                for old in self._registered - ids:
                    pipe.delete(self._instance_prefix + old)
                    pipe.srem(self._instances_key, old)
                if moved:
                    pipe.publish(self._applied_channel, _dumps(reported))
                await pipe.execute()
        self._registered = ids
        self._reported = reported
        await self.fetch_instances()
