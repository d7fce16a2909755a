"""The few CUDA runtime calls that CUDA shared memory needs, and whether this machine has them.

Triton's CUDA shared memory: a client allocates device memory, exports it with
`cudaIpcGetMemHandle` and sends the handle's 64 bytes; the server maps the same memory with
`cudaIpcOpenMemHandle` and copies tensors in and out of it with `cudaMemcpy`, then lets go with
`cudaIpcCloseMemHandle`. torch has no public call that opens a raw cudaIpcMemHandle_t (its
`_new_shared_cuda` expects torch's own ref-counting metadata), so the calls go through:

1. `cuda-python` (`cuda.bindings.runtime`, or the older `cuda.cudart`) when it is installed;
2. else libcudart itself through ctypes (a CUDA toolkit, or the `nvidia-cuda-runtime` wheel that
   CUDA builds of torch install).

The region's real allocation size (Triton checks `byte_size` against it) comes from the driver
(libcuda.so.1, `cuMemGetAddressRange_v2`), which is present wherever a GPU is.

`probe()` decides once whether any of this works here and, if not, says exactly why: no binding
installed and no CUDA runtime library found, or no CUDA device. Nothing here has run on a GPU
yet (docs/SHARED_MEMORY.md).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import importlib
import os
import sys
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

IPC_HANDLE_SIZE = 64  # sizeof(cudaIpcMemHandle_t)
_LAZY_ENABLE_PEER_ACCESS = 1  # cudaIpcMemLazyEnablePeerAccess
_HOST_TO_DEVICE, _DEVICE_TO_HOST = 1, 2  # cudaMemcpyKind
BINDINGS = ("cuda.bindings.runtime", "cuda.cudart")  # cuda-python >= 12.6, older


class CudaError(RuntimeError):
    """A CUDA call failed; the message names the call and CUDA's error string."""


class CudaRuntime(Protocol):
    """What the CUDA shared memory registry needs from CUDA (device pointers are ints)."""

    how: str  # which binding or library, for the log

    def device_count(self) -> int: ...
    def open_ipc(self, handle: bytes, device_id: int) -> int: ...
    def close_ipc(self, ptr: int, device_id: int) -> None: ...
    def to_host(self, ptr: int, byte_size: int, device_id: int) -> bytearray: ...
    def to_device(self, ptr: int, data: Any, device_id: int) -> None: ...
    def allocation_size(self, ptr: int) -> int: ...


def _host_address(data: Any) -> tuple[int, int]:
    """(address, byte count) of a contiguous host buffer (bytes, bytearray, memoryview, ndarray)."""
    arr = np.frombuffer(data, np.uint8) if not isinstance(data, np.ndarray) else data.reshape(-1).view(np.uint8)
    return int(arr.ctypes.data), int(arr.nbytes)


def _driver_allocation_size(ptr: int) -> int:
    """Size of the allocation that contains `ptr` (the caller's thread has the device's context
    current, as after any runtime call on it)."""
    cuda = ctypes.CDLL("libcuda.so.1")
    base, size = ctypes.c_uint64(0), ctypes.c_size_t(0)
    rc = cuda.cuMemGetAddressRange_v2(ctypes.byref(base), ctypes.byref(size), ctypes.c_uint64(ptr))
    if rc != 0:
        raise CudaError(f"cuMemGetAddressRange failed: CUresult {rc}")
    return int(size.value) - (ptr - int(base.value))


class CudaPython:
    """The calls through cuda-python (`mod` is its runtime module)."""

    def __init__(self, mod: Any, name: str) -> None:
        self._rt = mod
        self.how = f"cuda-python ({name})"

    def _check(self, result: Any, call: str) -> Any:
        err, *rest = result if isinstance(result, tuple) else (result,)
        if int(err) != 0:
            _, text = self._rt.cudaGetErrorString(err)
            raise CudaError(f"{call} failed: {text.decode() if isinstance(text, bytes) else text}")
        return rest[0] if rest else None

    def device_count(self) -> int:
        return int(self._check(self._rt.cudaGetDeviceCount(), "cudaGetDeviceCount"))

    def open_ipc(self, handle: bytes, device_id: int) -> int:
        self._check(self._rt.cudaSetDevice(device_id), "cudaSetDevice")
        mem_handle = self._rt.cudaIpcMemHandle_t()
        ctypes.memmove(mem_handle.getPtr(), handle, IPC_HANDLE_SIZE)
        flag = getattr(self._rt, "cudaIpcMemLazyEnablePeerAccess", _LAZY_ENABLE_PEER_ACCESS)
        return int(self._check(self._rt.cudaIpcOpenMemHandle(mem_handle, flag), "cudaIpcOpenMemHandle"))

    def close_ipc(self, ptr: int, device_id: int) -> None:
        self._check(self._rt.cudaSetDevice(device_id), "cudaSetDevice")
        self._check(self._rt.cudaIpcCloseMemHandle(ptr), "cudaIpcCloseMemHandle")

    def to_host(self, ptr: int, byte_size: int, device_id: int) -> bytearray:
        out = bytearray(byte_size)
        address, _ = _host_address(out)
        self._check(self._rt.cudaSetDevice(device_id), "cudaSetDevice")
        kind = self._rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        self._check(self._rt.cudaMemcpy(address, ptr, byte_size, kind), "cudaMemcpy")
        return out

    def to_device(self, ptr: int, data: Any, device_id: int) -> None:
        address, size = _host_address(data)
        self._check(self._rt.cudaSetDevice(device_id), "cudaSetDevice")
        kind = self._rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        self._check(self._rt.cudaMemcpy(ptr, address, size, kind), "cudaMemcpy")

    def allocation_size(self, ptr: int) -> int:
        return _driver_allocation_size(ptr)


