"""`triton_python_backend_utils`: the module Triton Python models import (`as pb_utils`).

Nereid's stub puts this folder on `sys.path`, so `import triton_python_backend_utils`
works in a model unchanged. The names, signatures and behaviour follow Triton's
python backend. Response senders (decoupled models, and the default mode's one response) are
backends/python_responses.py; `Logger`, `MetricFamily` and `Metric` talk to the server over the
stub's events socket (backends/python_observe.py); docs/PYTHON_BACKEND.md lists every name and
its status. Business logic scripting
(`InferenceRequest.exec`, `async_exec`, `is_model_ready`, `load_model`, `unload_model`) goes
through the stub's connection to the server: backends/python_bls_stub.py.

Input tensors are numpy views over the shared memory the server wrote the request
into: valid until `execute` returns. Copy an array to keep it longer.
"""

from __future__ import annotations

import ctypes
import json
import struct
from typing import Any

import numpy as np

from backends.python_observe import Logger, LogLevel, Metric, MetricFamily

__all__ = ["Logger", "LogLevel", "Metric", "MetricFamily"]  # re-exported: pb_utils.Logger etc.

TRITON_STRING_TO_NUMPY: dict[str, Any] = {
    "TYPE_BOOL": bool,
    "TYPE_UINT8": np.uint8,
    "TYPE_UINT16": np.uint16,
    "TYPE_UINT32": np.uint32,
    "TYPE_UINT64": np.uint64,
    "TYPE_INT8": np.int8,
    "TYPE_INT16": np.int16,
    "TYPE_INT32": np.int32,
    "TYPE_INT64": np.int64,
    "TYPE_FP16": np.float16,
    "TYPE_FP32": np.float32,
    "TYPE_FP64": np.float64,
    "TYPE_STRING": np.object_,
}

# Triton's DataType enum values (model_config.proto).
_ENUM_TO_NUMPY: dict[int, Any] = {
    1: np.bool_, 2: np.uint8, 3: np.uint16, 4: np.uint32, 5: np.uint64, 6: np.int8, 7: np.int16,
    8: np.int32, 9: np.int64, 10: np.float16, 11: np.float32, 12: np.float64, 13: np.object_,
}
_NUMPY_TO_ENUM: dict[Any, int] = {np.dtype(v): k for k, v in _ENUM_TO_NUMPY.items()}

TRITONSERVER_RESPONSE_COMPLETE_FINAL = 1
TRITONSERVER_REQUEST_FLAG_SEQUENCE_START = 1
TRITONSERVER_REQUEST_FLAG_SEQUENCE_END = 2
TRITONSERVER_REQUEST_RELEASE_ALL = 1
TRITONSERVER_REQUEST_RELEASE_RESCHEDULE = 2
TRITONSERVER_MEMORY_CPU = 0
TRITONSERVER_MEMORY_CPU_PINNED = 1
TRITONSERVER_MEMORY_GPU = 2

# The stub's BLS client (backends/python_bls_stub.py), set when a model runs in a stub.
_BLS: Any = None


def _bls() -> Any:
    if _BLS is None:
        raise TritonModelException("business logic scripting needs the model to run in the server's Python stub")
    return _BLS


def triton_to_numpy_type(data_type: int) -> Any:
    """DataType enum value (e.g. 11) -> numpy type (np.float32); None if unknown."""
    return _ENUM_TO_NUMPY.get(data_type)


def numpy_to_triton_type(data_type: Any) -> int | None:
    """numpy dtype or type -> DataType enum value; bytes and str count as TYPE_STRING."""
    try:
        dtype = np.dtype(data_type)
    except TypeError:
        return None
    if dtype.kind in ("S", "U", "O"):
        return 13
    return _NUMPY_TO_ENUM.get(dtype)


def triton_string_to_numpy(triton_type_string: str) -> Any:
    """"TYPE_FP32" -> np.float32 (KeyError for an unknown name, as in Triton)."""
    return TRITON_STRING_TO_NUMPY[triton_type_string]


def serialize_byte_tensor(input_tensor: np.ndarray) -> np.ndarray | None:
    """BYTES tensor -> flat uint8 array of (4-byte little-endian length, bytes) elements."""
    if input_tensor.size == 0:
        return np.empty([0], dtype=np.uint8)
    if input_tensor.dtype != np.object_ and input_tensor.dtype.type != np.bytes_:
        raise TritonModelException("cannot serialize bytes tensor: invalid datatype")
    parts = []
    for item in input_tensor.reshape(-1):
        data = item if isinstance(item, bytes) else str(item).encode("utf-8")
        parts.append(struct.pack("<I", len(data)))
        parts.append(data)
    return np.frombuffer(b"".join(parts), dtype=np.uint8)


