"""Who serves the routing state, and whether they all have the latest: ``/status`` instances.

A ``Fleet`` answers three questions for the admin API: which instances are live (each
with the generation it has applied and its connection counts), how the state store is
doing, and — after a write — which live instances have not applied the new generation
yet (``wait_applied``, bounded). ``LocalFleet`` is one process on the memory store;
``RedisFleet`` is every proxy registered in Redis (see ``proxy.redis_store``). A
supervisor with workers wraps either (``admin.supervisor.WorkerFleet``).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from config import Config, ServiceConfig
from config.schema import DEFAULT_SERVICE
from proxy import __version__
from proxy.redis_store import REDIS_DOWN, RedisStateStore
from proxy.state import Color, MemoryStateStore, RoutingState, StateStore, rfc3339

InstanceSource = Callable[[], list[dict[str, Any]]]


@dataclass(frozen=True, slots=True)
class Identity:
    """How this process names itself to the fleet."""

    id: str
    host: str
    pid: int
    version: str = __version__

    @classmethod
    def for_process(cls) -> Identity:
        host = socket.gethostname()
        pid = os.getpid()
        # hostname:pid can repeat (containers on the host network are all pid 1).
        return cls(id=f"{host}:{pid}:{secrets.token_hex(2)}", host=host, pid=pid)

    def record(self, suffix: str = "", pid: int | None = None) -> dict[str, Any]:
        return {
            "id": self.id + suffix,
            "host": self.host,
            "pid": self.pid if pid is None else pid,
            "version": self.version,
        }


def present(record: dict[str, Any]) -> dict[str, Any]:
    """An instance record as ``/status`` shows it (``last_seen`` as RFC 3339)."""
    seen = record.get("last_seen")
    out = dict(record)
    out["last_seen"] = rfc3339(seen) if isinstance(seen, int | float) else seen
    return out


class Fleet(Protocol):
    def instances(self) -> list[dict[str, Any]]:
        """Live instances for ``/status`` (no I/O)."""
        ...

    def store_status(self) -> dict[str, Any]: ...

    async def refresh(self) -> None:
        """Re-read the other instances' records, if there are any (bounded; never fails)."""
        ...

    def unavailable_detail(self) -> str: ...

    async def wait_applied(self, generation: int, timeout: float) -> list[str]:
        """Wait until every live instance has applied ``generation`` or ``timeout`` passed;
        the IDs of those that had not."""
        ...


class LocalFleet:
    """The memory backend: this one process is the fleet."""

    def __init__(self, store: StateStore, local: InstanceSource) -> None:
        self.store = store
        self.local = local

    def instances(self) -> list[dict[str, Any]]:
        return [present({**r, "last_seen": time.time()}) for r in self.local()]

    def store_status(self) -> dict[str, Any]:
        return {"backend": "memory", "available": self.store.available}

    async def refresh(self) -> None:
        pass

    def unavailable_detail(self) -> str:
        return "the state store is unavailable; try again"

    async def wait_applied(self, generation: int, timeout: float) -> list[str]:
        return []  # a write is applied in this process before it returns


class RedisFleet:
    """Every proxy registered in Redis; this process reports ``local`` in its heartbeat."""

    def __init__(self, store: RedisStateStore, local: InstanceSource, poll: float = 0.1) -> None:
        self.store = store
        self.local = local
        self._poll = poll
        store.instance_source = local

    def instances(self) -> list[dict[str, Any]]:
        known = self.store.instances()
        if not known:  # before the first heartbeat, or Redis down since start
            known = [{**r, "last_seen": time.time()} for r in self.local()]
        return [present(r) for r in sorted(known, key=lambda r: str(r.get("id")))]

    def store_status(self) -> dict[str, Any]:
        return {"backend": "redis", "available": self.store.available, "url": self.store.url}

    async def refresh(self) -> None:
        if self.store.available:  # when it is not, the last list is all there is
            with contextlib.suppress(*REDIS_DOWN):
                await self.store.fetch_instances()

    def unavailable_detail(self) -> str:
        return self.store.unavailable_detail

    def set_local(self, local: InstanceSource) -> None:
        self.local = local
        self.store.instance_source = local

    def kick(self) -> None:
        self.store.kick_heartbeat()

    async def wait_applied(self, generation: int, timeout: float) -> list[str]:
        # Instances report their generation in their heartbeat, which they send at once
        # when they apply a new one, and announce it on pub/sub: the records are re-read on
        # each announcement (or every ``poll`` seconds, should one be lost), until none lags.
        deadline = time.monotonic() + timeout
        self.store.kick_heartbeat()
        lagging: list[str] = [str(r["id"]) for r in self.store.instances()]
        while True:
            marker = self.store.applied_marker()
            try:
                live = await self.store.fetch_instances()
            except REDIS_DOWN:
                return lagging  # cannot confirm anyone further
            lagging = [str(r["id"]) for r in live if int(r.get("generation", 0)) < generation]
            left = deadline - time.monotonic()
            if not lagging or left <= 0:
                return lagging
            await self.store.wait_applied_message(marker, min(self._poll, left))


def key_prefix(config: Config, service: str) -> str:
    """A service's Redis keys: the single-service form keeps today's keys."""
    prefix = config.state.key_prefix
    return prefix if service == DEFAULT_SERVICE else f"{prefix}:svc:{service}"


@contextlib.asynccontextmanager
async def open_store(config: Config, service: ServiceConfig) -> AsyncIterator[StateStore]:
    """``service``'s store of the kind ``state.backend`` names, not yet connected (see
    ``connect_store``)."""
    seed = RoutingState.initial(Color(service.routing.active))
    if config.state.backend != "redis":
        yield MemoryStateStore(seed)
        return
    prefix = key_prefix(config, service.name)
    async with RedisStateStore(config.state.redis_url, prefix, seed) as store:
        yield store


async def connect_store(store: StateStore, config: Config) -> None:
    """Load the shared state (Redis: retried for ``state.connect_timeout``);
    ``StoreUnavailable`` when it cannot."""
    if isinstance(store, RedisStateStore):
        await store.start(config.state.connect_timeout)


def default_fleet(store: StateStore, local: InstanceSource) -> Fleet:
    if isinstance(store, RedisStateStore):
        return RedisFleet(store, local)
    return LocalFleet(store, local)
