"""TensorRT backend (`platform: tensorrt_plan`, `model.plan`), TensorRT 10 Python API.

- The engine is deserialized once per (plan file, GPU) and shared by the instances on
  that GPU; each instance owns one execution context and one CUDA stream, as in Triton.
- Dynamic shapes go through optimization profile 0 (`set_input_shape`); a shape
  outside the profile is the client's error and says which bounds apply.
- I/O and max_batch_size are auto-completed from the engine (`describe`): batching when
  every input's first dimension is dynamic, up to the profile's smallest maximum.
- Device buffers live on the instance's GPU and grow on demand; copies and
  `execute_async_v3` run on the instance's stream, synchronised once per batch.

Imports of `tensorrt` and `cuda-python` happen here at module level, so a machine
without them reports the model UNAVAILABLE with the pip command (backends/registry.py).
Without a GPU, `load` and `describe` fail with that reason before touching CUDA.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
import tensorrt as trt

try:  # cuda-python >= 12.6 moved the runtime bindings
    from cuda.bindings import runtime as cudart
except ImportError:  # pragma: no cover - older cuda-python
    from cuda import cudart  # type: ignore[no-redef]

from backends.base import Backend, BackendError, BackendInputError, Device, ModelSpec, Signature, TensorSpec

_LOGGER = trt.Logger(trt.Logger.WARNING)

_DTYPES: dict[Any, str] = {
    trt.DataType.FLOAT: "FP32",
    trt.DataType.HALF: "FP16",
    trt.DataType.INT8: "INT8",
    trt.DataType.INT32: "INT32",
    trt.DataType.BOOL: "BOOL",
    trt.DataType.UINT8: "UINT8",
}
for _name, _proto in (("INT64", "INT64"), ("BF16", "BF16")):
    if hasattr(trt.DataType, _name):
        _DTYPES[getattr(trt.DataType, _name)] = _proto
_NUMPY = {"FP32": np.float32, "FP16": np.float16, "INT8": np.int8, "INT32": np.int32, "BOOL": np.bool_,
          "UINT8": np.uint8, "INT64": np.int64, "BF16": np.uint16}


def _check(result: Any) -> Any:
    """cuda-python returns (error, value...); raise on error, return the value(s)."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise BackendError(f"CUDA error {err}")
    return values[0] if len(values) == 1 else tuple(values)


def _gpu_count() -> int:
    try:
        return int(_check(cudart.cudaGetDeviceCount()))
    except BackendError:
        return 0


