"""Business logic scripting: Python models calling other models, served in process.

A Python model's `InferenceRequest.exec()` reaches the server through its stub's socket
(backends/python_bls.py) and lands here: the call is checked against the target's
config as a gRPC request would be (codec.py's checks and messages), then run through
the target's own `Model.infer` on the event loop, so it is batched, scheduled, counted in
the target's statistics and bounded by its queue policy like any other request, and
never touches the network, the servicer's counters or its rate limits. It is a
transport like the gRPC one: the same request type, the same error tree.

A decoupled target's answers (`exec(decoupled=True)`) wait for credit: at most a window
(the 64 responses / 8 MiB of server/core/decoupled.py) sent to the caller's stub and not
yet taken by the caller (the stub reports what it took, backends/python_bls.py). Beyond
that this stops taking the callee's responses, so the callee's own window fills and its
sender blocks: a caller that does not iterate holds the callee back rather than filling
shared memory. The caller letting go of its iterator (or its stub going away) cancels
the callee's request.

Answers are written to the caller's socket from the event loop, which must never block on
it: a default-mode stub reads that socket only while one of its callers waits (or between
requests), so several calls' windows can fill it. Before each answer (inference or model
management) the loop checks that the socket has room (a poll every few dozen answers:
AnswerRoom, backends/python_bls.py) and otherwise waits for it, asynchronously; the answers
wait here meanwhile, bounded by the windows. The wait ends when the stub goes away.

Failures come back to the model as a response with an error (Triton's messages and
codes); the model-management calls (`is_model_ready`, `load_model`, `unload_model`)
answer a value or an error the stub raises as `TritonModelException`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from backends.datatypes import protocol_of_numpy
from backends.python_bls import AnswerRoom, BlsCall, CallFlow, Failure, Respond, set_host
from server.core.decoupled import WINDOW_BYTES, WINDOW_RESPONSES, stream_responses
from server.core.model import Model
from server.core.state import ModelState
from server.errors import ErrorCode, InvalidInput, ModelNotFound, ModelUnavailable, NereidError
from server.protocol.codec import _accept, _count_error
from server.repository.manager import RepositoryManager
from server.repository.registry import parse_version
from server.types import InferenceRequest

log = logging.getLogger("nereid.bls")

# NereidError codes -> pb_utils.TritonError codes (Triton's TRITONSERVER_Error_Code values)
_TRITON_CODE = {
    ErrorCode.INTERNAL: 1, ErrorCode.NOT_FOUND: 2, ErrorCode.INVALID_ARGUMENT: 3, ErrorCode.UNAVAILABLE: 4,
    ErrorCode.UNIMPLEMENTED: 5, ErrorCode.ALREADY_EXISTS: 6, ErrorCode.CANCELLED: 7,
    ErrorCode.RESOURCE_EXHAUSTED: 4, ErrorCode.DEADLINE_EXCEEDED: 4,
}
_INTERNAL = 1
_FLAG_START, _FLAG_END = 1, 2  # TRITONSERVER_REQUEST_FLAG_SEQUENCE_START / _END
_ROOM_POLL_MAX_S = 0.02  # how often an answer waiting for room in a full socket looks again, at most


def failure(exc: BaseException) -> Failure:
    """An exception as the (message, TritonError code) a model sees."""
    if isinstance(exc, NereidError):
        return str(exc), _TRITON_CODE.get(exc.code, _INTERNAL)
    return str(exc) or type(exc).__name__, _INTERNAL


def bls_request(model: Model, call: BlsCall) -> InferenceRequest:
    """The call as the core's request, checked against the model's config with the checks
    and messages of a gRPC request (codec.py); raises InvalidInput."""
    given = list(call.inputs)
    if len(given) > len(model.inputs) or len(given) < model.required_inputs:
        raise _count_error(model, given)
    batch = 0
    for name, array in call.inputs.items():
        try:
            datatype = protocol_of_numpy(array.dtype)
        except ValueError as exc:
            raise InvalidInput(f"input '{name}' for model '{model.name}': {exc}") from None
        _, size, _ = _accept(name, datatype, tuple(array.shape), model)
        if batch and size != batch:
            raise InvalidInput(f"input '{name}' batch size does not match other inputs for '{model.name}'")
        batch = size
    if any(not info.optional and name not in call.inputs for name, info in model.inputs.items()):
        raise _count_error(model, given)
    requested = call.requested_outputs
    if requested is not None:
        for name in requested:
            if name not in model.outputs:
                raise InvalidInput(f"unexpected inference output '{name}' for model '{model.name}'; "
                                   f"expected one of {list(model.outputs)}")
        if len(set(requested)) != len(requested):
            raise InvalidInput(f"an output is requested more than once: {list(requested)}")
    return InferenceRequest(dict(call.inputs), batch or 1, call.request_id, requested, _parameters(call))


def _parameters(call: BlsCall) -> dict[str, Any]:
    """The request's parameters as the gRPC frontend would give them: the model's own, plus
    timeout and the sequence fields from the request's timeout, correlation id and flags."""
    params: dict[str, Any] = {}
    for key, value in call.parameters.items():
        if not isinstance(value, (str, int, bool)):
            raise InvalidInput(f"Unsupported value type on parameters: '{key}' is a {type(value).__name__}; "
                               "expected a string, an integer or a bool")
        params[key] = value
    if call.timeout_us > 0:
        params["timeout"] = call.timeout_us
    if call.correlation_id not in (0, ""):
        params["sequence_id"] = call.correlation_id
    if call.flags & _FLAG_START:
        params["sequence_start"] = True
    if call.flags & _FLAG_END:
        params["sequence_end"] = True
    return params