def deserialize_bytes_tensor(encoded_tensor: bytes | np.ndarray) -> np.ndarray:
    """The inverse of serialize_byte_tensor: a 1-D object array of bytes."""
    buf = encoded_tensor.tobytes() if isinstance(encoded_tensor, np.ndarray) else bytes(encoded_tensor)
    items, offset = [], 0
    while offset < len(buf):
        (length,) = struct.unpack_from("<I", buf, offset)
        offset += 4
        items.append(buf[offset:offset + length])
        offset += length
    out = np.empty(len(items), dtype=np.object_)
    out[:] = items
    return out


class TritonError:
    """An error a model puts in an InferenceResponse; fails that request only."""

    UNKNOWN = 0
    INTERNAL = 1
    NOT_FOUND = 2
    INVALID_ARG = 3
    UNAVAILABLE = 4
    UNSUPPORTED = 5
    ALREADY_EXISTS = 6
    CANCELLED = 7

    def __init__(self, message: str, code: int = INTERNAL) -> None:
        self._message = message
        self._code = code

    def message(self) -> str:
        return self._message

    def code(self) -> int:
        return self._code

    def __str__(self) -> str:
        return self._message

    def __repr__(self) -> str:
        return f"TritonError({self._message!r}, code={self._code})"


class TritonModelException(Exception):
    """Raised by these utilities on misuse; a model may raise it too (fails its requests)."""

    def __init__(self, msg: str) -> None:
        super().__init__(msg)
        self._msg = msg

    def message(self) -> str:
        return self._msg


class Tensor:
    """A named numpy array, as an input of a request or an output of a response."""

    def __init__(self, name: str, numpy_array: Any, triton_dtype: int | None = None) -> None:
        if not isinstance(name, str):
            raise TritonModelException("Tensor name must be a str")
        array = numpy_array if type(numpy_array) is np.ndarray else np.asarray(numpy_array)
        kind = array.dtype.kind
        if kind == "U" or kind == "V":
            raise TritonModelException(
                "Tensor dtype used for numpy_array is not supported by the Python backend; use np.object_ instead"
            )
        if triton_dtype is not None:
            wanted = np.dtype(triton_to_numpy_type(triton_dtype))
            if array.dtype != wanted and wanted.kind != "O":
                array = array.view(wanted)
        self._name = name
        self._array = array
        self._triton_dtype = triton_dtype

    def name(self) -> str:
        return self._name

    def as_numpy(self) -> np.ndarray:
        return self._array

    def triton_dtype(self) -> int | None:
        if self._triton_dtype is None:  # computed on demand: the hot path never asks
            self._triton_dtype = numpy_to_triton_type(self._array.dtype)
        return self._triton_dtype

    def shape(self) -> list[int]:
        return list(self._array.shape)

    def is_cpu(self) -> bool:
        """Always True: tensors cross to and from the server through host shared memory."""
        return True

    def to_dlpack(self) -> Any:
        """A DLPack capsule over this tensor's memory (`torch.utils.dlpack.from_dlpack` takes it)."""
        return self.__dlpack__()

    def __dlpack__(self, stream: Any = None, **kwargs: Any) -> Any:
        if self._array.dtype.kind == "O":
            raise TritonModelException("DLPack does not support BYTES (string) tensors")
        array = self._array
        if not array.flags.writeable:  # numpy cannot export read-only memory to DLPack 0.x consumers
            array = array.copy()
        return array.__dlpack__(**kwargs)

    def __dlpack_device__(self) -> tuple[int, int]:
        return (1, 0)  # kDLCPU

    @staticmethod
    def from_dlpack(name: str, capsule: Any) -> Tensor:
        """A Tensor from a DLPack capsule (`torch.utils.dlpack.to_dlpack(t)`, Triton's idiom) or from
        any object with `__dlpack__` (a torch tensor, a numpy array). A GPU tensor is copied to host
        memory (through torch), since Nereid passes tensors through host shared memory."""
        if not isinstance(name, str):
            raise TritonModelException("Tensor name must be a str")
        if hasattr(capsule, "__dlpack__"):
            source: Any = capsule
            if getattr(capsule, "__dlpack_device__", lambda: (1, 0))()[0] != 1:
                source = capsule.cpu() if hasattr(capsule, "cpu") else capsule
            return Tensor(name, np.from_dlpack(source))
        if type(capsule).__name__ != "PyCapsule":
            raise TritonModelException(
                f"Tensor.from_dlpack needs a DLPack capsule or an object with __dlpack__, got {type(capsule).__name__}")
        if _capsule_device(capsule) != 1:
            try:
                import torch.utils.dlpack
            except ImportError as exc:
                raise TritonModelException("Tensor.from_dlpack: a GPU capsule needs torch to copy it to host") from exc
            return Tensor(name, torch.utils.dlpack.from_dlpack(capsule).cpu().numpy())
        return Tensor(name, np.from_dlpack(_Capsule(capsule)))


