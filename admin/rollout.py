"""The rollout driver: moves a progressive rollout through its steps, or aborts it.

Where a rollout is, is shared state: ``RoutingState.rollout`` (proxy/state.py), changed
only through ``ServiceControl.apply`` like any other write, by the pure transitions
there. This module is the part that acts by itself. For each service, one ``RolloutDriver``
per process watches the snapshot; while a rollout runs, the process that holds the
service's lease (always this one on the memory backend; with Redis, the instance whose
``{prefix}:lease:rollout`` key it is) drives it:

* every ``rollback.interval`` it judges that interval of the new color's traffic with the
  rollback watch's ``decide``: ``failure_limit`` consecutive failing intervals abort the
  rollout (trigger ``auto``, the failing figures in the event);
* once the step has lasted ``step_interval`` (while ``progressing``), the whole step is
  judged: fewer than ``min_requests`` requests is inconclusive, and the step is held (not
  passed, not failed) until it has seen them; figures over the thresholds abort; figures
  within them move to the next step. Before 100, ``auto_promote: false`` holds at
  ``waiting_promotion`` until an operator promotes.

A paused or waiting rollout is still watched: the new color keeps its traffic, so a
failure still aborts. The figures are this process's own counters (a supervisor's are
its workers' sums), as for the rollback watch. A driver that dies leaves its lease to
expire (``LEASE_TTL``): another instance takes over at the step the record holds, and
judges that step afresh from its own traffic.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from types import TracebackType
from typing import TYPE_CHECKING, Any

from admin.rollback import Outcome, Thresholds, Verdict, decide
from proxy.redis_store import RedisStateStore
from proxy.state import (
    RoutingState,
    StateError,
    StoreUnavailable,
    abort_rollout,
    advance_rollout,
    rfc3339,
)
from proxy.stats import Window
from proxy.tasks import cancel_and_wait

if TYPE_CHECKING:
    from admin.control import ServiceControl

log = logging.getLogger("bgproxy.rollout")

LEASE_TTL = 3.0  # a dead driver's rollout is taken over after at most this (plus a renewal)
IDLE: dict[str, Any] = {
    "state": "idle",
    "color": None,
    "steps": [],
    "step": None,
    "weight": None,
    "started_at": None,
    "next_at": None,
    "last": None,
}


def _ts(ts: float | None) -> str | None:
    return None if ts is None or not math.isfinite(ts) else rfc3339(ts)


class RolloutDriver:
    """One service's driver; an async context manager owning its one task."""

    def __init__(self, control: ServiceControl, lease_ttl: float = LEASE_TTL) -> None:
        self.control = control
        self.service = control.service
        self.owner = control.identity.id
        store = control.store
        self._redis = store if isinstance(store, RedisStateStore) else None
        self.lease_ttl = lease_ttl
        self.driving = False  # this process holds the lease of a running rollout
        self.auto_aborts = 0
        # Live figures of the step in force, as this process sees them (not shared).
        self.last: dict[str, Any] | None = None
        self.held: str | None = None
        self.step_requests = 0
        self.next_evaluation: float | None = None  # wall clock
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._open = False

    async def __aenter__(self) -> RolloutDriver:
        self._open = True
        self.control.store.add_listener(self._on_change)
        self._task = asyncio.get_running_loop().create_task(
            self._run(), name=f"{self.control.name}:rollout"
        )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._open = False
        await cancel_and_wait(self._task)
        await self._release()

    def _on_change(self, old: RoutingState, new: RoutingState, event: object) -> None:
        if self._open:
            self._changed.set()

    async def _wait_change(self, timeout: float | None) -> bool:
        """Until the snapshot changes (True) or ``timeout`` passes (False)."""
        try:
            if timeout is None:
                await self._changed.wait()
            else:
                async with asyncio.timeout(max(0.0, timeout)):
                    await self._changed.wait()
        except TimeoutError:
            return False
        self._changed.clear()
        return True

    # -- the lease ------------------------------------------------------------------------

    async def _hold(self) -> bool:
        if self._redis is None:
            held = True  # one process holds the only copy of the state
        else:
            held = await self._redis.hold_lease("rollout", self.owner, self.lease_ttl)
        if held and not self.driving:
            log.info("%s: driving the rollout", self.control.name)
        self.driving = held
        return held

    async def _release(self) -> None:
        if self.driving and self._redis is not None:
            await self._redis.release_lease("rollout", self.owner)
        self.driving = False

    # -- the loop -------------------------------------------------------------------------

    async def _run(self) -> None:
        while self._open:
            try:
                await self._drive()
            except Exception:
                # A bug must not strand a rollout at its step: log, then start over from
                # the record (the step is judged afresh).
                log.exception("%s: the rollout driver failed; restarting it", self.control.name)
                await asyncio.sleep(1.0)

    async def _drive(self) -> None:
        loop = asyncio.get_running_loop()
        cursor: tuple[float, int] | None = None  # the step being observed
        failures = 0
        prev = step_start = None
        next_eval = 0.0
        while self._open:
            state = self.control.store.snapshot()
            r = state.rollout
            if r is None or not r.running:
                await self._release()
                cursor, self.held, self.next_evaluation = None, None, None
                await self._wait_change(None)
                continue
            if not await self._hold():
                cursor = None  # another instance drives; a takeover starts the step afresh
                self.next_evaluation = None
                await self._wait_change(self.lease_ttl / 3)
                continue
            cfg = self.service.config.rollback
            thresholds = Thresholds.from_config(cfg)
            stats = self.service.traffic.colors[r.color]
            if cursor != (r.started_at, r.step):
                if cursor is None or cursor[0] != r.started_at:
                    self.last = None  # a new rollout (or a takeover): no figures of ours yet
                cursor = (r.started_at, r.step)
                prev = step_start = stats.snapshot(loop.time())
                failures, self.held, self.step_requests = 0, None, 0
                next_eval = loop.time() + cfg.interval
            assert prev is not None and step_start is not None
            step_due = r.step_started_at + r.step_interval if r.state == "progressing" else math.inf
            self.next_evaluation = time.time() + (next_eval - loop.time())
            wake = min(next_eval - loop.time(), step_due - time.time())
            if self._redis is not None:
                wake = min(wake, self.lease_ttl / 3)
            if await self._wait_change(wake):
                continue
            if self.control.store.snapshot() is not state:
                continue
            cur = stats.snapshot(loop.time())
            self.step_requests = cur.since(step_start).requests
            if loop.time() >= next_eval:
                win = cur.since(prev)
                prev = cur
                next_eval += cfg.interval
                verdict = decide(win, thresholds, failures)
                failures = verdict.consecutive_failures
                self.last = _figures(win, verdict)
                if verdict.outcome is Outcome.ROLL_BACK:
                    await self._abort(state, win, verdict, thresholds)
                    continue
            if r.state != "progressing" or time.time() < step_due:
                continue
            whole = cur.since(step_start)
            verdict = decide(whole, thresholds, 0)
            if verdict.outcome is Outcome.INCONCLUSIVE:
                self.held = f"inconclusive: {verdict.reason} at this step; holding"
            elif failures:
                self.held = f"{failures} failing interval(s) below failure_limit; holding"
            elif verdict.outcome is not Outcome.PASSING:
                self.last = _figures(whole, verdict)  # what failed: the whole step
                await self._abort(state, whole, verdict, thresholds)
            else:
                self.held = None
                await self._advance(state, whole)

    async def _advance(self, state: RoutingState, whole: Window) -> None:
        now = time.time()
        preview = advance_rollout(state, now)
        r = preview.rollout
        assert r is not None
        action = "promote" if r.state == "promoted" else "rollout_step"
        details: dict[str, Any] = {
            "step": r.step + 1,
            "steps": list(r.steps),
            "weight": r.weight,
            "rollout": r.state,
            "passed": whole.figures(),
        }
        reason = (
            f"rollout of {r.color.value}: "
            + ("promoted" if action == "promote" else f"step {r.step + 1} ({r.weight}%)")
            + (", waiting for promotion" if r.state == "waiting_promotion" else "")
        )
        await self._apply(state, lambda s: advance_rollout(s, now), action, reason, details)

    async def _abort(
        self, state: RoutingState, win: Window, verdict: Verdict, thresholds: Thresholds
    ) -> None:
        r = state.rollout
        assert r is not None
        reason = f"auto abort: {r.color.value} {verdict.reason}"
        details = {
            "figures": win.figures(),
            "thresholds": thresholds.as_dict(),
            "watched": r.color.value,
            "step": r.step + 1,
            "weight": r.weight,
            "consecutive_failures": verdict.consecutive_failures,
        }
        now = time.time()
        if await self._apply(state, lambda s: abort_rollout(s, now), "abort", reason, details):
            self.auto_aborts += 1
            log.warning("%s: %s", self.control.name, reason)

    async def _apply(
        self, state: RoutingState, build: Any, action: str, reason: str, details: dict[str, Any]
    ) -> bool:
        try:
            await self.control.apply(
                build,
                action,
                reason,
                actor="auto",
                trigger="auto",
                expected_generation=state.generation,
                details=details,
            )
        except StoreUnavailable:
            # Retried at the next evaluation: the weights stay where they are meanwhile.
            log.warning("%s: rollout %s deferred: the state store is unavailable", action, reason)
            return False
        except StateError as exc:
            log.info("%s: rollout %s not applied: %s", self.control.name, action, exc)
            return False
        return True

    # -- status ---------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        return rollout_status(self.control.store.snapshot(), self)