class BlsService:
    """The server's `BlsHost` (backends/python_bls.py): runs the models' calls on the loop."""

    def __init__(self, manager: RepositoryManager, loop: asyncio.AbstractEventLoop) -> None:
        self.manager = manager
        self.loop = loop
        # Loads and unloads asked for by models wait here, not on the manager's loader threads:
        # a model loading another from its `initialize` already holds one of those.
        self._loads = ThreadPoolExecutor(max_workers=2, thread_name_prefix="nereid-bls-load")

    def install(self) -> None:
        set_host(self)

    def close(self) -> None:
        set_host(None)
        self._loads.shutdown(wait=False)

    # -- BlsHost --

    def infer(self, call: BlsCall, respond: Respond) -> None:
        self._spawn(self._infer(call, respond), respond)

    def control(self, op: str, args: dict[str, Any], respond: Respond, room: AnswerRoom | None = None) -> None:
        self._spawn(self._control(op, args, respond, room), respond)

    def _spawn(self, coroutine: Any, respond: Respond) -> None:
        """Run on the event loop, from whichever thread read the stub's message (the loop's too)."""
        try:
            asyncio.run_coroutine_threadsafe(coroutine, self.loop)
        except RuntimeError:  # the loop has closed: the server is gone
            coroutine.close()
            respond(None, ("the server is stopping", 4), True)

    async def _infer(self, call: BlsCall, respond: Respond) -> None:
        name = call.model_name
        try:
            model = self._target(call)
            request = bls_request(model, call)
        except NereidError as exc:  # refused before running: Triton's wording, INTERNAL as Triton
            await self._answer(call.answer_room, respond, None,
                               (f"Model {name} - Error when running inference: {exc}", _INTERNAL))
            return
        if model.config.model_transaction_policy.decoupled:
            await self._stream(model, request, respond, call.flow, call.answer_room)
            return
        try:
            outputs = await model.infer(request)
        except Exception as exc:
            await self._answer(call.answer_room, respond, None, failure(exc))
            return
        await self._answer(call.answer_room, respond, outputs, None)

    async def _answer(self, room: AnswerRoom | None, respond: Respond, outputs: dict[str, np.ndarray] | None,
                      fail: Failure | None) -> None:
        """A call's one (final) answer, once the caller's socket has room for it."""
        await self._room(room)
        respond(outputs, fail, True)

    @staticmethod
    async def _room(room: AnswerRoom | None) -> None:
        """Wait until the caller's socket takes an answer without blocking the loop (usually
        at once, without a system call: AnswerRoom). Polled (1 ms, doubling to 20 ms) rather
        than watched: a watched fd is made non-blocking (uvloop), and the instance's thread
        reads this socket blocking meanwhile."""
        if room is None or room.ready():
            return
        pause = 0.001
        while not room.ready():
            await asyncio.sleep(pause)
            pause = min(pause * 2, _ROOM_POLL_MAX_S)

    async def _stream(self, model: Model, request: InferenceRequest, respond: Respond,
                      flow: CallFlow | None, room: AnswerRoom | None) -> None:
        """A decoupled target (the caller asked for `decoupled=True`): every response it sends
        goes back as an answer as it comes, the last one final, each once the caller's window
        has room for it (module docstring); the final flag sent alone is an empty final
        answer, as Triton's response iterator yields it."""
        credit = _Credit(self.loop, asyncio.current_task())
        if flow is not None:
            flow.listen(credit.told)
        async with contextlib.aclosing(stream_responses(model, request)) as responses:
            async for outputs, error, final in responses:
                if not final:
                    await credit.room()
                await self._room(room)
                if credit.dropped:
                    return  # the caller let go: closing the stream cancels the callee's request
                if error is not None:
                    respond(None, failure(error), final)
                else:
                    respond(outputs or {}, None, final)
                if not final:
                    credit.sent(sum(getattr(a, "nbytes", 0) for a in (outputs or {}).values()))

    def _target(self, call: BlsCall) -> Model:
        name = call.model_name
        try:
            model = self.manager.get(name, call.model_version)
        except (ModelNotFound, ModelUnavailable):
            raise ModelUnavailable(
                f"Failed for execute the inference request. Model '{name}' is not ready.") from None
        if model.state is not ModelState.READY:
            raise ModelUnavailable(f"Failed for execute the inference request. Model '{name}' is not ready.")
        decoupled = model.config.model_transaction_policy.decoupled
        if decoupled and not call.decoupled:
            raise InvalidInput(
                f"Model {name} is using the decoupled. The current BLS request call doesn't support models "
                "using the decoupled transaction policy. Please use 'decoupled=True' argument to the 'exec' or "
                "'async_exec' calls for decoupled models.'")
        return model

    async def _control(self, op: str, args: dict[str, Any], respond: Respond, room: AnswerRoom | None) -> None:
        """A model-management call. Its caller waits for the answer (and so its stub reads the
        socket), but the answer still waits for room like every other: the loop never writes
        to a full socket."""
        try:
            outputs = await self._managed(op, args)
        except Exception as exc:
            await self._answer(room, respond, None, failure(exc))
            return
        await self._answer(room, respond, outputs, None)

    async def _managed(self, op: str, args: dict[str, Any]) -> dict[str, np.ndarray]:
        """What a model-management call answers: {"ready": [bool]}, or {} once loaded or unloaded."""
        if op == "ready":
            return {"ready": np.array([self._ready(args["name"], args["version"])])}
        if op not in ("load", "unload"):
            raise InvalidInput(f"unknown model management call '{op}'")
        self.manager.require_explicit()
        if op == "load":
            await self.loop.run_in_executor(self._loads, self.manager.load_explicit, args["name"], args["parameters"])
        else:  # unload_dependents as RepositoryModelUnload (docs/ENSEMBLES.md)
            await self.loop.run_in_executor(self._loads, self.manager.unload_explicit, args["name"],
                                            bool(args.get("unload_dependents", False)))
        return {}

    def _ready(self, name: str, version: str) -> bool:
        """Triton's TRITONSERVER_ServerModelIsReady: false (not an error) for an unknown model."""
        try:
            entry = self.manager.entry(name)
        except ModelNotFound:
            return False
        if not version:
            return entry.latest_ready is not None
        model = entry.versions.get(parse_version(version, name))
        return model is not None and model.state is ModelState.READY


