"""Business logic scripting (BLS), the stub's half: what `InferenceRequest.exec()`,
`async_exec()`, `is_model_ready`, `load_model` and `unload_model` do in a model.

Each call is sent to the server over the instance's socket (backends/python_bls.py has
the messages) and answered there. `exec()` blocks, reading the socket until its answer
comes; answers to other calls read on the way are kept for them. `async_exec()` sends at
once and returns an awaitable; while any is awaited, the stub's event loop watches the
socket. Either way every answer is delivered to the call it belongs to, so blocking and
async calls can be mixed; an answer to a call nobody waits for any more is dropped.

As in Triton: BLS inference only inside `execute` (an exception elsewhere); failures of
the called model come back as a response whose `has_error()` is true, not an exception.
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import threading
from collections.abc import Iterator
from typing import Any

from backends.python_bls import ANSWER, pack_tensors, unpack_tensors
from backends.python_ipc import Channel

# (final, result, fd, size): one answer as received
_Answer = tuple[bool, tuple[Any, ...], int | None, int]


class BlsClient:
    """The stub's end of BLS; one per stub, installed as `pb_utils._BLS`."""

    def __init__(self, channel: Channel, pb_utils: Any) -> None:
        self.channel = channel
        self.pb = pb_utils
        self.phase = "initialize"  # "initialize" | "execute" | "finalize"
        self._next = 0
        self._answers: dict[int, collections.deque[_Answer]] = {}
        self._waiters: dict[int, asyncio.Future[None]] = {}
        self._watching: asyncio.AbstractEventLoop | None = None

    # -- inference --

    def exec(self, request: Any, decoupled: bool = False) -> Any:
        call_id = self._send_infer(request, decoupled)
        if decoupled:
            return _ResponseIterator(self, call_id)
        return self._response(self._wait(call_id))

    def async_exec(self, request: Any, decoupled: bool = False) -> Any:
        """Send now; the returned task resolves to the response (or, with `decoupled`, an
        iterator over the responses). Needs a running event loop (an `async def execute`)."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            raise self.pb.TritonModelException(
                "async_exec() needs a running event loop: make execute an 'async def'") from None
        call_id = self._send_infer(request, decoupled)
        return loop.create_task(self._answer_async(call_id, decoupled))

    async def _answer_async(self, call_id: int, decoupled: bool) -> Any:
        if not decoupled:
            return self._response(await self._wait_async(call_id))
        responses = []
        while True:
            answer = await self._wait_async(call_id)
            responses.append(self._response(answer))
            if answer[0]:
                return iter(responses)

    def _send_infer(self, request: Any, decoupled: bool) -> int:
        pb = self.pb
        if self.phase != "execute":
            raise pb.TritonModelException("BLS is only supported during the 'execute' function.")
        if threading.current_thread() is not threading.main_thread():
            raise pb.TritonModelException(
                "BLS from a thread other than the one running 'execute' is not supported by Nereid yet")
        tensors = []
        for tensor in request.inputs():
            if not isinstance(tensor, pb.Tensor):
                raise pb.TritonModelException(
                    f"BLS inputs must be pb_utils.Tensor objects, got {type(tensor).__name__}")
            tensors.append((tensor.name(), tensor.as_numpy()))
        try:
            parameters = json.loads(request.parameters()) if request.parameters() else {}
        except ValueError as exc:
            raise pb.TritonModelException(f"the request's parameters are not a JSON object: {exc}") from None
        version = request.model_version()
        spec = {
            "model_name": request.model_name(),
            "model_version": "" if version is None or int(version) < 0 else str(int(version)),
            "requested": list(request.requested_output_names()),
            "request_id": request.request_id(),
            "correlation_id": request.correlation_id(),
            "flags": int(request.flags()),
            "timeout": int(request.timeout()),
            "parameters": parameters,
            "decoupled": bool(decoupled),
        }
        metas, fd, size = pack_tensors(tensors)
        try:
            return self._send(("bls", self._new_id(), spec, metas, size), fd)
        finally:
            if fd is not None:
                os.close(fd)

    def _response(self, answer: _Answer) -> Any:
        pb = self.pb
        _, result, fd, size = answer
        if result[0] == "err":
            if fd is not None:
                os.close(fd)
            return pb.InferenceResponse(error=pb.TritonError(result[1], result[2]))
        tensors = [pb.Tensor(name, array) for name, array in unpack_tensors(result[1], fd, size)]
        return pb.InferenceResponse(output_tensors=tensors)

    # -- model management --

    def control(self, op: str, args: dict[str, Any]) -> Any:
        if self.phase == "finalize":
            raise self.pb.TritonModelException(
                "the model management API is not supported in 'finalize' or 'auto_complete_config'")
        if threading.current_thread() is not threading.main_thread():
            raise self.pb.TritonModelException(
                "the model management API from a thread other than the one running 'execute' is not "
                "supported by Nereid yet")
        _, result, fd, size = self._wait(self._send(("bls_ctl", self._new_id(), op, args)))
        if result[0] == "err":
            if fd is not None:
                os.close(fd)
            raise self.pb.TritonModelException(result[1])
        return dict(unpack_tensors(result[1], fd, size))

    # -- the socket --

    def _new_id(self) -> int:
        self._next += 1
        self._answers[self._next] = collections.deque()
        return self._next

    def _send(self, message: tuple[Any, ...], fd: int | None = None) -> int:
        call_id: int = message[1]
        try:
            self.channel.send(message, fd)
        except BaseException:
            self._answers.pop(call_id, None)
            raise
        return call_id

    def _wait(self, call_id: int) -> _Answer:
        """Block until the next answer to `call_id`, delivering others read on the way."""
        answers = self._answers[call_id]
        while not answers:
            self._pump()
        return self._take(call_id, answers)

    async def _wait_async(self, call_id: int) -> _Answer:
        answers = self._answers[call_id]
        loop = asyncio.get_running_loop()
        while not answers:
            if self.channel.buffered():
                self._pump()
                continue
            waiter: asyncio.Future[None] = loop.create_future()
            self._waiters[call_id] = waiter
            self._watch(loop)
            try:
                await waiter
            finally:
                self._waiters.pop(call_id, None)
                if not self._waiters:
                    self._unwatch()
        return self._take(call_id, answers)

    def _take(self, call_id: int, answers: collections.deque[_Answer]) -> _Answer:
        answer = answers.popleft()
        if answer[0]:  # final: the call is over
            self._answers.pop(call_id, None)
        return answer

    def _pump(self) -> None:
        """Read every message that is here (at least one, blocking) and deliver each."""
        while True:
            message, fd = self.channel.recv()
            self._deliver(message, fd)
            if not self.channel.buffered():
                return

    def _deliver(self, message: Any, fd: int | None) -> None:
        answers = self._answers.get(message[1]) if message[0] == ANSWER else None
        if answers is None:  # a call nobody waits for any more (or not ours): drop it
            if fd is not None:
                os.close(fd)
            return
        _, call_id, final, result, size = message
        answers.append((final, result, fd, size))
        waiter = self._waiters.get(call_id)
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _watch(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._watching is None:
            loop.add_reader(self.channel.sock.fileno(), self._pump)
            self._watching = loop

    def _unwatch(self) -> None:
        if self._watching is not None:
            self._watching.remove_reader(self.channel.sock.fileno())
            self._watching = None

    def drop_pending(self) -> None:
        """After `execute` returned: answers to calls it never waited for are dropped on arrival."""
        for answers in self._answers.values():
            for _, _, fd, _ in answers:
                if fd is not None:
                    os.close(fd)
        self._answers.clear()


class _ResponseIterator:
    """`exec(decoupled=True)`: the responses of one call, read as they come."""

    def __init__(self, client: BlsClient, call_id: int) -> None:
        self._client = client
        self._id = call_id
        self._done = False

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        if self._done:
            raise StopIteration
        answer = self._client._wait(self._id)
        self._done = answer[0]
        return self._client._response(answer)
