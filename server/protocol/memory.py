"""Give memory that a large request's receipt left behind back to the operating system.

grpcio receives a message as many small slices, copies each into a `bytes` and joins
them (grpc/_cython/_cygrpc/operation.pyx.pxi, ReceiveMessageOperation). The slices'
copies are freed once the join is done, but glibc keeps small freed blocks in its
heap: after a 300 MB request the process holds about 300 MB more than it uses, and the
response built next comes on top. Sending a large response leaves as much behind in the
arenas of grpc's own threads. `malloc_trim(0)` returns free heap pages to the OS
(it madvises them away, the middle of the heap included). It runs on a worker
thread, only after messages of TRIM_AFTER_BYTES or more, and is a no-op where glibc is
not the allocator.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
from collections.abc import Callable

log = logging.getLogger("nereid.protocol")

TRIM_AFTER_BYTES = 32 * 1024 * 1024


def _malloc_trim() -> Callable[[int], int] | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim  # type: ignore[no-any-return]


_TRIM = _malloc_trim()


async def release_freed_memory() -> None:
    """Return the allocator's free pages to the OS, off the event loop (ctypes drops the GIL)."""
    if _TRIM is not None:
        await asyncio.get_running_loop().run_in_executor(None, _TRIM, 0)


def trim_later(_: object = None) -> None:
    """For `context.add_done_callback`: trim once the response has been sent."""
    if _TRIM is not None:
        try:
            loop = asyncio.get_running_loop()
            loop.call_later(0.5, loop.run_in_executor, None, _TRIM, 0)
        except RuntimeError:  # no running loop (shutdown): nothing left to do
            pass
