"""A decoupled ensemble's request: steps that answer many times, each answer feeding the next steps.

Triton's ensemble scheduler (core `ensemble_scheduler.cc`) keeps, for every ensemble tensor,
one value per *iteration*: each response of a step adds a new iteration of the tensors it
writes. A step runs once per iteration for which all its inputs exist (load-time checks make
sure a step never mixes tensors descended from different decoupled steps, ensemble_plan.py
`decoupled_flow`, so the iterations of its inputs line up). Whenever an iteration of the
requested outputs is complete, it goes to the client as one response; the response sent
when no step request is left in flight carries the final flag, or, when the last thing to
happen was a step finishing without new outputs, the final flag goes alone (a decoupled
ensemble, like a decoupled model, may answer zero times).

How it runs here: every step request is a task on the event loop (a decoupled step model
through `stream_responses`, the same path ModelStreamInfer takes; another one through
`Model.infer`); the tasks post their responses to one queue and this loop consumes them in
order, so the iteration bookkeeping needs no locks. A tensor's iteration is dropped once
every step (and the response) that reads it has taken it. The ensemble's responses go to
the request's `sink` (decoupled.py ResponseStream), as a decoupled backend's do.

Back-pressure: the ensemble's responses wait for room in its `sink` (`ResponseStream.put`,
the window of 64 responses / 8 MiB not yet taken that a decoupled model's sender gets),
asynchronously, so a client that does not read stops this loop rather than filling memory.
While it waits, the steps hold their responses too: a step task waits (`_open`) before
passing on a response that is not final, so it stops taking its step model's responses,
whose own window then fills and blocks that model's sender thread (decoupled.py), as a
client that does not read a plain decoupled model does. What is held is then at most the
ensemble's window, one window per decoupled step request in flight, and the responses
already passed on and not yet used (at most what the step tasks took in one pass of the loop
before it waited); `max_inflight_requests` bounds how many step requests a fan-out has in
flight. Final step events never wait (they end a step request, which may be what a
`max_inflight_requests` wait in `_launch` is waiting for). Cancelling the request (the
client went away) closes the sink, which releases the loop, and cancels the step tasks.

Errors: the first step error (an error response of a decoupled step, a failed request of
another) ends the request: the step requests still in flight are cancelled (a decoupled
Python step sees `is_cancelled()`), and the error, named after the ensemble and the step, is
the final response. Triton waits for the steps in flight to finish before it sends the
error; their results would be dropped anyway.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from time import perf_counter_ns
from typing import TYPE_CHECKING, Any

import numpy as np

from server.core.decoupled import stream_responses
from server.core.ensemble_plan import StepPlan
from server.errors import InternalError, NereidError, Unsupported
from server.types import InferenceRequest

if TYPE_CHECKING:
    from server.core.ensemble import EnsembleModel

log = logging.getLogger("nereid.ensemble")

# (step, outputs or None, error or None, final, the step request's timing when final)
_Event = tuple[StepPlan, "dict[str, np.ndarray] | None", "BaseException | None", bool, Any]


async def infer_streamed(ensemble: EnsembleModel, request: InferenceRequest) -> dict[str, np.ndarray]:
    """Run `request` on a decoupled ensemble: its responses go to `request.sink`; returns {}."""
    sink = request.sink
    if sink is None:  # a caller that expects one answer (ModelInfer refuses such models before this)
        raise Unsupported(f"model {ensemble.label} is decoupled: its responses can only be streamed "
                          "(ModelStreamInfer)")
    sink.on_cancel(lambda: None)  # this ensemble sends the final response; a cancel cancels this task
    started = perf_counter_ns()
    ensemble.inflight += 1
    try:
        flow = _Flow(ensemble, request, sink)
        await flow.run()
    except asyncio.CancelledError:
        ensemble.stats.record_failure(1, perf_counter_ns() - started, "CANCELED")
        raise
    except Exception as exc:
        ensemble.stats.record_failure(1, perf_counter_ns() - started, "BACKEND")
        if not isinstance(exc, NereidError):
            log.exception("%s: the ensemble request failed unexpectedly", ensemble.label)
            exc = InternalError(f"in ensemble '{ensemble.name}': {exc!r}")
        sink.send(exc, True)
        return {}
    finally:
        ensemble.inflight -= 1
    d = flow.durations
    ensemble.stats.record_execution(request.batch_size, 1, d[0], d[1], d[2], max(0, flow.sent_first - started),
                                    perf_counter_ns() - started)
    return {}


class _Flow:
    """One request's ensemble tensors by iteration, the step requests in flight, and the loop."""

    def __init__(self, ensemble: EnsembleModel, request: InferenceRequest, sink: Any) -> None:
        self.ensemble = ensemble
        self.request = request
        self.sink = sink
        plan = ensemble.plan
        needed = ensemble.steps_for(request.requested_outputs)
        self.wanted = request.requested_outputs if request.requested_outputs is not None \
            else tuple(ensemble.outputs)
        # Who reads each tensor: the (needed) steps, and the response when it is a requested output.
        self.readers: dict[str, list[int]] = {}
        self.uses: dict[str, int] = {}
        for index in needed:
            for _, tensor in plan[index].inputs:
                self.readers.setdefault(tensor, []).append(index)
                self.uses[tensor] = self.uses.get(tensor, 0) + 1
        for tensor in self.wanted:
            self.uses[tensor] = self.uses.get(tensor, 0) + 1
        # tensor -> iteration -> [value (None: a missing optional one), readers left]
        self.values: dict[str, dict[int, list[Any]]] = {}
        self.iterations: dict[str, int] = {}
        self.launched: set[tuple[int, int]] = set()
        self.events: asyncio.Queue[_Event] = asyncio.Queue()
        self.tasks: set[asyncio.Task[None]] = set()
        self.inflight = 0
        self.durations = [0, 0, 0]
        self.sent_first = 0
        # Set unless this loop waits for room in the sink: the step tasks pass on responses only then.
        self.open = asyncio.Event()
        self.open.set()

    def add(self, tensor: str, value: np.ndarray | None) -> tuple[str, int]:
        iteration = self.iterations.get(tensor, 0)
        self.iterations[tensor] = iteration + 1
        uses = self.uses.get(tensor, 0)
        if uses:
            self.values.setdefault(tensor, {})[iteration] = [value, uses]
        return tensor, iteration

    def take(self, tensor: str, iteration: int) -> np.ndarray | None:
        by_iteration = self.values[tensor]
        slot = by_iteration[iteration]
        slot[1] -= 1
        if slot[1] == 0:
            del by_iteration[iteration]
        return slot[0]  # type: ignore[no-any-return]

    def has(self, tensor: str, iteration: int) -> bool:
        return iteration in self.values.get(tensor, ())

    async def run(self) -> None:
        updated = [self.add(name, array) for name, array in self.request.inputs.items()]
        updated += [self.add(name, None) for name in self.ensemble.inputs if name not in self.request.inputs]
        try:
            while True:
                await self._launch(updated)
                responses = self._responses(updated)
                for i, response in enumerate(responses):
                    last = self.inflight == 0 and i == len(responses) - 1
                    await self._send(self.ensemble.classified(response, self.request), last)
                if self.inflight == 0:
                    if not responses:
                        self.sink.send(None, True)  # the final flag alone
                    return
                step, outputs, error, final, timing = await self.events.get()
                if final:
                    self.inflight -= 1
                    self._count(timing)
                if error is not None:
                    raise self.ensemble.step_error(step, error)
                updated = [] if outputs is None else \
                    [self.add(tensor, outputs.get(output)) for output, tensor in step.outputs]
        finally:
            for task in self.tasks:
                task.cancel()
            if self.tasks:
                await asyncio.gather(*self.tasks, return_exceptions=True)

    async def _send(self, outcome: dict[str, np.ndarray], final: bool) -> None:
        """One ensemble response to the sink, waiting for room there; the steps wait meanwhile."""
        put = getattr(self.sink, "put", None)
        if put is None:  # a sink without a window
            self.sink.send(outcome, final)
            return
        self.open.clear()
        try:
            await put(outcome, final)
        finally:
            self.open.set()

    async def _launch(self, updated: list[tuple[str, int]]) -> None:
        """Send a request to every step whose inputs of one iteration are all there now."""
        ready: list[tuple[int, int]] = []
        plan = self.ensemble.plan
        for tensor, iteration in updated:
            for index in self.readers.get(tensor, ()):
                key = (index, iteration)
                if key in self.launched or not all(self.has(t, iteration) for _, t in plan[index].inputs):
                    continue
                self.launched.add(key)
                ready.append(key)
        limiters = self.ensemble.limiters
        for index, iteration in sorted(ready):
            step = plan[index]
            values = {tensor: self.take(tensor, iteration) for _, tensor in step.inputs}
            if limiters is not None:
                await limiters[index].acquire()  # max_inflight_requests
            if not self.sent_first:
                self.sent_first = perf_counter_ns()
            self.inflight += 1
            task = asyncio.ensure_future(self._step(step, {t: v for t, v in values.items() if v is not None}))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
            if limiters is not None:  # the slot is the step request's until it ends (even if never started)
                task.add_done_callback(limiters[index].released)

    def _responses(self, updated: list[tuple[str, int]]) -> list[dict[str, np.ndarray]]:
        """The ensemble responses completed by `updated`: one per iteration of all requested outputs."""
        wanted = set(self.wanted)
        done: list[dict[str, np.ndarray]] = []
        for iteration in dict.fromkeys(i for t, i in updated if t in wanted):
            if not all(self.has(name, iteration) for name in self.wanted):
                continue
            response = {name: self.take(name, iteration) for name in self.wanted}
            done.append({name: value for name, value in response.items() if value is not None})
        return done

    async def _step(self, step: StepPlan, values: dict[str, np.ndarray]) -> None:
        """One step request; each response becomes an event. Always ends with a final event."""
        put = self.events.put_nowait
        timing = None
        try:
            model, sub = self.ensemble.step_request(step, values, self.request)
            timing = sub.trace
            if model.decoupled:
                # aclosing: a cancel while waiting for room below closes the step's stream (and
                # cancels its request) at once, not when the generator is garbage-collected
                async with contextlib.aclosing(stream_responses(model, sub)) as responses:
                    async for outputs, error, final in responses:
                        if not final:
                            await self.open.wait()  # the ensemble's own responses wait for room
                        put((step, outputs, error, final, timing if final else None))
                        if final:
                            return
                put((step, None, InternalError(f"model {model.label} ended its responses without the final flag"),
                     True, timing))
            else:
                put((step, await model.infer(sub), None, True, timing))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            put((step, None, exc, True, timing))

    def _count(self, timing: Any) -> None:
        compute = getattr(timing, "compute", None)
        if compute is not None:
            _, began, prepared, executed, finished = compute
            self.durations[0] += prepared - began
            self.durations[1] += executed - prepared
            self.durations[2] += finished - executed
