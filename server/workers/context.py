"""What the owner's method handlers see of a call a frontend forwarded.

The servicer and the health service are written against grpc.aio's servicer context
(`read`, `abort`, `set_code`, `invocation_metadata`, `peer`, `add_done_callback`, `write`
...). This class offers that same surface for a call that arrived over a link, so the
handlers run unchanged in both modes and there is one request path, not two.
"""

from __future__ import annotations

import asyncio
import marshal
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from server.aio import Mailbox
from server.workers.link import Credit

_EOF = grpc.aio.EOF


class ForwardedContext:
    """A grpc.aio-like servicer context for one forwarded call."""

    __slots__ = ("_meta", "_fields", "_arrived", "_messages", "_first", "_write", "_credit", "_callbacks", "code",
                 "details", "finished")

    def __init__(self, meta: bytes, messages: Mailbox[Any] | None, first: bytes | memoryview | None,
                 write: Callable[[Any], Awaitable[None]], credit: Credit | None = None) -> None:
        # marshal((peer, metadata, auth, seconds left)), decoded on first use: a plain inference
        # never asks (only tracing, rate limits and rollout keys read it), and it is per call.
        self._meta = meta
        self._fields: tuple[Any, ...] | None = None
        self._arrived = time.monotonic()  # the seconds left were measured as the frontend sent the call
        self._messages = messages  # client-streaming calls: bodies, then _EOF
        self._first = first  # the one body of a unary or stream-unary call
        self._write = write  # sends a response and waits for credit when the window is full
        self._credit = credit  # client-streaming calls: returns the frontend credit for what read() took
        self._callbacks: list[Callable[[Any], None]] = []
        self.code: grpc.StatusCode | None = None
        self.details = ""
        self.finished = False

    # -- what the handlers call --

    async def read(self) -> Any:
        """The next request message, then grpc.aio.EOF (stream-unary and stream-stream calls)."""
        if self._first is not None:
            body, self._first = self._first, None
            return body
        if self._messages is None:
            return _EOF
        body = await self._messages.get()
        if body is not _EOF:
            self._credit.took(len(body))  # type: ignore[union-attr]
        return body

    async def abort(self, code: grpc.StatusCode, details: str = "", trailing_metadata: Any = ()) -> None:
        self.code, self.details = code, details
        raise grpc.aio.AbortError()

    def set_code(self, code: grpc.StatusCode) -> None:
        self.code = code

    def set_details(self, details: str) -> None:
        self.details = details

    def invocation_metadata(self) -> tuple[tuple[str, Any], ...]:
        return self._decoded()[1]  # type: ignore[no-any-return]

    def peer(self) -> str:
        return self._decoded()[0]  # type: ignore[no-any-return]

    def auth_context(self) -> dict[str, list[bytes]]:
        return self._decoded()[2] or {}

    def time_remaining(self) -> float | None:
        remaining = self._decoded()[3]
        return None if remaining is None else max(0.0, self._arrived + remaining - time.monotonic())

    def _decoded(self) -> tuple[Any, ...]:
        if self._fields is None:
            self._fields = marshal.loads(self._meta)
        return self._fields

    def add_done_callback(self, callback: Callable[[Any], None]) -> None:
        self._callbacks.append(callback)

    async def write(self, message: bytes) -> None:
        """A response message of a server-streaming handler that writes through its context;
        waits, as grpcio's does, while the receiving end has not taken enough of the earlier ones."""
        await self._write(message)

    def set_trailing_metadata(self, metadata: Any) -> None:
        pass  # not forwarded: no handler of ours sets any

    def send_initial_metadata(self, metadata: Any) -> Awaitable[None]:
        return asyncio.sleep(0)

    def cancelled(self) -> bool:
        return False

    def done(self) -> bool:
        return self.finished

    # -- the owner --

    def finish(self) -> None:
        """The call has ended: run the callbacks the handlers added (traces, memory trims)."""
        self.finished = True
        callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            callback(self)
