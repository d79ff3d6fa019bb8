"""The router: a pure function from request attributes and one snapshot to a color.

Precedence (the one place it is written down):

1. Override. A header (``routing.override_header``) or cookie (``routing.override_cookie``)
   value, where overrides are allowed for this request (no token configured, or the right
   token sent), pins the request to the color it names. The header wins over the cookie.
   A value that names no color is rejected (the edge answers 400).
2. Weights, when both colors have weight > 0. The sticky cookie holds the client's bucket,
   a number in [0, BUCKETS) drawn once: the client is on blue while its bucket is below
   blue's share of BUCKETS, else on green. Without a valid cookie, ``roll`` (uniform in
   [0, 1)) draws the bucket and the response sets the cookie. A cookie naming a color
   with weight > 0 (as earlier versions set it) keeps the client there and is replaced
   by a bucket on that color's side.
3. Otherwise the active color.

Buckets make stickiness and weights agree. As one color's weight only grows (the steps
of a rollout), every client on it stays, and exactly the clients whose buckets the new
share covers move to it: the share of clients on each color tracks the weights, and no
client flaps between versions. When the weight drops to 0 (an abort), the split is
over and everyone is on the active color.

The color drained after a switch has weight 0 in the new snapshot, so neither weights
nor a sticky cookie can choose it; only an explicit override reaches it, which is how QA
tests the idle color.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from proxy.state import Color, RoutingState


class Reason(enum.Enum):
    OVERRIDE = "override"
    INVALID_OVERRIDE = "invalid_override"
    STICKY = "sticky"
    WEIGHTED = "weighted"
    ACTIVE = "active"

    # Enum hashes by name in Python code; decisions are looked up by reason per request.
    __hash__ = object.__hash__


@dataclass(frozen=True, slots=True)
class RequestAttrs:
    """What the router needs from a request; raw strings, parsed here."""

    override: str | None = None  # header value, else cookie value
    override_allowed: bool = True
    sticky: str | None = None


class Decision:
    """Where a request goes and why. One of a few shared instances (below): never changed.
    A C type in the compiled build (router.pxd), so the request path reads its fields
    without a Python attribute lookup."""

    __slots__ = ("color", "reason", "set_sticky")

    def __init__(self, color: Color | None, reason: Reason, set_sticky: bool = False) -> None:
        self.color = color  # None only with INVALID_OVERRIDE
        self.reason = reason
        self.set_sticky = set_sticky

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Decision):
            return NotImplemented
        return (self.color, self.reason, self.set_sticky) == (
            other.color,
            other.reason,
            other.set_sticky,
        )

    def __hash__(self) -> int:
        return hash((self.color, self.reason, self.set_sticky))

    def __repr__(self) -> str:
        return f"Decision({self.color!r}, {self.reason!r}, set_sticky={self.set_sticky!r})"


NO_ATTRS = RequestAttrs()

# Decisions are a small closed set: build them once so routing allocates nothing.
_DECISIONS = {
    (c, r, s): Decision(c, r, s)
    for c in Color
    for r in Reason
    if r is not Reason.INVALID_OVERRIDE
    for s in (False, True)
}
REJECT = Decision(None, Reason.INVALID_OVERRIDE)
_ACTIVE = {c: _DECISIONS[c, Reason.ACTIVE, False] for c in Color}
_OVERRIDE = {c: _DECISIONS[c, Reason.OVERRIDE, False] for c in Color}


BUCKETS = 10000
_N = BUCKETS  # a C int in the compiled build


def sticky_bucket(value: str) -> int:
    """The bucket a sticky cookie holds (its decimal digits, below BUCKETS), or -1."""
    n = len(value)
    if n == 0 or n > 4:
        return -1
    bucket = 0
    for ch in value:
        digit = ord(ch) - 48
        if digit < 0 or digit > 9:
            return -1
        bucket = bucket * 10 + digit
    return bucket


def _blue_cut(blue: int, green: int) -> int:
    """Buckets below this are blue's: ceil(BUCKETS * blue / (blue + green))."""
    return -(-_N * blue // (blue + green))


def route(attrs: RequestAttrs, state: RoutingState, roll: float) -> Decision:
    if attrs.override is not None and attrs.override_allowed:
        color = Color.parse(attrs.override)
        if color is None:
            return REJECT
        return _OVERRIDE[color]
    weights = state.weights
    if weights.split:
        cut = _blue_cut(weights.blue, weights.green)
        if attrs.sticky is not None:
            bucket = sticky_bucket(attrs.sticky)
            if bucket >= 0:
                pick = Color.BLUE if bucket < cut else Color.GREEN
                return _DECISIONS[pick, Reason.STICKY, False]
            legacy = Color.parse(attrs.sticky)
            if legacy is not None and weights.of(legacy) > 0:
                return _DECISIONS[legacy, Reason.STICKY, True]
        bucket = int(roll * _N)
        pick = Color.BLUE if bucket < cut else Color.GREEN
        return _DECISIONS[pick, Reason.WEIGHTED, True]
    return _ACTIVE[state.active]


def cookie_bucket(decision: Decision, state: RoutingState, roll: float) -> int:
    """The bucket the response's sticky cookie gets, with the ``roll`` that ``route`` was
    given: the rolled one, or for an old color cookie one drawn on that color's side."""
    if decision.reason is Reason.WEIGHTED:
        return int(roll * _N)
    cut = _blue_cut(state.weights.blue, state.weights.green)
    low, high = (0, cut) if decision.color is Color.BLUE else (cut, BUCKETS)
    return low + int(roll * (high - low))
