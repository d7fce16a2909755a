"""TorchScript backend (`platform: pytorch_libtorch` / `backend: pytorch`, `model.pt`).

Follows Triton's pytorch backend where users depend on it:

- Input binding, in this order of preference: (1) a single `Dict[str, Tensor]` forward
  argument gets every input by config name; (2) config names equal to forward's
  argument names bind by name; (3) names `<anything>__<i>` (`INPUT__0`) bind to
  argument i; (4) otherwise config order. Outputs: `<anything>__<i>` picks element i
  of the returned tuple/list, otherwise config order.
- Strings: a TYPE_STRING input arrives in forward() as `List[str]` and a `List[str]` result becomes a
  BYTES output, 1-D only, as Triton does (backends/torch_strings.py).
- No auto-complete: TorchScript records no I/O types or shapes, so a config without
  inputs and outputs is rejected during config normalisation with that reason.
- Parameters (Triton's names): `INFERENCE_MODE` (default true), `DISABLE_OPTIMIZED_EXECUTION`,
  `INTRA_OP_THREAD_COUNT`, `INTER_OP_THREAD_COUNT` (lower case accepted too).

Threads: `torch.set_num_threads` is process-global in name only. With torch's OpenMP
build the intra-op thread count lives in the *calling thread* once that thread has run
a torch op, so each execute sets its own count on its own thread when it differs (a
cheap check), and instances of different models keep their own counts. The default is
the instance's share of the usable cores, as for ONNX Runtime. Inter-op threads (only
used by `torch.jit.fork`) are a single process pool that can be sized once: the first
model asking for `INTER_OP_THREAD_COUNT` sets it; a later, different request is logged
and ignored.

GPU instances (`KIND_GPU`, `cuda:N`): each instance owns a CUDA stream and its own copy of
the weights, so instances on one GPU overlap their copies and kernels instead of queueing
on the device's default stream. An execute copies its inputs to the device, runs, and copies
the outputs back on that stream; the copy back waits for the stream, so nothing of a request
is in flight once execute returns. The load logs the stream and the device memory the
weights take (the GPU tests read it).

Inputs become tensors with `torch.from_numpy`, sharing memory. Wire buffers are
read-only; they are shared as they are unless the scripted graph contains an in-place
op (one that could write to an input), in which case read-only inputs are copied first.
"""

from __future__ import annotations

import logging
import threading
import warnings
from typing import Any

import numpy as np
import torch

from backends.base import Backend, BackendError, BackendInputError, Device, ModelSpec, TensorSpec
from backends.threads import int_param, usable_cores
from backends.torch_strings import (
    check_argument_types,
    check_batch,
    check_string_shapes,
    string_output_error,
    strings_in,
    strings_out,
)

log = logging.getLogger("nereid.torchscript")

# Sharing a read-only wire buffer is deliberate (see the module docstring).
warnings.filterwarnings("ignore", message="The given NumPy array is not writable")

# Protocol datatype -> torch dtype. BYTES is absent: strings travel as List[str] (torch_strings.py).
TORCH_OF: dict[str, torch.dtype] = {
    "BOOL": torch.bool,
    "UINT8": torch.uint8,
    "UINT16": torch.uint16,
    "UINT32": torch.uint32,
    "UINT64": torch.uint64,
    "INT8": torch.int8,
    "INT16": torch.int16,
    "INT32": torch.int32,
    "INT64": torch.int64,
    "FP16": torch.float16,
    "FP32": torch.float32,
    "FP64": torch.float64,
    "BF16": torch.bfloat16,
}

_interop_lock = threading.Lock()
_interop_threads: int | None = None


def _truthy(value: str | None, default: bool) -> bool:
    if value is None or value == "":
        return default
    return value.strip().lower() in ("1", "true", "yes", "on")


def _param(spec: ModelSpec, key: str) -> str | None:
    return spec.parameters.get(key, spec.parameters.get(key.lower()))


def _index_of(name: str) -> int | None:
    """`INPUT__3` -> 3; None when the name does not follow the `<name>__<index>` rule."""
    _, sep, tail = name.rpartition("__")
    return int(tail) if sep and tail.isdigit() else None


def _set_interop_threads(count: int) -> None:
    global _interop_threads
    with _interop_lock:
        if _interop_threads is None:
            try:
                torch.set_num_interop_threads(count)
                _interop_threads = count
                return
            except RuntimeError as exc:  # torch already started its inter-op pool
                log.warning("INTER_OP_THREAD_COUNT=%d ignored: %s", count, exc)
                _interop_threads = torch.get_num_interop_threads()
        if count != _interop_threads:
            log.warning(
                "INTER_OP_THREAD_COUNT=%d ignored: torch's inter-op pool is process-wide and already has %d",
                count, _interop_threads,
            )


