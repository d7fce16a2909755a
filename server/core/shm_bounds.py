"""The bounds check every shared memory tensor passes, system or CUDA (Triton's messages,
server/src/shared_memory_manager.cc `GetMemoryInfo`)."""

from __future__ import annotations

from server.errors import InvalidInput


def check_bounds(name: str, region_size: int, offset: int, byte_size: int) -> None:
    """`[offset, offset + byte_size)` lies within a region of `region_size` bytes."""
    if offset < 0 or offset >= region_size:
        raise InvalidInput(f"Invalid offset for shared memory region: '{name}'")
    if byte_size < 0 or offset + byte_size > region_size:
        raise InvalidInput(f"Invalid offset + byte size for shared memory region: '{name}'")
