"""The router: a pure function from request attributes and one snapshot to a color.

Precedence (the one place it is written down):

1. Override. A header (``routing.override_header``) or cookie (``routing.override_cookie``)
   value, where overrides are allowed for this request (no token configured, or the right
   token sent), pins the request to the color it names. The header wins over the cookie.
   A value that names no color is rejected (the edge answers 400).
2. Weights, when both colors have weight > 0. A sticky cookie naming a color whose weight
   is > 0 keeps the client there; otherwise ``roll`` (uniform in [0, 1)) picks a color in
   proportion to the weights and the response sets the sticky cookie.
3. Otherwise the active color.

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


@dataclass(frozen=True, slots=True)
class Decision:
    color: Color | None  # None only with INVALID_OVERRIDE
    reason: Reason
    set_sticky: bool = False


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


def route(attrs: RequestAttrs, state: RoutingState, roll: float) -> Decision:
    if attrs.override is not None and attrs.override_allowed:
        color = Color.parse(attrs.override)
        if color is None:
            return REJECT
        return _OVERRIDE[color]
    weights = state.weights
    if weights.split:
        if attrs.sticky is not None:
            sticky = Color.parse(attrs.sticky)
            if sticky is not None and weights.of(sticky) > 0:
                return _DECISIONS[sticky, Reason.STICKY, False]
        pick = Color.BLUE if roll * (weights.blue + weights.green) < weights.blue else Color.GREEN
        return _DECISIONS[pick, Reason.WEIGHTED, True]
    return _ACTIVE[state.active]
