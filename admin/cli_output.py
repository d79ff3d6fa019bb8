"""How the operator commands print the admin API's answers for humans.

Plain ASCII tables (a 3 a.m. terminal may be a serial console or a pager), every state
spelled out in words, times in UTC as the API gives them plus "how long ago". Pure
functions of the JSON: tested by running the CLI against a live proxy.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

COLOR_NAMES = ("blue", "green")


# --- small formatters ---------------------------------------------------------------------


def to_epoch(value: Any) -> float | None:
    """Seconds since the epoch from a number or an RFC 3339 string (the API uses both)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str) and value:
        try:
            return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
        except ValueError:
            return None
    return None


def span(seconds: float) -> str:
    """A duration for people: 850ms, 12s, 4m05s, 2h03m."""
    seconds = max(0.0, seconds)
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms"
    if seconds < 60:
        return f"{seconds:.1f}s" if seconds < 10 else f"{seconds:.0f}s"
    minutes, sec = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{sec:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def when(value: Any, now: float | None = None) -> str:
    """'12:03:04Z (3m05s ago)'; the date too when it is not today (UTC)."""
    ts = to_epoch(value)
    if ts is None:
        return "-"
    now = time.time() if now is None else now
    moment = datetime.fromtimestamp(ts, UTC)
    today = datetime.fromtimestamp(now, UTC).date() == moment.date()
    text = moment.strftime("%H:%M:%SZ" if today else "%Y-%m-%d %H:%M:%SZ")
    delta = now - ts
    if abs(delta) < 1:
        rel = "just now"
    else:
        rel = f"{span(delta)} ago" if delta >= 0 else f"in {span(-delta)}"
    return f"{text} ({rel})"


def pct(value: Any) -> str:
    if not isinstance(value, int | float) or isinstance(value, bool):
        return "-"
    return f"{value * 100:.1f}%"


def latency(value: Any) -> str:
    if not isinstance(value, int | float) or isinstance(value, bool):
        return "-"
    return f"{value * 1000:.0f}ms" if value < 1 else f"{value:.2f}s"


def rate(value: Any) -> str:
    if not isinstance(value, int | float) or isinstance(value, bool):
        return "-"
    return f"{value:.1f}" if value < 10 else f"{value:.0f}"


def table(headers: list[str], rows: list[list[str]], right: frozenset[int] = frozenset()) -> str:
    """Columns as wide as their widest cell; ``right`` holds the numeric columns' indexes."""
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]

    def line(cells: list[str]) -> str:
        parts = [
            str(c).rjust(widths[i]) if i in right else str(c).ljust(widths[i])
            for i, c in enumerate(cells)
        ]
        return "  ".join(parts).rstrip()

    return "\n".join([line(headers), *(line(r) for r in rows)])


# --- status --------------------------------------------------------------------------------


def role(status: dict[str, Any], color: str) -> str:
    weights = status.get("weights") or {}
    mine = weights.get(color) or 0
    other = weights.get("green" if color == "blue" else "blue") or 0
    if mine and not other:
        return "LIVE"
    if mine:
        return f"split {round(100 * mine / (mine + other))}%"
    drain = status.get("drain") or {}
    if drain.get("color") == color and drain.get("state") == "draining":
        return "draining"
    return "idle"


def drain_line(drain: dict[str, Any], colors: dict[str, Any], now: float) -> str:
    state = drain.get("state") or "idle"
    color = drain.get("color") or "-"
    if state == "draining":
        in_flight = (colors.get(color) or {}).get("in_flight", 0)
        deadline = to_epoch(drain.get("deadline"))
        left = f", deadline in {span(deadline - now)}" if deadline is not None else ""
        return f"DRAINING {color}: {in_flight} request(s) in flight{left}"
    if state == "done":
        started, done = to_epoch(drain.get("started_at")), to_epoch(drain.get("completed_at"))
        took = f" in {span(done - started)}" if started is not None and done is not None else ""
        forced = drain.get("forced") or 0
        cut = f"; {forced} request(s) cut at the deadline" if forced else ""
        return f"done: {color} drained{took}, at {when(drain.get('completed_at'), now)}{cut}"
    return state


def interval_line(last: dict[str, Any] | None) -> str:
    if not last:
        return "no interval judged yet"
    verdict = f" -> {last['verdict']}" if last.get("verdict") else ""
    return (
        f"last interval {last.get('requests', '-')} req, {pct(last.get('error_rate'))} errors, "
        f"p99 {latency(last.get('p99'))}{verdict}"
    )