def _figures(win: Window, verdict: Verdict) -> dict[str, Any]:
    return {
        **win.figures(),
        "verdict": verdict.outcome.value,
        "reason": verdict.reason,
        "at": rfc3339(time.time()),
    }


def rollout_status(state: RoutingState, driver: RolloutDriver | None = None) -> dict[str, Any]:
    """``/status`` ``rollout``: the shared record, and the live figures where this process
    drives it."""
    r = state.rollout
    if r is None:
        return dict(IDLE)
    total = max(1, state.weights.blue + state.weights.green)
    running = r.running
    live = driver is not None and driver.driving and running
    next_at = None
    if r.state == "progressing":
        next_at = r.step_started_at + r.step_interval
        if live and driver is not None and driver.held and driver.next_evaluation is not None:
            next_at = driver.next_evaluation  # held: judged again then
    cfg = driver.service.config.rollback if driver is not None else None
    return {
        "state": r.state,
        "color": r.color.value,
        "steps": list(r.steps),
        "step": r.step + 1,
        "weight": state.weights.of(r.color) * 100 // total,
        "started_at": _ts(r.started_at),
        "step_started_at": _ts(r.step_started_at) if running else None,
        "next_at": _ts(next_at),
        "ended_at": _ts(r.ended_at),
        "step_interval": r.step_interval,
        "auto_promote": r.auto_promote,
        # The last figures stay after the end where they were seen (why it aborted).
        "last": driver.last if driver is not None and (live or not running) else None,
        "held": driver.held if live and driver is not None else None,
        "step_requests": driver.step_requests if live and driver is not None else None,
        "next_evaluation": _ts(driver.next_evaluation) if live and driver is not None else None,
        "thresholds": Thresholds.from_config(cfg).as_dict() if cfg is not None else None,
        "driving": live,
    }
