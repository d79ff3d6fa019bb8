"""The router's precedence (SPEC "Routing, per request"), as one table.

``route(attrs, state, roll)`` is pure: override > weights (sticky, then roll) > active.
"""

from __future__ import annotations

import pytest

from proxy.router import Decision, Reason, RequestAttrs, route
from proxy.state import Color, RoutingState, Weights

B, G = Color.BLUE, Color.GREEN


def st(active: Color, blue: int, green: int) -> RoutingState:
    return RoutingState(generation=7, active=active, weights=Weights(blue, green))


BLUE_LIVE = st(B, 100, 0)
GREEN_LIVE = st(G, 0, 100)
SPLIT_90_10 = st(B, 90, 10)
SPLIT_50_50 = st(B, 50, 50)
SPLIT_30_70 = st(G, 30, 70)


def A(override: str | None = None, allowed: bool = True, sticky: str | None = None) -> RequestAttrs:
    return RequestAttrs(override=override, override_allowed=allowed, sticky=sticky)


def ok(color: Color, reason: Reason, set_sticky: bool = False) -> Decision:
    return Decision(color, reason, set_sticky)


REJECTED = Decision(None, Reason.INVALID_OVERRIDE)

CASES = [
    # id, attrs, state, roll, expected
    # -- 1. override (header value, else cookie value: the listener passes one string)
    ("override-green-on-blue", A("green"), BLUE_LIVE, 0.0, ok(G, Reason.OVERRIDE)),
    ("override-blue-on-green", A("blue"), GREEN_LIVE, 0.0, ok(B, Reason.OVERRIDE)),
    ("override-live-color", A("blue"), BLUE_LIVE, 0.5, ok(B, Reason.OVERRIDE)),
    ("override-upper-case", A("GREEN"), BLUE_LIVE, 0.0, ok(G, Reason.OVERRIDE)),
    ("override-mixed-case", A("GrEeN"), BLUE_LIVE, 0.0, ok(G, Reason.OVERRIDE)),
    ("override-surrounding-space", A(" green "), BLUE_LIVE, 0.0, ok(G, Reason.OVERRIDE)),
    ("override-beats-weights", A("green"), SPLIT_90_10, 0.0, ok(G, Reason.OVERRIDE)),
    ("override-beats-sticky", A("blue", sticky="green"), SPLIT_90_10, 0.95, ok(B, Reason.OVERRIDE)),
    ("override-no-sticky-cookie-set", A("green"), SPLIT_50_50, 0.99, ok(G, Reason.OVERRIDE)),
    ("override-invalid", A("purple"), BLUE_LIVE, 0.0, REJECTED),
    ("override-empty", A(""), BLUE_LIVE, 0.0, REJECTED),
    ("override-prefix-of-color", A("gre"), BLUE_LIVE, 0.0, REJECTED),
    ("override-both-colors", A("blue,green"), BLUE_LIVE, 0.0, REJECTED),
    ("override-invalid-under-split", A("red"), SPLIT_90_10, 0.0, REJECTED),
    (
        "override-not-allowed-ignored",
        A("green", allowed=False),
        BLUE_LIVE,
        0.0,
        ok(B, Reason.ACTIVE),
    ),
    (
        "override-not-allowed-invalid-ignored",
        A("purple", allowed=False),
        BLUE_LIVE,
        0.0,
        ok(B, Reason.ACTIVE),
    ),
    (
        "override-not-allowed-falls-to-weights",
        A("green", allowed=False),
        SPLIT_90_10,
        0.1,
        ok(B, Reason.WEIGHTED, True),
    ),
    (
        "override-not-allowed-falls-to-sticky",
        A("blue", allowed=False, sticky="green"),
        SPLIT_90_10,
        0.1,
        ok(G, Reason.STICKY),
    ),
    # -- 2. weights: sticky cookie first
    ("sticky-green-kept", A(sticky="green"), SPLIT_90_10, 0.0, ok(G, Reason.STICKY)),
    ("sticky-blue-kept", A(sticky="blue"), SPLIT_90_10, 0.95, ok(B, Reason.STICKY)),
    ("sticky-garbage-rolls", A(sticky="purple"), SPLIT_90_10, 0.95, ok(G, Reason.WEIGHTED, True)),
    ("sticky-empty-rolls", A(sticky=""), SPLIT_90_10, 0.1, ok(B, Reason.WEIGHTED, True)),
    ("sticky-to-weight-0-green-ignored", A(sticky="green"), BLUE_LIVE, 0.99, ok(B, Reason.ACTIVE)),
    ("sticky-to-weight-0-blue-ignored", A(sticky="blue"), GREEN_LIVE, 0.0, ok(G, Reason.ACTIVE)),
    # -- 2. weights: roll boundaries, roll in [0, 1)
    ("roll-0.0-90/10", A(), SPLIT_90_10, 0.0, ok(B, Reason.WEIGHTED, True)),
    ("roll-0.899-90/10", A(), SPLIT_90_10, 0.899, ok(B, Reason.WEIGHTED, True)),
    ("roll-0.9-90/10", A(), SPLIT_90_10, 0.9, ok(G, Reason.WEIGHTED, True)),
    ("roll-0.999-90/10", A(), SPLIT_90_10, 0.999, ok(G, Reason.WEIGHTED, True)),
    ("roll-0.4999-50/50", A(), SPLIT_50_50, 0.4999, ok(B, Reason.WEIGHTED, True)),
    ("roll-0.5-50/50", A(), SPLIT_50_50, 0.5, ok(G, Reason.WEIGHTED, True)),
    ("roll-0.299-30/70", A(), SPLIT_30_70, 0.299, ok(B, Reason.WEIGHTED, True)),
    ("roll-0.3-30/70", A(), SPLIT_30_70, 0.3, ok(G, Reason.WEIGHTED, True)),
    ("roll-1/99-low", A(), st(G, 1, 99), 0.0099, ok(B, Reason.WEIGHTED, True)),
    ("roll-1/99-high", A(), st(G, 1, 99), 0.01, ok(G, Reason.WEIGHTED, True)),
    # -- 3. active: one side at 0 never rolls and never sets the sticky cookie
    ("100/0-roll-high", A(), BLUE_LIVE, 0.999, ok(B, Reason.ACTIVE)),
    ("100/0-roll-low", A(), BLUE_LIVE, 0.0, ok(B, Reason.ACTIVE)),
    ("0/100-roll-low", A(), GREEN_LIVE, 0.0, ok(G, Reason.ACTIVE)),
    ("0/100-roll-high", A(), GREEN_LIVE, 0.999, ok(G, Reason.ACTIVE)),
]


@pytest.mark.parametrize(
    ("attrs", "state", "roll", "expected"),
    [pytest.param(a, s, r, e, id=i) for i, a, s, r, e in CASES],
)
def test_route(attrs: RequestAttrs, state: RoutingState, roll: float, expected: Decision) -> None:
    decision = route(attrs, state, roll)
    assert (decision.color, decision.reason, decision.set_sticky) == (
        expected.color,
        expected.reason,
        expected.set_sticky,
    )
