"""An ensemble (`platform: "ensemble"`): a data flow between other models, run in this process.

An ensemble has no instances and no backend. A request's tensors go to the steps whose inputs
exist; each step is an ordinary in-process call to the step model's `Model.infer` (the same
scheduler, batcher and instances that a gRPC request to that model uses), so intermediate
tensors never leave the process and are never copied. Steps whose inputs are all there run
at once, concurrently with the others (a DAG, not a sequence). Only the steps that lead to
the requested outputs run (Triton prunes the same way).

A step error fails the request with the step's status code and message, prefixed with the
ensemble and the step (`in ensemble 'e', step 1 (model 'post'): ...`; Triton's prefix is
`in ensemble 'e', `). The request's id and parameters go to every step.

Statistics follow Triton: each ensemble request counts once (inference_count by its batch
size, one execution), its compute durations are the sums of its steps' compute durations,
its queue time is the ensemble's own scheduling before the first step is sent (Triton's
queue start to compute start), and each step model counts its own requests as usual.

An ensemble with a decoupled step is itself decoupled (Triton sets its transaction policy
when it loads): it answers on ModelStreamInfer only, every response of a decoupled step
feeding the steps after it (ensemble_stream.py). Other ensembles take the path below.
"""

from __future__ import annotations

import asyncio
import copy
import logging
from pathlib import Path
from time import monotonic, perf_counter_ns, sleep
from typing import Protocol

import numpy as np
from tritonclient.grpc import model_config_pb2 as mc

from backends.base import BackendError
from server.core.classification import Labels, classify_outputs, load_labels
from server.core.ensemble_plan import StepPlan, decoupled_flow, plan_steps, steps_problem
from server.core.ensemble_stream import infer_streamed
from server.core.limits import ServingLimits
from server.core.model import Model
from server.core.signature import TensorInfo
from server.core.state import ModelState
from server.core.step_limiter import step_limiters
from server.errors import InternalError, InvalidInput, ModelUnavailable, NereidError
from server.types import InferenceRequest

log = logging.getLogger("nereid.ensemble")


class StepModels(Protocol):
    """Where an ensemble finds its step models (the repository's registry)."""

    def get(self, name: str, version: str = "") -> Model: ...

    def known(self, name: str) -> bool: ...


class _StepTiming:
    """Handed to a step request as its `trace`: the instance that runs it records its
    (enqueued, started, prepared, executed, finished) timestamps here (core/instance.py)."""

    __slots__ = ("compute",)

    def __init__(self) -> None:
        self.compute: tuple[int, int, int, int, int] | None = None


