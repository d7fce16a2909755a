"""The frame format between a frontend and the owner, and the stream both ends read and write.

A frame is a 13-byte header (payload length u32, kind u8, call id u64, little endian) and
its payload. Calls are multiplexed by id over one socket pair per frontend.

Why a socket pair with batched writes rather than shared memory: docs/ARCHITECTURE.md
measured the hand-off, and at batch 1 its cost is the sleep and wake-up of two processes,
whatever carries the bytes. Both ends therefore write everything one event-loop pass
produced with one system call (`LinkProtocol.send` queues, the next pass flushes), and
read everything that arrived with one: under load many calls share each wake-up.
Large payloads are read straight into a buffer of their own size and handed on as a
memoryview of it (the socket's copy is the only one on this side); small ones are cut out of
a shared receive buffer as bytes.

Flow control: a streamed call's messages are credited per call in both directions (the
owner's SEND frames, the frontend's MESSAGE frames). The producer may have at most
`WINDOW_MESSAGES` messages or `WINDOW_BYTES` bytes sent and not yet consumed (`Window`);
the receiver counts what its consumer took (grpc accepted the response; the handler read
the request) and returns it in one CREDIT frame per half window (`Credit`). So a client
that does not read stops the owner's stream loop, and a handler that does not read (or an
owner that is stuck) stops the frontend reading the client's stream (HTTP/2 flow control
then holds the client), as grpc does in one process. Unary calls carry no credit. The link
as a whole is then bounded by the calls in flight (`--max-inflight-requests` per frontend)
times a window, so the transport's own pause_writing is not used.
"""

from __future__ import annotations

import asyncio
import logging
import marshal
import struct
from collections.abc import Callable
from typing import Any

log = logging.getLogger("nereid.workers")

HEADER = struct.Struct("<IBQ")
CREDIT_HEAD = struct.Struct("<II")  # messages, bytes
CALL_HEAD = struct.Struct("<HI")  # method index, metadata length
STATUS_HEAD = struct.Struct("<H")  # status code

# Frontend -> owner.
CALL = 1  # method index, metadata (marshal), first request body (unary, stream-unary, unary-stream)
OPEN = 2  # method index, metadata: a client-streaming call whose messages follow as MESSAGE frames
MESSAGE = 3  # one request message of a stream
HALF_CLOSE = 4  # the client sent its last message
CANCEL = 5  # the client went away or its deadline passed
READY = 6  # control (call id 0): the frontend is listening; payload: marshal((index, pid))
PONG = 7  # control (call id 0): the answer to a PING (the frontend's event loop turns)
CREDIT_SENDS = 8  # CREDIT_HEAD: SEND frames of this call that grpc accepted since the last one
# Owner -> frontend.
REPLY = 10  # the unary response; ends the call with OK
SEND = 11  # one response message of a stream
STATUS = 12  # ends the call: code (u16; 0 = OK) and details (UTF-8)
STOP = 13  # control (call id 0): stop serving; payload: marshal(grace seconds)
PING = 14  # control (call id 0): answer with PONG (a hung frontend is replaced: pool.py)
CREDIT_MESSAGES = 15  # CREDIT_HEAD: MESSAGE frames of this call its handler read since the last one

# Per call and direction: what a producer may have sent that its receiver's consumer has not taken.
WINDOW_MESSAGES = 64
WINDOW_BYTES = 4 * 1024 * 1024

_LARGE = 256 * 1024  # payloads at least this large get a buffer of their own
_BUFFER = 512 * 1024


def frame(kind: int, call_id: int, *parts: bytes | memoryview) -> list[bytes | memoryview]:
    """A frame as a list of buffers for `LinkProtocol.send` (the payload is not copied).

    Every reply, status and streamed response passes here: one part (the common case) is
    measured without a generator, which halves this function's cost (~400 -> ~190 ns)."""
    size = len(parts[0]) if len(parts) == 1 else sum(map(len, parts))
    return [HEADER.pack(size, kind, call_id), *parts]


def call_payload(method: int, meta: Any) -> bytes:
    """The head of a CALL or OPEN payload; the request body follows it."""
    packed = marshal.dumps(meta)
    return CALL_HEAD.pack(method, len(packed)) + packed


def split_call(payload: bytes | memoryview) -> tuple[int, bytes, bytes | memoryview]:
    """(method index, metadata still marshalled, body) of a CALL or OPEN payload (a large body
    stays a view). The metadata is decoded when a handler asks for it (context.py): most never do."""
    method, size = CALL_HEAD.unpack_from(payload)
    start = CALL_HEAD.size
    return method, bytes(payload[start:start + size]), payload[start + size:]


def status_payload(code: int, details: str) -> bytes:
    return STATUS_HEAD.pack(code) + details.encode("utf-8", "replace")


def split_status(payload: bytes) -> tuple[int, str]:
    (code,) = STATUS_HEAD.unpack_from(payload)
    return code, payload[STATUS_HEAD.size:].decode("utf-8", "replace")


