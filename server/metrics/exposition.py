"""Prometheus text exposition, written here for Triton's metric families.

prometheus_client renames a counter `x` to `x_total` in its HELP/TYPE lines, while Triton's
dashboards expect `nv_inference_count` exactly as Triton writes it (TYPE counter, no suffix):
so Triton's families are rendered by this module, and Nereid's own metrics (which follow the
Prometheus naming rules) by prometheus_client.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

Labels = Sequence[tuple[str, str]]


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(labels: Labels) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{key}="{_escape(value)}"' for key, value in labels) + "}"


def _number(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if float(value).is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(float(value))


class Family:
    """One metric family: HELP and TYPE, then its samples."""

    def __init__(self, name: str, help_text: str, kind: str) -> None:
        self.name = name
        self.lines = [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]

    def sample(self, labels: Labels, value: float, suffix: str = "", extra: Labels = ()) -> None:
        self.lines.append(f"{self.name}{suffix}{_labels(list(labels) + list(extra))} {_number(value)}")

    def histogram(self, labels: Labels, buckets: Iterable[tuple[float, int]], count: int, total: float) -> None:
        """Cumulative (upper bound, count) pairs ending with +Inf, then _count and _sum."""
        for bound, running in buckets:
            self.sample(labels, running, "_bucket", (("le", _number(bound)),))
        self.sample(labels, count, "_count")
        self.sample(labels, total, "_sum")

    def summary(self, labels: Labels, quantiles: Iterable[tuple[float, float]], count: int, total: float) -> None:
        for quantile, value in quantiles:
            self.sample(labels, value, "", (("quantile", _number(quantile)),))
        self.sample(labels, count, "_count")
        self.sample(labels, total, "_sum")

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def render(families: Iterable[Family]) -> str:
    """Families with no samples are left out, as Triton does for models it has no data for."""
    return "".join(f.text() for f in families if len(f.lines) > 2)
