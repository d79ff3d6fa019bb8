"""Per-color traffic counters for the request path, and windowed views of them.

The request path calls ``ColorTraffic.record`` once per response routed to a color: a few
integer increments and one ``bisect`` over a fixed tuple of bucket bounds, no lock, no
allocation beyond CPython's own ints. Everything else works on *snapshots*
(cumulative counts at an instant): the difference of two snapshots is the traffic of
that interval (``Window``), from which rate, error rate and a p99 estimate follow.
The rollback controller diffs its own snapshots at its evaluation times; ``/status``
uses a short ring of samples the server's sweeper takes about once a second.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections import deque
from dataclasses import dataclass
from typing import Any

from proxy._hotpath import KIND
from proxy.state import COLORS, Color, rfc3339

# Upper bounds (seconds) of the latency buckets: 1-1.5-2-2.5-3-4-5-7.5 per decade keeps
# every bucket within 50% of its lower bound, fine enough for a p99 against a threshold.
LATENCY_BUCKETS: tuple[float, ...] = (
    0.001, 0.0015, 0.002, 0.0025, 0.003, 0.004, 0.005, 0.0075,
    0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075,
    0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.75,
    1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 7.5,
    10.0, 15.0, 20.0, 30.0, 45.0, 60.0, 90.0, 120.0,
)  # fmt: skip
_BOUNDS = LATENCY_BUCKETS  # typed in stats.pxd; LATENCY_BUCKETS stays importable
_NBUCKETS = len(_BOUNDS)
HISTORY_EVERY = 5.0
HISTORY_KEEP = 600.0
_COMPILED = KIND == "compiled"


class ColorTraffic:
    """Cumulative counters of one color. ``counts[i]`` is latencies in (b[i-1], b[i]];
    the last slot is everything above the largest bound."""

    __slots__ = ("counts", "errors", "latency_sum", "requests")

    def __init__(self) -> None:
        self.requests = 0
        self.errors = 0
        self.latency_sum = 0.0
        self.counts = [0] * (len(LATENCY_BUCKETS) + 1)

    def record(self, status: int, latency: float) -> None:
        self.requests += 1
        if status >= 500:
            self.errors += 1
        self.latency_sum += latency
        if _COMPILED:
            # bisect_left in C: a Python-level call to bisect costs more than the search.
            lo = 0
            hi = _NBUCKETS
            while lo < hi:
                mid = (lo + hi) >> 1
                bound = _BOUNDS[mid]  # a C double (stats.pxd): no float object per step
                if bound < latency:
                    lo = mid + 1
                else:
                    hi = mid
            self.counts[lo] += 1
        else:
            self.counts[bisect_left(LATENCY_BUCKETS, latency)] += 1

    def snapshot(self, at: float) -> Sample:
        return Sample(at, self.requests, self.errors, self.latency_sum, tuple(self.counts))


class Sample:
    """One color's cumulative counters at loop time ``at``. Not modified once taken. A
    plain class, not a frozen dataclass: the sweeper takes two per service every second,
    and a frozen dataclass's ``__init__`` is five ``object.__setattr__`` calls."""

    __slots__ = ("at", "counts", "errors", "latency_sum", "requests")

    def __init__(
        self, at: float, requests: int, errors: int, latency_sum: float, counts: tuple[int, ...]
    ) -> None:
        self.at = at
        self.requests = requests
        self.errors = errors
        self.latency_sum = latency_sum
        self.counts = counts

    def at_time(self, at: float) -> Sample:
        """The same counts, taken at ``at`` (nothing happened since)."""
        return Sample(at, self.requests, self.errors, self.latency_sum, self.counts)

    def since(self, earlier: Sample) -> Window:
        """The traffic between ``earlier`` and this sample."""
        return Window(
            duration=max(0.0, self.at - earlier.at),
            requests=self.requests - earlier.requests,
            errors=self.errors - earlier.errors,
            counts=tuple(a - b for a, b in zip(self.counts, earlier.counts, strict=True)),
        )


@dataclass(frozen=True, slots=True)
class Window:
    """Traffic of one color over an interval: what rollback decisions and /status read."""

    duration: float
    requests: int
    errors: int
    counts: tuple[int, ...] = ()

    @property
    def rps(self) -> float:
        return self.requests / self.duration if self.duration > 0 else 0.0

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0

    @property
    def p99(self) -> float | None:
        return quantile(self.counts, 0.99)

    def figures(self) -> dict[str, float | int | None]:
        p99 = self.p99
        return {
            "requests": self.requests,
            "errors": self.errors,
            "rps": round(self.rps, 3),
            "error_rate": round(self.error_rate, 6),
            "p99": round(p99, 6) if p99 is not None else None,
        }


