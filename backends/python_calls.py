"""Calling a Python model's `execute` and reading its answers: shared by the stub process
(backends/python_stub.py) and the in-process mode (backends/python_inproc.py), so a model sees
the same semantics in both: response senders in the default mode, rescheduled requests,
`async def execute`, one InferenceResponse per request checked, an exception failing the call.

It imports the model-facing `triton_python_backend_utils` (backends/pb_utils/), putting its
folder on `sys.path` once, so models import the same module object as this code checks against.
"""

from __future__ import annotations

import asyncio
import sys
import traceback
from pathlib import Path
from typing import Any

_PB_UTILS = str(Path(__file__).resolve().parent / "pb_utils")
if _PB_UTILS not in sys.path:
    sys.path.insert(0, _PB_UTILS)

import triton_python_backend_utils as pb_utils  # noqa: E402 - needs the path above

# Frames of these files are ours, not the model's, when saying where an exception came from.
_OURS = ("python_stub.py", "python_calls.py", "python_inproc.py", "python_modules.py")


def describe(exc: BaseException) -> str:
    """`ValueError: bad shape (model.py:27 in execute)`: what and where, on one line."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if not f.filename.endswith(_OURS)]
    where = f" ({Path(frames[-1].filename).name}:{frames[-1].lineno} in {frames[-1].name})" if frames else ""
    return f"{type(exc).__name__}: {exc}{where}"


def failed_response(exc: BaseException) -> Any:
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(describe(exc)))


class ExecuteFailed(Exception):
    """The model's `execute` failed as a whole (it raised, or answered the wrong number)."""


class ModelCalls:
    """The calls into one `TritonPythonModel`; the user sets `model`, `model_name`, `iterative`
    (sequence_batching iterative_sequence) and `_loop` (None: made for the first `async def execute`)."""

    model: Any
    model_name: str
    iterative: bool
    _loop: asyncio.AbstractEventLoop | None

    def _run(self, requests: list[Any], states: list[Any]) -> list[Any]:
        """The model's responses, one per request. A request answered through its response sender
        (default mode) gets what the sender sent; what was sent before `execute` raised stands.
        A request the model released with TRITONSERVER_REQUEST_RELEASE_RESCHEDULE runs again (flags
        cleared, as Triton re-enqueues it) in a later `execute` until it is answered; that needs
        `iterative_sequence`, as in Triton."""
        responses: list[Any] = [None] * len(requests)
        pending = list(range(len(requests)))
        while pending:
            batch = [requests[i] for i in pending]
            batch_states = [states[i] for i in pending]
            try:
                answers = self.model.execute(batch)
                if not isinstance(answers, (list, tuple)) and asyncio.iscoroutine(answers):
                    answers = self._run_async(answers)  # an `async def execute`
            except Exception as exc:
                traceback.print_exc()
                if not any(state.sent for state in batch_states):
                    raise ExecuteFailed(describe(exc)) from exc
                answers = [state.response if state.sent else failed_response(exc) for state in batch_states]
            if answers is None or isinstance(answers, (list, tuple)) and (
                    any(state.sent for state in batch_states) or any(r is None for r in answers)):
                answers = self._sent_responses(batch, batch_states, answers)
            if not isinstance(answers, (list, tuple)) or len(answers) != len(batch):
                got = len(answers) if isinstance(answers, (list, tuple)) else type(answers).__name__
                raise ExecuteFailed(
                    f"execute() must return one InferenceResponse per request ({len(batch)}), got {got}")
            again = []
            for i, request, answer in zip(pending, batch, answers, strict=True):
                if request.release_flags() != pb_utils.TRITONSERVER_REQUEST_RELEASE_RESCHEDULE:
                    responses[i] = answer
                elif not self.iterative:
                    responses[i] = pb_utils.InferenceResponse(error=pb_utils.TritonError(
                        "Request is released with TRITONSERVER_REQUEST_RELEASE_RESCHEDULE, but model "
                        f"'{self.model_name}' does not set sequence_batching {{ iterative_sequence: true }}, "
                        "which rescheduling needs"))
                else:
                    request.set_release_flags(pb_utils.TRITONSERVER_REQUEST_RELEASE_ALL)
                    request._flags = 0
                    again.append(i)
            pending = again
        return responses

    @staticmethod
    def _sent_responses(requests: list[Any], states: list[Any], returned: Any) -> list[Any]:
        """Default mode with response senders: a request `execute` returned None for is answered
        by what its sender sends (waiting for the final flag, which may come from another thread)."""
        if returned is not None and len(returned) != len(requests):
            return list(returned)  # reported as a count mismatch by the caller
        out = []
        for i, (request, state) in enumerate(zip(requests, states, strict=True)):
            response = None if returned is None else returned[i]
            if state.closed or response is None and getattr(request, "_sender_used", False):
                state.done.wait()
                response = state.response
            out.append(response if response is not None else failed_response(ValueError(
                "execute() returned None for a request of a model that is not decoupled, and sent it no "
                "response through its response sender")))
        return out

    def _run_async(self, coroutine: Any) -> Any:
        """Run an `async def execute` to completion on the stub's event loop (as Triton does);
        tasks it started and left behind are cancelled, and BLS answers nobody awaits dropped."""
        if self._loop is None:
            self._loop = asyncio.new_event_loop()
        loop = self._loop
        try:
            return loop.run_until_complete(coroutine)
        finally:
            left = [t for t in asyncio.all_tasks(loop) if not t.done()]
            for task in left:
                task.cancel()
            if left:  # their BLS calls are abandoned as they end (python_bls_stub.py)
                loop.run_until_complete(asyncio.gather(*left, return_exceptions=True))

    @staticmethod
    def _response(response: Any, wanted: set[str]) -> list[tuple[str, Any]] | tuple[str, str, int]:
        if not isinstance(response, pb_utils.InferenceResponse):
            return ("err", f"execute() returned {type(response).__name__} instead of an InferenceResponse",
                    pb_utils.TritonError.INTERNAL)
        if response.has_error():
            error = response.error()
            code = error.code() if hasattr(error, "code") else pb_utils.TritonError.INTERNAL
            message = error.message() if hasattr(error, "message") else str(error)
            return ("err", message, code)
        return [(t.name(), t.as_numpy()) for t in response.output_tensors() if t.name() in wanted]