def rollback_line(rb: dict[str, Any], now: float) -> str:
    state = rb.get("state") or "idle"
    color = rb.get("color") or "-"
    if state == "watching":
        until = to_epoch(rb.get("until"))
        left = f" ({span(until - now)} left)" if until is not None else ""
        fails = rb.get("consecutive_failures") or 0
        return (
            f"WATCHING {color}{left}; {interval_line(rb.get('last'))}; "
            f"{fails} consecutive failing interval(s)"
        )
    if state == "rolled_back":
        return f"ROLLED BACK {color} automatically; {interval_line(rb.get('last'))}"
    if rb.get("enabled") is False:
        return "idle (automatic rollback disabled)"
    return state


def step_line(ro: dict[str, Any], now: float) -> str:
    """Where a running rollout is: step, weight, time left or why it is held, figures."""
    steps = ro.get("steps") or []
    head = f"step {ro.get('step')}/{len(steps)}  {ro.get('color')} {ro.get('weight')}%"
    state = ro.get("state")
    if state == "paused":
        return f"{head}  paused (bgproxy resume)"
    if state == "waiting_promotion":
        return f"{head}  waiting for promotion (bgproxy promote | bgproxy abort)"
    if ro.get("held"):
        when = f"; {ro['held']}"
    else:
        nxt = to_epoch(ro.get("next_at"))
        when = f"; next step in {span(max(0.0, nxt - now))}" if nxt is not None else ""
    return f"{head}{when}  {interval_line(ro.get('last'))}"


def rollout_line(ro: dict[str, Any], now: float) -> str:
    state = ro.get("state") or "idle"
    if state == "idle":
        return "none"
    if state in ("promoted", "aborted", "cancelled"):
        return f"{ro.get('color')} {state} {when(ro.get('ended_at'), now)}"
    return step_line(ro, now)


def format_status(s: dict[str, Any], now: float | None = None) -> str:
    now = time.time() if now is None else now
    w = s.get("weights") or {}
    colors: dict[str, Any] = s.get("colors") or {}
    traffic: dict[str, Any] = s.get("traffic") or {}
    active = str(s.get("active") or "-")
    lines = []
    service = s.get("service")
    if service and service != "default":
        lines.append(f"service     {service}")
    lines += [
        f"active      {active.upper()}   (weights blue {w.get('blue')} / green {w.get('green')})",
        f"generation  {s.get('generation')}   previous {s.get('previous') or '-'}   "
        f"changed {when(s.get('changed_at'), now)}",
        "",
    ]
    rows = []
    for name in COLOR_NAMES:
        c = colors.get(name) or {}
        targets = c.get("targets") or []
        up = sum(1 for t in targets if t.get("healthy"))
        t = traffic.get(name) or {}
        rows.append(
            [
                name,
                role(s, name),
                str(w.get(name, "-")),
                f"{'yes' if c.get('healthy') else 'NO'} ({up}/{len(targets)})",
                str(c.get("in_flight", 0)),
                str(c.get("websockets", 0)),
                rate(t.get("rps")),
                pct(t.get("error_rate")),
                latency(t.get("p99")),
            ]
        )
    headers = ["COLOR", "ROLE", "WEIGHT", "HEALTHY", "IN-FLIGHT", "WEBSOCKETS"]
    headers += ["REQ/S", "ERRORS", "P99"]
    lines.append(table(headers, rows, right=frozenset({2, 4, 5, 6, 7, 8})))
    lines.append("")
    target_rows = [
        [name, t.get("url", "?"), "up" if t.get("healthy") else "DOWN"]
        for name in COLOR_NAMES
        for t in (colors.get(name) or {}).get("targets") or []
    ]
    lines.append(table(["COLOR", "TARGET", "STATE"], target_rows))
    lines.append("")
    lines.append(f"drain       {drain_line(s.get('drain') or {}, colors, now)}")
    lines.append(f"rollback    {rollback_line(s.get('rollback') or {}, now)}")
    lines.append(f"rollout     {rollout_line(s.get('rollout') or {}, now)}")
    store = s.get("store")
    if isinstance(store, dict):
        where = f" {store['url']}" if store.get("url") else ""
        ok = "available" if store.get("available") else "UNAVAILABLE: changes are refused (503)"
        lines.append(f"state       {store.get('backend')}{where}, {ok}")
    instances = s.get("instances") or []
    if instances:
        lines.append("")
        inst_rows = []
        for i in instances:
            gen = i.get("generation")
            behind = isinstance(gen, int) and gen < (s.get("generation") or 0)
            fl, ws = i.get("in_flight") or {}, i.get("websockets") or {}
            inst_rows.append(
                [
                    str(i.get("id", "?")),
                    str(i.get("host", "")),
                    f"{gen}{' (BEHIND)' if behind else ''}",
                    f"{fl.get('blue', 0)}/{fl.get('green', 0)}",
                    f"{ws.get('blue', 0)}/{ws.get('green', 0)}",
                    when(i.get("last_seen"), now),
                ]
            )
        headers = ["INSTANCE", "HOST", "GENERATION", "IN-FLIGHT B/G", "WS B/G", "LAST SEEN"]
        lines.append(table(headers, inst_rows, right=frozenset({2})))
    return "\n".join(lines)


