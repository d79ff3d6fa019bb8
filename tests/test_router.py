"""The router's precedence (SPEC "Routing, per request"), as one table.

``route(attrs, state, roll)`` is pure: override > weights (sticky, then roll) > active.
"""

from __future__ import annotations

import pytest

from proxy.router import (
    BUCKETS,
    Decision,
    Reason,
    RequestAttrs,
    cookie_bucket,
    route,
    sticky_bucket,
)
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
        ok(G, Reason.STICKY, True),
    ),
    # -- 2. weights: the sticky cookie's bucket first (blue below blue's share of 10000)
    ("bucket-0-blue", A(sticky="0"), SPLIT_90_10, 0.99, ok(B, Reason.STICKY)),
    ("bucket-8999-blue", A(sticky="8999"), SPLIT_90_10, 0.99, ok(B, Reason.STICKY)),
    ("bucket-9000-green", A(sticky="9000"), SPLIT_90_10, 0.0, ok(G, Reason.STICKY)),
    ("bucket-9999-green", A(sticky="9999"), SPLIT_90_10, 0.0, ok(G, Reason.STICKY)),
    ("bucket-4999-blue-50/50", A(sticky="4999"), SPLIT_50_50, 0.99, ok(B, Reason.STICKY)),
    ("bucket-5000-green-50/50", A(sticky="5000"), SPLIT_50_50, 0.0, ok(G, Reason.STICKY)),
    ("bucket-leading-zeros", A(sticky="0042"), SPLIT_90_10, 0.99, ok(B, Reason.STICKY)),
    ("bucket-too-long-rolls", A(sticky="10000"), SPLIT_90_10, 0.95, ok(G, Reason.WEIGHTED, True)),
    ("bucket-sign-rolls", A(sticky="-1"), SPLIT_90_10, 0.1, ok(B, Reason.WEIGHTED, True)),
    ("bucket-unicode-digit-rolls", A(sticky="١٢"), SPLIT_90_10, 0.1, ok(B, Reason.WEIGHTED, True)),
    ("bucket-ignored-without-split", A(sticky="9999"), BLUE_LIVE, 0.99, ok(B, Reason.ACTIVE)),
    # An old cookie naming a color: kept there, and given a bucket on that side.
    ("sticky-green-kept", A(sticky="green"), SPLIT_90_10, 0.0, ok(G, Reason.STICKY, True)),
    ("sticky-blue-kept", A(sticky="blue"), SPLIT_90_10, 0.95, ok(B, Reason.STICKY, True)),
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


def test_sticky_bucket_reads_only_plain_decimal_digits() -> None:
    assert [sticky_bucket(v) for v in ("0", "7", "0042", "9999")] == [0, 7, 42, 9999]
    for bad in ("", "10000", "-1", "4.2", " 42", "42 ", "x", "١٢", "+1"):
        assert sticky_bucket(bad) == -1, bad


@pytest.mark.parametrize("state", [SPLIT_90_10, SPLIT_50_50, SPLIT_30_70, st(G, 1, 99)])
@pytest.mark.parametrize("roll", [0.0, 0.0999, 0.3, 0.5, 0.89999, 0.9, 0.99999])
def test_the_cookie_set_routes_the_client_where_it_went(state: RoutingState, roll: float) -> None:
    """Whatever set the cookie (a roll, or an old color cookie), the bucket it holds sends
    the next request to the color this one went to."""
    for attrs in (A(), A(sticky="blue"), A(sticky="green")):
        first = route(attrs, state, roll)
        if not first.set_sticky:
            continue
        bucket = cookie_bucket(first, state, roll)
        assert 0 <= bucket < BUCKETS
        again = route(A(sticky=str(bucket)), state, 0.5)
        assert (again.color, again.reason, again.set_sticky) == (first.color, Reason.STICKY, False)


def test_a_client_on_the_growing_color_stays_there() -> None:
    """The monotony rollouts rely on: as green's weight grows, the buckets on green only
    gain members; each step's share of buckets on green is its weight."""
    previous: set[int] = set()
    for green in (1, 10, 25, 50, 75, 99):
        state = st(B if green < 50 else G, 100 - green, green)
        on_green = {
            b for b in range(0, BUCKETS, 7) if route(A(sticky=str(b)), state, 0.0).color is G
        }
        assert previous <= on_green
        assert abs(len(on_green) / len(range(0, BUCKETS, 7)) - green / 100) < 0.002
        previous = on_green
