"""Automatic rollback: watch the color that just got traffic, undo the change if it is bad.

``decide`` is the whole policy, a pure function of one interval's stats, the thresholds
and the running count of failing intervals (table-tested). ``RollbackController``
applies it: a switch or weights change that gives a color traffic it did not have starts
a watch of that color for ``rollback.window``, evaluated every ``rollback.interval`` on
the proxy's own per-color counters. On ``failure_limit`` consecutive failing intervals it
rolls back through ``ControlPlane.apply`` - the admin API's write path - as actor and
trigger ``auto``. It never promotes: after a rollback nothing is watched until an
operator changes the state again, and any operator change ends the current watch.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any

from config import RollbackConfig
from proxy.state import (
    COLORS,
    Color,
    Event,
    RoutingState,
    StateError,
    StoreUnavailable,
    rfc3339,
    roll_back,
)
from proxy.stats import Window

if TYPE_CHECKING:
    from admin.control import ServiceControl

log = logging.getLogger("bgproxy.rollback")

# The reason of every auto rollback starts with this; it travels with the snapshot, so
# any instance can tell an auto rollback from an operator's change (and not watch it).
AUTO_REASON = "auto rollback"
# Events of a progressive rollout (admin.rollout drives them; this watch stands aside).
ROLLOUT_ACTIONS = frozenset({"rollout_step", "rollout_pause", "rollout_resume", "promote", "abort"})


# --- the decision (pure) ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Thresholds:
    max_error_rate: float
    max_p99_latency: float
    min_requests: int
    failure_limit: int

    @classmethod
    def from_config(cls, cfg: RollbackConfig) -> Thresholds:
        return cls(cfg.max_error_rate, cfg.max_p99_latency, cfg.min_requests, cfg.failure_limit)

    def as_dict(self) -> dict[str, float | int]:
        return {
            "max_error_rate": self.max_error_rate,
            "max_p99_latency": self.max_p99_latency,
            "min_requests": self.min_requests,
            "failure_limit": self.failure_limit,
        }


class Outcome(enum.Enum):
    INCONCLUSIVE = "inconclusive"  # too few requests to judge: no action, count unchanged
    PASSING = "passing"
    FAILING = "failing"  # a failing interval, below failure_limit so far
    ROLL_BACK = "roll_back"


@dataclass(frozen=True, slots=True)
class Verdict:
    outcome: Outcome
    consecutive_failures: int  # after this interval
    reason: str


def decide(window: Window, thresholds: Thresholds, consecutive_failures: int) -> Verdict:
    """Judge one interval of the watched color.

    Fewer than ``min_requests``: inconclusive, the failure count carries over unchanged
    (low traffic is no evidence either way). Error rate above ``max_error_rate`` or p99
    above ``max_p99_latency``: a failing interval; the ``failure_limit``-th consecutive one
    means roll back. Anything else passes and resets the count.
    """
    t = thresholds
    if window.requests < t.min_requests:
        return Verdict(
            Outcome.INCONCLUSIVE,
            consecutive_failures,
            f"{window.requests} requests, fewer than min_requests {t.min_requests}",
        )
    problems = []
    if window.error_rate > t.max_error_rate:
        problems.append(
            f"error rate {window.error_rate:.1%} > {t.max_error_rate:.1%} "
            f"({window.errors} of {window.requests} requests)"
        )
    p99 = window.p99
    if p99 is not None and p99 > t.max_p99_latency:
        problems.append(f"p99 latency {p99:.3f}s > {t.max_p99_latency:.3f}s")
    if not problems:
        return Verdict(Outcome.PASSING, 0, "within thresholds")
    failures = consecutive_failures + 1
    outcome = Outcome.ROLL_BACK if failures >= t.failure_limit else Outcome.FAILING
    return Verdict(outcome, failures, "; ".join(problems))


def gained_traffic(old: RoutingState, new: RoutingState) -> Color | None:
    """The color ``new`` gives traffic that ``old`` gave none, if there is one."""
    for color in COLORS:
        if old.weights.of(color) == 0 and new.weights.of(color) > 0:
            return color
    return None


# --- the controller -------------------------------------------------------------------------


def _rfc3339(ts: float | None) -> str | None:
    return None if ts is None else rfc3339(ts)


@dataclass(slots=True)
class Watch:
    color: Color
    generation: int  # the snapshot the watch judges; a rollback must still find it current
    started_at: float  # wall clock
    until: float
    thresholds: Thresholds
    next_evaluation: float | None = None
    failures: int = 0
    last: dict[str, Any] | None = None


class RollbackController:
    """Watches after changes; an async context manager owning its one watch task."""

    def __init__(self, control: ServiceControl) -> None:
        self.control = control
        self.server = control.service  # its config, traffic counters
        self.state = "idle"  # idle | watching | rolled_back
        self.watch: Watch | None = None
        self.auto_rollbacks = 0
        self._task: asyncio.Task[None] | None = None
        self._cancelled: set[asyncio.Task[None]] = set()  # ended watches, awaited on exit
        self._open = False

    async def __aenter__(self) -> RollbackController:
        self._open = True
        self.control.store.add_listener(self.on_state_change)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._open = False
        await self._stop_task()

    # -- reacting to changes ------------------------------------------------------------------

    def on_state_change(self, old: RoutingState, new: RoutingState, event: Event | None) -> None:
        """Store listener (synchronous). Any change ends the current watch; a manual switch
        or weights change that gives a color new traffic starts one."""
        if not self._open:
            return
        if event is not None:
            self._react(old, new, event.action, event.trigger)
            return
        # Learned without its event (a periodic re-read after a lost message): the
        # event list says what it was.
        self._end_watch("idle" if self.state == "watching" else self.state)
        self._task = self._spawn(self._look_up_and_react(old, new), "rollback-classify")

    async def _look_up_and_react(self, old: RoutingState, new: RoutingState) -> None:
        action, trigger = "switch", "auto" if new.reason.startswith(AUTO_REASON) else "manual"
        with contextlib.suppress(StateError):
            for e in await self.control.store.events(50):
                if e.generation == new.generation:
                    action, trigger = e.action, e.trigger
                    break
        self._react(old, new, action, trigger)

    def _react(self, old: RoutingState, new: RoutingState, action: str, trigger: str) -> None:
        rollout = new.rollout
        if rollout is not None and (rollout.running or action in ROLLOUT_ACTIONS):
            # A rollout's steps are watched by its driver. Once promoted, the new color is
            # watched for a window like any release; an abort has undone it already.
            self._end_watch("idle")
            if action == "promote" and self.server.config.rollback.enabled:
                self._start_watch(rollout.color, new)
            return
        if trigger == "auto":
            # A rollback by a controller (this one or another instance's): never re-promote.
            self._end_watch("rolled_back")
            return
        self._end_watch("idle")
        cfg = self.server.config.rollback
        color = gained_traffic(old, new)
        # A rollback (manual too) returns to the previous state: not a release to watch.
        if not cfg.enabled or color is None or action == "rollback":
            return
        self._start_watch(color, new)

    def _start_watch(self, color: Color, new: RoutingState) -> None:
        cfg = self.server.config.rollback
        now = time.time()
        watch = Watch(color, new.generation, now, now + cfg.window, Thresholds.from_config(cfg))
        watch.next_evaluation = now + cfg.interval
        self.watch = watch
        self.state = "watching"
        self._task = self._spawn(
            self._run(watch, cfg.interval, cfg.window), f"rollback-watch-{color.value}"
        )
        log.info("watching %s for %gs after generation %d", color.value, cfg.window, new.generation)

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        return asyncio.get_running_loop().create_task(coro, name=name)

    def _end_watch(self, state: str) -> None:
        task, self._task = self._task, None
        # Our own task is the caller when it applies the rollback: it ends by itself.
        if task is not None and task is not asyncio.current_task():
            task.cancel()  # this runs synchronously: the task is awaited in _stop_task
            self._cancelled.add(task)
            task.add_done_callback(self._cancelled.discard)
        self.state = state

    async def _stop_task(self) -> None:
        self._end_watch("idle" if self.state == "watching" else self.state)
        for task in list(self._cancelled):
            with contextlib.suppress(asyncio.CancelledError):
                await task

    # -- the watch ------------------------------------------------------------------------

    async def _run(self, watch: Watch, interval: float, window: float) -> None:
        loop = asyncio.get_running_loop()
        stats = self.server.traffic.colors[watch.color]
        t0 = loop.time()
        prev = stats.snapshot(t0)
        k = 1
        # Whole intervals only: the last one ends at or before the window's end.
        while k * interval <= window + 1e-9:
            due = t0 + k * interval
            watch.next_evaluation = watch.started_at + k * interval
            await asyncio.sleep(max(0.0, due - loop.time()))
            cur = stats.snapshot(loop.time())
            win = cur.since(prev)
            prev = cur
            verdict = decide(win, watch.thresholds, watch.failures)
            watch.failures = verdict.consecutive_failures
            watch.last = {
                **win.figures(),
                "verdict": verdict.outcome.value,
                "reason": verdict.reason,
                "at": _rfc3339(time.time()),
            }
            if verdict.outcome is Outcome.ROLL_BACK and await self._roll_back(watch, win, verdict):
                return
            k += 1
        await asyncio.sleep(max(0.0, t0 + window - loop.time()))
        watch.next_evaluation = None
        if self.watch is watch and self.state == "watching":
            self.state = "idle"
            self._task = None
            log.info("watch of %s ended: no rollback", watch.color.value)

    async def _roll_back(self, watch: Watch, win: Window, verdict: Verdict) -> bool:
        """Apply the rollback; False to keep watching (the store was unavailable)."""
        color = watch.color
        reason = f"{AUTO_REASON}: {color.value} {verdict.reason}"
        details = {
            "figures": win.figures(),
            "thresholds": watch.thresholds.as_dict(),
            "watched": color.value,
            "consecutive_failures": verdict.consecutive_failures,
        }
        try:
            await self.control.apply(
                lambda s: roll_back(s, time.time()),
                "rollback",
                reason,
                actor="auto",
                trigger="auto",
                expected_generation=watch.generation,
                details=details,
            )
        except StoreUnavailable:
            log.warning("auto rollback of %s deferred: the state store is unavailable", color.value)
            return False
        except StateError as exc:
            # The state moved on (an operator or another instance acted; the listener has
            # already ended this watch): nothing left to undo.
            log.warning("auto rollback of %s not applied: %s", color.value, exc)
            if self.watch is watch and self.state == "watching":
                self.state = "idle"
            return True
        self.auto_rollbacks += 1
        self.state = "rolled_back"
        watch.next_evaluation = None
        log.warning("%s", reason)
        return True

    # -- status ---------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        w = self.watch
        return {
            "state": self.state,
            "color": w.color.value if w else None,
            "started_at": _rfc3339(w.started_at) if w else None,
            "until": _rfc3339(w.until) if w else None,
            "next_evaluation": _rfc3339(w.next_evaluation)
            if w and self.state == "watching"
            else None,
            "consecutive_failures": w.failures if w else 0,
            "thresholds": w.thresholds.as_dict() if w else None,
            "last": w.last if w else None,
            "enabled": self.server.config.rollback.enabled,
        }