class EnsembleModel(Model):
    """One version of an ensemble. READY once every step model serves and fits (ensemble_plan.py)."""

    def __init__(self, config: mc.ModelConfig, model_dir: Path, version: int, limits: ServingLimits | None,
                 steps: StepModels) -> None:
        super().__init__(config, model_dir, version, limits)
        self._models = steps
        self.plan = plan_steps(config)
        self.step_names = list(dict.fromkeys(step.model for step in self.plan))
        # UNAVAILABLE because of its steps (one missing, unloaded or not fitting): the repository
        # manager tries it again whenever one of its step models changes.
        self.blocked = False
        self._inputs_set = frozenset(self.inputs)
        self._producer = {tensor: step.index for step in self.plan for _, tensor in step.outputs}
        self._pruned: dict[tuple[str, ...] | None, tuple[int, ...]] = {}
        # max_inflight_requests: one limiter per step, shared by all requests (step_limiter.py).
        self.limiters = step_limiters(config.ensemble_scheduling.max_inflight_requests, len(self.plan))
        self._flow_decoupled = False  # what the step models serving now make of it (steps_problem)

    # -- lifecycle --

    def load(self) -> None:
        try:
            self.labels = load_labels(self.config, self.spec.model_dir)
        except (ValueError, OSError, NereidError) as exc:
            self.state, self.reason = ModelState.UNAVAILABLE, str(exc)
            raise BackendError(str(exc)) from None
        problem = self.steps_problem()
        if problem:
            self.state, self.reason, self.blocked = ModelState.UNAVAILABLE, problem, True
            raise BackendError(problem)
        # As Triton, the ensemble is decoupled when a step is: its config says so (ModelConfig RPC, BLS).
        # A copy: the repository compares `source_config` with the config on disk.
        self.decoupled = self._flow_decoupled
        if self.decoupled != self.config.model_transaction_policy.decoupled:
            config = type(self.source_config)()
            config.CopyFrom(self.source_config)
            config.model_transaction_policy.decoupled = self.decoupled
            self.config = config
        self.state, self.reason, self.blocked = ModelState.READY, "", False

    def steps_problem(self) -> str:
        """Why the ensemble cannot serve with the step models serving now ('' if it can); Triton's messages."""
        name = self.name
        if name in self.step_names:
            return f"circular dependency between ensembles: {name} -> ... -> {name} -> {name}"
        missing = [step for step in self.step_names if not self._models.known(step)]
        if missing:
            return f"ensemble {name} contains models that are not available: {', '.join(missing)}"
        configs: dict[str, mc.ModelConfig] = {}
        for step in self.plan:
            try:
                model = self._models.get(step.model, step.version)
            except NereidError as exc:
                if step.version:
                    return (f"ensemble '{name}' depends on '{step.model}' whose required version {step.version} "
                            f"is not loaded.")
                return f"ensemble '{name}' depends on '{step.model}' which has no loaded version. {exc}"
            configs.setdefault(step.model, model.config)
        problem = steps_problem(self.config, configs)
        if problem:
            return problem
        decoupled = decoupled_flow(self.config, configs)[1]
        if self.state is ModelState.READY and decoupled != self.decoupled:
            # A step was reloaded with another transaction policy: the ensemble's changes with it (a new load).
            now = "decoupled" if decoupled else "not decoupled"
            return f"ensemble '{name}': a step model changed its transaction policy, the ensemble is now {now}"
        self._flow_decoupled = decoupled
        return ""

    def unload(self, timeout: float | None = None) -> None:
        """Let the requests in flight finish (their steps run in their own models), then stop."""
        self.state = ModelState.UNLOADING
        deadline = None if timeout is None else monotonic() + timeout
        while self.inflight > 0 and (deadline is None or monotonic() < deadline):
            sleep(0.005)
        self.state = ModelState.UNAVAILABLE
        self.reason = "unloaded"

    def pending(self) -> int:
        return 0

    # -- requests (event loop) --

    async def infer(self, request: InferenceRequest) -> dict[str, np.ndarray]:
        if self.state is not ModelState.READY:
            raise ModelUnavailable(f"{self.label} is not at ready state")
        if self.decoupled:
            return await infer_streamed(self, request)
        started = perf_counter_ns()
        self.inflight += 1
        try:
            values, durations = await self._run(request)
        except asyncio.CancelledError:
            self.stats.record_failure(1, perf_counter_ns() - started, "CANCELED")
            raise
        except BaseException:
            self.stats.record_failure(1, perf_counter_ns() - started, "BACKEND")
            raise
        finally:
            self.inflight -= 1
        wanted = request.requested_outputs if request.requested_outputs is not None else tuple(self.outputs)
        result = {name: values[name] for name in wanted}
        self.stats.record_execution(request.batch_size, 1, durations[0], durations[1], durations[2],
                                    durations[3] - started, perf_counter_ns() - started)
        return self.classified(result, request)

    def classified(self, outputs: dict[str, np.ndarray], request: InferenceRequest) -> dict[str, np.ndarray]:
        """The classification extension on the ensemble's outputs, as Triton's frontend classifies
        the ensemble's response (unary and streamed responses alike)."""
        if not request.classification:
            return outputs
        return classify_outputs(outputs, request.classification, self._output_labels(),
                                self.config.max_batch_size > 0)

    def _output_labels(self) -> Labels:
        """Labels for classifying ensemble outputs: the ensemble's own `label_filename`, else those
        of the step model output that produces the tensor (Triton's ensemble_image_client gets
        the classifier's labels through the ensemble)."""
        labels: Labels = dict(self.labels)
        for name in self.outputs:
            if name in labels:
                continue
            index = self._producer.get(name)
            if index is None:
                continue
            step = self.plan[index]
            try:
                model = self._models.get(step.model, step.version)
            except NereidError:
                continue
            for model_output, tensor in step.outputs:
                if tensor == name and model_output in model.labels:
                    labels[name] = model.labels[model_output]
        return labels

    async def _run(self, request: InferenceRequest) -> tuple[dict[str, np.ndarray], list[int]]:
        """Run the steps as their inputs appear; returns every tensor, the summed compute times and
        when the first step was sent (the end of the ensemble's queue time)."""
        values: dict[str, np.ndarray] = dict(request.inputs)
        absent = self._inputs_set.difference(values)  # optional ensemble inputs left out
        waiting = set(self.steps_for(request.requested_outputs))
        durations = [0, 0, 0, 0]
        running: dict[asyncio.Task[tuple[dict[str, np.ndarray], _StepTiming]], StepPlan] = {}

        def ready() -> list[StepPlan]:
            found = [self.plan[i] for i in sorted(waiting)
                     if all(t in values or t in absent for _, t in self.plan[i].inputs)]
            waiting.difference_update(step.index for step in found)
            return found

        def store(step: StepPlan, outputs: dict[str, np.ndarray], timing: _StepTiming) -> None:
            for model_output, tensor in step.outputs:
                values[tensor] = outputs[model_output]
            if timing.compute is not None:
                _, began, prepared, executed, finished = timing.compute
                durations[0] += prepared - began
                durations[1] += executed - prepared
                durations[2] += finished - executed

        try:
            steps = ready()
            durations[3] = perf_counter_ns()
            while steps or running:
                if len(steps) == 1 and not running:  # a chain: no task needed
                    outputs, timing = await self._call(steps[0], values, request)
                    store(steps[0], outputs, timing)
                else:
                    for step in steps:
                        running[asyncio.ensure_future(self._call(step, values, request))] = step
                    done, _ = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                    for task in sorted(done, key=lambda t: running[t].index):
                        step = running.pop(task)
                        outputs, timing = task.result()  # a step's error ends the request here
                        store(step, outputs, timing)
                steps = ready()
        finally:
            if running:  # a step failed (or the request was cancelled): the others are not needed
                for task in running:
                    task.cancel()
                await asyncio.gather(*running, return_exceptions=True)
        if waiting:
            unmet = sorted({t for i in waiting for _, t in self.plan[i].inputs if t not in values})
            raise InvalidInput(
                f"in ensemble '{self.name}', {self.plan[min(waiting)].label} cannot run: ensemble tensor(s) "
                f"{', '.join(repr(t) for t in unmet)} were never produced")
        return values, durations

    def steps_for(self, requested: tuple[str, ...] | None) -> tuple[int, ...]:
        """The steps that lead to the requested outputs (all of them when none are named)."""
        steps = self._pruned.get(requested)
        if steps is not None:
            return steps
        needed: set[int] = set()
        pending = list(requested if requested is not None else self.outputs)
        seen: set[str] = set()
        while pending:
            tensor = pending.pop()
            if tensor in seen:
                continue
            seen.add(tensor)
            index = self._producer.get(tensor)
            if index is not None and index not in needed:
                needed.add(index)
                pending.extend(t for _, t in self.plan[index].inputs)
        steps = tuple(sorted(needed))
        if len(self._pruned) < 64:
            self._pruned[requested] = steps
        return steps

    def step_request(self, step: StepPlan, values: dict[str, np.ndarray],
                     request: InferenceRequest) -> tuple[Model, InferenceRequest]:
        """The step model and its request: the ensemble tensors it reads, fitted to its inputs. The
        request's `trace` (a _StepTiming) gets the step's compute timestamps."""
        model = self._models.get(step.model, step.version)
        inputs: dict[str, np.ndarray] = {}
        batch = 0
        for model_input, tensor in step.inputs:
            array = values.get(tensor)
            if array is None:
                continue
            info = model.inputs[model_input]
            array = _fit(info, array)
            size = info.check_shape(array.shape, model.name)
            if batch and size != batch:
                raise InvalidInput(f"input '{model_input}' batch size does not match other inputs for "
                                   f"'{model.name}'")
            batch = size
            inputs[model_input] = array
        return model, InferenceRequest(inputs, batch or 1, request.id, tuple(o for o, _ in step.outputs),
                                       dict(request.parameters), _StepTiming())

    def step_error(self, step: StepPlan, exc: BaseException) -> NereidError:
        """A step's failure as the ensemble reports it: the same status, named after the step."""
        if isinstance(exc, NereidError):
            return _named(exc, f"in ensemble '{self.name}', {step.label}: {exc}")
        log.error("%s: %s failed unexpectedly: %r", self.label, step.label, exc)
        return InternalError(f"in ensemble '{self.name}', {step.label}: {exc!r}")

    async def _call(self, step: StepPlan, values: dict[str, np.ndarray],
                    request: InferenceRequest) -> tuple[dict[str, np.ndarray], _StepTiming]:
        """One step: an in-process request to the step model, its errors named after the step."""
        limiter = self.limiters[step.index] if self.limiters is not None else None
        if limiter is not None:
            await limiter.acquire()
        try:
            model, sub = self.step_request(step, values, request)
            return await model.infer(sub), sub.trace
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # named after the step (a bug is reported as such, not as a dropped connection)
            raise self.step_error(step, exc) from None
        finally:
            if limiter is not None:
                limiter.release()


def _fit(info: TensorInfo, array: np.ndarray) -> np.ndarray:
    """Triton's reshapes between batching and non-batching steps: a batching step given a tensor
    without a batch dim gets a batch of one; a non-batching step given a batch of one whose
    shape does not fit gets it without the batch dim."""
    shape = array.shape
    if info.max_batch_size > 0:
        if len(shape) == len(info.dims):
            return array.reshape((1,) + shape)
    elif len(shape) == len(info.dims) + 1 and shape and shape[0] == 1:
        return array.reshape(shape[1:])
    return array


def _named(exc: NereidError, message: str) -> NereidError:
    """The same error (so the same status code) with the ensemble's message."""
    renamed = copy.copy(exc)
    renamed.args = (message,)
    return renamed
