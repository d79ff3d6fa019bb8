"""Routing state: the immutable snapshot, its transitions, and the store that swaps it.

A request reads ``store.snapshot()`` once, at entry, and is routed by that one
object for its whole life; an admin write builds the next snapshot with a pure
transition function and swaps it in with a compare-and-set on the generation.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
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


# --- pure transitions (table-tested; no I/O) --------------------------------------------


def _next(state: RoutingState, active: Color, weights: Weights, now: float) -> RoutingState:
    return dataclasses.replace(
        state,
        generation=state.generation + 1,
        active=active,
        weights=weights,
        previous=state.active,
        previous_weights=state.weights,
        changed_at=now,
    )


def switch_to(state: RoutingState, color: Color, now: float) -> RoutingState | None:
    """Make ``color`` live with weights 100/0; None when that is already the state (no-op)."""
    target = Weights.all_to(color)
    if state.active is color and state.weights == target:
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
