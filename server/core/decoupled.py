"""Decoupled models: zero or many responses per request (`model_transaction_policy { decoupled: true }`).

The request takes the usual path (scheduler, instance, backend), which ends when the
model's `execute` returned; the responses take another. The request carries a
`ResponseStream` (the backend's `ResponseSink`, backends/responses.py); the backend sends
each response there from its own threads, and `stream_responses` yields them on the event
loop as they come, until the one marked final. This is the only place that knows a request
may have many outcomes: the scheduler, the batcher and the instances stay as they are.

Who closes the request: once the backend has taken it (it asked for a cancel callback),
the backend sends the final response, even if the model failed or its process died. If the
request failed before that (queue full, model unavailable, bad input), its error is the
final response. Cancelling (the client went away) tells the backend, which tells the model
(`is_cancelled()`), and stops waiting.

Back-pressure: a request holds at most `WINDOW_RESPONSES` responses (and about
`WINDOW_BYTES` of tensors) sent but not yet taken by its consumer (the stream writing to
the client). A backend thread that sends past that waits in `send` until the consumer takes
one, the request is cancelled, or the stream ends, so a client that does not read holds
back the model instead of filling the server's memory. For the Python backend the thread
that waits is the instance's response reader: that instance's model then waits in
`response_sender.send` (the stub's socket is full), as Triton's python_backend waits when
its message queue is full; other requests on the same instance wait with it, other
instances do not. Nothing waits on the event loop's own thread in `send`, and the final response never waits
(it is one more at most, and the paths that close requests when a stub died must not stall).
A sender on the event loop (a decoupled ensemble, ensemble_stream.py) awaits `put` instead,
which waits for the same room without blocking the loop.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncGenerator, Callable
from typing import Any

import numpy as np

from server.core.classification import ClassifiedOutputs
from server.core.instance import _as_error
from server.core.model import Model
from server.errors import InternalError, NereidError
from server.types import InferenceRequest

# One response as the protocol layer gets it: (outputs or None, error or None, final).
Response = tuple[dict[str, np.ndarray] | None, NereidError | None, bool]

# Responses of one request sent and not yet taken before the sender waits: enough that a
# reader keeping up never makes the model wait (the consumer takes each within microseconds
# and grpc's HTTP/2 window holds a few more), small enough that 64 typical responses (tokens,
# small tensors) cost little; the byte bound keeps large responses to a few.
WINDOW_RESPONSES = 64
WINDOW_BYTES = 8 << 20
_RECHECK_S = 1.0  # a waiting sender looks this often whether the event loop closed under it


def _nbytes(outcome: Any) -> int:
    if isinstance(outcome, dict):
        return sum(getattr(value, "nbytes", 0) for value in outcome.values())
    return 0


class ResponseStream:
    """One request's responses, from the backend's threads to the event loop, at most a
    window of them held (module docstring)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._loop_thread = threading.get_ident()  # made on the loop: `send` never waits there
        self.queue: asyncio.Queue[tuple[Any, bool, int, int]] = asyncio.Queue()
        self.attached = False  # the backend took the request: it will send the final response
        self._cancel: Callable[[], None] | None = None
        self._space = threading.Condition(threading.Lock())
        self._held = 0  # responses sent, not yet taken by the consumer
        self._held_bytes = 0
        self._closed = False  # cancelled or ended: nothing waits, and what comes is dropped
        self._waiters: list[asyncio.Future[None]] = []  # `room` waiters on the loop, woken by taken/close

    # -- the backend's side (any thread) --

    def send(self, outcome: Any, final: bool) -> None:
        size = _nbytes(outcome)
        with self._space:
            while (not final and not self._closed
                   and (self._held >= WINDOW_RESPONSES or (self._held and self._held_bytes + size > WINDOW_BYTES))
                   and threading.get_ident() != self._loop_thread and not self._loop.is_closed()):
                self._space.wait(_RECHECK_S)
            if self._closed:
                return
            self._held += 1
            self._held_bytes += size
        try:
            self._loop.call_soon_threadsafe(self.queue.put_nowait, (outcome, final, time.perf_counter_ns(), size))
        except RuntimeError:  # the loop has closed (shutdown): nobody is listening
            pass

    def on_cancel(self, callback: Callable[[], None]) -> None:
        self._cancel = callback
        self.attached = True

    # -- the event loop's side --

    async def put(self, outcome: Any, final: bool) -> None:
        """`send` from the event loop: a response that does not fit waits (asynchronously) for
        the consumer to take one, as `send` waits on a backend's thread."""
        if not final:
            await self.room(_nbytes(outcome))
        self.send(outcome, final)

    def full(self, size: int = 0) -> bool:
        """Whether a response of `size` bytes would wait now."""
        held = self._held
        return not self._closed and (held >= WINDOW_RESPONSES or (held > 0 and self._held_bytes + size > WINDOW_BYTES))

    async def room(self, size: int = 0) -> None:
        """Wait until a response of `size` bytes fits (or the stream was closed)."""
        while self.full(size) and not self._loop.is_closed():
            waiter = self._loop.create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            finally:
                if waiter in self._waiters:  # cancelled while waiting
                    self._waiters.remove(waiter)

    def _wake(self) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def taken(self, size: int) -> None:
        """The consumer took one response off the queue: a waiting sender may go on."""
        with self._space:
            self._held -= 1
            self._held_bytes -= size
            self._space.notify()
        if self._waiters:
            self._wake()

    def close(self) -> None:
        """Nobody will take more: release every waiting sender, drop what comes later."""
        with self._space:
            self._closed = True
            self._space.notify_all()
        self._wake()

    def cancel(self) -> None:
        self.close()
        callback, self._cancel = self._cancel, None
        if callback is not None:
            callback()


