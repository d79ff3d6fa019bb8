"""What happens to the old color after a switch: drain its requests, hand off its WebSockets.

A color is *fenced* when the new snapshot gives it weight 0: the router never chooses it
again (only an explicit override reaches it). Its in-flight requests finish there,
bounded by ``drain.timeout``; completion is an ``asyncio.Event`` set by the request path
when the color's count reaches zero. Each WebSocket on a fenced color gets the reconnect
message at its own uniformly random time in ``websocket.reconnect_window`` and, after
``close_grace``, a 1012 close; a color that becomes live again before a connection's
time cancels that connection's handoff.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, Protocol

from proxy.state import COLORS, Color, Event, RoutingState, rfc3339
from proxy.websocket import CLOSE_GOING_AWAY, CLOSE_SERVICE_RESTART

if TYPE_CHECKING:
    from config import ServiceConfig
    from proxy.interfaces import Tunnel as Exchange

log = logging.getLogger("bgproxy.drain")


def fenced_colors(old: RoutingState, new: RoutingState) -> list[Color]:
    """Colors that had traffic under ``old`` and have none under ``new``."""
    return [c for c in COLORS if old.weights.of(c) > 0 and new.weights.of(c) == 0]


def render_message(template: str, color: Color, reason: str) -> str:
    # str.replace, not str.format: the default template is JSON full of braces.
    # Values are JSON-escaped so a reason cannot break the message's JSON.
    def esc(v: str) -> str:
        return json.dumps(v)[1:-1]

    return template.replace("{color}", esc(color.value)).replace("{reason}", esc(reason))


def _time(ts: float | None) -> str | None:
    return None if ts is None else rfc3339(ts)


class Drain:
    """The drain of one color, as ``/status`` shows it."""

    def __init__(self) -> None:
        self.color: Color | None = None
        self.state = "idle"
        self.started_at: float | None = None
        self.deadline: float | None = None
        self.completed_at: float | None = None
        self.forced = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "color": self.color.value if self.color else None,
            "state": self.state,
            "started_at": _time(self.started_at),
            "deadline": _time(self.deadline),
            "completed_at": _time(self.completed_at),
            "forced": self.forced,
        }


class Drained(Protocol):
    """What a drain needs of its service (``proxy.service.Service``), which owns it."""

    config: ServiceConfig
    tunnels: set[Any]

    @property
    def loop(self) -> asyncio.AbstractEventLoop: ...

    @property
    def now(self) -> float: ...

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]: ...

    async def wait_color_idle(self, color: Color) -> None: ...

    def end_stragglers(self, color: Color) -> int: ...

    def close_idle_upstreams(self, color: Color) -> None: ...


class DrainController:
    def __init__(self, service: Drained) -> None:
        self.service = service
        self.drain = Drain()
        self._task: asyncio.Task[None] | None = None
        self._handoffs: dict[Exchange, list[asyncio.TimerHandle]] = {}
        self.reconnects_sent: dict[Color, int] = dict.fromkeys(COLORS, 0)
        # Control-plane log lines (wired by admin/runner.py): a drain's end where drains
        # are decided, a batch of WebSocket handoffs where the sockets are.
        self.on_done: Callable[[dict[str, Any]], None] | None = None
        self.on_handoff: Callable[[dict[str, Any]], None] | None = None

    # -- reacting to a new snapshot ---------------------------------------------------------

    def on_state_change(self, old: RoutingState, new: RoutingState, event: Event | None) -> None:
        live = [c for c in COLORS if new.weights.of(c) > 0]
        for color in live:
            self._cancel_handoffs(color)
            if self.drain.color is color and self.drain.state == "draining":
                # Live again before its drain ended: nothing to drain any more.
                self._end_drain(forced=False)
        for color in fenced_colors(old, new):
            self.start(color, new)

    def start(self, color: Color, new: RoutingState) -> None:
        if self._task is not None:
            self._task.cancel()
        service = self.service
        d = self.drain = Drain()
        d.color = color
        d.state = "draining"
        d.started_at = time.time()
        d.deadline = d.started_at + service.config.drain.timeout
        self._task = service.spawn(
            self._run(color, service.config.drain.timeout), name=f"drain-{color.value}"
        )
        self._schedule_handoffs(color, new.active, new.reason or "switch")

    async def _run(self, color: Color, timeout: float) -> None:
        service = self.service
        try:
            async with asyncio.timeout(timeout):
                await service.wait_color_idle(color)
        except TimeoutError:
            self.drain.forced = service.end_stragglers(color)
        self._end_drain(forced=self.drain.forced > 0)
        service.close_idle_upstreams(color)

    def _end_drain(self, forced: bool) -> None:
        d = self.drain
        if d.state == "draining":
            d.state = "done"
            d.completed_at = time.time()
            if self.on_done is not None and d.color is not None:
                self.on_done(
                    {"action": "drain_done", "color": d.color.value, "forced": d.forced,
                     "started_at": _time(d.started_at), "completed_at": _time(d.completed_at)}
                )  # fmt: skip
        self._task = None

    # -- WebSocket handoff ----------------------------------------------------------------

    def _schedule_handoffs(self, color: Color, new_color: Color, reason: str) -> None:
        cfg = self.service.config.websocket
        lo, hi = cfg.reconnect_window
        message = render_message(cfg.reconnect_message, new_color, reason)
        loop = self.service.loop
        n = 0
        for conn in list(self.service.tunnels):
            if conn.color is not color or conn.ws is None or conn in self._handoffs:
                continue
            at = random.uniform(lo, hi)
            self._handoffs[conn] = [
                loop.call_later(at, self._send_reconnect, conn, message),
                loop.call_later(at + cfg.close_grace, self._close, conn, CLOSE_SERVICE_RESTART),
            ]
            n += 1
        if n and self.on_handoff is not None:
            self.on_handoff(
                {"action": "handoff", "from": color.value, "to": new_color.value,
                 "connections": n, "window": [lo, hi], "reason": reason}
            )  # fmt: skip

    def _send_reconnect(self, conn: Exchange, message: str) -> None:
        ws = conn.ws
        if ws is None or ws.closing:
            return
        ws.send_text(message)
        ws.reconnect_sent = True
        if conn.color is not None:
            self.reconnects_sent[conn.color] += 1
        # Told to leave: a rollback can no longer take this back.
        handles = self._handoffs.get(conn)
        if handles:
            handles[0] = handles[1]

    def _close(self, conn: Exchange, code: int) -> None:
        self._handoffs.pop(conn, None)
        if conn.ws is not None:
            conn.ws.close(
                code, "service restart" if code == CLOSE_SERVICE_RESTART else "going away"
            )
            conn.ws_close_started(self.service.now)

    def _cancel_handoffs(self, color: Color) -> None:
        for conn, handles in list(self._handoffs.items()):
            if conn.color is color and conn.ws is not None and not conn.ws.reconnect_sent:
                for h in handles:
                    h.cancel()
                del self._handoffs[conn]

    def forget(self, conn: Exchange) -> None:
        for h in self._handoffs.pop(conn, ()):
            h.cancel()

    # -- shutdown -------------------------------------------------------------------------

    def shutdown_websockets(self, new_color: Color) -> None:
        """Every WebSocket: the reconnect message now, then a 1001 close."""
        message = render_message(
            self.service.config.websocket.reconnect_message, new_color, "shutdown"
        )
        for conn in list(self.service.tunnels):
            self.forget(conn)
            ws = conn.ws
            if ws is None:
                conn.close()
                continue
            if not ws.reconnect_sent:
                ws.send_text(message)
                ws.reconnect_sent = True
                if conn.color is not None:
                    self.reconnects_sent[conn.color] += 1
            ws.close(CLOSE_GOING_AWAY, "going away")
            conn.ws_close_started(self.service.now)

    def close(self) -> None:
        for handles in self._handoffs.values():
            for h in handles:
                h.cancel()
        self._handoffs.clear()
