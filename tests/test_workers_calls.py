"""Call-id bookkeeping at both ends of a --workers link: nothing of a finished call stays.

These drive the real OwnerLink and FrontendLink over a real socket pair, with grpc
method handlers of their own (the owner's handlers are tested end to end in
test_workers.py); they look at the call tables, which must be empty once every call ended.
"""

from __future__ import annotations

import asyncio
import contextvars
import marshal
import socket
from typing import Any

import grpc

from server.workers import link
from server.workers.frontend import FrontendLink
from server.workers.link import LinkProtocol, frame
from server.workers.owner import OwnerLink

_META = ("ipv4:127.0.0.1:1", (("k-bin", b"\x00"),), None, None)


async def _pair(handlers: list[grpc.RpcMethodHandler | None]) -> tuple[OwnerLink, LinkProtocol, list[Any]]:
    """An OwnerLink on one end of a socket pair and a frame collector on the other."""
    loop = asyncio.get_running_loop()
    ours, theirs = socket.socketpair()
    owner = OwnerLink(0, handlers, lambda i, p: None, lambda i: None, [0])
    await loop.connect_accepted_socket(lambda: owner.protocol, ours)
    got: list[Any] = []
    peer = LinkProtocol(lambda k, c, p: got.append((k, c, bytes(p))), lambda exc: None)
    await loop.connect_accepted_socket(lambda: peer, theirs)
    return owner, peer, got


async def _settle(passes: int = 20) -> None:
    for _ in range(passes):
        await asyncio.sleep(0)
    await asyncio.sleep(0.05)


def test_a_call_cancelled_in_the_same_read_as_it_arrived_leaves_nothing() -> None:
    """CALL and CANCEL read together (a busy owner): the task is cancelled before it ever ran."""
    async def slow(request: bytes, context: Any) -> bytes:
        await asyncio.sleep(30)
        return request

    async def slow_stream(requests: Any, context: Any) -> Any:
        async for r in requests:
            yield r

    async def run() -> None:
        handlers = [grpc.unary_unary_rpc_method_handler(slow), grpc.stream_stream_rpc_method_handler(slow_stream)]
        owner, peer, got = await _pair(handlers)
        parts: list[Any] = []
        for call_id in range(1, 51):
            parts += frame(link.CALL, call_id, link.call_payload(0, _META), b"x")
            parts += frame(link.CANCEL, call_id)
        for call_id in range(51, 101):
            parts += frame(link.OPEN, call_id, link.call_payload(1, _META))
            parts += frame(link.MESSAGE, call_id, b"m")
            parts += frame(link.CANCEL, call_id)
        peer.send(parts)  # one write: the owner reads them in one go
        await _settle()
        assert owner._tasks == {} and owner._streams == {} and owner._windows == {}
        # Each unary call ran its first step at once (OwnerLink._eager) and was cancelled before
        # its Task's first step: the cancellation still reached the handler, which ended the call.
        ended = {c: link.split_status(p) for k, c, p in got if k == link.STATUS}
        assert all(ended.get(c) == (grpc.StatusCode.CANCELLED.value[0], "cancelled") for c in range(1, 51)), ended
        assert peer.transport is not None
        peer.transport.close()

    asyncio.run(run())


def test_calls_started_after_the_owner_is_gone_leave_nothing() -> None:
    """A call that starts on a closed link ends UNAVAILABLE at once and is not kept."""
    async def run() -> None:
        forward = FrontendLink(secure=False)
        forward.protocol.connection_lost(None)  # the owner's end closed
        for streaming in (False, True):
            _, call = forward.start(link.CALL, 0, None, b"x", streaming=streaming)
            answer = await call.future if call.future is not None else await call.queue.get()  # type: ignore[union-attr]
            assert answer[0] == grpc.StatusCode.UNAVAILABLE.value[0]
        assert forward._calls == {}

    asyncio.run(run())


