"""A frontend process of `nereid serve --workers N`: terminate gRPC, forward every call.

It listens on the server's address and port with SO_REUSEPORT, with the same TLS,
message limits and restricted-protocol interceptor as a single-process server (they are
built from the same command line), answers reflection itself, and forwards every
inference and health RPC as raw bytes to the owner over its link. It never parses a
request: all decisions (readiness, refusal while stopping, errors) are the owner's.

It ignores SIGINT and SIGTERM (a terminal's Ctrl-C reaches the whole process group):
the owner tells it when to stop listening, after the drain. If the owner disappears,
every call in flight ends UNAVAILABLE and the frontend exits.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import gc
import logging
import marshal
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator
from typing import Any

import grpc

from server.aio import Mailbox
from server.workers import balance, link
from server.workers.link import LinkProtocol, frame
from server.workers.methods import Method, method_table

log = logging.getLogger("nereid.workers")

_CODES = {code.value[0]: code for code in grpc.StatusCode}
OWNER_GONE = "the server's model process has exited; retry"
_EOF = grpc.aio.EOF


class _Call:
    __slots__ = ("future", "queue", "window", "counted")

    def __init__(self, loop: asyncio.AbstractEventLoop, streaming: bool) -> None:
        self.future: asyncio.Future[Any] | None = None if streaming else loop.create_future()
        self.queue: Mailbox[Any] | None = Mailbox() if streaming else None
        self.window: link.Window | None = None  # a client stream's MESSAGE frames (set by _pump)
        self.counted = False  # a ModelInfer call: it counts toward the --max-inflight-requests cap

    def resolve(self, item: Any) -> None:
        if self.future is not None:
            if not self.future.done():
                self.future.set_result(item)
        else:
            self.queue.put_nowait(item)  # type: ignore[union-attr]


class FrontendLink:
    """The frontend's end of the link: call ids, pending calls, and the STOP order."""

    def __init__(self, secure: bool, limit: int = 0) -> None:
        self._loop = asyncio.get_running_loop()
        self._calls: dict[int, _Call] = {}
        # --max-inflight-requests, applied here too: the owner refuses only what it has read, so a
        # stuck owner would otherwise let this process buffer calls without bound. It counts the
        # ModelInfer calls held (`_held`), as the owner's cap counts inference requests only
        # (servicer.infer): not open streams (a stream buffers at most its link window, and its
        # requests count in the owner as in one process), nor readiness, health or metadata
        # calls. Counting those, N idle streams or N inferences made this frontend refuse every
        # other call, ServerReady and health checks included (a probe failed under load).
        self._limit = limit
        self._held = 0
        self._capped = frozenset(i for i, m in enumerate(method_table()) if m.name == "ModelInfer")
        self._next = 1
        self._secure = secure
        self.stopped: asyncio.Future[float | None] = self._loop.create_future()  # grace, or None if lost
        self.protocol = LinkProtocol(self._frame, self._lost)

    def meta(self, context: Any) -> tuple[Any, ...]:
        metadata = tuple((m[0], m[1]) for m in context.invocation_metadata() or ())
        auth = {k: list(v) for k, v in context.auth_context().items()} if self._secure else None
        return context.peer(), metadata, auth, context.time_remaining()

    def start(self, kind: int, method: int, context: Any, body: bytes, streaming: bool) -> tuple[int, _Call]:
        call_id = self._next
        self._next += 1
        call = _Call(self._loop, streaming)
        if self.protocol.closed:  # never answered by a frame: not kept in _calls
            call.resolve((grpc.StatusCode.UNAVAILABLE.value[0], OWNER_GONE))
        elif self._limit and self._held >= self._limit and method in self._capped:
            call.resolve((grpc.StatusCode.RESOURCE_EXHAUSTED.value[0],
                          f"server is at its limit of {self._limit} requests in flight through this frontend "
                          "(--max-inflight-requests; the model process is not keeping up); retry later"))
        else:
            self._calls[call_id] = call
            if method in self._capped:
                call.counted = True
                self._held += 1
            self.protocol.send(frame(kind, call_id, link.call_payload(method, self.meta(context)), body))
        return call_id, call

    def send(self, kind: int, call_id: int, body: bytes = b"") -> None:
        self.protocol.send(frame(kind, call_id, body) if body else frame(kind, call_id))

    def forget(self, call_id: int, cancel: bool) -> None:
        if self._pop(call_id) is not None and cancel:
            self.send(link.CANCEL, call_id)

    def _pop(self, call_id: int) -> _Call | None:
        """Take an ended call out of the table (and out of the cap's count)."""
        call = self._calls.pop(call_id, None)
        if call is not None and call.counted:
            self._held -= 1
        return call

    def _frame(self, kind: int, call_id: int, payload: bytes | memoryview) -> None:
        if isinstance(payload, memoryview):  # a large answer: grpcio sends bytes only
            payload = bytes(payload)
        if kind == link.REPLY:
            call = self._pop(call_id)
            if call is not None:
                call.resolve(payload)
        elif kind == link.SEND:
            call = self._calls.get(call_id)
            if call is not None:
                call.resolve(payload)
        elif kind == link.CREDIT_MESSAGES:
            call = self._calls.get(call_id)
            if call is not None and call.window is not None:
                call.window.credit(payload)
        elif kind == link.STATUS:
            call = self._pop(call_id)
            if call is not None:
                call.resolve(link.split_status(payload))
        elif kind == link.PING:
            self.send(link.PONG, 0)
        elif kind == link.STOP and not self.stopped.done():
            self.stopped.set_result(marshal.loads(payload))

    def _lost(self, exc: Exception | None) -> None:
        calls, self._calls, self._held = self._calls, {}, 0
        for call in calls.values():
            call.resolve((grpc.StatusCode.UNAVAILABLE.value[0], OWNER_GONE))
        if not self.stopped.done():
            self.stopped.set_result(None)