async def stream_responses(model: Model, request: InferenceRequest) -> AsyncGenerator[Response, None]:
    """Run `request` on a decoupled model and yield its responses as the model sends them; the
    last one yielded is final (its outputs may be None: the final flag alone)."""
    loop = asyncio.get_running_loop()
    stream = ResponseStream(loop)
    request.sink = stream
    task = loop.create_task(model.infer(request))

    def executed(task: asyncio.Task[Any]) -> None:
        if task.cancelled():
            return
        error = task.exception()
        if stream.attached:  # the backend sends the final response (its error too, if it failed)
            return
        # It never reached the backend (queue full, model unavailable, bad input): its error closes it.
        stream.queue.put_nowait((error or InternalError(f"model {model.label} took no request"), True,
                                 time.perf_counter_ns(), -1))  # not counted in the window

    task.add_done_callback(executed)
    finished = False
    # response_stats: compute_infer runs from the request's start, then from the previous response's send
    index, previous = 0, time.perf_counter_ns()
    try:
        while not finished:
            outcome, finished, sent, size = await stream.queue.get()
            if size >= 0:
                stream.taken(size)
            response = _response(model, request, outcome, finished)
            handed = time.perf_counter_ns()
            kind = "empty_response" if outcome is None else "fail" if response[1] is not None else "success"
            model.stats.record_response(index, kind, max(0, sent - previous), max(0, handed - sent))
            index, previous = index + 1, sent
            yield response
    finally:
        if not finished:  # the client went away (or the server is stopping)
            model.stats.record_response(index, "cancel", time.perf_counter_ns() - previous, 0)
            stream.cancel()
            task.cancel()
        stream.close()


def _response(model: Model, request: InferenceRequest, outcome: Any, final: bool) -> Response:
    if outcome is None:
        return None, None, final
    if isinstance(outcome, BaseException):
        error = _as_error(outcome, model.label, "") if isinstance(outcome, Exception) else \
            InternalError(f"model {model.label} failed: {outcome!r}")
        return None, error, final
    try:
        return _outputs(model, outcome, request.requested_outputs), None, final
    except NereidError as exc:
        return None, exc, final


def _outputs(model: Model, outputs: dict[str, np.ndarray], wanted: tuple[str, ...] | None) -> dict[str, np.ndarray]:
    """The requested outputs a response carries, in order. A decoupled model's response may
    carry fewer than all of them (Triton passes on what the model sent)."""
    result: dict[str, np.ndarray] = {}
    classified: frozenset[str] = getattr(outputs, "classified", frozenset())  # ClassifiedOutputs: those are BYTES now
    for name in wanted or model.outputs:
        arr = outputs.get(name)
        if arr is None:
            continue
        info = model.outputs[name]
        if info.itemsize and arr.dtype != info.dtype and name not in classified:
            raise InternalError(f"model {model.label} produced {arr.dtype} for output '{name}', "
                                f"config says {info.datatype}")
        result[name] = arr
    return ClassifiedOutputs(result, classified) if classified else result
