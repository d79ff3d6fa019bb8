"""``bgproxy rollout COLOR --wait``: follow a rollout in the terminal, a line per step.

Kept apart from ``admin.cli`` (which calls it with a function that fetches ``/status``)
so neither module grows past a screenful of concerns.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from typing import Any, Protocol

from admin.cli_output import interval_line, step_line


class Lines(Protocol):
    def show(self, key: str, text: str) -> None: ...

    def done(self, text: str) -> None: ...


def steps_arg(text: str) -> list[int]:
    """``--steps 10,25,50,100``: the server checks the rest (rising, ending at 100)."""
    try:
        steps = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"expected weights like 10,25,50,100, got {text!r}") from None
    if not steps:
        raise ValueError("expected at least one weight, like 10,25,50,100")
    return steps


def follow_rollout(
    fetch: Callable[[], dict[str, Any]],
    lines: Lines,
    first: dict[str, Any],
    as_json: bool,
    poll: float = 0.5,
) -> int:
    """Poll until the rollout that ``first`` started ends: 0 promoted, 1 aborted or
    cancelled (by an operator's switch, weights or rollback)."""
    status = first
    started = (first.get("rollout") or {}).get("started_at")
    reported_step = None
    while True:
        ro = status.get("rollout") or {}
        if ro.get("started_at") != started:
            print("bgproxy: another rollout replaced this one", file=sys.stderr)
            return 1
        step = ro.get("step")
        if step != reported_step and reported_step is not None:
            lines.done(f"step {reported_step} passed")
        if step != reported_step:
            reported_step = step
        state = ro.get("state")
        if state in ("promoted", "aborted", "cancelled"):
            if as_json:
                print(json.dumps(status, indent=2))
            if state == "promoted":
                lines.done(f"{ro.get('color')} promoted: 100% (generation {status['generation']})")
                return 0
            lines.done(f"rollout {state}: {status.get('active')} has all the traffic")
            last = ro.get("last") or {}
            why = f": {last.get('reason') or interval_line(last)}" if last else ""
            print(f"bgproxy: rollout of {ro.get('color')} {state}{why}", file=sys.stderr)
            return 1
        lines.show(f"{step}-{state}-{ro.get('held')}", step_line(ro, time.time()))
        time.sleep(poll)
        status = fetch()
