"""A time-based sliding window of one version's outcomes (latency, ok or not), and a fixed histogram.

Both are updated on the event loop, one request at a time: an append and a few pops from a
deque, a bisect into a bucket list. The p99 is computed only when a decision needs it.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import deque

import numpy as np

# Seconds; the upper bounds of the latency histograms (Prometheus `le`), +Inf implied.
BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Window:
    """Outcomes of the last `span` seconds (by the caller's monotonic clock)."""

    def __init__(self, span: float) -> None:
        self.span = span
        self._items: deque[tuple[float, float, bool]] = deque()  # (time, latency s, ok)
        self.errors = 0

    def add(self, now: float, latency: float, ok: bool) -> None:
        self._items.append((now, latency, ok))
        if not ok:
            self.errors += 1
        self.trim(now)

    def trim(self, now: float) -> None:
        items, oldest = self._items, now - self.span
        while items and items[0][0] < oldest:
            if not items.popleft()[2]:
                self.errors -= 1

    def clear(self) -> None:
        self._items.clear()
        self.errors = 0

    @property
    def count(self) -> int:
        return len(self._items)

    @property
    def error_rate(self) -> float:
        return self.errors / len(self._items) if self._items else 0.0

    def p99(self) -> float:
        """The 99th percentile latency (seconds) in the window; 0 when empty."""
        if not self._items:
            return 0.0
        return float(np.percentile(np.fromiter((i[1] for i in self._items), float, len(self._items)), 99))


class Histogram:
    """Cumulative-on-read latency histogram over BUCKETS."""

    def __init__(self) -> None:
        self.counts = [0] * (len(BUCKETS) + 1)
        self.total = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(BUCKETS, seconds)] += 1
        self.total += seconds

    def cumulative(self) -> list[tuple[str, float]]:
        out, running = [], 0
        for bound, count in zip((*map(str, BUCKETS), "+Inf"), self.counts, strict=True):
            running += count
            out.append((bound, float(running)))
        return out
