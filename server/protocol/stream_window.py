"""The window of one ModelStreamInfer stream: responses made and not yet handed to grpc.

grpc.aio's flow control reaches only the stream's writer (its `yield` waits for the
client's HTTP/2 window). Everything that makes responses for the stream (one task per
request, a decoupled model's many responses) puts them in one queue the writer drains; if
those puts never waited, a client that does not read would make the server hold every
response. Here they wait: `put` returns once the queue holds fewer than `MESSAGES`
responses and under `BYTES` bytes (one response of any size is always let in), and the
stream's reader waits for `room` before reading the next request, so HTTP/2 holds the
client back as it does for a unary call.

The writer must keep draining whatever else it waits for (shutdown, the end of the tasks):
a put waits only for the writer's `taken`.

Waiters are served in arrival order; each is given its place (counted) when woken, so a
window never holds more than its bound, and a waiter cancelled after being woken gives its
place back.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any

from server.aio import Mailbox
from server.core.decoupled import WINDOW_BYTES, WINDOW_RESPONSES

# The same bound as one decoupled request's untaken responses (server/core/decoupled.py): a
# client that reads keeps the queue near empty (the writer takes each as soon as grpc accepts
# the previous one), so it costs a reader nothing, and a batch of up to 64 requests answered
# at once still goes out without waiting; the byte bound keeps large responses (a decoupled
# model's 1 MB tensors) to a few per stream.
MESSAGES = WINDOW_RESPONSES
BYTES = WINDOW_BYTES


class StreamWindow:
    """Puts into `queue` (the writer's) bounded by what the writer has not taken yet."""

    def __init__(self, queue: Mailbox[Any], messages: int = MESSAGES, nbytes: int = BYTES) -> None:
        self.queue = queue
        self._messages = messages
        self._bytes = nbytes
        self.held = 0
        self.held_bytes = 0
        self._waiters: deque[tuple[asyncio.Future[None], int]] = deque()

    def _fits(self, size: int) -> bool:
        return self.held < self._messages and (self.held == 0 or self.held_bytes + size <= self._bytes)

    async def put(self, item: bytes) -> None:
        """Queue `item` for the writer once the window has room for it."""
        size = len(item)
        if self._waiters or not self._fits(size):
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            entry = (waiter, size)
            self._waiters.append(entry)
            try:
                await waiter  # `_wake` counted this item in before waking us
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():
                    self._release(size)  # woken, then cancelled: give the place back
                else:
                    self._forget(entry)
                raise
        else:
            self.held += 1
            self.held_bytes += size
        self.queue.put_nowait(item)

    async def room(self) -> None:
        """Wait until the window is not full (the reader waits here before reading a request)."""
        if not self._waiters and self._fits(0):
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (waiter, -1)  # wakes without taking a place
        self._waiters.append(entry)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.cancelled() or not waiter.done():
                self._forget(entry)
            raise

    def _forget(self, entry: tuple[asyncio.Future[None], int]) -> None:
        """A waiter left before its turn: take it out at once (a stale entry would make later
        puts queue behind it with nothing to wake them), and let those behind it go if they fit."""
        try:
            self._waiters.remove(entry)
        except ValueError:
            pass
        self._wake()

    def taken(self, item: bytes) -> None:
        """The writer took `item` off the queue."""
        self._release(len(item))

    def _release(self, size: int) -> None:
        self.held -= 1
        self.held_bytes -= size
        self._wake()

    def _wake(self) -> None:
        while self._waiters:
            waiter, size = self._waiters[0]
            if waiter.done():  # cancelled while waiting
                self._waiters.popleft()
                continue
            if not self._fits(max(size, 0)):
                return
            self._waiters.popleft()
            if size >= 0:
                self.held += 1
                self.held_bytes += size
            waiter.set_result(None)