def _may_write_inputs(module: torch.jit.ScriptModule) -> bool:
    """Whether the scripted graph has an in-place op (`aten::add_`, `aten::copy_`...)."""
    try:
        graph = module.inlined_graph
    except Exception:  # a graph we cannot inspect: assume the worst
        return True
    for node in graph.nodes():
        kind = node.kind()
        if kind.startswith("aten::") and kind.endswith("_") and not kind.endswith("__"):
            return True
    return False


class TorchScriptBackend(Backend):
    name = "pytorch"
    default_model_filename = "model.pt"
    supports_gpu = True

    def load(self, spec: ModelSpec, device: Device) -> None:
        for tensor in spec.inputs + spec.outputs:
            if tensor.datatype not in TORCH_OF and tensor.datatype != "BYTES":
                raise BackendError(f"'{tensor.name}': datatype {tensor.datatype} has no torch dtype")
        check_string_shapes(spec)
        self._stream: Any = None
        if device.kind == "GPU":
            if not torch.cuda.is_available():
                raise BackendError(f"instance on GPU {device.device_id}: this torch build has no CUDA device")
            self._device = torch.device("cuda", device.device_id)
            self._stream = torch.cuda.Stream(device=self._device)
        else:
            self._device = torch.device("cpu")
        share = max(1, usable_cores() // max(1, spec.instance_count))
        self._threads = int_param(spec.parameters, "INTRA_OP_THREAD_COUNT", 0) or share
        inter = int_param(spec.parameters, "INTER_OP_THREAD_COUNT", 0)
        if inter:
            _set_interop_threads(inter)
        self._inference_mode = _truthy(_param(spec, "INFERENCE_MODE"), True)
        self._optimized = not _truthy(_param(spec, "DISABLE_OPTIMIZED_EXECUTION"), False)
        try:
            self._module = torch.jit.load(str(spec.model_file), map_location=self._device)
        except Exception as exc:
            raise BackendError(f"torch.jit.load could not load {spec.model_file}: {exc}") from exc
        self._module.eval()
        self._forward = self._module.forward
        if self._stream is not None:
            self._log_gpu_instance(spec)
        self._bind(spec)
        self._copy_readonly = _may_write_inputs(self._module)
        self._dtypes = {t.name: TORCH_OF[t.datatype] for t in spec.inputs if t.datatype != "BYTES"}
        self._strings = frozenset(t.name for t in spec.inputs if t.datatype == "BYTES")
        self._string_outputs = frozenset(t.name for t in spec.outputs if t.datatype == "BYTES")
        self._batching = spec.max_batch_size > 0
        self._batch = 0  # the batch size of the execution running now (checks string outputs)

    def _log_gpu_instance(self, spec: ModelSpec) -> None:
        """Say where a GPU instance lives: its stream and the device memory of its weights."""
        weights = [*self._module.parameters(), *self._module.buffers()]
        size = sum(t.numel() * t.element_size() for t in weights if t.device == self._device)
        log.info("model %s version %d instance %s: on %s, CUDA stream 0x%x, weights %d bytes on the device, "
                 "%d bytes allocated on %s by this process", spec.name, spec.version, spec.instance_name or "-",
                 self._device, self._stream.cuda_stream, size, torch.cuda.memory_allocated(self._device),
                 self._device)

    def _bind(self, spec: ModelSpec) -> None:
        """Work out how config inputs map to forward's arguments and outputs to its results."""
        try:
            args = list(self._module.forward.schema.arguments)[1:]  # drop `self`
        except Exception as exc:
            raise BackendError(f"{spec.model_file}: the module has no scripted forward(): {exc}") from exc
        names = [t.name for t in spec.inputs]
        self._dict_input = len(args) == 1 and str(args[0].type).startswith("Dict[str, Tensor]")
        if self._dict_input:
            strings = [t.name for t in spec.inputs if t.datatype == "BYTES"]
            if strings:
                raise BackendError(f"forward() takes one Dict[str, Tensor], which cannot hold the TYPE_STRING "
                                   f"inputs {strings} (they are List[str]); give forward() one argument per input")
        else:
            required = [a.name for a in args if not a.has_default_value()]
            if len(names) > len(args) or len(names) < len(required):
                raise BackendError(
                    f"configuration has {len(names)} inputs {names} but forward() takes "
                    f"{len(required)}-{len(args)} arguments {[a.name for a in args]}"
                )
            arg_names = [a.name for a in args]
            self._by_name = set(names) <= set(arg_names)
            self._order = _input_order(names, arg_names)
            types = {a.name: str(a.type) for a in args}
            bound = dict(zip(self._order, arg_names, strict=False)) if not self._by_name else {n: n for n in names}
            check_argument_types(spec, {name: types[arg] for name, arg in bound.items()})
        self._out_names = _output_order(spec.outputs)

    def execute(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if torch.get_num_threads() != self._threads:  # per calling thread, see the module docstring
            torch.set_num_threads(self._threads)
        if self._stream is None:
            return self._execute(inputs)
        with torch.cuda.stream(self._stream):  # this instance's stream, for copies and kernels alike
            return self._execute(inputs)

    def _execute(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        tensors = {name: self._tensor(name, arr) for name, arr in inputs.items()}
        if self._string_outputs and self._batching:
            self._batch = next(iter(inputs.values())).shape[0] if inputs else 0
        try:
            with torch.inference_mode(self._inference_mode):
                if self._optimized:  # torch's default; toggling it costs ~10 µs a call
                    result = self._call(tensors)
                else:
                    with torch.jit.optimized_execution(False):
                        result = self._call(tensors)
        except UnicodeDecodeError as exc:  # an output string torch cannot hand to Python
            raise string_output_error(exc) from exc
        except (RuntimeError, TypeError, ValueError, IndexError, KeyError) as exc:
            raise BackendInputError(f"torch error: {_first_line(exc)}") from exc
        return self._outputs(result)

    def _call(self, tensors: dict[str, Any]) -> Any:
        forward = self._forward  # the scripted method itself: skips nn.Module's Python call hooks
        if self._dict_input:
            return forward(tensors)
        if self._by_name:
            return forward(**tensors)
        return forward(*[tensors[name] for name in self._order if name in tensors])

    def _tensor(self, name: str, arr: np.ndarray) -> Any:
        dtype = self._dtypes.get(name)
        if dtype is None:
            if name in self._strings:
                return strings_in(arr)
            raise BackendInputError(f"unexpected input '{name}'")
        if self._copy_readonly and not arr.flags.writeable:
            arr = arr.copy()
        if arr.dtype.kind == "O":
            raise BackendInputError(f"input '{name}': torch has no string tensors")
        tensor = torch.from_numpy(arr)
        if dtype is torch.bfloat16:  # BF16 travels as uint16 bit patterns
            tensor = tensor.view(torch.bfloat16)
        if self._device.type != "cpu":
            tensor = tensor.to(self._device, non_blocking=True)
        return tensor

    def _outputs(self, result: Any) -> dict[str, np.ndarray]:
        if isinstance(result, torch.Tensor) or _is_string_list(result):
            result = (result,)  # one output: a tensor, or a List[str] (never a list of outputs)
        if not isinstance(result, (tuple, list)):
            raise BackendError(f"forward() returned {type(result).__name__}; expected a Tensor or a tuple/list of them")
        if len(result) < len(self._out_names):
            raise BackendError(
                f"forward() returned {len(result)} outputs; the configuration has {len(self._out_names)}"
            )
        outputs: dict[str, np.ndarray] = {}
        for name, index in self._out_names.items():
            value = result[index]
            if name in self._string_outputs:
                if not isinstance(value, list):
                    raise BackendError(f"output '{name}' (result {index}) is TYPE_STRING, so forward() must return "
                                       f"a List[str] for it, not a {type(value).__name__}")
                if self._batching:
                    check_batch(name, len(value), self._batch)
                outputs[name] = strings_out(name, value)
                continue
            if not isinstance(value, torch.Tensor):
                raise BackendError(f"output '{name}' (result {index}) is a {type(value).__name__}, not a Tensor")
            outputs[name] = self._numpy(value)
        return outputs

    def _numpy(self, value: torch.Tensor) -> np.ndarray:
        """Tensor -> numpy without a copy on the CPU. Kept to as few tensor attribute reads as
        possible: each costs about a microsecond, which is a lot next to a small model."""
        if not self._inference_mode:
            value = value.detach()  # outside inference mode, outputs may carry autograd state
        if value.dtype is torch.bfloat16:
            value = value.view(torch.uint16)
        try:
            return value.numpy()
        except TypeError:  # on a GPU (or another device): bring it to the host
            return value.cpu().numpy()

    def close(self) -> None:
        self._module = None  # type: ignore[assignment]
        self._forward = None
        if self._device.type == "cuda":
            if self._stream is not None:
                self._stream.synchronize()
            self._stream = None
            torch.cuda.empty_cache()


def _input_order(names: list[str], arg_names: list[str]) -> list[str]:
    """Config input names in forward-argument order (Triton's three naming rules)."""
    if set(names) <= set(arg_names):
        return [a for a in arg_names if a in names]
    indices = [_index_of(n) for n in names]
    if all(i is not None for i in indices) and sorted(indices) == list(range(len(names))):  # type: ignore[type-var]
        return [n for _, n in sorted(zip(indices, names, strict=True))]  # type: ignore[arg-type]
    return list(names)


def _output_order(outputs: tuple[TensorSpec, ...]) -> dict[str, int]:
    """Output name -> index in forward's result: `OUTPUT__<i>` if every name says, else config order."""
    indices = [_index_of(t.name) for t in outputs]
    if all(i is not None for i in indices) and len(set(indices)) == len(indices):
        return {t.name: i for t, i in zip(outputs, indices, strict=True)}  # type: ignore[misc]
    return {t.name: i for i, t in enumerate(outputs)}


def _is_string_list(value: Any) -> bool:
    return isinstance(value, list) and (not value or isinstance(value[0], str))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    # TorchScript errors carry a long traceback of the scripted code; the last line says what went wrong.
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines else type(exc).__name__
