"""Custom metrics that Python models create (`pb_utils.MetricFamily` / `Metric`), kept in the server.

The stub process asks for every operation over its events socket (backends/python_events.py);
this registry holds the values, so instances of one model (and different models) that name the
same family and labels share one metric, as in Triton, and the server's /metrics endpoint renders
them (server/metrics/custom.py). Rules follow Triton's: a family's name is reused (its first
description wins) unless the kind differs; counters only grow; histograms need strictly ascending
buckets and support only `observe`; gauges and counters do not support `observe`.

Lifetime, as in Triton: every `MetricFamily` and `Metric` object a model holds is a reference;
a metric leaves /metrics when the last `Metric` object with its labels is gone, a family when
the last `MetricFamily` object of its name is gone. A stub that stops (the model unloads, or the
stub dies) drops every reference it held (python_events.py), so an unloaded model's families and
metrics leave /metrics with it.
"""

from __future__ import annotations

import bisect
import threading
from dataclasses import dataclass, field

COUNTER, GAUGE, HISTOGRAM = 0, 1, 2  # pb_utils.MetricFamily.COUNTER / GAUGE / HISTOGRAM
KIND_NAMES = {COUNTER: "counter", GAUGE: "gauge", HISTOGRAM: "histogram"}

Labels = tuple[tuple[str, str], ...]


# Triton's words (python_backend), for a Metric used after its MetricFamily object was deleted.
FAMILY_DELETED = ("Invalid metric operation as the corresponding 'MetricFamily' has been deleted. The "
                  "'MetricFamily' object should be deleted AFTER its corresponding 'Metric' objects have "
                  "been deleted.")


class MetricError(ValueError):
    """A metric operation Triton refuses; the stub raises it as TritonModelException."""


@dataclass
class MetricValue:
    value: float = 0.0
    buckets: tuple[float, ...] = ()  # histograms: upper bounds, ascending
    counts: list[int] = field(default_factory=list)  # histograms: per bucket, last is +Inf
    count: int = 0
    total: float = 0.0
    refs: int = 0  # live `Metric` objects with these labels, over every stub


@dataclass
class FamilyEntry:
    name: str
    description: str
    kind: int
    metrics: dict[Labels, MetricValue] = field(default_factory=dict)
    refs: int = 0  # live `MetricFamily` objects of this name, over every stub


class Registry:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._families: dict[str, FamilyEntry] = {}

    def family(self, name: str, description: str, kind: int) -> None:
        if kind not in KIND_NAMES:
            raise MetricError(f"unknown metric kind {kind!r} (use MetricFamily.COUNTER, GAUGE or HISTOGRAM)")
        if not name or not all(c.isalnum() or c in "_:" for c in name) or name[0].isdigit():
            raise MetricError(f"invalid metric family name '{name}' (letters, digits, '_' and ':'; "
                              "not starting with a digit)")
        with self._lock:
            entry = self._families.get(name)
            if entry is None:
                entry = self._families[name] = FamilyEntry(name, description, kind)
            elif entry.kind != kind:
                raise MetricError(f"metric family '{name}' already exists as a {KIND_NAMES[entry.kind]}; "
                                  f"cannot create it as a {KIND_NAMES[kind]}")
            entry.refs += 1

    def metric(self, name: str, labels: Labels, buckets: list[float] | None) -> None:
        with self._lock:
            entry = self._entry(name)
            if entry.kind == HISTOGRAM:
                if buckets is None:
                    raise MetricError("a histogram metric needs buckets (Metric(labels, buckets=[...]))")
                bounds = tuple(float(b) for b in buckets)
                if any(b >= c for b, c in zip(bounds, bounds[1:], strict=False)):
                    raise MetricError(f"histogram buckets must be strictly ascending, got {list(buckets)}")
            elif buckets is not None:
                raise MetricError(f"buckets are only for histograms; '{name}' is a {KIND_NAMES[entry.kind]}")
            else:
                bounds = ()
            metric = entry.metrics.get(labels)
            if metric is None:
                metric = entry.metrics[labels] = MetricValue(buckets=bounds, counts=[0] * (len(bounds) + 1))
            metric.refs += 1

    def release_family(self, name: str) -> None:
        """One `MetricFamily` object of `name` is gone; the last one takes the family away."""
        with self._lock:
            entry = self._families.get(name)
            if entry is not None:
                entry.refs -= 1
                if entry.refs <= 0:
                    del self._families[name]

    def release_metric(self, name: str, labels: Labels) -> None:
        """One `Metric` object is gone; the last one with these labels takes the metric away."""
        with self._lock:
            entry = self._families.get(name)
            metric = None if entry is None else entry.metrics.get(labels)
            if entry is not None and metric is not None:
                metric.refs -= 1
                if metric.refs <= 0:
                    del entry.metrics[labels]

    def apply(self, name: str, labels: Labels, op: str, value: float) -> float:
        """increment / set / observe / value on one metric; returns its value (0 for histograms)."""
        with self._lock:
            entry = self._entry(name)
            metric = entry.metrics.get(labels)
            if metric is None:
                raise MetricError(f"metric {dict(labels)} of family '{name}' does not exist")
            kind = KIND_NAMES[entry.kind]
            if entry.kind == HISTOGRAM:
                if op != "observe":
                    raise MetricError(f"a histogram supports observe() only, not {op}()")
                metric.counts[bisect.bisect_left(metric.buckets, value)] += 1
                metric.count += 1
                metric.total += value
                return 0.0
            if op == "observe":
                raise MetricError(f"a {kind} does not support observe(); use a HISTOGRAM family")
            if op == "increment":
                if entry.kind == COUNTER and value < 0:
                    raise MetricError(f"a counter cannot be incremented by a negative value ({value})")
                metric.value += value
            elif op == "set":
                if entry.kind == COUNTER:
                    raise MetricError("a counter does not support set(); use increment()")
                metric.value = value
            elif op != "value":
                raise MetricError(f"unknown metric operation {op!r}")
            return metric.value

    def _entry(self, name: str) -> FamilyEntry:
        entry = self._families.get(name)
        if entry is None:
            raise MetricError(FAMILY_DELETED)
        return entry

    def snapshot(self) -> list[FamilyEntry]:
        """Copies of every family, for rendering without holding the lock."""
        with self._lock:
            return [
                FamilyEntry(f.name, f.description, f.kind, {
                    labels: MetricValue(m.value, m.buckets, list(m.counts), m.count, m.total)
                    for labels, m in f.metrics.items()
                })
                for f in self._families.values()
            ]


REGISTRY = Registry()