class _Capsule:
    """Lets numpy's `from_dlpack` (which takes objects with `__dlpack__`) consume a bare capsule."""

    def __init__(self, capsule: Any) -> None:
        self._capsule = capsule

    def __dlpack__(self, stream: Any = None, **_: Any) -> Any:
        return self._capsule

    def __dlpack_device__(self) -> tuple[int, int]:
        return (1, 0)


def _capsule_device(capsule: Any) -> int:
    """The DLDevice type (1: CPU, 2: CUDA, ...) of an unconsumed "dltensor" capsule: DLManagedTensor
    starts with DLTensor { void* data; DLDevice { int32 device_type; int32 device_id }; ... }."""
    get = ctypes.pythonapi.PyCapsule_GetPointer
    get.restype, get.argtypes = ctypes.c_void_p, [ctypes.py_object, ctypes.c_char_p]
    try:
        pointer = get(capsule, b"dltensor")
    except ValueError as exc:  # the name check failed: already consumed, or not DLPack
        raise TritonModelException(f"Tensor.from_dlpack: not an unused DLPack capsule ({exc})") from None
    return int(ctypes.c_int32.from_address(pointer + ctypes.sizeof(ctypes.c_void_p)).value)


class PreferredMemory:
    """Where a BLS call's outputs should be placed; accepted, outputs are always in host memory."""

    def __init__(self, preferred_memory_type: int = TRITONSERVER_MEMORY_CPU, preferred_device_id: int = 0) -> None:
        self.preferred_memory_type = preferred_memory_type
        self.preferred_device_id = preferred_device_id


class InferenceTrace:
    """A request's trace, to pass on to the requests it makes (`trace=request.trace()`).
    Nereid's traces are per client request (server/tracing); this holder carries nothing."""

    def __init__(self, context: str | None = None) -> None:
        self._context = context

    def get_context(self, mode: str = "opentelemetry") -> str | None:
        return self._context


def _text(value: Any) -> Any:
    """A str argument given as bytes (UTF-8) becomes str, as pybind11 converts it for Triton."""
    return value.decode("utf-8") if isinstance(value, (bytes, bytearray)) else value


