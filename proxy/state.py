"""Routing state: the immutable snapshot, its transitions, and the store that swaps it.

A request reads ``store.snapshot()`` once, at entry, and is routed by that one
object for its whole life; an admin write builds the next snapshot with a pure
transition function and swaps it in with a compare-and-set on the generation.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import itertools
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol


class Color(enum.Enum):
    BLUE = "blue"
    GREEN = "green"

    # Enum hashes by name in Python code; colors key the per-request counters, so use the
    # C identity hash (members are singletons, equality is identity anyway).
    __hash__ = object.__hash__

    @property
    def other(self) -> Color:
        return Color.GREEN if self is Color.BLUE else Color.BLUE

    @classmethod
    def parse(cls, value: object) -> Color | None:
        """The color a user-supplied string names, or None."""
        if isinstance(value, str):
            return _BY_NAME.get(value.strip().lower())
        return None


_BY_NAME = {c.value: c for c in Color}
COLORS = (Color.BLUE, Color.GREEN)


@dataclass(frozen=True, slots=True)
class Weights:
    blue: int
    green: int
    # Both colors get traffic: the router must roll. A field, not a property: the router
    # reads it per request.
    split: bool = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "split", self.blue > 0 and self.green > 0)

    def of(self, color: Color) -> int:
        return self.blue if color is Color.BLUE else self.green

    @classmethod
    def all_to(cls, color: Color) -> Weights:
        return cls(100, 0) if color is Color.BLUE else cls(0, 100)

    def as_dict(self) -> dict[str, int]:
        return {"blue": self.blue, "green": self.green}


# Rollout states: the first three are running (a driver advances or holds them).
RUNNING = ("progressing", "paused", "waiting_promotion")
ENDED = ("promoted", "aborted", "cancelled")


@dataclass(frozen=True, slots=True)
class Rollout:
    """A progressive rollout of ``color``: where it is, as the shared state records it.

    The driver's live figures (requests seen at the step, the last verdict) are not here:
    they are per process and change every evaluation, while this changes only when the
    weights or the rollout's state do (each such change is a new generation)."""

    color: Color  # the new color; the other one is the stable color
    steps: tuple[int, ...]  # the new color's weight at each step; the last is 100
    step: int  # index into steps of the step in force
    state: str  # one of RUNNING or ENDED
    step_interval: float
    auto_promote: bool
    started_at: float  # wall clock
    step_started_at: float  # wall clock; while paused, ``now - elapsed`` on resume
    elapsed: float = 0.0  # time spent at the step when paused
    ended_at: float | None = None

    @property
    def running(self) -> bool:
        return self.state in RUNNING

    @property
    def weight(self) -> int:
        return self.steps[self.step]

    def to_dict(self) -> dict[str, Any]:
        return {
            "color": self.color.value,
            "steps": list(self.steps),
            "step": self.step,
            "state": self.state,
            "step_interval": self.step_interval,
            "auto_promote": self.auto_promote,
            "started_at": self.started_at,
            "step_started_at": self.step_started_at,
            "elapsed": self.elapsed,
            "ended_at": self.ended_at,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Rollout:
        color = Color.parse(data["color"])
        if color is None:
            raise ValueError(f"bad rollout color {data['color']!r}")
        ended = data.get("ended_at")
        return cls(
            color=color,
            steps=tuple(int(w) for w in data["steps"]),
            step=int(data["step"]),
            state=str(data["state"]),
            step_interval=float(data["step_interval"]),
            auto_promote=bool(data["auto_promote"]),
            started_at=float(data["started_at"]),
            step_started_at=float(data["step_started_at"]),
            elapsed=float(data.get("elapsed", 0.0)),
            ended_at=float(ended) if ended is not None else None,
        )


@dataclass(frozen=True, slots=True)
class RoutingState:
    """One immutable routing snapshot. ``previous_*`` is what /rollback restores."""

    generation: int
    active: Color
    weights: Weights
    previous: Color | None = None
    previous_weights: Weights | None = None
    changed_at: float = 0.0  # wall-clock seconds
    reason: str = ""  # why the last change happened; WebSocket handoff messages carry it
    # The progressive rollout this snapshot is part of (or the last one, ended); it
    # travels with the weights, so every instance and worker sees both in one record.
    rollout: Rollout | None = None

    @classmethod
    def initial(cls, active: Color) -> RoutingState:
        return cls(
            generation=1, active=active, weights=Weights.all_to(active), changed_at=time.time()
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "generation": self.generation,
            "active": self.active.value,
            "weights": self.weights.as_dict(),
            "previous": self.previous.value if self.previous else None,
            "previous_weights": self.previous_weights.as_dict() if self.previous_weights else None,
            "changed_at": self.changed_at,
            "reason": self.reason,
            "rollout": self.rollout.to_dict() if self.rollout is not None else None,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RoutingState:
        prev_w = data.get("previous_weights")
        prev = Color.parse(data.get("previous"))
        active = Color.parse(data["active"])
        if active is None:
            raise ValueError(f"bad active color {data['active']!r}")
        return cls(
            generation=int(data["generation"]),
            active=active,
            weights=Weights(int(data["weights"]["blue"]), int(data["weights"]["green"])),
            previous=prev,
            previous_weights=Weights(int(prev_w["blue"]), int(prev_w["green"])) if prev_w else None,
            changed_at=float(data.get("changed_at", 0.0)),
            reason=str(data.get("reason", "")),
            rollout=Rollout.from_dict(data["rollout"]) if data.get("rollout") else None,
        )


def rfc3339(ts: float) -> str:
    """How every time in the admin API is written: UTC, milliseconds, ``Z``."""
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace(
        "+00:00", "Z"
    )


class StateError(Exception):
    """A write the store refused; ``code`` is the admin API's error code."""

    code = "conflict"


class GenerationMismatch(StateError):
    code = "generation_mismatch"


class NothingToRollBack(StateError):
    code = "nothing_to_roll_back"


class InvalidWeights(StateError):
    code = "invalid_weights"


class StoreUnavailable(StateError):
    code = "store_unavailable"


class NoRollout(StateError):
    code = "no_rollout"


class RolloutInProgress(StateError):
    code = "rollout_in_progress"


class AlreadyLive(StateError):
    code = "already_live"


class InvalidRollout(StateError):
    code = "bad_rollout"


# --- pure transitions (table-tested; no I/O) --------------------------------------------


def _cancelled(rollout: Rollout | None, now: float) -> Rollout | None:
    """A manual change ends a running rollout: the operator took the wheel."""
    if rollout is None or not rollout.running:
        return rollout
    return dataclasses.replace(rollout, state="cancelled", ended_at=now)


def _next(state: RoutingState, active: Color, weights: Weights, now: float) -> RoutingState:
    return dataclasses.replace(
        state,
        generation=state.generation + 1,
        active=active,
        weights=weights,
        previous=state.active,
        previous_weights=state.weights,
        changed_at=now,
        rollout=_cancelled(state.rollout, now),
    )


def switch_to(state: RoutingState, color: Color, now: float) -> RoutingState | None:
    """Make ``color`` live with weights 100/0; None when that is already the state (no-op)."""
    target = Weights.all_to(color)
    if state.active is color and state.weights == target and not _running(state):
        return None
    return _next(state, color, target, now)


def set_weights(state: RoutingState, blue: int, green: int, now: float) -> RoutingState:
    if blue < 0 or green < 0 or (blue == 0 and green == 0):
        raise InvalidWeights("weights must be integers >= 0 and not both 0")
    # One side at zero names the active color; a split keeps the heavier (blue on a tie).
    active = Color.BLUE if blue >= green else Color.GREEN
    return _next(state, active, Weights(blue, green), now)


def roll_back(state: RoutingState, now: float) -> RoutingState:
    if state.previous is None:
        raise NothingToRollBack("there is no previous state to roll back to")
    weights = state.previous_weights or Weights.all_to(state.previous)
    return _next(state, state.previous, weights, now)


# --- rollouts (pure too) -------------------------------------------------------------------


def _running(state: RoutingState) -> bool:
    return state.rollout is not None and state.rollout.running


def split(color: Color, weight: int) -> tuple[Color, Weights]:
    """The active color and weights that give ``color`` ``weight`` percent (the heavier
    color is active, blue on a tie, as for ``set_weights``)."""
    if weight >= 100:
        return color, Weights.all_to(color)
    w = Weights(100 - weight, weight) if color is Color.GREEN else Weights(weight, 100 - weight)
    return (Color.BLUE if w.blue >= w.green else Color.GREEN), w


def steps_problem(steps: tuple[int, ...]) -> str | None:
    """Why ``steps`` is not a valid list of rollout weights, or None."""
    if not steps:
        return "must list at least one weight"
    if any(not 1 <= w <= 100 for w in steps):
        return "each weight must be an integer from 1 to 100"
    if any(b <= a for a, b in itertools.pairwise(steps)):
        return "weights must increase from step to step"
    if steps[-1] != 100:
        return "the last step must be 100"
    return None


def _at(state: RoutingState, rollout: Rollout, now: float) -> RoutingState:
    """The snapshot for ``rollout`` in force. ``previous`` is the stable color at 100, so
    a /rollback during or right after a rollout returns to where it started."""
    if rollout.state == "promoted":
        active, weights = rollout.color, Weights.all_to(rollout.color)
    elif rollout.state == "aborted":
        active, weights = rollout.color.other, Weights.all_to(rollout.color.other)
    else:
        active, weights = split(rollout.color, rollout.weight)
    stable = rollout.color.other
    return dataclasses.replace(
        state,
        generation=state.generation + 1,
        active=active,
        weights=weights,
        previous=stable,
        previous_weights=Weights.all_to(stable),
        changed_at=now,
        rollout=rollout,
    )


def start_rollout(
    state: RoutingState,
    color: Color,
    steps: tuple[int, ...],
    step_interval: float,
    auto_promote: bool,
    now: float,
) -> RoutingState:
    """Weights to the first step; a step below the weight ``color`` already has is skipped
    (moving clients off the new color and back would be the flapping rollouts avoid)."""
    if _running(state):
        raise RolloutInProgress("a rollout is running: promote or abort it first")
    problem = steps_problem(steps)
    if problem is not None:
        raise InvalidRollout(f"steps: {problem}")
    if state.weights.of(color) == 100:
        raise AlreadyLive(f"{color.value} already has all the traffic")
    have = state.weights.of(color) * 100 // max(1, state.weights.blue + state.weights.green)
    first = next(i for i, w in enumerate(steps) if w >= have)
    rollout = Rollout(color, steps, first, "progressing", step_interval, auto_promote, now, now)
    if rollout.weight == 100:
        rollout = dataclasses.replace(rollout, state="promoted", ended_at=now)
    return _at(state, rollout, now)


def _need_running(state: RoutingState) -> Rollout:
    if state.rollout is None or not state.rollout.running:
        raise NoRollout("no rollout is running")
    return state.rollout


def advance_rollout(state: RoutingState, now: float) -> RoutingState:
    """The step in force passed: the next one, or the end (promoted, or held below 100
    waiting for a promote when ``auto_promote`` is off)."""
    r = _need_running(state)
    nxt = r.step + 1
    if nxt >= len(r.steps) or r.steps[nxt] == 100:
        if not r.auto_promote:
            new = dataclasses.replace(r, state="waiting_promotion")
            return dataclasses.replace(
                state, generation=state.generation + 1, changed_at=now, rollout=new
            )
        return _promoted(state, r, now)
    return _at(state, dataclasses.replace(r, step=nxt, step_started_at=now), now)


def pause_rollout(state: RoutingState, now: float) -> RoutingState | None:
    r = _need_running(state)
    if r.state != "progressing":
        return None  # paused already, or holding for a promote: nothing to pause
    new = dataclasses.replace(r, state="paused", elapsed=max(0.0, now - r.step_started_at))
    return dataclasses.replace(state, generation=state.generation + 1, changed_at=now, rollout=new)


def resume_rollout(state: RoutingState, now: float) -> RoutingState | None:
    r = _need_running(state)
    if r.state != "paused":
        return None
    new = dataclasses.replace(r, state="progressing", step_started_at=now - r.elapsed, elapsed=0.0)
    return dataclasses.replace(state, generation=state.generation + 1, changed_at=now, rollout=new)


def _promoted(state: RoutingState, r: Rollout, now: float) -> RoutingState:
    last = len(r.steps) - 1
    return _at(state, dataclasses.replace(r, step=last, state="promoted", ended_at=now), now)


def promote_rollout(state: RoutingState, now: float) -> RoutingState:
    return _promoted(state, _need_running(state), now)


def abort_rollout(state: RoutingState, now: float) -> RoutingState:
    r = _need_running(state)
    return _at(state, dataclasses.replace(r, state="aborted", ended_at=now), now)


# --- events ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Event:
    at: float
    generation: int
    action: str  # switch | weights | rollback
    from_: str | None
    to: str
    trigger: str  # manual | auto
    reason: str | None
    actor: str
    details: dict[str, Any] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "at": rfc3339(self.at),
            "generation": self.generation,
            "action": self.action,
            "from": self.from_,
            "to": self.to,
            "trigger": self.trigger,
            "reason": self.reason,
            "actor": self.actor,
        }
        out.update(self.details)
        return out


def describe(state: RoutingState) -> str:
    """How an event names a state: the color, or the split."""
    if state.weights.split:
        return f"blue={state.weights.blue},green={state.weights.green}"
    return state.active.value


# --- the store -----------------------------------------------------------------------------

# (old, new, the event that made new, or None when the store learned of new without it:
# a periodic re-read, a re-seed).
Listener = Callable[[RoutingState, RoutingState, "Event | None"], None]


class StateStore(Protocol):
    """Holds the current snapshot. ``snapshot`` is synchronous and never does I/O: it is
    called on the request path. Writes are compare-and-set on the generation."""

    def snapshot(self) -> RoutingState: ...

    async def compare_and_set(
        self, expected_generation: int, new: RoutingState, event: Event
    ) -> RoutingState: ...

    async def events(self, limit: int) -> list[Event]: ...

    def add_listener(self, listener: Listener) -> None:
        """``listener(old, new, event)`` runs synchronously whenever a new snapshot is
        applied."""
        ...

    @property
    def available(self) -> bool: ...


class MemoryStateStore:
    """One process's state. A write is atomic: it is one reference swap on the event loop."""

    def __init__(self, initial: RoutingState, max_events: int = 1000) -> None:
        self._state = initial
        self._events: deque[Event] = deque(maxlen=max_events)
        self._listeners: list[Listener] = []
        self._lock = asyncio.Lock()

    def snapshot(self) -> RoutingState:
        return self._state

    @property
    def available(self) -> bool:
        return True

    def add_listener(self, listener: Listener) -> None:
        self._listeners.append(listener)

    async def compare_and_set(
        self, expected_generation: int, new: RoutingState, event: Event
    ) -> RoutingState:
        async with self._lock:
            old = self._state
            if old.generation != expected_generation:
                raise GenerationMismatch(
                    f"state is at generation {old.generation}, not {expected_generation}"
                )
            self._state = new
            self._events.appendleft(event)
        for listener in self._listeners:
            listener(old, new, event)
        return new

    async def events(self, limit: int) -> list[Event]:
        return list(self._events)[: max(0, limit)]
