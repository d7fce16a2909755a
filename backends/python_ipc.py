"""How the server and a Python model's stub process talk: small messages over a Unix
socket, tensor bytes through shared memory.

Each side owns one *arena*: an anonymous shared-memory file (memfd) mapped into both
processes. A side writes the tensors it sends into its own arena and sends only their
layout (name, dtype, shape, offset) in a small pickled message; the other side makes
numpy arrays over the same memory. Arrays are never pickled. When a message needs more
room the owner makes a bigger arena and passes its file descriptor along with that
message (SCM_RIGHTS), so neither side ever touches a file name or a resource tracker.

Only stdlib and numpy: the stub imports this module, and nothing here imports `server`.
"""

from __future__ import annotations

import array
import collections
import mmap
import os
import pickle
import socket
import threading
from typing import Any

import numpy as np

_ALIGN = 64
_MIN_ARENA = 1 << 20
_HEADER = 4  # little-endian message length; the top bit says a descriptor comes with it
_FD_FLAG = 1 << 31
_SIZE_MASK = _FD_FLAG - 1
_INT = array.array("i", [0]).itemsize
_FDS = socket.CMSG_SPACE(_INT)
_RECV_BUFFER = 1 << 16

# (name, dtype string or "BYTES", shape, offset, nbytes)
TensorMeta = tuple[str, str, tuple[int, ...], int, int]


class ChannelClosed(EOFError):
    """The other process closed its end (it exited or crashed)."""


class Channel:
    """Length-prefixed pickled messages, each optionally carrying one file descriptor.

    A message usually arrives whole in one `recvmsg_into` (one system call) into a
    buffer kept between calls; only longer ones take more reads. Several messages may
    be on their way at once (a stub's business-logic calls answered while it still
    runs its model), so bytes read past one message are kept for the next, and
    `buffered()` says whether a whole one is already here (the socket then need not be
    readable). A message that carries a descriptor says so in its header's top bit;
    descriptors queue in arrival order, and each arrives no later than the first byte
    of its message (it rides on that message's first segment).
    Sends are serialised, so two threads may answer on one channel.
    """

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._buf = bytearray(_RECV_BUFFER)
        self._view = memoryview(self._buf)
        self._lo = self._hi = 0  # unread bytes: _buf[_lo:_hi]
        self._fds: collections.deque[int] = collections.deque()
        self._send_lock = threading.Lock()

    def send(self, message: Any, fd: int | None = None) -> None:
        payload = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        word = len(payload) if fd is None else len(payload) | _FD_FLAG
        data = word.to_bytes(_HEADER, "little") + payload
        lock = self._send_lock
        lock.acquire()  # cheaper than `with` on the per-request path
        try:
            if fd is None:
                self.sock.sendall(data)
                return
            ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))]
            sent = self.sock.sendmsg([data], ancillary)
            if sent < len(data):
                self.sock.sendall(memoryview(data)[sent:])
        finally:
            lock.release()

    def try_send(self, message: Any) -> bool:
        """Send `message` only if no send is under way (False, and nothing sent, if one is): for
        code that may run in the middle of another send on the same thread (a `__del__`)."""
        payload = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        lock = self._send_lock
        if not lock.acquire(blocking=False):
            return False
        try:
            self.sock.sendall(len(payload).to_bytes(_HEADER, "little") + payload)
        finally:
            lock.release()
        return True

    def buffered(self) -> bool:
        """Whether a whole message has already been read off the socket (`recv` will not block)."""
        have = self._hi - self._lo
        if have < _HEADER:
            return False
        word = int.from_bytes(self._view[self._lo:self._lo + _HEADER], "little")
        return have >= _HEADER + (word & _SIZE_MASK)

    def recv(self) -> tuple[Any, int | None]:
        """The next message and the descriptor that came with it (or None)."""
        lo = self._lo
        if lo == self._hi:  # nothing read ahead (the usual case): one system call into an empty buffer
            got, ancdata, _, _ = self.sock.recvmsg_into([self._view], _FDS)
            if got == 0:
                raise ChannelClosed("the other process closed the channel")
            if ancdata:
                self._keep_fds(ancdata)
            lo, self._lo, self._hi = 0, 0, got
        while self._hi - lo < _HEADER:
            self._room(_HEADER)
            self._fill()
            lo = self._lo
        word = int.from_bytes(self._buf[lo:lo + _HEADER], "little")
        size = _HEADER + (word & _SIZE_MASK)
        if size <= len(self._buf):
            if self._hi - lo < size:
                self._room(size)
                while self._hi - self._lo < size:
                    self._fill()
                lo = self._lo
            self._lo = lo + size
            message = pickle.loads(self._view[lo + _HEADER:lo + size])
        else:  # longer than the buffer: read the rest of it (and nothing more) into its own
            whole = bytearray(size)
            got = self._hi - lo
            whole[:got] = self._view[lo:self._hi]
            self._lo = self._hi = 0
            view = memoryview(whole)
            while got < size:
                got += self._more(view[got:])
            message = pickle.loads(view[_HEADER:])
        return message, (self._fds.popleft() if word & _FD_FLAG else None)

    def _room(self, size: int) -> None:
        """Make room for a message of `size` bytes starting at the unread bytes."""
        if self._lo + size > len(self._buf):
            have = self._hi - self._lo
            self._buf[:have] = self._buf[self._lo:self._hi]
            self._lo, self._hi = 0, have

    def _fill(self) -> None:
        got, ancdata, _, _ = self.sock.recvmsg_into([self._view[self._hi:]], _FDS)
        if got == 0:
            raise ChannelClosed("the other process closed the channel")
        if ancdata:
            self._keep_fds(ancdata)
        self._hi += got

    def _keep_fds(self, ancdata: list[tuple[int, int, bytes]]) -> None:
        for level, kind, data in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                self._fds.append(array.array("i", data[:_INT])[0])

    def _more(self, into: memoryview) -> int:
        n = self.sock.recv_into(into)
        if n == 0:
            raise ChannelClosed("the other process closed the channel mid-message")
        return n

    def close(self) -> None:
        self.sock.close()
        for fd in self._fds:
            os.close(fd)
        self._fds.clear()