def format_events(events: list[dict[str, Any]], with_service: bool = False) -> str:
    """The audit trail; ``with_service`` adds a SERVICE column when the events span
    services other than the single-service form's ``default``."""
    if not events:
        return "no events"
    names = {e.get("service") for e in events} - {None}
    show_service = with_service and bool(names - {"default"})
    rows = []
    for e in events:
        row = [
            str(e.get("at", "")),
            str(e.get("generation", "")),
            str(e.get("action", "")),
            str(e.get("from") or "-"),
            str(e.get("to") or "-"),
            "AUTO" if e.get("trigger") == "auto" else str(e.get("trigger") or "-"),
            str(e.get("actor") or "-"),
            str(e.get("reason") or ""),
        ]
        if show_service:
            row.insert(1, str(e.get("service") or "-"))
        rows.append(row)
    headers = ["AT", "GEN", "ACTION", "FROM", "TO", "TRIGGER", "ACTOR", "REASON"]
    if show_service:
        headers.insert(1, "SERVICE")
    return table(headers, rows, right=frozenset({2 if show_service else 1}))


# --- services ------------------------------------------------------------------------------


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def split(weights: dict[str, Any]) -> str:
    """Weights as percentages, blue/green: ``100/0``, ``90/10``."""
    blue = _number(weights.get("blue")) or 0.0
    green = _number(weights.get("green")) or 0.0
    total = blue + green
    if total <= 0:
        return "-"
    share = round(100 * blue / total)
    return f"{share}/{100 - share}"


def service_traffic(traffic: dict[str, Any]) -> tuple[float | None, float | None, float | None]:
    """One service's req/s (both colors), error rate (over both colors' requests) and p99
    (the higher of the two colors': a percentile of the whole cannot be rebuilt)."""
    per_color = [traffic.get(c) or {} for c in COLOR_NAMES]
    rates = [r for r in (_number(t.get("rps")) for t in per_color) if r is not None]
    rps = sum(rates) if rates else None
    weighted = [
        (_number(t.get("error_rate")), _number(t.get("requests")) or 0.0) for t in per_color
    ]
    requests = sum(n for e, n in weighted if e is not None)
    if requests > 0:
        errors: float | None = sum((e or 0.0) * n for e, n in weighted) / requests
    else:
        known = [e for e, _ in weighted if e is not None]
        errors = max(known) if known else None
    p99s = [p for p in (_number(t.get("p99")) for t in per_color) if p is not None]
    return rps, errors, max(p99s) if p99s else None


def service_notes(svc: dict[str, Any]) -> str:
    """What needs an operator's eye: a drain, a rollback watch or rollback, a dead pool."""
    notes = []
    drain = svc.get("drain") or {}
    if drain.get("state") == "draining":
        notes.append(f"draining {drain.get('color') or '-'}")
    ro = svc.get("rollout") or {}
    if ro.get("state") in ("progressing", "paused", "waiting_promotion"):
        paused = "" if ro["state"] == "progressing" else f" ({ro['state'].replace('_', ' ')})"
        notes.append(f"rolling out {ro.get('color')} {ro.get('weight')}%{paused}")
    elif ro.get("state") == "aborted":
        notes.append(f"ROLLOUT ABORTED {ro.get('color')}")
    rb = svc.get("rollback") or {}
    if rb.get("state") == "watching":
        notes.append(f"watching {rb.get('color') or '-'}")
    elif rb.get("state") == "rolled_back":
        notes.append(f"ROLLED BACK {rb.get('color') or '-'}")
    healthy = svc.get("healthy") or {}
    for color in COLOR_NAMES:
        if healthy.get(color) is False:
            notes.append(f"{color} UNHEALTHY")
    return "; ".join(notes)


def format_services(services: list[dict[str, Any]]) -> str:
    """``bgproxy services``: one line per service, what ``GET /services`` says."""
    if not services:
        return "no services"
    rows = []
    for svc in services:
        rps, errors, p99 = service_traffic(svc.get("traffic") or {})
        rows.append(
            [
                str(svc.get("name", "?")),
                ",".join(str(h) for h in svc.get("hosts") or []) or "-",
                ",".join(str(p) for p in svc.get("paths") or []) or "-",
                str(svc.get("active") or "-"),
                split(svc.get("weights") or {}),
                str(svc.get("generation", "-")),
                rate(rps),
                pct(errors),
                latency(p99),
                service_notes(svc),
            ]
        )
    headers = ["SERVICE", "HOSTS", "PATHS", "LIVE", "SPLIT B/G", "GEN", "REQ/S", "ERRORS", "P99"]
    headers.append("NOTES")
    return table(headers, rows, right=frozenset({4, 5, 6, 7, 8}))
