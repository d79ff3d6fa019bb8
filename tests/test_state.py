"""Routing state: the pure transitions (tables) and the memory store's compare-and-set."""

from __future__ import annotations

import dataclasses
from datetime import datetime

import pytest

from proxy.state import (
    Color,
    Event,
    GenerationMismatch,
    InvalidWeights,
    MemoryStateStore,
    NothingToRollBack,
    RoutingState,
    Weights,
    roll_back,
    set_weights,
    switch_to,
)

B, G = Color.BLUE, Color.GREEN
W = Weights
NOW = 1_700_000_000.5


def st(
    active: Color,
    blue: int,
    green: int,
    gen: int = 5,
    prev: Color | None = None,
    prev_w: Weights | None = None,
) -> RoutingState:
    return RoutingState(
        generation=gen,
        active=active,
        weights=W(blue, green),
        previous=prev,
        previous_weights=prev_w,
        changed_at=1.0,
    )


def expect(old: RoutingState, active: Color, weights: Weights) -> RoutingState:
    """What every accepted transition yields: generation + 1, the old state as previous."""
    return RoutingState(
        generation=old.generation + 1,
        active=active,
        weights=weights,
        previous=old.active,
        previous_weights=old.weights,
        changed_at=NOW,
    )


# --- switch_to --------------------------------------------------------------------------------

SWITCH_CASES = [
    ("blue-to-green", st(B, 100, 0), G, W(0, 100)),
    ("green-to-blue", st(G, 0, 100, prev=B, prev_w=W(100, 0)), B, W(100, 0)),
    ("split-to-blue-resets-weights", st(B, 80, 20), B, W(100, 0)),
    ("split-to-green", st(B, 80, 20), G, W(0, 100)),
    ("green-heavy-split-to-green", st(G, 30, 70), G, W(0, 100)),
]


@pytest.mark.parametrize(
    ("old", "color", "weights"), [pytest.param(*c[1:], id=c[0]) for c in SWITCH_CASES]
)
def test_switch_to(old: RoutingState, color: Color, weights: Weights) -> None:
    assert switch_to(old, color, NOW) == expect(old, color, weights)


@pytest.mark.parametrize(
    "old",
    [
        pytest.param(st(B, 100, 0), id="blue-live"),
        pytest.param(st(G, 0, 100, prev=B, prev_w=W(100, 0)), id="green-live"),
    ],
)
def test_switch_to_live_color_is_a_noop(old: RoutingState) -> None:
    assert switch_to(old, old.active, NOW) is None


# --- set_weights ------------------------------------------------------------------------------

WEIGHT_CASES = [
    ("80/20-blue-heavier", st(B, 100, 0), 80, 20, B),
    ("30/70-green-heavier", st(B, 100, 0), 30, 70, G),
    ("50/50-tie-is-blue", st(G, 0, 100), 50, 50, B),
    ("1/1-tie-is-blue", st(G, 0, 100), 1, 1, B),
    ("0/100-green-active", st(B, 100, 0), 0, 100, G),
    ("0/1-green-active", st(B, 100, 0), 0, 1, G),
    ("100/0-blue-active", st(G, 0, 100), 100, 0, B),
    ("7/0-blue-active", st(G, 0, 100), 7, 0, B),
    ("same-weights-still-a-change", st(B, 80, 20), 80, 20, B),
]


@pytest.mark.parametrize(
    ("old", "blue", "green", "active"), [pytest.param(*c[1:], id=c[0]) for c in WEIGHT_CASES]
)
def test_set_weights(old: RoutingState, blue: int, green: int, active: Color) -> None:
    assert set_weights(old, blue, green, NOW) == expect(old, active, W(blue, green))


@pytest.mark.parametrize(
    ("blue", "green"),
    [(0, 0), (-1, 100), (100, -1), (-5, -5)],
    ids=["both-zero", "negative-blue", "negative-green", "both-negative"],
)
def test_set_weights_invalid_raises(blue: int, green: int) -> None:
    with pytest.raises(InvalidWeights):
        set_weights(st(B, 100, 0), blue, green, NOW)


# --- roll_back --------------------------------------------------------------------------------

ROLLBACK_CASES = [
    ("after-switch", st(G, 0, 100, prev=B, prev_w=W(100, 0)), B, W(100, 0)),
    ("after-weights", st(B, 80, 20, prev=B, prev_w=W(100, 0)), B, W(100, 0)),
    ("back-to-a-split", st(G, 0, 100, prev=B, prev_w=W(60, 40)), B, W(60, 40)),
    ("back-to-green", st(B, 100, 0, prev=G, prev_w=W(0, 100)), G, W(0, 100)),
    ("previous-without-weights", st(G, 0, 100, prev=B, prev_w=None), B, W(100, 0)),
]


@pytest.mark.parametrize(
    ("old", "active", "weights"), [pytest.param(*c[1:], id=c[0]) for c in ROLLBACK_CASES]
)
def test_roll_back(old: RoutingState, active: Color, weights: Weights) -> None:
    assert roll_back(old, NOW) == expect(old, active, weights)


def test_roll_back_twice_toggles() -> None:
    first = switch_to(st(B, 100, 0, gen=1), G, NOW)
    assert first is not None
    back = roll_back(first, NOW)
    again = roll_back(back, NOW)
    assert (back.active, back.weights, back.generation) == (B, W(100, 0), 3)
    assert (again.active, again.weights, again.generation) == (G, W(0, 100), 4)


