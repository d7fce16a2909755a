"""Server-wide defaults for how a model version serves, from the command line.

The repository manager builds one from the settings (repository/actions.py); a model's own
config parameters may override some of them (faults.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from server.core.response_cache import ResponseCache


@dataclass(frozen=True)
class ServingLimits:
    """Server-wide defaults for how a model version serves (from the command line)."""

    inline_us: float = 100.0
    queue_limit: int = 0  # bound on queued requests where the config sets none; 0: unbounded
    execution_timeout_s: float = 0.0  # 0: none
    failure_threshold: int = 0  # consecutive failed executions before an instance is retired; 0: never
    # Histogram bucket bounds (ms) when metrics want per-request latencies; () records none.
    latency_buckets_ms: tuple[float, ...] = ()
    # The server's response cache (response_cache.py), used by versions whose config enables it.
    response_cache: ResponseCache | None = None
