"""Explicit lifecycle states (Triton's names, as RepositoryIndex reports them)."""

from __future__ import annotations

import enum


class ModelState(enum.Enum):
    UNKNOWN = "UNKNOWN"
    LOADING = "LOADING"
    READY = "READY"
    UNLOADING = "UNLOADING"
    UNAVAILABLE = "UNAVAILABLE"