def test_roll_back_without_previous_raises() -> None:
    with pytest.raises(NothingToRollBack):
        roll_back(RoutingState.initial(B), NOW)


def test_transitions_do_not_mutate() -> None:
    old = st(B, 100, 0)
    copy = dataclasses.replace(old)
    switch_to(old, G, NOW)
    set_weights(old, 10, 90, NOW)
    assert old == copy
    with pytest.raises(dataclasses.FrozenInstanceError):
        old.generation = 99  # type: ignore[misc]


def test_initial_state() -> None:
    s = RoutingState.initial(G)
    assert (s.generation, s.active, s.weights, s.previous, s.previous_weights) == (
        1,
        G,
        W(0, 100),
        None,
        None,
    )


@pytest.mark.parametrize(
    ("raw", "color"),
    [
        ("blue", B),
        ("GREEN", G),
        (" Blue ", B),
        ("purple", None),
        ("", None),
        (None, None),
        (1, None),
    ],
)
def test_color_parse(raw: object, color: Color | None) -> None:
    assert Color.parse(raw) is color


def test_state_dict_round_trip() -> None:
    s = st(G, 30, 70, gen=9, prev=B, prev_w=W(100, 0))
    assert RoutingState.from_dict(s.to_dict()) == s


# --- MemoryStateStore -------------------------------------------------------------------------


def event_for(state: RoutingState, action: str = "switch") -> Event:
    return Event(
        at=state.changed_at,
        generation=state.generation,
        action=action,
        from_="blue",
        to=state.active.value,
        trigger="manual",
        reason=None,
        actor="admin",
    )


async def test_store_compare_and_set_swaps_and_notifies() -> None:
    initial = RoutingState.initial(B)
    store = MemoryStateStore(initial)
    seen: list[tuple[RoutingState, RoutingState, Event | None]] = []
    store.add_listener(lambda old, new, event: seen.append((old, new, event)))

    new = switch_to(initial, G, NOW)
    assert new is not None
    event = event_for(new)
    result = await store.compare_and_set(1, new, event)

    assert result is new
    assert store.snapshot() is new
    assert seen == [(initial, new, event)]  # listeners learn what made the change
    assert [e.generation for e in await store.events(10)] == [2]


async def test_store_generation_mismatch_changes_nothing() -> None:
    initial = RoutingState.initial(B)
    store = MemoryStateStore(initial)
    seen: list[object] = []
    store.add_listener(lambda old, new, event: seen.append(new))
    new = switch_to(initial, G, NOW)
    assert new is not None

    with pytest.raises(GenerationMismatch):
        await store.compare_and_set(2, new, event_for(new))
    with pytest.raises(GenerationMismatch):
        await store.compare_and_set(0, new, event_for(new))

    assert store.snapshot() is initial
    assert seen == []
    assert await store.events(10) == []


async def test_store_second_write_on_the_same_generation_loses() -> None:
    initial = RoutingState.initial(B)
    store = MemoryStateStore(initial)
    a = switch_to(initial, G, NOW)
    b = set_weights(initial, 50, 50, NOW)
    assert a is not None
    await store.compare_and_set(1, a, event_for(a))
    with pytest.raises(GenerationMismatch):
        await store.compare_and_set(1, b, event_for(b, "weights"))
    assert store.snapshot() is a


async def test_store_events_newest_first_and_limited() -> None:
    state = RoutingState.initial(B)
    store = MemoryStateStore(state)
    for i in range(5):
        new = switch_to(state, state.active.other, NOW + i)
        assert new is not None
        await store.compare_and_set(state.generation, new, event_for(new))
        state = new
    events = await store.events(10)
    assert [e.generation for e in events] == [6, 5, 4, 3, 2]
    assert [e.generation for e in await store.events(2)] == [6, 5]
    assert await store.events(0) == []


async def test_store_keeps_at_most_max_events() -> None:
    state = RoutingState.initial(B)
    store = MemoryStateStore(state, max_events=3)
    for _ in range(5):
        new = switch_to(state, state.active.other, NOW)
        assert new is not None
        await store.compare_and_set(state.generation, new, event_for(new))
        state = new
    assert [e.generation for e in await store.events(100)] == [6, 5, 4]


def test_event_to_dict_shape() -> None:
    e = Event(
        at=NOW,
        generation=3,
        action="rollback",
        from_="green",
        to="blue",
        trigger="auto",
        reason="error rate",
        actor="auto",
    )
    d = e.to_dict()
    assert set(d) >= {"at", "generation", "action", "from", "to", "trigger", "reason", "actor"}
    assert (
        d["generation"],
        d["action"],
        d["from"],
        d["to"],
        d["trigger"],
        d["reason"],
        d["actor"],
    ) == (3, "rollback", "green", "blue", "auto", "error rate", "auto")
    assert d["at"].endswith("Z")
    parsed = datetime.fromisoformat(d["at"].replace("Z", "+00:00"))
    assert parsed.utcoffset() is not None and parsed.utcoffset().total_seconds() == 0
    assert abs(parsed.timestamp() - NOW) < 0.001