class InferenceRequest:
    """One client request: its inputs (in the order the client sent them) and metadata.

    Built by a model, it is a business-logic-scripting request to another model:
    `exec()` runs it and returns the InferenceResponse (`async_exec()`: an awaitable).
    """

    def __init__(
        self,
        model_name: str = "",
        inputs: list[Tensor] | None = None,
        requested_output_names: list[str] | None = None,
        request_id: str = "",
        correlation_id: int | str = 0,
        flags: int = 0,
        parameters: dict[str, Any] | str | None = None,
        model_version: int = -1,
        timeout: int = 0,
        trace: InferenceTrace | None = None,
        preferred_memory: Any = None,
        **_: Any,
    ) -> None:
        # Triton's constructor takes std::string arguments, which pybind11 also fills from bytes:
        # python_backend's examples/bls passes the raw element of a BYTES input as model_name.
        self._model_name = _text(model_name)
        self._inputs = list(inputs or [])
        self._requested = [_text(name) for name in requested_output_names or []]
        self._request_id = _text(request_id)
        self._correlation_id = correlation_id
        self._flags = flags
        self._release_flags = TRITONSERVER_REQUEST_RELEASE_ALL
        if isinstance(parameters, str):
            self._parameters = parameters
        else:
            self._parameters = json.dumps(parameters or {})
        self._model_version = model_version
        self._timeout = timeout
        self._trace = trace
        self._preferred_memory = preferred_memory

    def inputs(self) -> list[Tensor]:
        return self._inputs

    def requested_output_names(self) -> list[str]:
        return self._requested

    def request_id(self) -> str:
        return self._request_id

    def correlation_id(self) -> int | str:
        return self._correlation_id

    def flags(self) -> int:
        return self._flags

    def parameters(self) -> str:
        """The request's parameters as a JSON object string (as Triton returns them)."""
        return self._parameters

    def model_name(self) -> str:
        return self._model_name

    def model_version(self) -> int:
        return self._model_version

    def timeout(self) -> int:
        """The request's timeout in microseconds (its `timeout` parameter); 0 if none."""
        if not self._timeout and '"timeout"' in self._parameters:  # a client request: read it once
            try:
                value = json.loads(self._parameters).get("timeout", 0)
            except ValueError:
                value = 0
            self._timeout = int(value) if isinstance(value, (int, float)) else 0
        return self._timeout

    def trace(self) -> InferenceTrace:
        if self._trace is None:
            self._trace = InferenceTrace()
        return self._trace

    def set_release_flags(self, flags: int) -> None:
        """TRITONSERVER_REQUEST_RELEASE_RESCHEDULE runs the request again in a later `execute` (the
        model returns None as its response now); the model needs `sequence_batching {
        iterative_sequence: true }`, as in Triton, or the request fails."""
        if flags not in (TRITONSERVER_REQUEST_RELEASE_ALL, TRITONSERVER_REQUEST_RELEASE_RESCHEDULE):
            raise TritonModelException(f"invalid release flags {flags}: use TRITONSERVER_REQUEST_RELEASE_ALL "
                                       "or TRITONSERVER_REQUEST_RELEASE_RESCHEDULE")
        self._release_flags = flags

    def release_flags(self) -> int:
        return self._release_flags

    def is_cancelled(self) -> bool:
        """Whether the client gave up on this request (cancelled it, or its deadline passed).
        Decoupled models learn it from the server as it happens; in the default mode the stub
        asks the server (from the thread running `execute`, while it runs; False otherwise)."""
        sender = getattr(self, "_sender", None)  # set by the stub (backends/python_responses.py)
        if sender is not None and sender.is_cancelled():
            return True
        probe = getattr(self, "_cancel_probe", None)  # set by the stub (backends/python_stub.py)
        return bool(probe()) if probe is not None else False

    def get_response_sender(self) -> Any:
        """The request's InferenceResponseSender (the same object on every call)."""
        sender = getattr(self, "_sender", None)
        if sender is None:
            raise TritonModelException("get_response_sender() is only available on the requests a model "
                                       "receives in execute()")
        self._sender_used = True
        return sender

    def exec(self, decoupled: bool = False) -> Any:
        """Run this request on `model_name` (in the server, through its scheduler) and wait.
        Failures of that model come back as a response with `has_error()`. With `decoupled=True`
        (required for a decoupled target): a ResponseIterator over all of its responses."""
        return _bls().exec(self, decoupled)

    def async_exec(self, decoupled: bool = False) -> Any:
        """Send this request now; await the result for the response, or with `decoupled=True` a
        ResponseIterator (in an `async def execute`)."""
        return _bls().async_exec(self, decoupled)

    def stream_exec(self, *args: Any, **kwargs: Any) -> Any:
        """Not in Triton's released API (a pre-release name of `exec(decoupled=True)`)."""
        raise TritonModelException("InferenceRequest has no stream_exec() in Triton's python backend: "
                                   "use exec(decoupled=True), which returns an iterator over the responses")


class InferenceResponse:
    """The answer to one request: output tensors, or an error that fails that request."""

    def __init__(self, output_tensors: list[Tensor] | None = None, error: TritonError | None = None,
                 parameters: Any = None) -> None:
        if output_tensors is None:
            output_tensors = []
        if not isinstance(output_tensors, list):
            raise TritonModelException('"output_tensors" must be a list.')
        self._output_tensors = output_tensors
        self._error = error
        if parameters is None or parameters == "":
            self._parameters: dict[str, Any] = {}
        elif isinstance(parameters, str):
            self._parameters = json.loads(parameters)
        elif isinstance(parameters, dict):
            self._parameters = dict(parameters)
        else:
            raise TritonModelException('"parameters" must be a dict or a JSON object string')
        for key, value in self._parameters.items():
            if not isinstance(key, str) or not isinstance(value, (bool, int, float, str)):
                raise TritonModelException(f"response parameter {key!r}: keys must be str and values bool, int, "
                                           f"float or str, got {type(value).__name__}")

    def output_tensors(self) -> list[Tensor]:
        return self._output_tensors

    def has_error(self) -> bool:
        return self._error is not None

    def error(self) -> TritonError | None:
        return self._error

    def parameters(self) -> str:
        """The response's parameters as a JSON object string (as Triton returns them)."""
        return json.dumps(self._parameters)


