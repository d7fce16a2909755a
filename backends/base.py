"""The backend contract: the only thing the server knows about a framework.

A backend instance is one loaded copy of one model version on one device (a
Triton "model instance"). The server calls `load` once, then `execute` with
whole batches from a single worker thread, then `close`. Frameworks that
release the GIL (ONNX Runtime, torch, TensorRT) therefore run instances in
parallel without any locking here.

Optional, for backends whose models answer requests one by one (Python models):
`execute_requests` takes the scheduler's requests separately and returns one
outcome each, so one request can fail alone. The core calls it instead of
`execute` when the class sets `wants_requests`. docs/BACKENDS.md has a worked example.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np


class BackendError(Exception):
    """A backend could not load or run a model (maps to INTERNAL at run time)."""


class BackendInputError(BackendError):
    """The request's tensors were unacceptable to the framework (INVALID_ARGUMENT)."""


class BackendStatusError(BackendError):
    """An error a model returned for one request with a status of its own (a Python model's
    `TritonError(message, code)`): the client gets `code` (a gRPC status name such as "NOT_FOUND")
    and the model's message as is, without a prefix, as Triton sends them."""

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.code = code

    def __reduce__(self) -> tuple[type, tuple[str, str]]:  # copy/pickle: the code is not in args
        return type(self), (str(self.args[0]) if self.args else "", self.code)


class ResponseOutputs(dict[str, np.ndarray]):
    """A model's outputs for one request that also carry response `parameters` (a Python model's
    `InferenceResponse(..., parameters={...})`); the protocol layer sends them in the response.
    Plain dicts stay the common case: only responses with parameters pay for this."""

    def __init__(self, outputs: Mapping[str, np.ndarray], parameters: Mapping[str, Any]) -> None:
        super().__init__(outputs)
        self.parameters = dict(parameters)


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


@dataclass(frozen=True)
class Request:
    """One client request as `execute_requests` sees it: its own inputs (batch dim first
    when the model batches) and what a request-aware model (Python models) may read."""

    inputs: dict[str, np.ndarray]
    id: str = ""
    parameters: Mapping[str, Any] = field(default_factory=dict)
    requested_outputs: tuple[str, ...] | None = None  # None: every output
    # Decoupled models: where this request's responses go (backends/responses.py ResponseSink).
    sink: Any = None
    # Whether the client has given up on the request (cancelled, deadline passed): the model
    # may ask while it runs (`request.is_cancelled()` in Python models).
    cancelled: Callable[[], bool] | None = None


# One outcome per request: its outputs, or the error that fails that request only.
Outcome = dict[str, np.ndarray] | BackendError


class Backend(abc.ABC):
    """One loaded model instance. Subclasses set `name` and implement the three verbs."""

    name: ClassVar[str] = ""
    default_model_filename: ClassVar[str] = ""
    needs_model_file: ClassVar[bool] = True
    # Whether instances can run on a GPU: KIND_AUTO places them there when one is visible.
    supports_gpu: ClassVar[bool] = False
    # True when the backend wants the scheduler's requests one by one through
    # `execute_requests` (its model answers each request, and may fail one of them)
    # instead of one concatenated batch through `execute`.
    wants_requests: ClassVar[bool] = False
    # True when `execute` waits on another process (Python models): it must never run
    # on the event loop, whatever it costs, because that process may hang or die.
    out_of_process: ClassVar[bool] = False
    # True when the backend can serve `model_transaction_policy { decoupled: true }`: it sends
    # each request's responses to `Request.sink` (backends/responses.py) and returns `{}` for it.
    supports_decoupled: ClassVar[bool] = False

    @classmethod
    def variant(cls, spec: ModelSpec) -> type[Backend]:
        """The class that serves this version: `cls`, unless a config parameter picks another mode
        of the same backend (the Python backend's `nereid_in_process`). The core asks once, at load,
        before anything else about the class. Raise BackendError if the config cannot be served."""
        return cls

    @classmethod
    def gpu_unusable(cls) -> str | None:
        """Why this installation cannot run a `supports_gpu` backend on a GPU that is visible,
        or None. KIND_AUTO then stays on the CPU instead of failing the load: a default group
        is not a request for the GPU (a CPU build of the framework on a GPU machine)."""
        return None

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

    def execute_requests(self, requests: Sequence[Request]) -> list[Outcome]:
        """Run requests the scheduler grouped; one outcome per request, in order.

        An error in the list fails that request only; an exception raised fails them all.
        The default runs each request through `execute`, so every backend supports it.
        """
        outcomes: list[Outcome] = []
        for request in requests:
            try:
                outcomes.append(self.execute(request.inputs))
            except BackendError as exc:
                outcomes.append(exc)
        return outcomes

    def interrupt(self, reason: str) -> bool:
        """Stop the execution running now, from another thread, if the backend can (its model runs
        in a process it may kill); the interrupted `execute` then raises BackendError naming
        `reason`. Returns whether it could. In-process frameworks cannot be interrupted."""
        return False

    def close(self) -> None:  # noqa: B027 - optional hook, default does nothing
        """Release the framework's resources."""
