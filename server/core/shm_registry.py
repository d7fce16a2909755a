"""System shared memory regions that clients register by name (Triton's system shared memory).

A client creates a POSIX shared memory object (`shm_open(key)`, a file in /dev/shm), writes
tensors into it and registers `(name, key, offset, byte_size)`. Requests then name the region
instead of carrying the bytes. This registry is transport-free: the gRPC servicer and any other
frontend (HTTP) call the same `register` / `status` / `unregister` / `view`, with the same errors
and Triton's messages (server/src/shared_memory_manager.cc).

Safety, beyond what Triton checks:
- A key names a POSIX shm object only: one optional leading '/', then a single file name (no
  '/', not '.' or '..', no NUL). It is opened in /dev/shm with O_NOFOLLOW (a symlink planted
  there cannot redirect it) and must be a regular file on /dev/shm's own file system.
- `offset + byte_size` must lie within the object's real size at registration, and is checked
  again (fstat) each time a request uses the region: a client that shrinks the object after
  registering would otherwise make the server touch unbacked pages (SIGBUS).
- Every view is a slice of the region's own mapping, bounds-checked against its byte_size.
- Unregistering while requests use a region is safe: the region leaves the registry at once
  (new requests cannot find it), and its mapping and descriptor stay alive, by reference,
  until the last request holding a view or the region itself lets go.
"""

from __future__ import annotations

import mmap
import os
import stat
import threading
import weakref
from dataclasses import dataclass, field

from server.core.cuda_runtime import CudaRuntime
from server.core.cuda_shm import CudaRegion, check_cuda_args, open_region
from server.core.shm_bounds import check_bounds
from server.errors import AlreadyExists, InvalidInput, RegionNotFound, Unsupported

SHM_DIR = "/dev/shm"
_NAME_MAX = 255


def check_key(key: str) -> str:
    """The file name a shm key names inside /dev/shm; InvalidInput for anything else."""
    name = key[1:] if key.startswith("/") else key
    if (not name or "/" in name or name in (".", "..") or "\x00" in name
            or len(name.encode("utf-8", "surrogateescape")) > _NAME_MAX):
        raise InvalidInput(
            f"Unable to open shared memory region: '{key}': a key must name a POSIX shared memory object "
            "('/name', one path component, as shm_open takes it)")
    return name


@dataclass(eq=False)
class Region:
    """One registered region: a read-write mapping of [offset, offset + byte_size) of the object."""

    name: str
    key: str
    offset: int
    byte_size: int
    _fd: int = field(repr=False)
    _map: mmap.mmap = field(repr=False)
    _start: int = field(repr=False)  # where `offset` falls inside the page-aligned mapping

    def __post_init__(self) -> None:
        # Closed when the region is garbage: after unregistering AND after the last request let go.
        weakref.finalize(self, os.close, self._fd)

    def view(self, offset: int, byte_size: int) -> memoryview:
        """`byte_size` writable bytes at `offset` (relative to the region), bounds-checked
        with Triton's messages; the view keeps the mapping alive while it exists."""
        self.check(offset, byte_size)
        begin = self._start + offset
        return memoryview(self._map)[begin:begin + byte_size]

    def check(self, offset: int, byte_size: int) -> None:
        """The bounds check of `view` (and that the object still backs the region), no view."""
        check_bounds(self.name, self.byte_size, offset, byte_size)
        self._check_backed()

    def _check_backed(self) -> None:
        """The object still holds the whole region (a shrunk object would SIGBUS on access)."""
        try:
            size = os.fstat(self._fd).st_size
        except OSError:
            size = -1
        if size < self.offset + self.byte_size:
            raise InvalidInput(
                f"shared memory region '{self.name}': the object '{self.key}' is now {max(size, 0)} bytes, "
                f"smaller than the registered offset + byte_size ({self.offset + self.byte_size}); "
                "re-register the region")


AnyRegion = Region | CudaRegion
SYSTEM, CUDA = "system", "cuda"


def _kind(region: AnyRegion) -> str:
    return CUDA if isinstance(region, CudaRegion) else SYSTEM