def _handler(number: int, method: Method, forward: FrontendLink) -> grpc.RpcMethodHandler:
    """A raw-bytes handler that forwards one method."""
    if method.name == "ModelInfer" or (not method.client_streaming and not method.server_streaming):
        async def unary(request: Any, context: Any) -> bytes | None:
            body = request if method.name != "ModelInfer" else await context.read()
            if not isinstance(body, bytes):  # the client closed without a message
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{method.name}: no request message was sent")
            call_id, call = forward.start(link.CALL, number, context, body, streaming=False)
            del body, request
            try:
                answer = await call.future  # type: ignore[misc]
            except asyncio.CancelledError:
                forward.forget(call_id, cancel=True)
                raise
            if isinstance(answer, bytes):
                return answer
            await context.abort(_CODES.get(answer[0], grpc.StatusCode.UNKNOWN), answer[1])
            return None

        if method.name == "ModelInfer":  # stream-unary, to own the request's bytes (servicer.ModelInfer)
            return grpc.stream_unary_rpc_method_handler(unary)
        return grpc.unary_unary_rpc_method_handler(unary)

    async def streaming(request: Any, context: Any) -> AsyncIterator[bytes]:
        if method.client_streaming:
            call_id, call = forward.start(link.OPEN, number, context, b"", streaming=True)
            call.window = link.Window()
            pump = asyncio.ensure_future(_pump(request, call_id, call.window, forward))
        else:
            call_id, call = forward.start(link.CALL, number, context, request, streaming=True)
            pump = None
        credit = link.Credit(forward.protocol.send, link.CREDIT_SENDS, call_id)
        finished = False
        try:
            while True:
                item = await call.queue.get()  # type: ignore[union-attr]
                if isinstance(item, bytes):
                    yield item  # returns once grpc took it (HTTP/2 flow control): only then credit it
                    credit.took(len(item))
                    continue
                finished = True
                code, details = item
                if code:
                    context.set_code(_CODES.get(code, grpc.StatusCode.UNKNOWN))
                    context.set_details(details)
                return
        finally:
            if pump is not None:
                pump.cancel()
            forward.forget(call_id, cancel=not finished)

    if method.client_streaming:
        return grpc.stream_stream_rpc_method_handler(streaming)
    return grpc.unary_stream_rpc_method_handler(streaming)


async def _pump(requests: AsyncIterator[bytes], call_id: int, window: link.Window, forward: FrontendLink) -> None:
    """Forward a client stream's messages as they arrive, then its end. While the owner's
    handler has not read enough of them (the window is full) it stops reading the client's
    stream, so grpc stops granting the client HTTP/2 window, as in one process."""
    try:
        async for body in requests:
            forward.send(link.MESSAGE, call_id, body)
            if window.sent(len(body)):
                await window.room()
    except Exception:  # the client's stream broke: the call's own status says so
        pass
    forward.send(link.HALF_CLOSE, call_id)


async def serve(settings: Any, link_fd: int, index: int, balance_fd: int | None = None) -> int:
    from server.protocol.server import grpc_server  # the same listener a single process builds

    loop = asyncio.get_running_loop()
    forward = FrontendLink(secure=settings.grpc_use_ssl, limit=settings.max_inflight_requests)
    sock = socket.socket(fileno=link_fd)
    await loop.connect_accepted_socket(lambda: forward.protocol, sock)
    services: dict[str, dict[str, grpc.RpcMethodHandler]] = {}
    for number, method in enumerate(method_table()):
        services.setdefault(method.service, {})[method.name] = _handler(number, method, forward)
    server, _ = grpc_server(settings, services, reuse_port=True, announce=False)
    await server.start()
    if balance_fd is not None:  # before READY: no client can connect to the port before all attached
        try:
            balance.attach(balance_fd, settings.grpc_port)
        except OSError as exc:
            log.warning("worker %d: new connections reach it by the kernel's hash, not in turn: %s", index, exc)
        finally:
            os.close(balance_fd)
    gc.collect()
    gc.freeze()
    forward.send(link.READY, 0, marshal.dumps((index, os.getpid())))
    grace = await forward.stopped
    if grace is None:
        log.error("worker %d: the owner process is gone; exiting", index)
        await server.stop(0.5)
        return 1
    await server.stop(grace)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nereid-frontend", description="internal: a --workers frontend")
    parser.add_argument("--link-fd", type=int, required=True)
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--grpc-port", type=int, required=True)
    parser.add_argument("--balance-fd", type=int, default=None)
    parser.add_argument("serve_argv", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    from server.cli import build_parser, settings_from_args
    from server.logs import configure as configure_logging

    serve_argv = args.serve_argv[1:] if args.serve_argv[:1] == ["--"] else args.serve_argv
    settings = settings_from_args(build_parser().parse_args(["serve", *serve_argv]))
    settings = dataclasses.replace(settings, grpc_port=args.grpc_port)
    configure_logging(settings.log)
    if settings.event_loop != "asyncio":
        try:
            import uvloop
        except ImportError:
            pass
        else:
            asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return asyncio.run(serve(settings, args.link_fd, args.index, args.balance_fd))


if __name__ == "__main__":
    sys.exit(main())