class _Credit:
    """One decoupled call's answers sent to the caller's stub and not yet taken by the caller
    (on the event loop; the stub's reports arrive through `told`, from any thread)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, task: asyncio.Task[Any] | None) -> None:
        self._loop = loop
        self._task = task  # the call's: cancelled when the caller lets go (the callee may send nothing for long)
        self._sizes: deque[int] = deque()
        self._bytes = 0
        self.dropped = False
        self._waiter: asyncio.Future[None] | None = None

    def told(self, count: int) -> None:
        """The stub took `count` answers (-1: the caller let go of the call)."""
        try:
            self._loop.call_soon_threadsafe(self._update, count)
        except RuntimeError:  # the loop has closed: nothing waits any more
            pass

    def _update(self, count: int) -> None:
        if count < 0:
            self.dropped = True
            if self._task is not None:
                self._task.cancel()  # at its next wait: closing the stream cancels the callee's request
        for _ in range(min(max(count, 0), len(self._sizes))):
            self._bytes -= self._sizes.popleft()
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def sent(self, size: int) -> None:
        self._sizes.append(size)
        self._bytes += size

    async def room(self) -> None:
        """Wait until the caller's window has room for one more answer, or the caller let go.
        The window is full at 64 answers or 8 MiB, counting only what was sent (one answer
        may take it past 8 MiB): the stub reports every 16 answers or 2 MiB taken, so once
        the caller took everything, what it has not reported never fills the window, and it
        need not report before it waits (which cost a message per answer to a caller that
        keeps up)."""
        while not self.dropped and (len(self._sizes) >= WINDOW_RESPONSES or self._bytes >= WINDOW_BYTES):
            self._waiter = self._loop.create_future()
            await self._waiter
