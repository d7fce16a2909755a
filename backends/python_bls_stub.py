"""Business logic scripting (BLS), the stub's half: what `InferenceRequest.exec()`,
`async_exec()`, `is_model_ready`, `load_model` and `unload_model` do in a model.

Each call is sent to the server (backends/python_bls.py has the messages) and answered
there; the answers wait in a `Mailbox` (backends/python_bls_mailbox.py) until their caller
takes them, so any thread may call, and blocking and async calls can be mixed. A model in
the default mode calls over the instance's main socket; a decoupled model over its response
channel, which a listener thread reads at all times (its sender threads call BLS after
`execute` returned, when nothing else reads the main socket on either side).

As in Triton: `exec(decoupled=True)` returns a `ResponseIterator` over every response of the
target (a decoupled target's last one may be empty: the final flag alone), and
`async_exec(...)` an awaitable resolving, once the first response is in, to the response or
such an iterator. BLS inference is only for `execute` (and what it starts); failures of the
called model come back as a response whose `has_error()` is true, not an exception.

A decoupled call's answers come on credit (backends/python_bls.py): the iterator tells the
server what the caller took (`bls_took`, every `TOOK_EVERY` answers or `TOOK_BYTES`), and
that the caller let go of it (`bls_drop`). A `__del__` may run in the middle of a send on
its own thread, so it sends only if no send is under way; otherwise a short-lived thread
sends the drop once that send ends.
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import threading
from typing import Any

from backends.python_bls import TOOK_BYTES, TOOK_EVERY, pack_tensors, unpack_tensors
from backends.python_bls_mailbox import Answer, Mailbox
from backends.python_ipc import Channel


class BlsClient:
    """The stub's end of BLS; one per stub, installed as `pb_utils._BLS`."""

    def __init__(self, channel: Channel, pb_utils: Any, listened: bool = False) -> None:
        self.channel = channel
        self.pb = pb_utils
        self.phase = "initialize"  # "initialize" | "execute" | "finalize"
        self.mailbox = Mailbox(channel, listened)
        self._credit: dict[int, list[int]] = {}  # decoupled call -> [answers, bytes] taken, not yet reported
        self._credit_lock = threading.Lock()
        self._drops: collections.deque[int] = collections.deque()  # let go of, not yet reported

    # -- inference --

    def exec(self, request: Any, decoupled: bool = False) -> Any:
        call_id = self._send_infer(request, decoupled)
        if decoupled:
            return ResponseIterator(self, call_id)
        return self.response(self.mailbox.wait(call_id))

    def async_exec(self, request: Any, decoupled: bool = False) -> Any:
        """Send now; the returned task resolves to the response (or, with `decoupled`, a
        `ResponseIterator` holding the first response). Needs a running event loop (an
        `async def execute`)."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            raise self.pb.TritonModelException(
                "async_exec() needs a running event loop: make execute an 'async def'") from None
        call_id = self._send_infer(request, decoupled)
        task = loop.create_task(self._answer_async(call_id, decoupled))
        # Cancelled (its execute ended without awaiting it) or done: later answers are dropped.
        task.add_done_callback(lambda t: None if decoupled and not t.cancelled() and t.exception() is None
                               else self.drop(call_id) if decoupled else self.mailbox.abandon(call_id))
        return task

    async def _answer_async(self, call_id: int, decoupled: bool) -> Any:
        answer = await self.mailbox.wait_async(call_id)
        if not decoupled:
            return self.response(answer)
        iterator = ResponseIterator(self, call_id)
        iterator._add(answer)
        iterator._index = 0  # the first response is yet to be read
        return iterator

    def _send_infer(self, request: Any, decoupled: bool) -> int:
        pb = self.pb
        if self.phase != "execute":
            raise pb.TritonModelException("BLS is only supported during the 'execute' function.")
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
            return self._send(lambda call_id: ("bls", call_id, spec, metas, size), fd)
        finally:
            if fd is not None:
                os.close(fd)

    def response(self, answer: Answer) -> Any:
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
        _, result, fd, size = self.mailbox.wait(self._send(lambda call_id: ("bls_ctl", call_id, op, args)))
        if result[0] == "err":
            if fd is not None:
                os.close(fd)
            raise self.pb.TritonModelException(result[1])
        return dict(unpack_tensors(result[1], fd, size))

    # -- a decoupled call's credit --

    def took(self, call_id: int, size: int, final: bool) -> None:
        """The caller took an answer of `size` bytes; tell the server every few of them."""
        with self._credit_lock:
            if final:
                self._credit.pop(call_id, None)
                return
            credit = self._credit.setdefault(call_id, [0, 0])
            credit[0] += 1
            credit[1] += size
            due = credit[0] >= TOOK_EVERY or credit[1] >= TOOK_BYTES
        if due:
            self.report(call_id)

    def report(self, call_id: int) -> None:
        """Tell the server what the caller took of `call_id` and has not reported yet."""
        with self._credit_lock:
            credit = self._credit.pop(call_id, None)
        self.flush()
        if credit:
            try:
                self.channel.send(("bls_took", call_id, credit[0]))
            except OSError:  # the server is gone: the answer the caller waits for says so
                pass

    def drop(self, call_id: int) -> None:
        """The caller let go of a decoupled call: the server stops it. Safe in a `__del__`."""
        self.mailbox.abandon(call_id)
        self._credit.pop(call_id, None)
        try:
            if not self.channel.try_send(("bls_drop", call_id)):
                # A send is under way (maybe under us, in this thread): a thread of its own
                # sends the drop once it ends, and the stub's next message flushes it otherwise.
                self._drops.append(call_id)
                threading.Thread(target=self.flush, name="nereid-bls-drop", daemon=True).start()
        except (OSError, RuntimeError):  # the server is gone, or this process is exiting
            pass

    def flush(self) -> None:
        """Send the drops a `__del__` could not send (before any other message of this stub)."""
        drops = self._drops
        while drops:
            try:
                self.channel.send(("bls_drop", drops.popleft()))
            except (OSError, IndexError):
                return

    # -- the socket --

    def _send(self, message: Any, fd: int | None = None) -> int:
        if self._drops:
            self.flush()
        call_id = self.mailbox.open()
        try:
            self.channel.send(message(call_id), fd)
        except BaseException:
            self.mailbox.abandon(call_id)
            raise
        return call_id


class ResponseIterator:
    """`exec(decoupled=True)`: the responses of one call, as Triton's `ResponseIterator`:
    `next()` waits for the next response; after the final one, a new `for` loop (a new
    `iter()`) goes over all of them again. Also an async iterator (`async for`, a Nereid
    extension), which waits without blocking the event loop."""

    def __init__(self, client: BlsClient, call_id: int) -> None:
        self._client = client
        self._id = call_id
        self._responses: list[Any] = []
        self._index = 0
        self._finished = False

    def _add(self, answer: Answer) -> Any:
        response = self._client.response(answer)
        self._responses.append(response)
        if answer[0]:
            self._finished = True
        self._index = len(self._responses)
        self._client.took(self._id, answer[3], answer[0])
        return response

    def __iter__(self) -> ResponseIterator:
        if self._finished and self._index >= len(self._responses):
            self._index = 0
        return self

    def __next__(self) -> Any:
        if self._index < len(self._responses):
            self._index += 1
            return self._responses[self._index - 1]
        if self._finished:
            raise StopIteration
        return self._add(self._client.mailbox.wait(self._id))

    def __aiter__(self) -> ResponseIterator:
        return self.__iter__()

    async def __anext__(self) -> Any:
        if self._index < len(self._responses):
            self._index += 1
            return self._responses[self._index - 1]
        if self._finished:
            raise StopAsyncIteration
        return self._add(await self._client.mailbox.wait_async(self._id))

    def __del__(self) -> None:
        if not self._finished:  # dropped half read: the server stops the call, the rest is dropped
            try:
                self._client.drop(self._id)
            except Exception:
                pass
