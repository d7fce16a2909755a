"""Tensors that live in a registered system shared memory region instead of the message.

An input or a requested output names a region with the tensor parameters
`shared_memory_region` (string), `shared_memory_byte_size` (int64) and optionally
`shared_memory_offset` (int64), checked with Triton's messages
(server/src/grpc/infer_handler.h `ParseSharedMemoryParams`). Inputs become numpy views of
the region (no copy, read-only); outputs are written into the region after the model ran, and
the response carries their name, datatype and shape with an empty raw_output_contents entry,
as Triton sends them. A CUDA region (server/core/cuda_shm.py) gives inputs a host copy of its
bytes and takes outputs by a host -> device copy.

A request holds references to the regions it uses (its input views, its output slots), so an
unregister while it is in flight cannot unmap memory under it (server/core/shm_registry.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from server.core.cuda_shm import CudaRegion
from server.core.shm_registry import AnyRegion, SharedMemoryRegistry
from server.core.signature import TensorInfo
from server.errors import InvalidInput

REGION, BYTE_SIZE, OFFSET = "shared_memory_region", "shared_memory_byte_size", "shared_memory_offset"


@dataclass(frozen=True, slots=True)
class OutputSlot:
    """Where a requested output goes: `byte_size` bytes at `offset` in `region`."""

    region: AnyRegion
    offset: int
    byte_size: int


def shm_params(parameters: Any, tensor: str) -> tuple[str, int, int] | None:
    """(region, offset, byte_size) if the tensor's parameters name a region, else None."""
    has_region = REGION in parameters
    if not has_region and OFFSET not in parameters and BYTE_SIZE not in parameters:
        return None
    region = ""
    if has_region:
        param = parameters[REGION]
        if param.WhichOneof("parameter_choice") != "string_param":
            raise InvalidInput(f"invalid value type for '{REGION}' parameter for tensor '{tensor}', "
                               "expected string_param.")
        region = param.string_param
    offset = byte_size = 0
    for key in (OFFSET, BYTE_SIZE):
        if key not in parameters:
            continue
        if not has_region:
            raise InvalidInput(f"'{key}' can not be specified without '{REGION}' parameter for tensor '{tensor}'")
        param = parameters[key]
        if param.WhichOneof("parameter_choice") != "int64_param":
            raise InvalidInput(f"invalid value type for '{key}' parameter for tensor '{tensor}', "
                               "expected int64_param.")
        if key == OFFSET:
            offset = param.int64_param
        else:
            byte_size = param.int64_param
    if BYTE_SIZE not in parameters:
        raise InvalidInput(f"'{BYTE_SIZE}' must be specified along with '{REGION}' parameter for tensor '{tensor}'")
    return region, offset, byte_size


def read_input(registry: SharedMemoryRegistry, where: tuple[str, int, int], info: TensorInfo,
               shape: tuple[int, ...], count: int, model: str,
               decode_bytes: Callable[[memoryview, int, str, str], np.ndarray]) -> np.ndarray:
    """The input's array over the region's bytes (fixed-size types: a read-only view, no copy;
    BYTES: the elements decoded by `decode_bytes`, codec.py's)."""
    region_name, offset, byte_size = where
    view = registry.get(region_name).view(offset, byte_size).toreadonly()
    name = info.name
    if not info.itemsize:  # length-prefixed elements, decoded into objects
        return decode_bytes(view, count, name, model).reshape(shape)
    expected = count * info.itemsize
    if byte_size != expected:
        raise InvalidInput(f"input byte size mismatch for input '{name}' for model '{model}'. Expected "
                           f"{expected}, got {byte_size}")
    if info.datatype == "BOOL" and expected and np.frombuffer(view, np.uint8).max() > 1:
        raise InvalidInput(f"input '{name}' for model '{model}': BOOL elements must be bytes 0 or 1")
    return np.ndarray(shape, info.dtype, view)


def output_slot(registry: SharedMemoryRegistry, where: tuple[str, int, int]) -> OutputSlot:
    """Resolve a requested output's region now (Triton checks it before running the model)."""
    region_name, offset, byte_size = where
    region = registry.get(region_name)
    region.check(offset, byte_size)
    return OutputSlot(region, offset, byte_size)


def write_outputs(outputs: dict[str, np.ndarray], slots: dict[str, OutputSlot], infos: dict[str, TensorInfo],
                  encode_bytes: Callable[[np.ndarray], bytes]) -> frozenset[str]:
    """Copy each output that has a slot into its region (BYTES serialized by `encode_bytes`,
    codec.py's); returns the names written."""
    written = []
    for name, slot in slots.items():
        arr = outputs.get(name)
        if arr is None:
            continue
        if infos[name].itemsize:
            data: Any = np.ascontiguousarray(arr)
            size = data.nbytes
        else:
            data = encode_bytes(arr)
            size = len(data)
        if size > slot.byte_size:
            raise InvalidInput(f"shared memory size specified with the request for output '{name}' "
                               f"({slot.byte_size} bytes) should be at least {size} bytes to hold the results")
        if isinstance(slot.region, CudaRegion):  # host -> device (cudaMemcpy)
            slot.region.write(slot.offset, data)
            written.append(name)
            continue
        view = slot.region.view(slot.offset, size)
        if isinstance(data, bytes):
            view[:] = data
        elif size:
            np.copyto(np.ndarray(data.shape, data.dtype, view), data, casting="no")
        written.append(name)
    return frozenset(written)
