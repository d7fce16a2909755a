"""`--metrics-config KEY=VALUE` as Triton spells it, parsed once.

Keys (Triton's): `counter_latencies` (default true), `histogram_latencies` (default false),
`summary_latencies` (default false), `summary_quantiles` ("0.5:0.05,0.9:0.01,..."; the error
part is accepted and ignored: Nereid computes exact quantiles over a window). Nereid adds
`histogram_buckets_ms` ("0.5,1,2.5,...").
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from server.core.latency import DEFAULT_BUCKETS_MS

DEFAULT_QUANTILES = (0.5, 0.9, 0.95, 0.99, 0.999)
KEYS = ("counter_latencies", "histogram_latencies", "summary_latencies", "summary_quantiles", "histogram_buckets_ms")


@dataclass(frozen=True)
class MetricsConfig:
    counter_latencies: bool = True
    histogram_latencies: bool = False
    summary_latencies: bool = False
    quantiles: tuple[float, ...] = DEFAULT_QUANTILES
    buckets_ms: tuple[float, ...] = DEFAULT_BUCKETS_MS

    @property
    def per_request(self) -> bool:
        """Whether models must record each request's durations (histograms or summaries)."""
        return self.histogram_latencies or self.summary_latencies


def _bool(key: str, value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("true", "1", "yes", "on"):
        return True
    if lowered in ("false", "0", "no", "off"):
        return False
    raise ValueError(f"--metrics-config {key}: expected true or false, got '{value}'")


def _numbers(key: str, value: str, separators: str) -> list[float]:
    text = value.strip().strip('"')
    for separator in separators:
        text = text.replace(separator, " ")
    try:
        return [float(part) for part in text.split()]
    except ValueError:
        raise ValueError(f"--metrics-config {key}: expected numbers, got '{value}'") from None


def parse_metrics_config(items: Sequence[str]) -> MetricsConfig:
    """The `--metrics-config` flags (repeatable `KEY=VALUE`); raises ValueError with the reason."""
    values: dict[str, object] = {}
    for item in items:
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq:
            raise ValueError(f"--metrics-config expects KEY=VALUE, got '{item}'")
        if key not in KEYS:
            raise ValueError(f"--metrics-config: unknown key '{key}'; known: {', '.join(KEYS)}")
        if key == "summary_quantiles":
            quantiles = []
            for pair in value.strip().strip('"').replace(" ", ",").split(","):
                if pair:
                    quantiles.append(_numbers(key, pair.split(":")[0], "")[0])
            if not quantiles or not all(0 <= q <= 1 for q in quantiles):
                raise ValueError(f"--metrics-config summary_quantiles: quantiles in [0, 1], got '{value}'")
            values["quantiles"] = tuple(quantiles)
        elif key == "histogram_buckets_ms":
            buckets = _numbers(key, value, ",")
            if not buckets or any(b <= 0 for b in buckets):
                raise ValueError(f"--metrics-config histogram_buckets_ms: positive bounds, got '{value}'")
            values["buckets_ms"] = tuple(sorted(set(buckets)))
        else:
            values[key] = _bool(key, value)
    return MetricsConfig(**values)  # type: ignore[arg-type]
