"""Thread-count helpers shared by the framework backends (no framework imports)."""

from __future__ import annotations

import os
from collections.abc import Mapping

from backends.base import BackendError


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity), not the machine's total."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def int_param(parameters: Mapping[str, str], key: str, default: int) -> int:
    """A non-negative integer config parameter; `key` or its lower-case spelling."""
    raw = parameters.get(key, parameters.get(key.lower()))
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise BackendError(f"parameter {key} must be an integer, got '{raw}'") from None
    if value < 0:
        raise BackendError(f"parameter {key} must be >= 0, got {value}")
    return value
