"""The shared memory RPCs of GRPCInferenceService, over the transport-free registry
(server/core/shm_registry.py). System shared memory is implemented; CUDA shared memory is not,
and says why."""

from __future__ import annotations

import asyncio
import logging

from tritonclient.grpc import service_pb2 as pb

from server import __version__
from server.core.shm_registry import SharedMemoryRegistry
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
        entry = response.regions[region.name]
        entry.name, entry.key, entry.offset, entry.byte_size = region.name, region.key, region.offset, region.byte_size
    return response


def unregister(registry: SharedMemoryRegistry,
               request: pb.SystemSharedMemoryUnregisterRequest) -> pb.SystemSharedMemoryUnregisterResponse:
    registry.unregister(request.name)
    log.info("system shared memory %s unregistered",
             f"region '{request.name}'" if request.name else "regions (all)")
    return pb.SystemSharedMemoryUnregisterResponse()


CUDA_UNSUPPORTED = ("{rpc}: CUDA shared memory is not supported by this server (nereid {version}): it is built "
                    "without CUDA IPC support, and where a GPU exists it is not implemented yet either; use "
                    "system shared memory (SystemSharedMemoryRegister) or send tensors in the request")


def cuda_unsupported(rpc: str) -> Unsupported:
    return Unsupported(CUDA_UNSUPPORTED.format(rpc=rpc, version=__version__))
