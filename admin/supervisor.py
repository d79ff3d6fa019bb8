"""``bgproxy serve --workers N``, the supervisor side: sockets, worker processes, and the
flip that every worker must acknowledge before an admin write answers.

The worker side and the channel protocol are described in ``admin/workers.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import signal
import socket
import sys
import time
from collections.abc import Callable, Coroutine
from typing import Any

from admin.fleet import Fleet, Identity, RedisFleet, present
from admin.runner import (
    Running,
    StartupError,
    reload_config,
    running,
)
from admin.view import ControlRuntime
from admin.workers import (
    CHANNEL_LIMIT,
    START_TIMEOUT,
    encode_line,
)
from config import Config, ConfigError, HostPort, load_config
from proxy.health import health_report
from proxy.pools import record_result
from proxy.redis_store import decode_event, encode_event
from proxy.service import Service
from proxy.state import (
    COLORS,
    Color,
    Event,
    RoutingState,
    StateError,
    StateStore,
)
from proxy.tasks import Tasks

log = logging.getLogger("bgproxy.workers")


def _health_line(service: Service) -> bytes:
    """The channel message with ``service``'s targets' health, whole."""
    return encode_line({"t": "health", "svc": service.name, "targets": health_report(service)})

# -- the supervisor side -------------------------------------------------------------------


def listen_sockets(listen: HostPort, n: int, key: str = "listen") -> list[socket.socket]:
    """``n`` listening sockets on one address with SO_REUSEPORT (port 0: the first one's);
    ``key`` names the config key in an error."""
    socks: list[socket.socket] = []
    port = listen.port
    try:
        for _ in range(n):
            infos = socket.getaddrinfo(
                listen.host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
            )
            family, kind, proto, _, addr = infos[0]
            sock = socket.socket(family, kind, proto)
            socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind(addr)
            sock.listen(2048)
            port = sock.getsockname()[1]
    except OSError as exc:
        for sock in socks:
            sock.close()
        raise StartupError(f"{key}: cannot listen on {listen}: {exc.strerror}") from exc
    return socks


class SlotService:
    """What one worker process last reported of one service."""

    def __init__(self) -> None:
        self.acked = 0  # generation the running process has reported applied
        self.in_flight: dict[str, int] = dict.fromkeys((c.value for c in COLORS), 0)
        self.websockets: dict[str, int] = dict.fromkeys((c.value for c in COLORS), 0)
        self.seen: dict[tuple[str, ...], Any] = {}  # its cumulative counters, last report


class Slot:
    """One worker position: its socket outlives the processes that serve it."""

    def __init__(self, index: int, sock: socket.socket, ident: str, services: list[str]) -> None:
        self.index = index
        self.sock = sock
        self.id = ident
        self.proc: asyncio.subprocess.Process | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.services = {name: SlotService() for name in services}
        self.last_seen = 0.0
        self.ready = False  # reported at least once since it was started
        self.tls_sock: socket.socket | None = None  # its share of tls.listen, if any
        self.tls_seen: dict[str, int] = {}  # its TLS handshake counts, last report
        self.log_dropped = 0  # access-log lines the running process reported dropped

    def reset(self) -> None:
        self.proc = self.writer = None
        self.ready = False
        self.log_dropped = 0
        # A new process counts from zero.
        self.services = {name: SlotService() for name in self.services}
        self.tls_seen = {}


class WorkerPool:
    """Starts, feeds, watches and restarts the workers; an async context manager."""

    def __init__(
        self,
        run: Running,
        runtime: ControlRuntime,
        config_path: str,
        socks: list[socket.socket],
        identity: Identity,
        on_ack: Callable[[], None] = lambda: None,
        tls_socks: list[socket.socket] | None = None,
    ) -> None:
        self.run = run
        self.runtime = runtime  # run's view: the services whose counters sum the workers'
        self.controls = dict(run.control.services)
        self.path = config_path
        self.identity = identity
        self.on_ack = on_ack
        names = list(self.controls)
        self.slots = [Slot(i, s, f"{identity.id}/w{i}", names) for i, s in enumerate(socks)]
        for slot, tls_sock in zip(self.slots, tls_socks or (), strict=False):
            slot.tls_sock = tls_sock
        self.stopping = False
        self.started = False  # every worker has served once: from now on, deaths restart
        self._acked = asyncio.Event()
        self._failed: str | None = None
        # The workers' TLS handshakes, summed across restarts: what /metrics reports.
        self.tls_handshakes: dict[str, int] = {}
        run.control.tls_handshakes = self.tls_handshakes
        self._tasks = Tasks()

    async def __aenter__(self) -> WorkerPool:
        for name, control in self.controls.items():
            control.store.add_listener(functools.partial(self._push, name))
        if self.run.health is not None:  # the tree's only checker: workers follow it
            self.run.health.add_listener(self.push_health)
        for slot in self.slots:
            self._spawn(self._keep_running(slot), f"worker-{slot.index}")
        try:
            async with asyncio.timeout(START_TIMEOUT):
                while not all(s.ready for s in self.slots):
                    if self._failed:
                        raise StartupError(self._failed)
                    await self._next_ack()
        except TimeoutError:
            await self._stop_all(0)
            raise StartupError(f"workers did not start within {START_TIMEOUT:g}s") from None
        except BaseException:
            await self._stop_all(0)
            raise
        self.started = True
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._stop_all(0)

    # -- what the admin API asks -------------------------------------------------------------

    def instances(self, service: str) -> list[dict[str, Any]]:
        out = []
        for slot in self.slots:
            if slot.proc is None:
                continue
            record = self.identity.record(f"/w{slot.index}", pid=slot.proc.pid)
            seen = slot.services[service]
            out.append(
                {
                    **record,
                    "worker": slot.index,
                    "generation": seen.acked,  # 0 until it has reported
                    "in_flight": dict(seen.in_flight),
                    "websockets": dict(seen.websockets),
                    "last_seen": slot.last_seen or time.time(),
                }
            )
        return out

    async def wait_applied(self, service: str, generation: int, timeout: float) -> list[str]:
        """Until every running worker acknowledged ``service``'s ``generation``
        (event-driven, bounded)."""
        deadline = time.monotonic() + timeout
        while True:
            lagging = [
                s.id
                for s in self.slots
                if s.proc is not None and s.services[service].acked < generation
            ]
            left = deadline - time.monotonic()
            if not lagging or left <= 0:
                return lagging
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(left):
                    await self._next_ack()

    def signal_all(self, sig: int) -> None:
        for slot in self.slots:
            if slot.proc is not None and slot.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    slot.proc.send_signal(sig)

    async def shutdown(self, timeout: float) -> None:
        """Graceful: SIGTERM every worker, wait for them (killed after ``timeout``)."""
        await self._stop_all(timeout)

    # -- internals -------------------------------------------------------------------------

    def _spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> None:
        self._tasks.spawn(coro, name)

    async def _next_ack(self) -> None:
        await self._acked.wait()

    def _acknowledged(self) -> None:
        # Wake every waiter once; later waiters wait for the next report.
        self._acked.set()
        self._acked = asyncio.Event()

    def _push(
        self, service: str, old: RoutingState, new: RoutingState, event: Event | None
    ) -> None:
        msg = {"t": "state", "svc": service, "state": new.to_dict()}
        if event is not None:
            msg["event"] = encode_event(event)
        line = encode_line(msg)
        for slot in self.slots:
            if slot.writer is not None and not slot.writer.is_closing():
                slot.writer.write(line)

    def push_health(self, service: Service) -> None:
        """``service``'s targets' health, whole, to every worker (a flip, a reload)."""
        line = _health_line(service)
        for slot in self.slots:
            if slot.writer is not None and not slot.writer.is_closing():
                slot.writer.write(line)

    def _connect_failed(self, msg: dict[str, Any]) -> None:
        """A worker's connect failure counts like a failed check here, as it would in a
        single process; a flip reaches every worker."""
        control = self.controls.get(str(msg.get("svc")))
        if control is None:
            return
        service = control.service
        pool = service.pools.get(Color(msg["color"]))
        for up in pool.upstreams if pool is not None else ():
            if up.url == msg["url"]:
                if record_result(up.stats, False, service.config.health_check, str(msg["kind"])):
                    self.push_health(service)
                return

    async def _stop_all(self, timeout: float) -> None:
        self.stopping = True
        self.signal_all(signal.SIGTERM)
        procs = [s.proc for s in self.slots if s.proc is not None]
        if procs:
            waits = [p.wait() for p in procs]
            try:
                async with asyncio.timeout(timeout + 2.0):
                    await asyncio.gather(*waits)
            except TimeoutError:
                for p in procs:
                    if p.returncode is None:
                        log.warning("worker pid %d did not stop in time; killing it", p.pid)
                        with contextlib.suppress(ProcessLookupError):
                            p.kill()
        await self._tasks.cancel_all()

    async def _keep_running(self, slot: Slot) -> None:
        backoff = 0.1
        while not self.stopping:
            started = time.monotonic()
            try:
                code = await self._run_once(slot)
            except Exception:  # e.g. out of file descriptors: retried like a crash
                log.exception("could not run worker %d", slot.index)
                code = None
            if self.stopping:
                return
            if not self.started:
                # A worker that cannot start is a start-up failure, not a restart loop.
                self._failed = f"worker {slot.index} exited with code {code} while starting"
                self._acknowledged()
                return
            slot.reset()
            self._update_totals()
            self._acknowledged()
            backoff = 0.1 if time.monotonic() - started > 10 else min(backoff * 2, 5.0)
            log.warning("worker %d exited with code %s; restarting it", slot.index, code)
            await asyncio.sleep(backoff)

    async def _run_once(self, slot: Slot) -> int | None:
        parent, child = socket.socketpair()
        fds: tuple[int, ...] = (slot.sock.fileno(), child.fileno())
        tls_args: tuple[str, ...] = ()
        if slot.tls_sock is not None:
            fds += (slot.tls_sock.fileno(),)
            tls_args = ("--tls-listen-fd", str(fds[2]))
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "admin.workers",
                "--config",
                self.path,
                "--listen-fd",
                str(fds[0]),
                "--channel-fd",
                str(fds[1]),
                "--index",
                str(slot.index),
                *tls_args,
                pass_fds=fds,
                stdin=asyncio.subprocess.DEVNULL,
            )
        except BaseException:
            parent.close()
            raise
        finally:
            child.close()
        reader, writer = await asyncio.open_unix_connection(sock=parent, limit=CHANNEL_LIMIT)
        slot.proc, slot.writer = proc, writer
        for name, control in self.controls.items():
            # The worker serves once it has both: never on a stale "all healthy".
            writer.write(_health_line(control.service))
            state = control.store.snapshot().to_dict()
            writer.write(encode_line({"t": "state", "svc": name, "state": state}))
        try:
            while line := await reader.readline():
                try:
                    self._handle(slot, json.loads(line))
                except (ValueError, KeyError, TypeError):
                    log.exception("bad message from worker %d: %.200r", slot.index, line)
        except ConnectionError as exc:
            log.error("channel to worker %d broke: %s", slot.index, exc)
        finally:
            writer.close()
        return await proc.wait()

    def _handle(self, slot: Slot, msg: dict[str, Any]) -> None:
        kind = msg.get("t")
        if kind == "report":
            changed = not slot.ready
            for name, report in msg["services"].items():
                seen = slot.services.get(name)
                if seen is None:
                    continue
                generation = int(report["generation"])
                changed = changed or generation != seen.acked
                seen.acked = generation
                seen.in_flight.update(report["in_flight"])
                seen.websockets.update(report["websockets"])
                if report.get("stats"):
                    self.runtime.add_stats(name, seen.seen, report["stats"])
            for result, count in (msg.get("tls") or {}).items():
                delta = int(count) - slot.tls_seen.get(result, 0)
                slot.tls_seen[result] = int(count)
                self.tls_handshakes[result] = self.tls_handshakes.get(result, 0) + max(0, delta)
            dropped = int(msg.get("log_dropped", 0))
            if dropped > slot.log_dropped:  # cumulative per worker process
                self.run.control.workers_log_dropped += dropped - slot.log_dropped
            slot.log_dropped = dropped
            slot.last_seen = time.time()
            slot.ready = True
            self._update_totals()
            if changed:
                self._acknowledged()
                self.on_ack()
        elif kind == "fail":
            self._connect_failed(msg)
        elif kind == "cas":
            self._spawn(self._answer_cas(slot, msg), f"worker-{slot.index}-cas")
        elif kind == "events":
            self._spawn(self._answer_events(slot, msg), f"worker-{slot.index}-events")

    def _update_totals(self) -> None:
        live = [s for s in self.slots if s.proc is not None]
        for name in self.controls:
            seen = [s.services[name] for s in live]
            in_flight = {c: sum(r.in_flight[c.value] for r in seen) for c in COLORS}
            websockets = {c: sum(r.websockets[c.value] for r in seen) for c in COLORS}
            self.runtime.set_counts(name, in_flight, websockets)

    def _reply(self, slot: Slot, rid: Any, body: dict[str, Any]) -> None:
        if slot.writer is not None and not slot.writer.is_closing():
            slot.writer.write(encode_line({"t": "reply", "id": rid, **body}))

    def _store(self, msg: dict[str, Any]) -> StateStore:
        control = self.controls.get(str(msg.get("svc")))
        if control is None:
            raise StateError(f"no service named {msg.get('svc')!r}")
        return control.store

    async def _answer_cas(self, slot: Slot, msg: dict[str, Any]) -> None:
        try:
            new = RoutingState.from_dict(msg["state"])
            state = await self._store(msg).compare_and_set(
                int(msg["expected"]), new, decode_event(msg["event"])
            )
        except StateError as exc:
            self._reply(slot, msg["id"], {"ok": False, "error": exc.code, "detail": str(exc)})
            return
        self._reply(slot, msg["id"], {"ok": True, "state": state.to_dict()})

    async def _answer_events(self, slot: Slot, msg: dict[str, Any]) -> None:
        try:
            items = await self._store(msg).events(int(msg["limit"]))
        except StateError as exc:
            self._reply(slot, msg["id"], {"ok": False, "error": exc.code, "detail": str(exc)})
            return
        self._reply(slot, msg["id"], {"ok": True, "events": [encode_event(e) for e in items]})


class WorkerFleet:
    """The supervisor's fleet for one service: its workers, and with Redis every other
    instance too."""

    def __init__(self, pool: WorkerPool, inner: Fleet, service: str) -> None:
        self.pool = pool
        self.inner = inner
        self.service = service
        if isinstance(inner, RedisFleet):
            # The supervisor serves nothing: its workers are the instances it registers.
            inner.set_local(functools.partial(pool.instances, service))
            pool.on_ack = _chain(pool.on_ack, inner.kick)

    def instances(self) -> list[dict[str, Any]]:
        if isinstance(self.inner, RedisFleet):
            return self.inner.instances()
        return [present(r) for r in self.pool.instances(self.service)]

    def store_status(self) -> dict[str, Any]:
        return {**self.inner.store_status(), "workers": len(self.pool.slots)}

    def unavailable_detail(self) -> str:
        return self.inner.unavailable_detail()

    async def refresh(self) -> None:
        await self.inner.refresh()

    async def wait_applied(self, generation: int, timeout: float) -> list[str]:
        deadline = time.monotonic() + timeout
        lagging = await self.pool.wait_applied(self.service, generation, timeout)
        if isinstance(self.inner, RedisFleet):
            left = max(0.0, deadline - time.monotonic())
            others = await self.inner.wait_applied(generation, left)
            lagging = sorted(set(lagging) | set(others))
        return lagging


def _chain(first: Callable[[], None], then: Callable[[], None]) -> Callable[[], None]:
    def both() -> None:
        first()
        then()

    return both


async def supervise(config: Config, path: str, workers: int) -> int:
    socks = listen_sockets(config.listen, workers)
    tls_socks: list[socket.socket] = []
    if config.tls.listen is not None:
        try:
            tls_socks = listen_sockets(config.tls.listen, workers, "tls.listen")
        except StartupError:
            for sock in socks:
                sock.close()
            raise
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    try:
        async with running(config, data_plane=False) as run:
            control = run.control
            control.ready = False  # until every worker serves
            runtime = run.view
            assert isinstance(runtime, ControlRuntime)  # data_plane=False: no ProxyServer
            pool = WorkerPool(run, runtime, path, socks, control.identity, tls_socks=tls_socks)
            async with pool:
                for name, svc_control in control.services.items():
                    svc_control.fleet = WorkerFleet(pool, svc_control.fleet, name)
                control.ready = True
                host, port = socks[0].getsockname()[:2]
                ahost, aport = run.admin_address
                log.info(
                    "bgproxy listening on http://%s:%d with %d workers (admin http://%s:%d)",
                    host,
                    port,
                    workers,
                    ahost,
                    aport,
                )
                if tls_socks:
                    thost, tport = tls_socks[0].getsockname()[:2]
                    log.info("bgproxy listening on https://%s:%d", thost, tport)
                loop.add_signal_handler(signal.SIGTERM, stop.set)
                loop.add_signal_handler(signal.SIGINT, stop.set)
                loop.add_signal_handler(signal.SIGHUP, _reload, run, path, pool)
                loop.add_signal_handler(signal.SIGUSR1, _reopen_logs, run, pool)
                await stop.wait()
                log.info("shutting down %d workers", workers)
                control.ready = False
                await pool.shutdown(runtime.config.drain.timeout)
    finally:
        for sock in socks + tls_socks:
            sock.close()
    return 0


def _reopen_logs(run: Running, pool: WorkerPool) -> None:
    # logrotate signals the process it knows (this one): every worker reopens its own.
    if run.observer is not None:
        run.observer.reopen()
    pool.signal_all(signal.SIGUSR1)


def _reload(run: Running, path: str, pool: WorkerPool) -> None:
    # Validated here first: a bad file is rejected once, and workers keep their config.
    try:
        names = [svc.name for svc in load_config(path).services]
    except ConfigError:
        names = []  # reload_config logs the errors
    if names and names != list(run.view.services):
        log.error(
            "reload rejected, keeping the running config: with --workers the services "
            "cannot change (running %s, file has %s)",
            ", ".join(run.view.services),
            ", ".join(names),
        )
        return
    if reload_config(run, path):
        # The reloaded pools' health (kept targets' as they were, new ones healthy) before
        # the workers reload: each applies the last report it has to its new pools.
        for service in run.view.services.values():
            pool.push_health(service)
        pool.signal_all(signal.SIGHUP)