class _IpcHandle(ctypes.Structure):
    _fields_ = [("reserved", ctypes.c_char * IPC_HANDLE_SIZE)]


class CtypesCudart:
    """The calls through libcudart with ctypes (no Python binding needed)."""

    def __init__(self, path: str) -> None:
        lib = ctypes.CDLL(path)
        lib.cudaGetErrorString.restype = ctypes.c_char_p
        lib.cudaIpcOpenMemHandle.argtypes = [ctypes.POINTER(ctypes.c_void_p), _IpcHandle, ctypes.c_uint]
        lib.cudaIpcCloseMemHandle.argtypes = [ctypes.c_void_p]
        lib.cudaMemcpy.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        self._lib = lib
        self.how = f"libcudart through ctypes ({path})"

    def _check(self, rc: int, call: str) -> None:
        if rc != 0:
            raise CudaError(f"{call} failed: {self._lib.cudaGetErrorString(rc).decode()} (cudaError {rc})")

    def device_count(self) -> int:
        count = ctypes.c_int(0)
        self._check(self._lib.cudaGetDeviceCount(ctypes.byref(count)), "cudaGetDeviceCount")
        return count.value

    def open_ipc(self, handle: bytes, device_id: int) -> int:
        self._check(self._lib.cudaSetDevice(device_id), "cudaSetDevice")
        ptr = ctypes.c_void_p()
        mem_handle = _IpcHandle(bytes(handle))
        self._check(self._lib.cudaIpcOpenMemHandle(ctypes.byref(ptr), mem_handle, _LAZY_ENABLE_PEER_ACCESS),
                    "cudaIpcOpenMemHandle")
        return int(ptr.value or 0)

    def close_ipc(self, ptr: int, device_id: int) -> None:
        self._check(self._lib.cudaSetDevice(device_id), "cudaSetDevice")
        self._check(self._lib.cudaIpcCloseMemHandle(ptr), "cudaIpcCloseMemHandle")

    def to_host(self, ptr: int, byte_size: int, device_id: int) -> bytearray:
        out = bytearray(byte_size)
        address, _ = _host_address(out)
        self._check(self._lib.cudaSetDevice(device_id), "cudaSetDevice")
        self._check(self._lib.cudaMemcpy(address, ptr, byte_size, _DEVICE_TO_HOST), "cudaMemcpy")
        return out

    def to_device(self, ptr: int, data: Any, device_id: int) -> None:
        address, size = _host_address(data)
        self._check(self._lib.cudaSetDevice(device_id), "cudaSetDevice")
        self._check(self._lib.cudaMemcpy(ptr, address, size, _HOST_TO_DEVICE), "cudaMemcpy")

    def allocation_size(self, ptr: int) -> int:
        return _driver_allocation_size(ptr)


def cudart_candidates() -> list[str]:
    """Where libcudart may be: the loader's search (a toolkit on the path), the toolkit's usual
    place, and the nvidia-cuda-runtime wheels that CUDA builds of torch install."""
    found = ctypes.util.find_library("cudart")
    names = [found] if found else []
    names += ["libcudart.so", "libcudart.so.13", "libcudart.so.12"]
    patterns = ["/usr/local/cuda/lib64/libcudart.so*"]
    for entry in sys.path:
        patterns += [os.path.join(entry, "nvidia", "cuda_runtime", "lib", "libcudart.so*"),
                     os.path.join(entry, "nvidia", "cu1*", "lib", "libcudart.so*")]
    for pattern in patterns:
        names += sorted(glob.glob(pattern), reverse=True)
    return list(dict.fromkeys(names))


def probe(bindings: Sequence[str] = BINDINGS, libraries: Sequence[str] | None = None) -> CudaRuntime | str:
    """A working CUDA runtime with at least one device, or the reason there is none (one line).

    Tries the cuda-python modules in `bindings`, then each libcudart in `libraries`
    (default: cudart_candidates()). The first that loads is asked for its device count."""
    runtime: CudaRuntime | None = None
    binding_errors = []
    for name in bindings:
        try:
            runtime = CudaPython(importlib.import_module(name), name)
            break
        except Exception as exc:  # ImportError, or a binding that cannot find its own libcudart
            binding_errors.append(f"{name}: {exc}")
    if runtime is None:
        tried = list(cudart_candidates() if libraries is None else libraries)
        for path in tried:
            try:
                runtime = CtypesCudart(path)
                break
            except (OSError, AttributeError):
                continue
        if runtime is None:
            return ("no binding installed (cuda-python: " + "; ".join(binding_errors or ["none tried"]) + ") and "
                    f"no CUDA runtime library found (libcudart; tried {', '.join(tried) or 'nothing'})")
    try:
        count = runtime.device_count()
    except CudaError as exc:
        return f"no CUDA device ({runtime.how}: {exc})"
    if count < 1:
        return f"no CUDA device ({runtime.how}: cudaGetDeviceCount found 0)"
    return runtime
