"""The backend contract: the only thing the server knows about a framework.

A backend instance is one loaded copy of one model version on one device (a
Triton "model instance"). The server calls `load` once, then `execute` with
whole batches from a single worker thread, then `close`. Frameworks that
release the GIL (ONNX Runtime, torch, TensorRT) therefore run instances in
parallel without any locking here.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np


class BackendError(Exception):
    """A backend could not load or run a model (maps to INTERNAL at run time)."""


class BackendInputError(BackendError):
    """The request's tensors were unacceptable to the framework (INVALID_ARGUMENT)."""


class BackendUnavailable(BackendError):
    """The framework a backend needs is not installed; the message says how to install it."""


@dataclass(frozen=True)
class TensorSpec:
    """One input or output as the config declares it (dims exclude the batch dim)."""

    name: str
    datatype: str  # protocol name: "FP32", "BYTES", ...
    dims: tuple[int, ...]  # -1 marks a variable dimension
    reshape: tuple[int, ...] | None = None  # framework-side shape (no batch dim), if it differs


@dataclass(frozen=True)
class Device:
    """Where an instance runs. `kind` is "CPU" or "GPU"; `device_id` is the CUDA ordinal."""

    kind: str = "CPU"
    device_id: int = 0


@dataclass(frozen=True)
class ModelSpec:
    """Everything a backend needs to load a model version, already normalised."""

    name: str
    version: int
    model_dir: Path
    version_dir: Path
    model_file: Path
    max_batch_size: int
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    parameters: Mapping[str, str] = field(default_factory=dict)
    config_json: str = "{}"
    # How many instances of this model share the machine, so backends can pick
    # thread counts that do not oversubscribe the cores.
    instance_count: int = 1
    instance_name: str = ""


@dataclass(frozen=True)
class Signature:
    """A model file's own view of its I/O (dims include the batch dim if any)."""

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    max_batch_size: int | None = None  # only for formats that record it (TensorRT)


class Backend(abc.ABC):
    """One loaded model instance. Subclasses set `name` and implement the three verbs."""

    name: ClassVar[str] = ""
    default_model_filename: ClassVar[str] = ""
    needs_model_file: ClassVar[bool] = True

    @classmethod
    def describe(cls, model_file: Path) -> Signature | None:
        """Read the model file's I/O for auto-complete; None if the format cannot say."""
        return None

    @abc.abstractmethod
    def load(self, spec: ModelSpec, device: Device) -> None:
        """Load the model onto `device`. Raise BackendError with a reason on failure."""

    @abc.abstractmethod
    def execute(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one batch. Inputs and outputs are keyed by config tensor names."""

    def close(self) -> None:  # noqa: B027 - optional hook, default does nothing
        """Release the framework's resources."""