class _Engines:
    """Engines shared per (plan, GPU): instances on one GPU need only their own contexts."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._engines: dict[tuple[str, int], list[Any]] = {}  # key -> [engine, users]

    def acquire(self, plan: Path, device_id: int) -> Any:
        key = (str(plan), device_id)
        with self._lock:
            entry = self._engines.get(key)
            if entry is None:
                _check(cudart.cudaSetDevice(device_id))
                engine = trt.Runtime(_LOGGER).deserialize_cuda_engine(plan.read_bytes())
                if engine is None:
                    raise BackendError(f"TensorRT could not deserialize {plan} (built for another TensorRT "
                                       "version or GPU?); rebuild the plan on this machine")
                entry = self._engines[key] = [engine, 0]
            entry[1] += 1
            return entry[0]

    def release(self, plan: Path, device_id: int) -> None:
        key = (str(plan), device_id)
        with self._lock:
            entry = self._engines.get(key)
            if entry is not None:
                entry[1] -= 1
                if entry[1] <= 0:
                    del self._engines[key]


_ENGINES = _Engines()


_IO = list[tuple[str, str, tuple[int, ...]]]  # (name, protocol datatype, engine shape)


def _io(engine: Any) -> tuple[_IO, _IO]:
    inputs: _IO = []
    outputs: _IO = []
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        trt_type = engine.get_tensor_dtype(name)
        if trt_type not in _DTYPES:
            raise BackendError(f"tensor '{name}' has TensorRT type {trt_type}, which Nereid cannot serve")
        entry = (name, _DTYPES[trt_type], tuple(int(d) for d in engine.get_tensor_shape(name)))
        (inputs if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT else outputs).append(entry)
    return inputs, outputs


def _max_batch(engine: Any, inputs: _IO) -> int:
    """The largest batch profile 0 allows when every input has a dynamic first dim, else 0."""
    if not inputs or any(not shape or shape[0] != -1 for _, _, shape in inputs):
        return 0
    return min(int(engine.get_tensor_profile_shape(name, 0)[2][0]) for name, _, _ in inputs)


class TensorRTBackend(Backend):
    name = "tensorrt"
    default_model_filename = "model.plan"
    supports_gpu = True

    @classmethod
    def describe(cls, model_file: Path) -> Signature:
        if _gpu_count() == 0:
            raise BackendError("TensorRT needs a CUDA GPU to read a plan, and none is visible")
        engine = _ENGINES.acquire(model_file, 0)
        try:
            inputs, outputs = _io(engine)
            return Signature(
                tuple(TensorSpec(n, d, s) for n, d, s in inputs),
                tuple(TensorSpec(n, d, s) for n, d, s in outputs),
                max_batch_size=_max_batch(engine, inputs),
            )
        finally:
            _ENGINES.release(model_file, 0)

    def load(self, spec: ModelSpec, device: Device) -> None:
        self._buffers: dict[str, tuple[int, int]] = {}  # name -> (device pointer, bytes)
        self._stream = None
        self._engine = None
        if device.kind != "GPU":
            raise BackendError("TensorRT plans run only on a GPU: use instance_group kind KIND_GPU "
                               "(or KIND_AUTO on a machine with a CUDA device)")
        if _gpu_count() == 0:
            raise BackendError("TensorRT needs a CUDA GPU and none is visible")
        self._device_id = device.device_id
        self._plan = spec.model_file
        self._engine = _ENGINES.acquire(spec.model_file, device.device_id)
        inputs, outputs = _io(self._engine)
        self._check_io(spec, dict((n, d) for n, d, _ in inputs), dict((n, d) for n, d, _ in outputs))
        self._outputs = {o.name: _NUMPY[o.datatype] for o in spec.outputs}
        self._inputs = {i.name: _NUMPY[i.datatype] for i in spec.inputs}
        _check(cudart.cudaSetDevice(self._device_id))
        self._context = self._engine.create_execution_context()
        if self._context is None:
            raise BackendError("TensorRT could not create an execution context (out of GPU memory?)")
        self._stream = _check(cudart.cudaStreamCreate())
        self._context.set_optimization_profile_async(0, int(self._stream))

    @staticmethod
    def _check_io(spec: ModelSpec, engine_inputs: dict[str, str], engine_outputs: dict[str, str]) -> None:
        for kind, wanted, have in (("input", spec.inputs, engine_inputs), ("output", spec.outputs, engine_outputs)):
            for tensor in wanted:
                if tensor.name not in have:
                    raise BackendError(f"configuration expects {kind} '{tensor.name}' but the engine's {kind}s "
                                       f"are {sorted(have)}")
                if have[tensor.name] != tensor.datatype:
                    raise BackendError(f"{kind} '{tensor.name}': configuration says {tensor.datatype} but the "
                                       f"engine has {have[tensor.name]}")
        missing = sorted(set(engine_inputs) - {t.name for t in spec.inputs})
        if missing:
            raise BackendError(f"the engine has inputs missing from the configuration: {missing}")

    def _buffer(self, name: str, nbytes: int) -> int:
        ptr, size = self._buffers.get(name, (0, 0))
        if nbytes > size:
            if ptr:
                _check(cudart.cudaFree(ptr))
            size = max(nbytes, 256)
            ptr = int(_check(cudart.cudaMalloc(size)))
            self._buffers[name] = (ptr, size)
        return ptr

    def execute(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        _check(cudart.cudaSetDevice(self._device_id))
        context, stream = self._context, int(self._stream)  # type: ignore[arg-type]
        h2d, d2h = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        for name, arr in inputs.items():
            arr = np.ascontiguousarray(arr, dtype=self._inputs[name])
            if not context.set_input_shape(name, arr.shape):
                low, _, high = self._engine.get_tensor_profile_shape(name, 0)  # type: ignore[union-attr]
                raise BackendInputError(f"input '{name}': shape {list(arr.shape)} is outside the engine's "
                                        f"optimization profile ({list(low)} to {list(high)})")
            ptr = self._buffer(name, arr.nbytes)
            _check(cudart.cudaMemcpyAsync(ptr, arr.ctypes.data, arr.nbytes, h2d, stream))
            context.set_tensor_address(name, ptr)
        results: dict[str, np.ndarray] = {}
        for name, dtype in self._outputs.items():
            shape = tuple(context.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise BackendError(f"output '{name}' has a data-dependent shape {list(shape)}, which is not supported")
            out = np.empty(shape, dtype=dtype)
            ptr = self._buffer(name, out.nbytes)
            context.set_tensor_address(name, ptr)
            results[name] = out
        if not context.execute_async_v3(stream):
            raise BackendError("TensorRT execute_async_v3 failed (see the server log for TensorRT's message)")
        for name, out in results.items():
            _check(cudart.cudaMemcpyAsync(out.ctypes.data, self._buffers[name][0], out.nbytes, d2h, stream))
        _check(cudart.cudaStreamSynchronize(stream))
        return results

    def close(self) -> None:
        for ptr, _ in getattr(self, "_buffers", {}).values():
            cudart.cudaFree(ptr)
        self._buffers = {}
        if getattr(self, "_stream", None) is not None:
            cudart.cudaStreamDestroy(self._stream)
            self._stream = None
        self._context = None
        if getattr(self, "_engine", None) is not None:
            self._engine = None
            _ENGINES.release(self._plan, self._device_id)
