"""``bgproxy serve --workers N``: N data-plane processes on one port, one routing state
per service.

This module is the worker side and the channel protocol; the supervisor side is
``admin/supervisor.py``.

The supervisor (the process ``serve`` started) owns the admin API and the state store
(memory or Redis) and serves no traffic itself. For each worker it binds a listening
socket on ``listen`` with SO_REUSEPORT, so the kernel spreads new connections across
the workers, and keeps that socket open: a worker that dies is restarted on the same
socket and the connections queued meanwhile wait for it instead of being refused.

Each worker is a fresh interpreter (``python -m admin.workers``) that inherits its
socket and one end of a socketpair: no fork of a running event loop. Over that channel,
newline-delimited JSON:

- supervisor → worker: ``state`` (a service's every new snapshot, and each service's
  current one at start; ``svc`` names the service), ``health`` (a service's targets'
  health from the supervisor's checker, the only one of the tree: whole, at start,
  whenever a target flips and after a reload), ``reply`` (to a request below);
- worker → supervisor: ``report`` (per service, the generation it has applied, its
  per-color in-flight and WebSocket counts and its cumulative traffic counters; sent at
  once after applying a snapshot, so it is the acknowledgement, and every 250 ms),
  ``cas`` and ``events`` (a worker's own writes, e.g. its automatic rollback, go
  through the supervisor's store of that ``svc``), ``fail`` (a connect failure to a
  target: the supervisor counts it like a failed check, so passive marking reaches every
  worker and is undone by the supervisor's checks).

An admin write answers once every running worker has acknowledged the new generation
(or the bounded wait names the laggards). With ``state.backend: redis`` each worker is
registered as a fleet instance by the supervisor's heartbeat. SIGTERM/SIGINT and SIGHUP
are forwarded; a worker whose supervisor vanished shuts down gracefully.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import socket
import sys
from collections.abc import Coroutine
from typing import Any

from admin.runner import (
    Running,
    StartupError,
    graceful_stop,
    reload_config,
    run_loop,
    running,
    settle_heap,
)
from config import Config, ConfigError, load_config
from proxy.health import HealthReport, apply_health
from proxy.pools import Upstream
from proxy.redis_store import decode_event, encode_event
from proxy.server import ProxyServer
from proxy.service import Service
from proxy.state import (
    COLORS,
    Color,
    Event,
    GenerationMismatch,
    InvalidWeights,
    Listener,
    NothingToRollBack,
    RoutingState,
    StateError,
    StateStore,
    StoreUnavailable,
)
from proxy.tasks import Tasks

log = logging.getLogger("bgproxy.workers")

CHANNEL_LIMIT = 8 * 1024 * 1024  # one line: an events reply of up to 1000 events
REPORT_EVERY = 0.25
START_TIMEOUT = 30.0
_ERRORS: dict[str, type[StateError]] = {
    cls.code: cls
    for cls in (GenerationMismatch, NothingToRollBack, InvalidWeights, StoreUnavailable)
}


def encode_line(msg: dict[str, Any]) -> bytes:
    return json.dumps(msg, separators=(",", ":")).encode() + b"\n"


def _counts(values: dict[Color, int]) -> dict[str, int]:
    return {c.value: values[c] for c in COLORS}


def _stats(server: Service) -> dict[str, Any]:
    """A worker's cumulative traffic counters (the supervisor adds up the differences), so
    that metrics and the rollback watch on the supervisor see every worker's requests."""
    return {
        "responses": [[c.value, s, n] for (c, s), n in server.responses.items()],
        "upstream_errors": [[c.value, k, n] for (c, k), n in server.upstream_errors.items()],
        "reconnects": _counts(server.drain.reconnects_sent),
        "traffic": {
            c.value: [t.requests, t.errors, t.latency_sum, list(t.counts)]
            for c, t in server.traffic.colors.items()
        },
    }


# -- the worker side -----------------------------------------------------------------------