def quantile(counts: tuple[int, ...] | list[int], q: float) -> float | None:
    """Estimate the q-quantile from bucket counts, interpolating linearly inside the
    bucket that holds it (Prometheus' histogram_quantile); None without observations.
    Beyond the last bound the estimate is that bound: the histogram knows no more."""
    total = sum(counts)
    if total == 0:
        return None
    rank = q * total
    seen = 0
    for i, n in enumerate(counts):
        if n and seen + n >= rank:
            if i >= len(LATENCY_BUCKETS):
                return LATENCY_BUCKETS[-1]
            lower = LATENCY_BUCKETS[i - 1] if i else 0.0
            upper = LATENCY_BUCKETS[i]
            return lower + (upper - lower) * ((rank - seen) / n)
        seen += n
    return LATENCY_BUCKETS[-1]  # pragma: no cover - rank <= total always lands above


_IDLE_FIGURES: dict[str, dict[str, float | None]] = {
    c.value: {"rps": 0.0, "error_rate": 0.0, "p99": None, "requests": 0, "window": HISTORY_EVERY}
    for c in COLORS
}


class Traffic:
    """Both colors' counters and a ring of recent samples for "the last N seconds"."""

    def __init__(self, now: float, sample_every: float = 1.0, keep: float = 15.0) -> None:
        self.colors: dict[Color, ColorTraffic] = {c: ColorTraffic() for c in COLORS}
        self.sample_every = sample_every
        # The dashboard's charts on a fresh page load: figures every HISTORY_EVERY seconds
        # for the last HISTORY_KEEP, as (wall-clock time, per-color figures).
        self.history: deque[tuple[float, dict[str, dict[str, float | None]]]] = deque(
            maxlen=int(HISTORY_KEEP / HISTORY_EVERY)
        )
        self._history_at = now
        self._history_requests = 0  # requests counted at the last history point
        # Seeded with an all-zero sample so a window exists from the start.
        self._samples: deque[dict[Color, Sample]] = deque(
            [{c: t.snapshot(now) for c, t in self.colors.items()}],
            maxlen=max(2, int(keep / sample_every) + 2),
        )

    def sample(self, now: float) -> None:
        """Take a sample if the last one is ``sample_every`` old (called by a coarse timer).
        An idle service (most of them, behind a busy edge) costs next to nothing: its
        sample reuses the last counts, and its history point is the shared idle one."""
        last = self._samples[-1]
        requests = 0
        for t in self.colors.values():
            requests += t.requests
        if now - last[Color.BLUE].at >= self.sample_every:
            before = 0
            for s in last.values():
                before += s.requests
            if requests == before:
                self._samples.append({c: s.at_time(now) for c, s in last.items()})
            else:
                self._samples.append({c: t.snapshot(now) for c, t in self.colors.items()})
        if now - self._history_at >= HISTORY_EVERY:
            self._history_at = now
            idle = requests == self._history_requests
            self._history_requests = requests
            figures = _IDLE_FIGURES if idle else self.status(now, HISTORY_EVERY)
            self.history.append((time.time(), figures))

    def history_dict(self) -> dict[str, Any]:
        """``GET /history``: the kept points, oldest first."""
        return {
            "interval": HISTORY_EVERY,
            "points": [
                {
                    "at": rfc3339(at),
                    **{c: {k: f[k] for k in ("rps", "error_rate", "p99")} for c, f in figs.items()},
                }
                for at, figs in self.history
            ],
        }

    def window(self, color: Color, seconds: float, now: float) -> Window:
        """Traffic of ``color`` from the newest sample at least ``seconds`` old (or the
        oldest one kept) until now."""
        base = self._samples[0][color]
        for entry in reversed(self._samples):
            if entry[color].at <= now - seconds:
                base = entry[color]
                break
        return self.colors[color].snapshot(now).since(base)

    def status(self, now: float, seconds: float = 10.0) -> dict[str, dict[str, float | None]]:
        """``/status``'s ``traffic``: rps, error_rate and p99 (seconds) per color."""
        out: dict[str, dict[str, float | None]] = {}
        for color in COLORS:
            w = self.window(color, seconds, now)
            p99 = w.p99
            out[color.value] = {
                "rps": round(w.rps, 3),
                "error_rate": round(w.error_rate, 6),
                "p99": round(p99, 6) if p99 is not None else None,
                "requests": w.requests,
                "window": round(w.duration, 3),
            }
        return out