def get_input_tensor_by_name(inference_request: InferenceRequest, name: str) -> Tensor | None:
    for tensor in inference_request.inputs():
        if tensor.name() == name:
            return tensor
    return None


def get_output_tensor_by_name(inference_response: InferenceResponse, name: str) -> Tensor | None:
    """The output tensor `name` of a (BLS) response, or None."""
    for tensor in inference_response.output_tensors():
        if tensor.name() == name:
            return tensor
    return None


def is_model_ready(model_name: str, model_version: str = "") -> bool:
    """Whether `model_name` (a version, or any if "") is ready in the server."""
    return bool(_bls().control("ready", {"name": model_name, "version": str(model_version)})["ready"][0])


def load_model(model_name: str, config: str = "", files: dict[str, bytes] | None = None) -> None:
    """Load (or reload) a model; the server must run with --model-control-mode=explicit.
    `config` is a JSON model config; `files` maps "file:<version>/<name>" to its bytes."""
    if files is not None and not isinstance(files, dict):
        raise TritonModelException(
            f"failed to load model '{model_name}', files should be a dictionary of file paths and file contents")
    parameters: dict[str, Any] = {}
    if config:
        parameters["config"] = config
    for key, value in (files or {}).items():
        parameters[str(key)] = bytes(value)
    _bls().control("load", {"name": model_name, "parameters": parameters})


def unload_model(model_name: str, unload_dependents: bool = False) -> None:
    """Unload a model; the server must run with --model-control-mode=explicit."""
    _bls().control("unload", {"name": model_name, "unload_dependents": bool(unload_dependents)})


def get_input_config_by_name(model_config: dict[str, Any], name: str) -> dict[str, Any] | None:
    for entry in model_config.get("input", []):
        if entry["name"] == name:
            return dict(entry)
    return None


def get_output_config_by_name(model_config: dict[str, Any], name: str) -> dict[str, Any] | None:
    for entry in model_config.get("output", []):
        if entry["name"] == name:
            return dict(entry)
    return None


def using_decoupled_model_transaction_policy(model_config: dict[str, Any]) -> bool:
    return bool(model_config.get("model_transaction_policy", {}).get("decoupled", False))


class ModelConfig:
    """What `auto_complete_config(auto_complete_model_config)` receives and returns."""

    def __init__(self, model_config: dict[str, Any] | str) -> None:
        self._config = json.loads(model_config) if isinstance(model_config, str) else model_config
        self._config.setdefault("input", [])
        self._config.setdefault("output", [])
        self._config.setdefault("max_batch_size", 0)

    def as_dict(self) -> dict[str, Any]:
        return self._config

    def max_batch_size(self) -> int:
        return int(self._config.get("max_batch_size", 0))

    def set_max_batch_size(self, max_batch_size: int) -> None:
        if max_batch_size < 0:
            raise TritonModelException(f"max_batch_size must be >= 0, got {max_batch_size}")
        self._config["max_batch_size"] = int(max_batch_size)

    def set_dynamic_batching(self) -> None:
        self._config.setdefault("dynamic_batching", {})

    def set_model_transaction_policy(self, policy: dict[str, Any]) -> None:
        self._config["model_transaction_policy"] = dict(policy)

    def add_input(self, input: dict[str, Any]) -> None:  # noqa: A002 - Triton's parameter name
        self._add("input", input)

    def add_output(self, output: dict[str, Any]) -> None:
        self._add("output", output)

    def _add(self, kind: str, entry: dict[str, Any]) -> None:
        for key in ("name", "data_type", "dims"):
            if key not in entry:
                raise TritonModelException(f"{kind} {entry!r} has no '{key}'")
        for existing in self._config[kind]:
            if existing["name"] == entry["name"]:
                if existing.get("data_type") != entry["data_type"] or [int(d) for d in existing.get("dims", [])] != [
                    int(d) for d in entry["dims"]
                ]:
                    raise TritonModelException(
                        f"{kind} '{entry['name']}' already exists in the configuration with another data_type or dims"
                    )
                return
        self._config[kind].append(dict(entry))
