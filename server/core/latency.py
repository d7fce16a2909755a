"""Per-request durations for latency histograms and quantile summaries (metrics).

The cumulative counters in stats.py cannot give percentiles; these keep each request's
durations. Recording is one deque append on the instance thread; the samples are folded
into cumulative histogram buckets and a bounded window of recent samples when read (a
scrape) or when many have piled up, so nothing grows without bound when nobody scrapes.
Only models served with histograms or summaries enabled record anything.
"""

from __future__ import annotations

import bisect
import collections
import threading
import time
from collections.abc import Sequence

# One request: end to end, queue, compute input, compute infer, compute output (nanoseconds).
Sample = tuple[int, int, int, int, int]
FIELDS = ("request", "queue", "compute_input", "compute_infer", "compute_output")
_FOLD_AT = 4096

# Default histogram buckets in milliseconds (Triton's first-response histogram uses ms).
DEFAULT_BUCKETS_MS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0,
                      2500.0, 5000.0, 10000.0)
# Summaries: quantiles over the requests of the last WINDOW_S seconds, at most WINDOW_MAX of them.
WINDOW_S = 60.0
WINDOW_MAX = 10_000


class RequestLatencies:
    def __init__(self, buckets_ms: Sequence[float] = DEFAULT_BUCKETS_MS, window_s: float = WINDOW_S,
                 window_max: int = WINDOW_MAX) -> None:
        self.buckets_ms = tuple(sorted(buckets_ms))
        self._bounds_ns = [b * 1e6 for b in self.buckets_ms]
        self._pending: collections.deque[Sample] = collections.deque()
        self._lock = threading.Lock()
        self._counts = [0] * (len(self.buckets_ms) + 1)  # per bucket, not cumulative; last is +Inf
        self._sums = [0] * len(FIELDS)  # cumulative ns per field
        self._count = 0
        self._window: collections.deque[tuple[float, Sample]] = collections.deque(maxlen=window_max)
        self._window_s = window_s

    def add(self, sample: Sample) -> None:
        pending = self._pending
        pending.append(sample)
        if len(pending) >= _FOLD_AT:
            self.fold()

    def fold(self) -> None:
        """Move the pending samples into the histogram, the sums and the window."""
        pending = self._pending
        now = time.monotonic()
        with self._lock:
            counts, sums, window, bounds = self._counts, self._sums, self._window, self._bounds_ns
            while True:
                try:
                    sample = pending.popleft()  # atomic: no sample is lost to a concurrent add
                except IndexError:
                    break
                counts[bisect.bisect_left(bounds, sample[0])] += 1
                for i, value in enumerate(sample):
                    sums[i] += value
                self._count += 1
                window.append((now, sample))

    def histogram(self) -> tuple[list[tuple[float, int]], int, float]:
        """Cumulative (upper bound ms, count) pairs ending with +Inf, the count, the sum in ms."""
        self.fold()
        with self._lock:
            buckets, running = [], 0
            for bound, count in zip(list(self.buckets_ms) + [float("inf")], self._counts, strict=True):
                running += count
                buckets.append((bound, running))
            return buckets, self._count, self._sums[0] / 1e6

    def summary(self, field: int, quantiles: Sequence[float]) -> tuple[list[tuple[float, float]], int, float]:
        """Quantiles (µs) of `field` over the recent window, the cumulative count and sum (µs)."""
        self.fold()
        cutoff = time.monotonic() - self._window_s
        with self._lock:
            window = self._window
            while window and window[0][0] < cutoff:
                window.popleft()
            values = sorted(sample[field] for _, sample in window)
            count, total = self._count, self._sums[field] / 1e3
        result = []
        for q in quantiles:
            if values:
                value = values[min(len(values) - 1, max(0, int(round(q * (len(values) - 1)))))] / 1e3
            else:
                value = float("nan")
            result.append((q, value))
        return result, count, total