class ChannelStore:
    """A worker's ``StateStore`` of one service: snapshots pushed by the supervisor, writes
    sent to it over the worker's one channel."""

    backend = "supervisor"

    def __init__(self, channel: Channel, service: str) -> None:
        self.channel = channel
        self.service = service
        self._state: RoutingState | None = None
        self._listeners: list[Listener] = []

    def snapshot(self) -> RoutingState:
        if self._state is None:
            raise StoreUnavailable("no routing state from the supervisor yet")
        return self._state

    @property
    def available(self) -> bool:
        return not self.channel.closed.is_set()

    def add_listener(self, listener: Listener) -> None:
        self._listeners.append(listener)

    async def compare_and_set(
        self, expected_generation: int, new: RoutingState, event: Event
    ) -> RoutingState:
        msg = {"t": "cas", "expected": expected_generation, "state": new.to_dict()}
        reply = await self.channel.request(self.service, {**msg, "event": encode_event(event)})
        state = RoutingState.from_dict(reply["state"])
        self.apply(state, event)
        return state

    async def events(self, limit: int) -> list[Event]:
        reply = await self.channel.request(self.service, {"t": "events", "limit": limit})
        return [decode_event(raw) for raw in reply["events"]]

    def apply(self, new: RoutingState, event: Event | None = None) -> None:
        old = self._state
        if old is not None and new.generation <= old.generation:
            return
        self._state = new
        if old is not None:
            for listener in self._listeners:
                try:
                    listener(old, new, event)
                except Exception:
                    log.exception("state listener failed")
            self.channel.report()  # the acknowledgement the supervisor's admin call waits for


class Channel:
    """A worker's end of its channel to the supervisor: one ``ChannelStore`` per service."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, services: list[str]
    ) -> None:
        self._reader = reader
        self._writer = writer
        self.stores = {name: ChannelStore(self, name) for name in services}
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._next_id = 0
        self._server: ProxyServer | None = None
        # The supervisor's last health report of each service, kept to apply again to the
        # pools a reload builds (new targets in it included).
        self.health: dict[str, HealthReport] = {}
        self._followed: ProxyServer | None = None  # the server whose pools follow it
        self._tasks = Tasks()
        self.closed = asyncio.Event()  # the supervisor is gone

    async def wait_initial(self, timeout: float) -> None:
        """Read the supervisor's first snapshot and health report of every service (before
        the data plane: a new worker never starts with stale "all healthy")."""
        async with asyncio.timeout(timeout):
            while any(
                store._state is None or name not in self.health
                for name, store in self.stores.items()
            ):
                line = await self._reader.readline()
                if not line:
                    raise StoreUnavailable("the supervisor closed the channel")
                self._handle(json.loads(line))

    def follow_health(self, server: ProxyServer) -> None:
        """Before ``server`` serves: its pools take the supervisor's health, and its connect
        failures go to the supervisor (this process runs no health checker)."""
        self._followed = server
        server.send_connect_failure = self._connect_failed
        self.apply_health()

    def apply_health(self) -> None:
        """The last reports, to the followed server's current pools (e.g. after a reload)."""
        server = self._followed
        if server is None:
            return
        for name, report in self.health.items():
            service = server.services.get(name)
            if service is not None:
                apply_health(service, report)

    def _connect_failed(self, service: Service, upstream: Upstream, kind: str) -> None:
        if self._writer.is_closing():
            return
        msg = {"t": "fail", "svc": service.name, "color": upstream.color.value}
        self._writer.write(encode_line({**msg, "url": upstream.url, "kind": kind}))

    def start(self, server: ProxyServer) -> None:
        """The data plane is up: acknowledge, then follow the channel and report."""
        self._server = server
        self.report()
        self._spawn(self._read_loop(), "channel-read")
        self._spawn(self._report_loop(), "channel-report")

    async def close(self) -> None:
        await self._tasks.cancel_all()
        self._writer.close()

    def report(self) -> None:
        server = self._server
        if server is None or self._writer.is_closing():
            return
        services = {
            name: {
                "generation": store.snapshot().generation,
                "in_flight": _counts(server.services[name].in_flight),
                "websockets": _counts(server.services[name].websockets),
                "stats": _stats(server.services[name]),
            }
            for name, store in self.stores.items()
            if name in server.services
        }
        dropped = server.observer.dropped if server.observer is not None else 0
        report: dict[str, Any] = {"t": "report", "services": services, "log_dropped": dropped}
        if server.edge is not None:
            report["tls"] = dict(server.edge.handshakes)  # cumulative, this process
        self._writer.write(encode_line(report))

    def _spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> None:
        self._tasks.spawn(coro, name)

    def _handle(self, msg: dict[str, Any]) -> None:
        kind = msg.get("t")
        if kind == "state":
            store = self.stores.get(str(msg.get("svc")))
            if store is not None:
                event = decode_event(msg["event"]) if msg.get("event") else None
                store.apply(RoutingState.from_dict(msg["state"]), event)
        elif kind == "health":
            name = str(msg.get("svc"))
            self.health[name] = msg["targets"]
            server = self._followed
            if server is not None and name in server.services:
                apply_health(server.services[name], msg["targets"])
        elif kind == "reply":
            fut = self._pending.pop(int(msg["id"]), None)
            if fut is not None and not fut.done():
                fut.set_result(msg)

    async def _read_loop(self) -> None:
        try:
            while line := await self._reader.readline():
                self._handle(json.loads(line))
        except (ConnectionError, ValueError) as exc:
            log.error("channel to the supervisor broke: %s", exc)
        finally:
            self.closed.set()
            for fut in self._pending.values():
                if not fut.done():
                    fut.set_exception(StoreUnavailable("the supervisor is gone"))

    async def _report_loop(self) -> None:
        while True:
            await asyncio.sleep(REPORT_EVERY)
            self.report()

    async def request(self, service: str, msg: dict[str, Any]) -> dict[str, Any]:
        if self.closed.is_set():
            raise StoreUnavailable("the supervisor is gone")
        self._next_id += 1
        rid = self._next_id
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[rid] = fut
        self._writer.write(encode_line({**msg, "svc": service, "id": rid}))
        try:
            async with asyncio.timeout(5.0):
                reply = await fut
        except TimeoutError:
            raise StoreUnavailable("the supervisor did not answer") from None
        finally:
            self._pending.pop(rid, None)
        if not reply.get("ok"):
            cls = _ERRORS.get(str(reply.get("error")), StateError)
            raise cls(str(reply.get("detail", "refused")))
        return reply


