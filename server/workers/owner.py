"""The owner's end of a frontend's link: run each forwarded call against the owner's handlers.

The handlers are the very ones a single-process server registers with grpc.aio (the
servicer's and the health service's), called the way grpcio calls them, with a
`ForwardedContext`. A call's task is cancelled when its client goes away (CANCEL) or
when the frontend's link closes (the frontend died: its clients have lost their
connections already).
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import marshal
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any

import grpc

from server import aio
from server.aio import Mailbox
from server.workers import link
from server.workers.context import ForwardedContext
from server.workers.link import LinkProtocol, frame
from server.workers.methods import method_table

log = logging.getLogger("nereid.workers")

_EOF = grpc.aio.EOF


def handler_table(services: dict[str, dict[str, grpc.RpcMethodHandler]]) -> list[grpc.RpcMethodHandler | None]:
    """The owner's handler for each method number of `methods.method_table()`."""
    return [services.get(m.service, {}).get(m.name) for m in method_table()]


class OwnerLink:
    """One frontend's link, seen from the owner."""

    def __init__(self, index: int, handlers: list[grpc.RpcMethodHandler | None],
                 on_ready: Callable[[int, int], None], on_lost: Callable[[int], None], calls: list[int]) -> None:
        self.index = index
        self._calls = calls  # calls[index]: this frontend's forwarded calls, shared with the pool
        self._handlers = handlers
        self._on_ready = on_ready
        self._on_lost = on_lost
        self._tasks: dict[int, asyncio.Task[None]] = {}
        self._streams: dict[int, Mailbox[Any]] = {}
        self._windows: dict[int, link.Window] = {}  # server-streaming calls: their SEND frames' credit
        self.protocol = LinkProtocol(self._frame, self._lost)
        self._loop = asyncio.get_running_loop()
        self.answered = time.monotonic()  # when the frontend last answered a PING (or started)

    def ping(self) -> None:
        self.protocol.send(frame(link.PING, 0))

    def stop(self, grace: float) -> None:
        """Tell the frontend to stop listening, letting its calls finish for up to `grace` seconds."""
        self.protocol.send(frame(link.STOP, 0, marshal.dumps(float(grace))))

    def _frame(self, kind: int, call_id: int, payload: bytes | memoryview) -> None:
        if kind == link.CALL or kind == link.OPEN:
            method, meta, body = link.split_call(payload)
            self._calls[self.index] += 1
            handler = self._handlers[method] if method < len(self._handlers) else None
            if handler is None:
                self._status(call_id, grpc.StatusCode.UNIMPLEMENTED, "method not found")
                return
            messages: Mailbox[Any] | None = None
            credit: link.Credit | None = None
            if kind == link.OPEN:
                messages = self._streams[call_id] = Mailbox()
                credit = link.Credit(self.protocol.send, link.CREDIT_MESSAGES, call_id)
            streaming = handler.unary_stream is not None or handler.stream_stream is not None
            write = self._writer(call_id, handler) if streaming else _no_stream
            context = ForwardedContext(meta, messages, body if kind == link.CALL else None, write, credit)
            run = self._run(call_id, handler, context, body, write)
            if streaming or kind == link.OPEN:
                self._task(call_id, context, run)
            else:
                self._eager(call_id, context, run)
        elif kind == link.CREDIT_SENDS:
            window = self._windows.get(call_id)
            if window is not None:
                window.credit(payload)
        elif kind == link.MESSAGE:
            queue = self._streams.get(call_id)
            if queue is not None:
                queue.put_nowait(payload)
        elif kind == link.HALF_CLOSE:
            queue = self._streams.get(call_id)
            if queue is not None:
                queue.put_nowait(_EOF)
        elif kind == link.CANCEL:
            task = self._tasks.get(call_id)
            if task is not None:
                task.cancel()
        elif kind == link.PONG:
            self.answered = time.monotonic()
        elif kind == link.READY:
            index, pid = marshal.loads(payload)
            self.answered = time.monotonic()
            self._on_ready(index, pid)
        else:
            log.error("worker %d sent an unknown frame kind %d; ignored", self.index, kind)

    def _task(self, call_id: int, context: ForwardedContext, run: Coroutine[Any, Any, None]) -> None:
        self._track(call_id, context, self._loop.create_task(run))

    def _track(self, call_id: int, context: ForwardedContext, task: asyncio.Task[Any]) -> None:
        """Keep the call's task (CANCEL and a lost link cancel it); forget it when it ends."""
        self._tasks[call_id] = task
        task.add_done_callback(functools.partial(self._ended, call_id, context))

    def _eager(self, call_id: int, context: ForwardedContext, run: Coroutine[Any, Any, None]) -> None:
        """Run a unary-response call's first step now (server/aio.py `start`): most calls (an
        inference run inline, a metadata query) end in it, and then cost no Task, no done
        callback and no extra event-loop pass. A call that waits continues in a Task,
        cancellable as any other."""
        task = aio.start(run, self._loop)
        if task is not None:
            self._track(call_id, context, task)

    def _writer(self, call_id: int, handler: grpc.RpcMethodHandler) -> Callable[[Any], Awaitable[None]]:
        """How a server-streaming call sends a response: a SEND frame, then wait for the
        frontend's credit if the window is full (as grpcio's write waits for the client)."""
        serializer = handler.response_serializer
        window = self._windows[call_id] = link.Window()
        send = self.protocol.send

        async def write(message: Any) -> None:
            body = message if serializer is None else serializer(message)
            send(frame(link.SEND, call_id, body))
            if window.sent(len(body)):
                await window.room()

        return write

    def _status(self, call_id: int, code: grpc.StatusCode, details: str) -> None:
        self.protocol.send(frame(link.STATUS, call_id, link.status_payload(code.value[0], details)))

    async def _run(self, call_id: int, handler: grpc.RpcMethodHandler, context: ForwardedContext,
                   body: bytes | memoryview, write: Callable[[Any], Awaitable[None]]) -> None:
        """Run one call as grpcio would, then end it on the link with its reply or status."""
        reply: bytes | None = None
        try:
            parse = handler.request_deserializer
            if handler.unary_unary is not None or handler.stream_unary is not None:
                response = await (handler.unary_unary(body if parse is None else parse(body), context)
                                  if handler.unary_unary is not None
                                  else handler.stream_unary(_messages(context), context))
                if context.code is None or context.code is grpc.StatusCode.OK:
                    serializer = handler.response_serializer
                    reply = response if serializer is None else serializer(response)
            else:
                stream = handler.unary_stream(body if parse is None else parse(body), context) \
                    if handler.unary_stream is not None else handler.stream_stream(_messages(context), context)
                if inspect.isasyncgen(stream):
                    async for item in stream:
                        await write(item)
                else:  # a handler that writes through its context
                    await stream
        except grpc.aio.AbortError:
            pass  # the context holds the status
        except asyncio.CancelledError:
            context.code, context.details = grpc.StatusCode.CANCELLED, "cancelled"
        except Exception as exc:  # the handlers map their own errors: this is a bug
            log.exception("forwarded call failed")
            context.code, context.details = grpc.StatusCode.INTERNAL, f"internal error: {exc!r}"
        finally:
            self._tasks.pop(call_id, None)
            self._streams.pop(call_id, None)
            self._windows.pop(call_id, None)
            context.finish()
        if reply is not None:
            self.protocol.send(frame(link.REPLY, call_id, reply))
        else:
            self._status(call_id, context.code or grpc.StatusCode.OK, context.details)

    def _ended(self, call_id: int, context: ForwardedContext, _task: object) -> None:
        """A task cancelled before its first step never enters `_run` (its CALL and CANCEL came
        in one read, or the link closed): forget it here, or its entries and body stay forever."""
        if not context.finished:
            self._tasks.pop(call_id, None)
            self._streams.pop(call_id, None)
            self._windows.pop(call_id, None)
            context.finish()

    def _lost(self, exc: Exception | None) -> None:
        for task in list(self._tasks.values()):
            task.cancel()
        self._on_lost(self.index)


async def _no_stream(message: Any) -> None:
    raise RuntimeError("context.write() on a call whose method does not stream its responses")


async def _messages(context: ForwardedContext) -> AsyncIterator[Any]:
    """A client-streaming call's requests, as grpcio's request iterator gives them."""
    while (body := await context.read()) is not _EOF:
        yield body