def _aligned(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


class Arena:
    """Shared memory this process writes into (an owner) or reads from (a mirror)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.size = 0
        self.map: mmap.mmap | None = None
        self._fd: int | None = None

    def ensure(self, needed: int) -> int | None:
        """Owner side: make room for `needed` bytes. Returns the new arena's fd to send, or None."""
        if needed <= self.size:
            return None
        size = max(_MIN_ARENA, 1 << (needed - 1).bit_length())
        fd = os.memfd_create(self.name, os.MFD_CLOEXEC)
        os.ftruncate(fd, size)
        self._replace(fd, size)
        return fd

    def attach(self, fd: int, size: int) -> None:
        """Mirror side: map the owner's new arena (the old mapping is dropped)."""
        self._replace(fd, size)

    def _replace(self, fd: int, size: int) -> None:
        old_map, old_fd = self.map, self._fd
        self.map = mmap.mmap(fd, size)
        self.size, self._fd = size, fd
        if old_fd is not None:
            os.close(old_fd)
        if old_map is not None:
            try:
                old_map.close()
            except BufferError:  # a model still holds arrays over it: let them keep it alive
                pass

    def close(self) -> None:
        if self.map is not None:
            try:
                self.map.close()
            except BufferError:
                pass
            self.map = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _flat_bytes(arr: np.ndarray) -> list[bytes]:
    return [x if isinstance(x, bytes) else str(x).encode("utf-8") for x in arr.reshape(-1)]


def layout(tensors: list[tuple[str, np.ndarray]]) -> tuple[list[tuple[str, np.ndarray, Any]], int]:
    """Plan where each tensor goes; returns (plan, bytes needed). BYTES are encoded here."""
    plan: list[tuple[str, np.ndarray, Any]] = []
    offset = 0
    for name, arr in tensors:
        if arr.dtype.kind in ("O", "S", "U"):
            items = _flat_bytes(arr)
            lengths = np.fromiter((len(x) for x in items), dtype=np.int64, count=len(items))
            blob = b"".join(items)
            size = lengths.nbytes + len(blob)
            plan.append((name, arr, (lengths, blob, offset)))
        else:
            size = arr.nbytes
            plan.append((name, arr, offset))
        offset = _aligned(offset + size)
    return plan, offset


def write(arena: Arena, plan: list[tuple[str, np.ndarray, Any]], base: int = 0) -> list[TensorMeta]:
    """Copy planned tensors into the arena at `base`; returns their metas."""
    metas: list[TensorMeta] = []
    buf = arena.map  # None until something with bytes was sent: empty tensors need no arena
    for name, arr, where in plan:
        if isinstance(where, tuple):
            lengths, blob, offset = where
            start = base + offset
            n = lengths.nbytes
            if n == 0:  # no elements
                metas.append((name, "BYTES", tuple(arr.shape), start, 0))
                continue
            assert buf is not None
            buf[start:start + n] = lengths.tobytes()
            buf[start + n:start + n + len(blob)] = blob
            metas.append((name, "BYTES", tuple(arr.shape), start, n + len(blob)))
        elif arr.nbytes == 0:
            metas.append((name, arr.dtype.str, tuple(arr.shape), base + where, 0))
        else:
            assert buf is not None
            start = base + where
            if arr.flags.c_contiguous:  # one memcpy, without making an array over the map
                buf[start:start + arr.nbytes] = arr.data.cast("B")
            else:
                np.copyto(np.ndarray(arr.shape, dtype=arr.dtype, buffer=buf, offset=start), arr, casting="no")
            metas.append((name, arr.dtype.str, arr.shape, start, arr.nbytes))
    return metas


def read(arena: Arena, metas: list[TensorMeta], copy: bool) -> list[tuple[str, np.ndarray]]:
    """Arrays for `metas`: views into the arena, or copies when `copy` (the arena is reused).

    Empty tensors (and no tensors at all: a request without inputs to a model whose inputs are
    all optional) are made without touching the arena, which does not exist until some message
    carried bytes."""
    buf = arena.map
    out: list[tuple[str, np.ndarray]] = []
    for name, dtype, shape, start, nbytes in metas:
        if nbytes == 0:
            out.append((name, np.empty(shape, dtype=np.object_ if dtype == "BYTES" else np.dtype(dtype))))
            continue
        assert buf is not None
        if dtype == "BYTES":
            count = int(np.prod(shape, dtype=np.int64))
            lengths = np.frombuffer(buf, dtype=np.int64, count=count, offset=start)
            blob = buf[start + lengths.nbytes:start + nbytes]
            ends = np.cumsum(lengths).tolist()
            starts = [0, *ends[:-1]]
            arr = np.empty(count, dtype=np.object_)
            arr[:] = [blob[s:e] for s, e in zip(starts, ends, strict=True)]
            out.append((name, arr.reshape(shape)))
            continue
        view = np.ndarray(shape, dtype=np.dtype(dtype), buffer=buf, offset=start)
        out.append((name, view.copy() if copy else view))
    return out