async def _worker(
    config: Config, path: str, listen_fd: int, channel_fd: int, tls_fd: int | None = None
) -> int:
    sock = socket.socket(fileno=listen_fd)
    tls_sock = socket.socket(fileno=tls_fd) if tls_fd is not None else None
    chan = socket.socket(fileno=channel_fd)
    reader, writer = await asyncio.open_unix_connection(sock=chan, limit=CHANNEL_LIMIT)
    channel = Channel(reader, writer, [svc.name for svc in config.services])
    try:
        await channel.wait_initial(START_TIMEOUT)
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        stores: dict[str, StateStore] = dict(channel.stores)
        async with running(
            config, stores=stores, sock=sock, tls_sock=tls_sock, admin=False,
            health_checks=False, before_serving=channel.follow_health,
        ) as run:  # fmt: skip
            channel.start(run.server)
            settle_heap()
            loop.add_signal_handler(signal.SIGTERM, stop.set)
            loop.add_signal_handler(signal.SIGINT, stop.set)
            loop.add_signal_handler(signal.SIGHUP, _reload, run, path, channel)
            if run.observer is not None:  # logrotate: the supervisor forwards SIGUSR1
                loop.add_signal_handler(signal.SIGUSR1, run.observer.reopen)
            orphaned = loop.create_task(channel.closed.wait(), name="supervisor-gone")
            stopped = loop.create_task(stop.wait(), name="stop-signal")
            await asyncio.wait({orphaned, stopped}, return_when=asyncio.FIRST_COMPLETED)
            for task in (orphaned, stopped):
                task.cancel()
            await graceful_stop(run, run.server.config.drain.timeout)
    finally:
        await channel.close()
    return 0


def _reload(run: Running, path: str, channel: Channel) -> None:
    # The new pools' stats start from the supervisor's view, not "all healthy".
    if reload_config(run, path):
        channel.apply_health()


def worker_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bgproxy-worker")
    parser.add_argument("--config", required=True)
    parser.add_argument("--listen-fd", type=int, required=True)
    parser.add_argument("--channel-fd", type=int, required=True)
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--tls-listen-fd", type=int, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=os.environ.get("BGPROXY_LOG_LEVEL", "INFO").upper(),
        format=f"%(asctime)s %(levelname)s %(name)s[w{args.index}]: %(message)s",
        stream=sys.stderr,
    )
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    try:
        return run_loop(
            _worker(config, args.config, args.listen_fd, args.channel_fd, args.tls_listen_fd)
        )
    except StartupError as exc:
        print(f"bgproxy worker {args.index}: {exc}", file=sys.stderr)
        return exc.code
    except StateError as exc:
        print(f"bgproxy worker {args.index}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1:]))
