"""Find a backend class by name, platform or model file name.

Built-in backends are imported lazily so a missing framework only affects the
models that need it. Third-party backends register under the entry-point group
`nereid.backends` (`name = "package.module:Class"`), so a new framework needs
no change to `server/`.
"""

from __future__ import annotations

import importlib
from importlib import metadata

from backends.base import Backend, BackendError, BackendUnavailable

ENTRY_POINT_GROUP = "nereid.backends"

_BUILTIN: dict[str, str] = {
    "onnxruntime": "backends.onnxruntime:OnnxRuntimeBackend",
    "identity": "backends.identity:IdentityBackend",
    "pytorch": "backends.torchscript:TorchScriptBackend",
    "tensorrt": "backends.tensorrt:TensorRTBackend",
    "python": "backends.python:PythonBackend",
}

# Built-in backends whose instances may run on a GPU (KIND_AUTO picks the GPU for them).
# Known without importing the framework, so config normalisation stays cheap.
_GPU_BUILTIN = frozenset({"onnxruntime", "pytorch", "tensorrt", "python"})

# What to install when a built-in backend's framework is missing. The module name that
# failed to import is matched too, so a third-party backend that needs torch gets the hint.
INSTALL_HINT: dict[str, str] = {
    "onnxruntime": 'pip install "nereid[cpu]" (onnxruntime) or, on a CUDA machine, pip install "nereid[gpu]" '
    "(onnxruntime-gpu; never both)",
    "pytorch": 'pip install "nereid[torch]"',
    "torch": 'pip install "nereid[torch]"',
    "tensorrt": 'pip install "nereid[tensorrt]" (tensorrt and cuda-python; needs an NVIDIA GPU and driver)',
    "cuda": 'pip install "nereid[tensorrt]" (cuda-python)',
}

# Triton's platform names and the backend each one means.
PLATFORM_BACKEND: dict[str, str] = {
    "onnxruntime_onnx": "onnxruntime",
    "pytorch_libtorch": "pytorch",
    "tensorrt_plan": "tensorrt",
}

# What Triton puts in `platform` when only `backend` is given.
BACKEND_PLATFORM: dict[str, str] = {v: k for k, v in PLATFORM_BACKEND.items()}

# Default model file per backend; also how auto-complete guesses the backend.
DEFAULT_FILENAME: dict[str, str] = {
    "onnxruntime": "model.onnx",
    "pytorch": "model.pt",
    "tensorrt": "model.plan",
    "python": "model.py",
}


def backend_for_file(filename: str) -> str | None:
    """The backend whose default file this is (`model.onnx` -> onnxruntime)."""
    for backend, default in DEFAULT_FILENAME.items():
        if filename == default:
            return backend
    return None


def known_backends() -> list[str]:
    """Names of the built-in and entry-point backends."""
    names = set(_BUILTIN)
    names.update(ep.name for ep in metadata.entry_points(group=ENTRY_POINT_GROUP))
    return sorted(names)


def supports_gpu(name: str) -> bool:
    """Whether backend `name` can place instances on a GPU (False if it cannot be imported)."""
    if name in _BUILTIN:
        return name in _GPU_BUILTIN
    try:
        return bool(backend_class(name).supports_gpu)
    except BackendError:
        return False


def gpu_unusable(name: str) -> str | None:
    """Why backend `name` (one that `supports_gpu`) cannot use a visible GPU on this
    installation, or None. Imports the framework: ask only where a GPU is visible."""
    try:
        return backend_class(name).gpu_unusable()
    except BackendError as exc:
        return str(exc)


def _hint(name: str, target: str, exc: ImportError) -> str:
    missing = (exc.name or "").split(".")[0]
    return INSTALL_HINT.get(name) or INSTALL_HINT.get(missing) or f"install the package that provides {target}"


def backend_class(name: str) -> type[Backend]:
    """Import and return the class for backend `name`, or raise BackendError."""
    target = _BUILTIN.get(name)
    if target is None:
        for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
            if ep.name == name:
                target = ep.value
                break
    if target is None:
        raise BackendError(f"unknown backend '{name}'; known backends: {', '.join(known_backends())}")
    module_name, _, attr = target.partition(":")
    if not attr:
        raise BackendError(f"backend '{name}': entry point '{target}' must be 'package.module:Class'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        hint = _hint(name, target, exc)
        raise BackendUnavailable(f"backend '{name}' is not available ({exc}); to fix: {hint}") from exc
    cls = getattr(module, attr, None)
    if not (isinstance(cls, type) and issubclass(cls, Backend)):
        raise BackendError(f"backend '{name}' ({target}) is not a backends.base.Backend subclass")
    return cls
