"""ONNX Runtime backend (`platform: onnxruntime_onnx` / `backend: onnxruntime`).

Thread settings use Triton's parameter names (`intra_op_thread_count`,
`inter_op_thread_count`). Without them, an instance gets its share of the
cores this process may run on, so several instances do not oversubscribe the
machine. ONNX Runtime releases the GIL in `run`, so instances run in parallel.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnxruntime as ort

from backends.base import Backend, BackendError, BackendInputError, Device, ModelSpec, Signature, TensorSpec
from backends.datatypes import NUMPY_OF

_ORT_TYPES: dict[str, str] = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(string)": "BYTES",
    "tensor(bfloat16)": "BF16",
}


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _int_param(spec: ModelSpec, key: str, default: int) -> int:
    raw = spec.parameters.get(key)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise BackendError(f"parameter {key} must be an integer, got '{raw}'") from None
    if value < 0:
        raise BackendError(f"parameter {key} must be >= 0, got {value}")
    return value


def _tensor_specs(args: list) -> tuple[TensorSpec, ...]:  # type: ignore[type-arg]
    specs = []
    for arg in args:
        datatype = _ORT_TYPES.get(arg.type)
        if datatype is None:
            raise BackendError(f"tensor '{arg.name}' has type {arg.type}, which Nereid cannot serve")
        dims = tuple(d if isinstance(d, int) and d >= 0 else -1 for d in (arg.shape or []))
        specs.append(TensorSpec(arg.name, datatype, dims))
    return tuple(specs)


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"
    default_model_filename = "model.onnx"

    @classmethod
    def describe(cls, model_file: Path) -> Signature:
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.intra_op_num_threads = 1
        session = ort.InferenceSession(str(model_file), options, providers=["CPUExecutionProvider"])
        return Signature(_tensor_specs(session.get_inputs()), _tensor_specs(session.get_outputs()))

    def load(self, spec: ModelSpec, device: Device) -> None:
        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only; load failures are reported by the server
        share = max(1, _usable_cores() // max(1, spec.instance_count))
        intra = _int_param(spec, "intra_op_thread_count", 0) or share
        options.intra_op_num_threads = intra
        inter = _int_param(spec, "inter_op_thread_count", 0)
        if inter:
            options.inter_op_num_threads = inter
            options.execution_mode = ort.ExecutionMode.ORT_PARALLEL
        if intra > 1:
            # Spinning threads steal the core from the gRPC frontend between requests.
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        providers: list = ["CPUExecutionProvider"]  # type: ignore[type-arg]
        if device.kind == "GPU":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise BackendError("KIND_GPU needs onnxruntime-gpu with CUDA; CUDAExecutionProvider is absent")
            providers = [("CUDAExecutionProvider", {"device_id": device.device_id}), "CPUExecutionProvider"]
        try:
            self._session = ort.InferenceSession(str(spec.model_file), options, providers=providers)
        except Exception as exc:
            raise BackendError(f"onnxruntime could not load {spec.model_file}: {exc}") from exc
        self._check_io(spec)
        self._output_names = [o.name for o in spec.outputs]
        self._string_inputs = {i.name for i in spec.inputs if i.datatype == "BYTES"}

    def _check_io(self, spec: ModelSpec) -> None:
        graph_inputs = {a.name: a for a in self._session.get_inputs()}
        graph_outputs = {a.name: a for a in self._session.get_outputs()}
        for kind, wanted, graph in (("input", spec.inputs, graph_inputs), ("output", spec.outputs, graph_outputs)):
            for tensor in wanted:
                arg = graph.get(tensor.name)
                if arg is None:
                    raise BackendError(
                        f"configuration expects {kind} '{tensor.name}' but the model's {kind}s are "
                        f"{sorted(graph)}"
                    )
                actual = _ORT_TYPES.get(arg.type, arg.type)
                if actual != tensor.datatype:
                    raise BackendError(
                        f"{kind} '{tensor.name}': configuration says {tensor.datatype} but the model has {actual}"
                    )
                if tensor.datatype == "BF16":
                    raise BackendError(f"{kind} '{tensor.name}': BF16 is not supported by this backend")
        required = [n for n, a in graph_inputs.items() if n not in {t.name for t in spec.inputs}]
        if required:
            raise BackendError(f"the model has inputs missing from the configuration: {required}")

    def execute(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self._string_inputs:
            inputs = {k: (_as_str(v) if k in self._string_inputs else v) for k, v in inputs.items()}
        try:
            results = self._session.run(self._output_names, inputs)
        except (ort.capi.onnxruntime_pybind11_state.InvalidArgument, ValueError) as exc:
            raise BackendInputError(f"onnx runtime error: {exc}") from exc
        return dict(zip(self._output_names, results, strict=True))

    def close(self) -> None:
        self._session = None  # type: ignore[assignment]


def _as_str(values: np.ndarray) -> np.ndarray:
    """ONNX Runtime wants str elements for string tensors (it would store `str(b"x")` for
    bytes); the wire gives bytes, which therefore must be UTF-8."""
    try:
        flat = [v.decode("utf-8") if isinstance(v, bytes) else v for v in values.ravel()]
    except UnicodeDecodeError as exc:
        raise BackendInputError(f"string tensors must be valid UTF-8 for onnxruntime: {exc}") from None
    out = np.empty(len(flat), dtype=NUMPY_OF["BYTES"])
    out[:] = flat
    return out.reshape(values.shape)
