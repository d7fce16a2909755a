"""One registered CUDA shared memory region: device memory of another process, opened here
from its cudaIpcMemHandle_t (Triton's CUDA shared memory).

This first version moves tensors through the host: an input named by a CUDA region is copied
device -> host before the model runs, an output host -> device after (cudaMemcpy, synchronous).
A model on that GPU therefore pays two PCIe copies it would not need with a device tensor
handed to it directly (docs/SHARED_MEMORY.md).

The region closes its IPC mapping (cudaIpcCloseMemHandle) when it is garbage: at unregister if
no request holds it, else when the last in-flight request using it lets go, as the system
regions release their mappings (server/core/shm_registry.py).
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass, field
from typing import Any

from server.core.cuda_runtime import IPC_HANDLE_SIZE, CudaError, CudaRuntime
from server.core.shm_bounds import check_bounds
from server.errors import InvalidInput

log = logging.getLogger("nereid.core")


def _close(runtime: CudaRuntime, ptr: int, device_id: int, name: str) -> None:
    try:
        runtime.close_ipc(ptr, device_id)
    except CudaError as exc:  # nothing to answer to at this point: say it
        log.error("CUDA shared memory region '%s': %s", name, exc)


def check_cuda_args(name: str, raw_handle: bytes, device_id: int, byte_size: int) -> None:
    """Refuse what cannot be a registration before touching CUDA (INVALID_ARGUMENT)."""
    if len(raw_handle) != IPC_HANDLE_SIZE:
        raise InvalidInput(f"failed to register shared memory region '{name}': invalid args (raw_handle must be "
                           f"a cudaIpcMemHandle_t's {IPC_HANDLE_SIZE} bytes, got {len(raw_handle)})")
    if device_id < 0:
        raise InvalidInput(f"failed to register shared memory region '{name}': invalid args "
                           f"(device_id {device_id} must be >= 0)")
    if byte_size <= 0:
        raise InvalidInput(f"failed to register shared memory region '{name}': invalid args "
                           f"(byte_size {byte_size} must be > 0)")


@dataclass(eq=False)
class CudaRegion:
    """`byte_size` bytes of device memory on `device_id`, at `_ptr` in this process."""

    name: str
    device_id: int
    byte_size: int
    raw_handle: bytes = field(repr=False)
    _runtime: CudaRuntime = field(repr=False)
    _ptr: int = field(repr=False)

    def __post_init__(self) -> None:
        self._closer = weakref.finalize(self, _close, self._runtime, self._ptr, self.device_id, self.name)

    def close(self) -> None:
        """Close the IPC mapping now (once; later calls do nothing). Only for a region no request
        can hold yet: a failed registration."""
        self._closer()

    def check(self, offset: int, byte_size: int) -> None:
        check_bounds(self.name, self.byte_size, offset, byte_size)

    def view(self, offset: int, byte_size: int) -> memoryview:
        """A host copy of `byte_size` bytes at `offset` (bounds-checked as system regions)."""
        self.check(offset, byte_size)
        try:
            return memoryview(self._runtime.to_host(self._ptr + offset, byte_size, self.device_id))
        except CudaError as exc:
            raise InvalidInput(f"shared memory region '{self.name}': {exc}") from None

    def write(self, offset: int, data: Any) -> None:
        """Copy a contiguous host buffer to `offset` (bounds-checked)."""
        size = memoryview(data).nbytes
        self.check(offset, size)
        if not size:
            return
        try:
            self._runtime.to_device(self._ptr + offset, data, self.device_id)
        except CudaError as exc:
            raise InvalidInput(f"shared memory region '{self.name}': {exc}") from None


def open_region(runtime: CudaRuntime, name: str, raw_handle: bytes, device_id: int, byte_size: int) -> CudaRegion:
    """Open the handle on `device_id` and check `byte_size` against the real allocation,
    with Triton's messages (a bad handle is the client's mistake: INVALID_ARGUMENT)."""
    check_cuda_args(name, raw_handle, device_id, byte_size)
    try:
        ptr = runtime.open_ipc(raw_handle, device_id)
    except CudaError as exc:
        log.error("failed to open CUDA IPC handle for region '%s' on device %d: %s", name, device_id, exc)
        raise InvalidInput(f"failed to register shared memory region '{name}': invalid args ({exc})") from None
    region = CudaRegion(name, device_id, byte_size, bytes(raw_handle), runtime, ptr)
    try:
        size = runtime.allocation_size(ptr)
    except (CudaError, OSError) as exc:
        region.close()  # now, not when the exception's frames are collected: the handle may be reopened
        log.error("CUDA shared memory region '%s': %s", name, exc)
        raise InvalidInput(f"failed to register shared memory region '{name}': invalid args ({exc})") from None
    if byte_size > size:
        region.close()
        raise InvalidInput(f"failed to register shared memory region '{name}': invalid args (byte_size "
                           f"{byte_size} exceeds the device allocation's {size} bytes)")
    return region
