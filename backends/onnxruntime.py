"""ONNX Runtime backend (`platform: onnxruntime_onnx` / `backend: onnxruntime`).

Thread settings use Triton's parameter names (`intra_op_thread_count`,
`inter_op_thread_count`). Without them, an instance gets its share of the
cores this process may run on, so several instances do not oversubscribe the
machine. ONNX Runtime releases the GIL in `run`, so instances run in parallel.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from backends.base import Backend, BackendError, BackendInputError, Device, ModelSpec, Signature, TensorSpec
from backends.datatypes import NUMPY_OF
from backends.threads import int_param, usable_cores

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
    supports_gpu = True

    @classmethod
    def gpu_unusable(cls) -> str | None:
        available = ort.get_available_providers()
        if "CUDAExecutionProvider" in available:
            return None
        return (f"this onnxruntime has no CUDAExecutionProvider (available: {', '.join(available)}); "
                'for the GPU: pip install "nereid[gpu]"')

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
        share = max(1, usable_cores() // max(1, spec.instance_count))
        intra = int_param(spec.parameters, "intra_op_thread_count", 0) or share
        options.intra_op_num_threads = intra
        inter = int_param(spec.parameters, "inter_op_thread_count", 0)
        if inter:
            options.inter_op_num_threads = inter
            options.execution_mode = ort.ExecutionMode.ORT_PARALLEL
        if intra > 1:
            # Spinning threads steal the core from the gRPC frontend between requests.
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        providers = execution_providers(_accelerators(spec.config_json), device, ort.get_available_providers())
        try:
            self._session = ort.InferenceSession(str(spec.model_file), options, providers=providers)
        except Exception as exc:
            raise BackendError(f"onnxruntime could not load {spec.model_file}: {exc}") from exc
        self._check_io(spec)
        self._output_names = [o.name for o in spec.outputs]
        # The public `run` re-validates the feed names on every call (the server already
        # did) and costs ~3 µs more per call on this machine; use the binding when present.
        inner = getattr(self._session, "_sess", None)
        self._run = (lambda names, feeds: inner.run(names, feeds, None)) if inner is not None and hasattr(
            inner, "run") else self._session.run
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
            results = self._run(self._output_names, inputs)
        except (ort.capi.onnxruntime_pybind11_state.InvalidArgument, ValueError) as exc:
            raise BackendInputError(f"onnx runtime error: {exc}") from exc
        return dict(zip(self._output_names, results, strict=True))

    def close(self) -> None:
        self._session = None  # type: ignore[assignment]


def _accelerators(config_json: str) -> dict[str, list[dict[str, Any]]]:
    """`optimization.execution_accelerators` of the config: {"gpu_execution_accelerator": [...], ...}."""
    try:
        config = json.loads(config_json or "{}")
    except json.JSONDecodeError:
        return {}
    return dict(config.get("optimization", {}).get("execution_accelerators", {}))


# Triton's TensorRT accelerator parameters -> ONNX Runtime TensorRT provider options.
_TRT_OPTIONS = {
    "max_workspace_size_bytes": "trt_max_workspace_size",
    "trt_engine_cache_enable": "trt_engine_cache_enable",
    "trt_engine_cache_path": "trt_engine_cache_path",
    "max_partition_iterations": "trt_max_partition_iterations",
    "minimum_segment_size": "trt_min_subgraph_size",
}


def _trt_options(parameters: dict[str, str], device_id: int) -> dict[str, Any]:
    options: dict[str, Any] = {"device_id": device_id}
    precision = parameters.get("precision_mode", "FP32").upper()
    if precision not in ("FP32", "FP16", "INT8"):
        raise BackendError(f"tensorrt accelerator: precision_mode must be FP32, FP16 or INT8, got '{precision}'")
    options["trt_fp16_enable"] = precision in ("FP16", "INT8")
    options["trt_int8_enable"] = precision == "INT8"
    for key, value in parameters.items():
        if key in _TRT_OPTIONS:
            options[_TRT_OPTIONS[key]] = value
        elif key != "precision_mode":
            raise BackendError(f"tensorrt accelerator: unknown parameter '{key}' (known: precision_mode, "
                               f"{', '.join(sorted(_TRT_OPTIONS))})")
    return options


def execution_providers(accelerators: dict[str, list[dict[str, Any]]], device: Device,
                        available: list[str]) -> list[Any]:
    """ONNX Runtime providers for an instance, in priority order, from Triton's config.

    GPU instances get CUDA (plus TensorRT when `gpu_execution_accelerator` names it);
    CPU instances get the CPU provider (plus OpenVINO when `cpu_execution_accelerator`
    names it). As in Triton, GPU accelerators are ignored on CPU instances and vice versa.
    A provider this onnxruntime build lacks is an error naming the package that has it.
    """
    providers: list[Any] = []
    if device.kind == "GPU":
        if "CUDAExecutionProvider" not in available:
            raise BackendError(
                "KIND_GPU needs onnxruntime-gpu with CUDA; CUDAExecutionProvider is absent from this "
                f"onnxruntime (available: {', '.join(available)}); to fix: pip install \"nereid[gpu]\""
            )
        for accelerator in accelerators.get("gpu_execution_accelerator", []):
            name = accelerator.get("name", "")
            if name == "tensorrt":
                if "TensorrtExecutionProvider" not in available:
                    raise BackendError("gpu_execution_accelerator 'tensorrt' needs onnxruntime-gpu with TensorRT; "
                                       f"TensorrtExecutionProvider is absent (available: {', '.join(available)})")
                providers.append(("TensorrtExecutionProvider",
                                  _trt_options(dict(accelerator.get("parameters", {})), device.device_id)))
            elif name != "cuda":
                raise BackendError(f"unknown gpu_execution_accelerator '{name}' (known: tensorrt, cuda)")
        providers.append(("CUDAExecutionProvider", {"device_id": device.device_id}))
    else:
        for accelerator in accelerators.get("cpu_execution_accelerator", []):
            name = accelerator.get("name", "")
            if name != "openvino":
                raise BackendError(f"unknown cpu_execution_accelerator '{name}' (known: openvino)")
            if "OpenVINOExecutionProvider" not in available:
                raise BackendError("cpu_execution_accelerator 'openvino' needs the OpenVINO execution provider, "
                                   "which this onnxruntime lacks; to fix: pip install onnxruntime-openvino "
                                   "(instead of onnxruntime)")
            providers.append(("OpenVINOExecutionProvider", dict(accelerator.get("parameters", {}))))
    providers.append("CPUExecutionProvider")
    return providers


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
