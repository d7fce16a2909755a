"""The custom metrics Python models created (`pb_utils.MetricFamily`), as exposition families.

The values live in backends/custom_metrics.py's registry (the stubs update it over IPC); this
module only renders a snapshot of it when /metrics is scraped. Labels are written in key order,
as Triton (prometheus-cpp) writes them; a family with no metrics yet is left out, as Triton does.
"""

from __future__ import annotations

from backends.custom_metrics import HISTOGRAM, KIND_NAMES, REGISTRY
from server.metrics.exposition import Family


def custom_families() -> list[Family]:
    families: list[Family] = []
    for entry in REGISTRY.snapshot():
        family = Family(entry.name, entry.description, KIND_NAMES[entry.kind])
        for labels, metric in entry.metrics.items():
            ordered = sorted(labels)
            if entry.kind == HISTOGRAM:
                running, cumulative = 0, []
                for bound, count in zip((*metric.buckets, float("inf")), metric.counts, strict=True):
                    running += count
                    cumulative.append((bound, running))
                family.histogram(ordered, cumulative, metric.count, metric.total)
            else:
                family.sample(ordered, metric.value)
        families.append(family)
    return families