class SharedMemoryRegistry:
    """Registered shared memory regions by name, system and CUDA in one namespace (as Triton's
    manager: a name is taken whatever its kind); every method is thread-safe.

    `cuda` is the CUDA runtime that CUDA regions use, or the reason there is none (a string:
    server/core/cuda_runtime.py `probe`); the default is that reason, so a registry built
    without a probe never touches CUDA."""

    def __init__(self, shm_dir: str = SHM_DIR, cuda: CudaRuntime | str = "CUDA was not probed") -> None:
        self._dir = shm_dir
        self._regions: dict[str, AnyRegion] = {}
        self._lock = threading.Lock()
        self.cuda = cuda

    @property
    def cuda_available(self) -> bool:
        return not isinstance(self.cuda, str)

    def register_cuda(self, name: str, raw_handle: bytes, device_id: int, byte_size: int) -> None:
        """Open a client's cudaIpcMemHandle_t on `device_id` under `name` (Triton's semantics)."""
        if isinstance(self.cuda, str):
            raise Unsupported(f"CUDA shared memory is not available on this server: {self.cuda}")
        check_cuda_args(name, raw_handle, device_id, byte_size)
        with self._lock:
            if name in self._regions:
                raise AlreadyExists(f"shared memory region '{name}' already in manager")
            self._regions[name] = open_region(self.cuda, name, raw_handle, device_id, byte_size)

    def register(self, name: str, key: str, offset: int, byte_size: int) -> None:
        """Map `byte_size` bytes of the object `key` from `offset` under `name` (Triton's semantics)."""
        file_name = check_key(key)
        if offset < 0 or byte_size <= 0:
            raise InvalidInput(f"failed to register shared memory region '{name}': invalid args "
                               f"(offset {offset} must be >= 0 and byte_size {byte_size} > 0)")
        with self._lock:
            if name in self._regions:
                raise AlreadyExists(f"shared memory region '{name}' already in manager")
            region = self._open(name, key, file_name, offset, byte_size)
            self._regions[name] = region

    def _open(self, name: str, key: str, file_name: str, offset: int, byte_size: int) -> Region:
        try:
            fd = os.open(os.path.join(self._dir, file_name), os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:  # absent, a symlink (ELOOP), not ours: a client's mistake, not a server failure
            raise RegionNotFound(f"Unable to open shared memory region: '{key}'") from None
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode) or info.st_dev != os.stat(self._dir).st_dev:
                raise InvalidInput(f"Unable to open shared memory region: '{key}': not a POSIX shared memory "
                                   "object")
            if offset + byte_size > info.st_size:
                raise InvalidInput(f"failed to register shared memory region '{name}': invalid args "
                                   f"(offset {offset} + byte_size {byte_size} exceeds the object's "
                                   f"{info.st_size} bytes)")
            aligned = offset - offset % mmap.ALLOCATIONGRANULARITY
            try:
                mapping = mmap.mmap(fd, offset + byte_size - aligned, mmap.MAP_SHARED,
                                    mmap.PROT_READ | mmap.PROT_WRITE, offset=aligned)
            except (OSError, ValueError) as exc:
                raise InvalidInput(f"failed to register shared memory region '{name}': {exc}") from None
        except BaseException:
            os.close(fd)
            raise
        return Region(name, key, offset, byte_size, fd, mapping, offset - aligned)

    def get(self, name: str) -> AnyRegion:
        """The region for a request; the caller's reference keeps it usable even if unregistered."""
        region = self._regions.get(name)
        if region is None:
            raise RegionNotFound(f"Unable to find shared memory region: '{name}'")
        return region

    def status(self, name: str = "", kind: str = SYSTEM) -> list[AnyRegion]:
        """Every region of `kind` (empty name) or the one named; NOT_FOUND with Triton's messages
        (also for a name registered as the other kind)."""
        with self._lock:
            if not name:
                return [r for r in self._regions.values() if _kind(r) == kind]
            region = self._regions.get(name)
        if region is None:
            raise RegionNotFound(f"Unable to find {'cuda' if kind == CUDA else 'system'} shared memory region: "
                                 f"'{name}'")
        if _kind(region) != kind:
            other, this = ("CUDA", "system") if kind == SYSTEM else ("system", "CUDA")
            raise RegionNotFound(f"The region named '{name}' is registered as {other} shared memory, "
                                 f"not {this} shared memory")
        return [region]

    def unregister(self, name: str = "", kind: str = SYSTEM) -> None:
        """Forget one region of `kind` (empty name: all of that kind). Unknown names, and names
        of the other kind, are not an error, as in Triton. Mappings (and CUDA IPC handles) are
        released once no in-flight request holds them."""
        with self._lock:
            if name:
                region = self._regions.get(name)
                if region is not None and _kind(region) == kind:
                    del self._regions[name]
            else:
                for key in [k for k, r in self._regions.items() if _kind(r) == kind]:
                    del self._regions[key]

    def __len__(self) -> int:
        return len(self._regions)
