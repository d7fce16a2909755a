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
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import numpy as np

from server.core.classification import ClassifiedOutputs
from server.core.instance import _as_error
from server.core.model import Model
from server.errors import InternalError, NereidError
from server.types import InferenceRequest

# One response as the protocol layer gets it: (outputs or None, error or None, final).
Response = tuple[dict[str, np.ndarray] | None, NereidError | None, bool]


class ResponseStream:
    """One request's responses, from the backend's threads to the event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.queue: asyncio.Queue[tuple[Any, bool, int]] = asyncio.Queue()
        self.attached = False  # the backend took the request: it will send the final response
        self._cancel: Callable[[], None] | None = None

    # -- the backend's side (any thread) --

    def send(self, outcome: Any, final: bool) -> None:
        try:
            self._loop.call_soon_threadsafe(self.queue.put_nowait, (outcome, final, time.perf_counter_ns()))
        except RuntimeError:  # the loop has closed (shutdown): nobody is listening
            pass

    def on_cancel(self, callback: Callable[[], None]) -> None:
        self._cancel = callback
        self.attached = True

    # -- the event loop's side --

    def cancel(self) -> None:
        callback, self._cancel = self._cancel, None
        if callback is not None:
            callback()


async def stream_responses(model: Model, request: InferenceRequest) -> AsyncIterator[Response]:
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
                                 time.perf_counter_ns()))

    task.add_done_callback(executed)
    finished = False
    # response_stats: compute_infer runs from the request's start, then from the previous response's send
    index, previous = 0, time.perf_counter_ns()
    try:
        while not finished:
            outcome, finished, sent = await stream.queue.get()
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