class Window:
    """The producer's side of one call's flow: messages and bytes sent and not yet credited."""

    __slots__ = ("messages", "size", "_waiter")

    def __init__(self) -> None:
        self.messages = 0
        self.size = 0
        self._waiter: asyncio.Future[None] | None = None

    def sent(self, size: int) -> bool:
        """Count one message sent; True if the window is now full (await `room()` before the next)."""
        self.messages += 1
        self.size += size
        return self.messages >= WINDOW_MESSAGES or self.size >= WINDOW_BYTES

    async def room(self) -> None:
        """Wait until the receiver has credited enough to send again (cancelled with the call)."""
        while self.messages >= WINDOW_MESSAGES or self.size >= WINDOW_BYTES:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    def credit(self, payload: bytes | memoryview) -> None:
        """A CREDIT frame arrived: what the receiver's consumer took."""
        messages, size = CREDIT_HEAD.unpack_from(payload)
        self.messages -= messages
        self.size -= size
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


class Credit:
    """The receiver's side of one call's flow: what the consumer took, returned every half window."""

    __slots__ = ("_send", "_kind", "_call_id", "_messages", "_size")

    def __init__(self, send: Callable[[list[bytes | memoryview]], None], kind: int, call_id: int) -> None:
        self._send = send
        self._kind = kind
        self._call_id = call_id
        self._messages = 0
        self._size = 0

    def took(self, size: int) -> None:
        self._messages += 1
        self._size += size
        if self._messages >= WINDOW_MESSAGES // 2 or self._size >= WINDOW_BYTES // 2:
            self._send(frame(self._kind, self._call_id, CREDIT_HEAD.pack(self._messages, self._size)))
            self._messages = self._size = 0


# (kind, call id, payload): bytes, or a memoryview for payloads of _LARGE bytes and more.
FrameHandler = Callable[[int, int, Any], None]


class LinkProtocol(asyncio.BufferedProtocol):
    """One end of a link: parses frames into `on_frame(kind, call_id, payload)` and batches writes."""

    def __init__(self, on_frame: FrameHandler, on_lost: Callable[[Exception | None], None]) -> None:
        self._on_frame = on_frame
        self._on_lost = on_lost
        self.transport: asyncio.Transport | None = None
        self._buffer = bytearray(_BUFFER)
        self._view = memoryview(self._buffer)
        self._filled = 0  # bytes of _buffer holding data not yet parsed
        self._large: bytearray | None = None  # the payload being read into a buffer of its own
        self._large_at = 0
        self._large_head: tuple[int, int] = (0, 0)  # its (kind, call id)
        self._pending: list[bytes | memoryview] = []
        self._reading = False  # in buffer_updated: what its frames send goes out as it returns
        self._loop = asyncio.get_running_loop()
        self.closed = False

    # -- writing --

    def send(self, parts: list[bytes | memoryview]) -> None:
        """Queue a frame; everything queued in one event-loop pass goes out in one write.

        Frames sent while a read is handled (the replies of calls that ended at once, as most
        unary calls do: owner.py) go out when the read's frames have all been handled, without
        waiting for the next pass: one write per read, and one loop pass less."""
        if self.closed:
            return
        if not self._pending and not self._reading:
            self._loop.call_soon(self._flush)
        self._pending += parts

    def _flush(self) -> None:
        pending, self._pending = self._pending, []
        if pending and self.transport is not None and not self.transport.is_closing():
            self.transport.writelines(pending)

    # -- reading --

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._large is not None:
            return memoryview(self._large)[self._large_at:]
        if self._filled == len(self._buffer):  # cannot happen (frames under _LARGE fit): be safe
            bigger = bytearray(2 * len(self._buffer))
            bigger[:self._filled] = self._buffer
            self._buffer, self._view = bigger, memoryview(bigger)
        return self._view[self._filled:]

    def buffer_updated(self, nbytes: int) -> None:
        self._reading = True
        try:
            if self._large is not None:
                self._large_at += nbytes
                if self._large_at == len(self._large):
                    self._deliver_large()
            else:
                self._filled += nbytes
                self._parse()
        finally:  # even if a frame's handler failed: nothing queued may wait for a flush never scheduled
            self._reading = False
            if self._pending:
                self._flush()

    def _deliver_large(self) -> None:
        """Hand on the completed large payload as a view of its buffer (no copy: the request
        path reads buffers)."""
        large, self._large = self._large, None
        if large is not None:
            kind, call_id = self._large_head
            self._on_frame(kind, call_id, memoryview(large))

    def _parse(self) -> None:
        buffer, view, filled = self._buffer, self._view, self._filled
        pos = 0
        head = HEADER.size
        while filled - pos >= head:
            size, kind, call_id = HEADER.unpack_from(buffer, pos)
            start = pos + head
            if size >= _LARGE:  # read the rest straight into its own buffer
                have = min(filled - start, size)
                self._large = bytearray(size)
                self._large[:have] = view[start:start + have]
                self._large_at, self._large_head = have, (kind, call_id)
                pos = start + have
                if have == size:
                    self._deliver_large()
                    continue
                break
            if filled - start < size:
                break
            self._on_frame(kind, call_id, bytes(view[start:start + size]))
            pos = start + size
        if pos:
            rest = filled - pos
            if rest:
                buffer[:rest] = bytes(view[pos:filled])  # a copy: the ranges may overlap
            self._filled = rest
            if len(buffer) > _BUFFER and not rest:
                self._buffer = bytearray(_BUFFER)
                self._view = memoryview(self._buffer)

    def eof_received(self) -> bool:
        return False  # close our end too

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.transport = None
        self._on_lost(exc)
