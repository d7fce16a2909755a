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

from server.errors import AlreadyExists, InvalidInput, RegionNotFound

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
        if offset < 0 or offset >= self.byte_size:
            raise InvalidInput(f"Invalid offset for shared memory region: '{self.name}'")
        if byte_size < 0 or offset + byte_size > self.byte_size:
            raise InvalidInput(f"Invalid offset + byte size for shared memory region: '{self.name}'")
        self._check_backed()
        begin = self._start + offset
        return memoryview(self._map)[begin:begin + byte_size]

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


class SharedMemoryRegistry:
    """Registered system shared memory regions by name; every method is thread-safe."""

    def __init__(self, shm_dir: str = SHM_DIR) -> None:
        self._dir = shm_dir
        self._regions: dict[str, Region] = {}
        self._lock = threading.Lock()

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

    def get(self, name: str) -> Region:
        """The region for a request; the caller's reference keeps it usable even if unregistered."""
        region = self._regions.get(name)
        if region is None:
            raise RegionNotFound(f"Unable to find shared memory region: '{name}'")
        return region

    def status(self, name: str = "") -> list[Region]:
        """Every region (empty name) or the one named; NOT_FOUND with Triton's message."""
        with self._lock:
            if not name:
                return list(self._regions.values())
            region = self._regions.get(name)
        if region is None:
            raise RegionNotFound(f"Unable to find system shared memory region: '{name}'")
        return [region]

    def unregister(self, name: str = "") -> None:
        """Forget one region (empty name: all). Unknown names are not an error, as in Triton.
        Mappings are released once no in-flight request holds them."""
        with self._lock:
            if name:
                self._regions.pop(name, None)
            else:
                self._regions.clear()

    def __len__(self) -> int:
        return len(self._regions)
