"""The request and response as the core sees them: numpy tensors, no protobuf."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass(slots=True)
class InferenceRequest:
    """A decoded, validated request. `inputs` are numpy views over the wire bytes."""

    inputs: dict[str, np.ndarray]
    batch_size: int  # leading dim for batching models, 1 otherwise
    id: str = ""
    requested_outputs: tuple[str, ...] | None = None  # None means every output
    parameters: dict[str, Any] = field(default_factory=dict)
    # A sampled request's trace (server/tracing/otel.py RequestTrace); the instance that runs it
    # records its queue and compute timestamps there. None for the (many) untraced requests.
    trace: Any = None
    # Requested outputs asking for their top-k classes (server/core/classification.py): name -> k.
    classification: dict[str, int] | None = None
    # A decoupled model's request: where its responses go (server/core/decoupled.py ResponseStream).
    sink: Any = None
    # Requested outputs to be written into shared memory (server/protocol/shm_tensors.py OutputSlot).
    shm_outputs: dict[str, Any] | None = None


@dataclass(slots=True)
class InferenceResponse:
    """Outputs keyed by name, in the order the client should receive them."""

    outputs: dict[str, np.ndarray]
    model_name: str = ""
    model_version: str = ""
    id: str = ""