def test_frames_for_unknown_or_ended_calls_are_ignored_and_leave_nothing() -> None:
    """A reply after a cancel (the owner answered as the client left) and frames for ids never
    used must not create entries or fail the link."""
    async def run() -> None:
        forward = FrontendLink(secure=False)
        for kind, payload in ((link.REPLY, b"r"), (link.SEND, b"s"), (link.STATUS, link.status_payload(0, ""))):
            forward._frame(kind, 12345, payload)
            assert forward._calls == {}, kind
        assert not forward.stopped.done()
        forward._frame(link.STOP, 0, marshal.dumps(1.0))
        assert forward.stopped.result() == 1.0

    asyncio.run(run())


_VAR: contextvars.ContextVar[str] = contextvars.ContextVar("test_var", default="unset")


def test_unary_calls_that_end_at_once_or_wait_both_answer_and_keep_their_context() -> None:
    """Unary calls run their first step as they arrive (OwnerLink._eager): one that ends in it
    and one that waits (continued in a Task) both answer, a CANCEL ends a waiting one, and a
    context variable a handler sets stays in that call's context."""
    release = asyncio.Event()
    seen: list[str] = []

    async def now(request: bytes, context: Any) -> bytes:
        seen.append(_VAR.get())
        _VAR.set("now")
        return b"now:" + request

    async def later(request: bytes, context: Any) -> bytes:
        seen.append(_VAR.get())
        _VAR.set("later")
        await release.wait()
        await asyncio.sleep(0)
        seen.append(_VAR.get())
        return b"later:" + request

    async def run() -> None:
        handlers = [grpc.unary_unary_rpc_method_handler(now), grpc.unary_unary_rpc_method_handler(later)]
        owner, peer, got = await _pair(handlers)
        parts: list[Any] = []
        parts += frame(link.CALL, 1, link.call_payload(1, _META), b"a")
        parts += frame(link.CALL, 2, link.call_payload(0, _META), b"b")
        parts += frame(link.CALL, 3, link.call_payload(1, _META), b"c")
        peer.send(parts)
        await _settle()
        assert [(k, c, p) for k, c, p in got] == [(link.REPLY, 2, b"now:b")]
        assert set(owner._tasks) == {1, 3}
        peer.send(frame(link.CANCEL, 3))
        await _settle()
        release.set()
        await _settle()
        assert owner._tasks == {}
        assert (link.REPLY, 1, b"later:a") in got
        assert (link.STATUS, 3, link.status_payload(grpc.StatusCode.CANCELLED.value[0], "cancelled")) in got
        assert seen == ["unset", "unset", "unset", "later"] and _VAR.get() == "unset"
        assert peer.transport is not None
        peer.transport.close()

    asyncio.run(run())


def test_a_handler_sees_the_calls_peer_metadata_auth_and_time_left() -> None:
    """The metadata travels marshalled and is decoded when a handler asks (context.py): what it
    reads is what the frontend sent, and the seconds left count from the call's arrival."""
    meta = ("ipv4:10.0.0.7:5151", (("traceparent", "00-ab-cd-01"), ("k-bin", b"\x00\xff")),
            {"x509_common_name": [b"client"]}, 30.0)
    seen: list[Any] = []

    async def look(request: bytes, context: Any) -> bytes:
        seen.extend([context.peer(), context.invocation_metadata(), context.auth_context(), context.time_remaining()])
        return b""

    async def run() -> None:
        owner, peer, got = await _pair([grpc.unary_unary_rpc_method_handler(look)])
        peer.send(frame(link.CALL, 1, link.call_payload(0, meta), b"x")
                  + frame(link.CALL, 2, link.call_payload(0, ("unix:", (), None, None)), b"x"))
        await _settle()
        assert [(k, c) for k, c, _ in got] == [(link.REPLY, 1), (link.REPLY, 2)]
        assert seen[:3] == list(meta[:3]) and 29.0 < seen[3] <= 30.0, seen
        assert seen[4:] == ["unix:", (), {}, None]
        assert peer.transport is not None
        peer.transport.close()

    asyncio.run(run())
