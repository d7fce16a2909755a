"""The shared memory RPCs of GRPCInferenceService, over the transport-free registry
(server/core/shm_registry.py). CUDA shared memory works where the registry was given a CUDA
runtime (server/core/cuda_runtime.py `probe`, once at startup); elsewhere its RPCs answer
UNIMPLEMENTED with the probe's reason."""

from __future__ import annotations

import asyncio
import logging

from tritonclient.grpc import service_pb2 as pb

from server import __version__
from server.core.cuda_shm import CudaRegion
from server.core.shm_registry import CUDA, Region, SharedMemoryRegistry
from server.errors import Unsupported

log = logging.getLogger("nereid.protocol")


async def register(registry: SharedMemoryRegistry,
                   request: pb.SystemSharedMemoryRegisterRequest) -> pb.SystemSharedMemoryRegisterResponse:
    # open + fstat + mmap touch the file system: off the event loop
    await asyncio.get_running_loop().run_in_executor(
        None, registry.register, request.name, request.key, request.offset, request.byte_size)
    log.info("system shared memory region '%s' registered: key '%s', offset %d, byte_size %d",
             request.name, request.key, request.offset, request.byte_size)
    return pb.SystemSharedMemoryRegisterResponse()


def status(registry: SharedMemoryRegistry,
           request: pb.SystemSharedMemoryStatusRequest) -> pb.SystemSharedMemoryStatusResponse:
    response = pb.SystemSharedMemoryStatusResponse()
    for region in registry.status(request.name):
        assert isinstance(region, Region)
        entry = response.regions[region.name]
        entry.name, entry.key, entry.offset, entry.byte_size = region.name, region.key, region.offset, region.byte_size
    return response


def unregister(registry: SharedMemoryRegistry,
               request: pb.SystemSharedMemoryUnregisterRequest) -> pb.SystemSharedMemoryUnregisterResponse:
    registry.unregister(request.name)
    log.info("system shared memory %s unregistered",
             f"region '{request.name}'" if request.name else "regions (all)")
    return pb.SystemSharedMemoryUnregisterResponse()


async def cuda_register(registry: SharedMemoryRegistry,
                        request: pb.CudaSharedMemoryRegisterRequest) -> pb.CudaSharedMemoryRegisterResponse:
    _require_cuda(registry, "CudaSharedMemoryRegister")
    # cudaIpcOpenMemHandle maps the peer's memory (milliseconds): off the event loop
    await asyncio.get_running_loop().run_in_executor(
        None, registry.register_cuda, request.name, request.raw_handle, request.device_id, request.byte_size)
    log.info("CUDA shared memory region '%s' registered: device %d, byte_size %d",
             request.name, request.device_id, request.byte_size)
    return pb.CudaSharedMemoryRegisterResponse()


def cuda_status(registry: SharedMemoryRegistry,
                request: pb.CudaSharedMemoryStatusRequest) -> pb.CudaSharedMemoryStatusResponse:
    _require_cuda(registry, "CudaSharedMemoryStatus")
    response = pb.CudaSharedMemoryStatusResponse()
    for region in registry.status(request.name, CUDA):
        assert isinstance(region, CudaRegion)
        entry = response.regions[region.name]
        entry.name, entry.device_id, entry.byte_size = region.name, region.device_id, region.byte_size
    return response


def cuda_unregister(registry: SharedMemoryRegistry,
                    request: pb.CudaSharedMemoryUnregisterRequest) -> pb.CudaSharedMemoryUnregisterResponse:
    _require_cuda(registry, "CudaSharedMemoryUnregister")
    registry.unregister(request.name, CUDA)
    log.info("CUDA shared memory %s unregistered", f"region '{request.name}'" if request.name else "regions (all)")
    return pb.CudaSharedMemoryUnregisterResponse()


CUDA_UNSUPPORTED = ("{rpc}: CUDA shared memory is not supported by this server (nereid {version}) on this "
                    "machine: {reason}; use system shared memory (SystemSharedMemoryRegister) or send "
                    "tensors in the request")


def _require_cuda(registry: SharedMemoryRegistry, rpc: str) -> None:
    if isinstance(registry.cuda, str):
        raise Unsupported(CUDA_UNSUPPORTED.format(rpc=rpc, version=__version__, reason=registry.cuda))
