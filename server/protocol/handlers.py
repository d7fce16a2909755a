"""gRPC method handlers that receive raw bytes, parse them here, and map every error in one place.

grpcio would otherwise parse each request before any of our code runs: a body that is
not a valid protobuf then answers UNKNOWN with grpcio's exception text and logs a
traceback per request (a flood of 1-byte requests fills the disk), and a 300 MB
request is parsed into protobuf's arena on the event loop. Here every method takes
bytes: a parse failure is INVALID_ARGUMENT with one line, ModelInfer cuts its tensors
out without copying (wire.py), and responses may be handed over already serialized.

Errors become a status *after* the `except` block has ended, with the exception's
tracebacks cleared: a traceback holds the frames that hold the request, and a
reference cycle through it kept rejected 100 MB requests alive until the next
full garbage collection (issue 9, defect 2).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

from server.errors import NereidError
from server.protocol.status import grpc_status
from server.protocol.wire import parse_message

log = logging.getLogger("nereid.protocol")


class RateLimitedLog:
    """At most `burst` lines per `period` seconds per kind; the rest are counted and summed
    up in the next line that gets through. A client that sends a million bad requests
    costs a few log lines a minute, not a million."""

    def __init__(self, logger: logging.Logger, burst: int = 10, period: float = 60.0) -> None:
        self._log = logger
        self._burst = burst
        self._period = period
        self._windows: dict[str, tuple[float, int, int]] = {}  # kind -> (window start, sent, suppressed)

    def __call__(self, level: int, kind: str, message: str, *args: Any, exc_info: Any = None) -> None:
        if not self._log.isEnabledFor(level):
            return
        now = time.monotonic()
        start, sent, suppressed = self._windows.get(kind, (now, 0, 0))
        if now - start >= self._period:
            start, sent = now, 0
        if sent >= self._burst:
            self._windows[kind] = (start, sent, suppressed + 1)
            return
        if suppressed:
            message += f" ({suppressed} similar message(s) suppressed)"
        self._windows[kind] = (start, sent + 1, 0)
        self._log.log(level, message, *args, exc_info=exc_info)


client_errors = RateLimitedLog(log)


def forget_traceback(exc: BaseException) -> None:
    """Drop the tracebacks of `exc` and the exceptions it chains to: they hold the frames that
    hold the request, often in a reference cycle only a full collection would free."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        item = todo.pop()
        if item is None or id(item) in seen:
            continue
        seen.add(id(item))
        item.__traceback__ = None
        todo += (item.__cause__, item.__context__)


def failure(method: str, exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status and message for an exception raised while handling `method`; logs bugs."""
    if isinstance(exc, NereidError):
        code, details = grpc_status(exc), str(exc)
        client_errors(logging.DEBUG, method, "%s: %s: %s", method, code.name, details)
    else:  # a bug, not the client's fault: say so, keep serving
        code, details = grpc.StatusCode.INTERNAL, f"{method}: internal error: {exc!r}"
        client_errors(logging.ERROR, "internal:" + method, "%s failed", method, exc_info=exc)
    forget_traceback(exc)
    return code, details


def finish_with(context: Any, status: tuple[grpc.StatusCode, str]) -> None:
    context.set_code(status[0])
    context.set_details(status[1])


Behavior = Callable[..., Any]


def unary(method: str, behavior: Behavior, parse: Callable[[bytes], Any] | None,
          serialize: Callable[[Any], bytes] | None) -> grpc.RpcMethodHandler:
    """A unary-unary handler over raw bytes: parse (None: the behavior takes bytes), run, serialize
    (None: the behavior returns bytes)."""

    async def run(body: bytes, context: Any) -> bytes | tuple[grpc.StatusCode, str]:
        try:
            request = body if parse is None else parse(body)
            response = await behavior(request, context)
            return response if serialize is None else serialize(response)
        except (grpc.aio.AbortError, asyncio.CancelledError):
            raise
        except Exception as exc:
            return failure(method, exc)

    async def handle(body: bytes, context: Any) -> bytes | None:
        answer = await run(body, context)
        if isinstance(answer, bytes):
            return answer
        await context.abort(*answer)  # from a frame without the request: see ModelInfer
        return None

    return grpc.unary_unary_rpc_method_handler(handle)


def typed_parser(cls: Any, method: str) -> Callable[[bytes], Any]:
    parse = cls.FromString
    return lambda body: parse_message(parse, body, f"{method} request")


def guard(name: str, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """Wrap a method handler of another service (health, reflection) so that it receives raw
    bytes and an unparseable request is INVALID_ARGUMENT with one line (not UNKNOWN plus a
    logged traceback from grpcio)."""
    parse = handler.request_deserializer
    serializer = handler.response_serializer
    full = f"{name}/{method}"

    def parsed(body: bytes) -> tuple[Any, tuple[grpc.StatusCode, str] | None]:
        """(the request, None), or (None, the status to end the call with)."""
        status = None
        try:
            return (body if parse is None else parse_message(parse, body, f"{full} request")), None
        except Exception as exc:
            status = failure(full, exc)
        return None, status

    if handler.unary_unary is not None:
        inner = handler.unary_unary

        async def unary_unary(body: bytes, context: Any) -> Any:
            request, status = parsed(body)
            if status is not None:
                await context.abort(*status)
            return await inner(request, context)

        return grpc.unary_unary_rpc_method_handler(unary_unary, response_serializer=serializer)
    if handler.unary_stream is not None:
        inner_stream = handler.unary_stream

        async def unary_stream(body: bytes, context: Any) -> AsyncIterator[Any]:
            request, status = parsed(body)
            if status is not None:
                await context.abort(*status)
            if inspect.isasyncgenfunction(inner_stream):
                async for item in inner_stream(request, context):
                    yield item
            else:  # the reader/writer API: it writes through the context itself
                await inner_stream(request, context)

        return grpc.unary_stream_rpc_method_handler(unary_stream, response_serializer=serializer)

    async def requests(iterator: Any, context: Any) -> AsyncIterator[Any]:
        async for body in iterator:
            request, status = parsed(body)
            if status is not None:
                await context.abort(*status)
            yield request

    if handler.stream_unary is not None:
        inner_su = handler.stream_unary

        async def stream_unary(iterator: Any, context: Any) -> Any:
            return await inner_su(requests(iterator, context), context)

        return grpc.stream_unary_rpc_method_handler(stream_unary, response_serializer=serializer)
    inner_ss = handler.stream_stream

    async def stream_stream(iterator: Any, context: Any) -> AsyncIterator[Any]:
        if inspect.isasyncgenfunction(inner_ss):
            async for item in inner_ss(requests(iterator, context), context):
                yield item
        else:
            await inner_ss(requests(iterator, context), context)

    return grpc.stream_stream_rpc_method_handler(stream_stream, response_serializer=serializer)


class HandlerCollector:
    """Stands in for a grpc server while generated `add_*_to_server` functions register their
    handlers, so they can be wrapped before the real server sees them."""

    def __init__(self) -> None:
        self.services: dict[str, dict[str, grpc.RpcMethodHandler]] = {}

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        pass  # the same handlers arrive through add_registered_method_handlers

    def add_registered_method_handlers(self, service: str, handlers: dict[str, grpc.RpcMethodHandler]) -> None:
        self.services[service] = dict(handlers)
