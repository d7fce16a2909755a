"""A model instance: one backend object, its lock, and the worker thread that feeds it.

The worker pulls batches from the scheduler, runs the backend, shapes each
request's outputs and hands all results of a batch back to the event loop with
ONE `call_soon_threadsafe`. The same `execute` also serves the inline path
(`Model.infer` running a cheap model on the event loop while the instance is
idle); the instance lock keeps the two from using one backend at once.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from time import perf_counter_ns
from typing import Any

import numpy as np

from backends.base import Backend, BackendInputError, BackendStatusError, ResponseOutputs
from backends.base import Request as BackendRequest
from server import logs
from server.core.batching import concat_inputs, split_outputs
from server.core.faults import FailureCounter, Watched
from server.core.scheduler import Job, Scheduler
from server.core.signature import TensorInfo
from server.core.stats import ModelStats
from server.errors import (
    ErrorCode,
    ExecutionTimeout,
    InternalError,
    InvalidInput,
    ModelStatusError,
    ModelUnavailable,
    NereidError,
)

log = logging.getLogger("nereid.instance")

Outcome = tuple[Any, NereidError | None]  # (outputs, None) or (None, error)


def deliver_all(jobs: list[Job], outcomes: list[Outcome]) -> None:
    """Runs on the event loop: complete each request unless its client already gave up."""
    for job, (result, error) in zip(jobs, outcomes, strict=True):
        future = job.future
        if future is None or future.done():
            continue
        if error is None:
            future.set_result(result)
        else:
            future.set_exception(error)


class CostTracker:
    """A moving average of compute time per batch item, to decide what may run inline."""

    __slots__ = ("per_item_ns",)

    def __init__(self) -> None:
        self.per_item_ns: float | None = None

    def record(self, items: int, ns: int) -> None:
        # Once per execution: plain comparisons instead of max() and min() calls (~290 -> ~150 ns).
        sample = ns / items if items > 1 else float(ns)
        current = self.per_item_ns
        if current is None:
            self.per_item_ns = sample
            return
        # Wall time includes moments when another thread had the core; clip such
        # outliers so one preempted run does not flip the model off the inline path.
        if sample > 3.0 * current:
            sample = 3.0 * current
        self.per_item_ns = current + 0.1 * (sample - current)


class OutputShaper:
    """Model-level knowledge to turn backend outputs into per-request response tensors."""

    def __init__(self, model_label: str, outputs: dict[str, TensorInfo], inputs: dict[str, TensorInfo]):
        self.model_label = model_label
        self.outputs = outputs
        self.output_names = tuple(outputs)
        self.input_reshapes = {n: i for n, i in inputs.items() if i.reshape is not None}
        self.output_reshapes = {n: i for n, i in outputs.items() if i.reshape is not None}

    def backend_inputs(self, inputs: dict[str, np.ndarray], batch: int) -> dict[str, np.ndarray]:
        """Apply config `reshape` (API shape -> framework shape) where the config asks for it."""
        shaped = dict(inputs)
        for name, info in self.input_reshapes.items():
            arr = shaped.get(name)
            if arr is not None:
                lead = (batch,) if info.max_batch_size > 0 else ()
                shaped[name] = arr.reshape(lead + (info.reshape or ()))
        return shaped

    def response(self, outputs: dict[str, np.ndarray], wanted: tuple[str, ...] | None) -> dict[str, np.ndarray]:
        """Pick the requested outputs in order, check dtypes, undo `reshape`."""
        result: dict[str, np.ndarray] = {}
        for name in wanted or self.output_names:
            arr = outputs.get(name)
            info = self.outputs[name]
            if arr is None:
                raise InternalError(f"model {self.model_label} did not produce output '{name}'")
            if info.itemsize and arr.dtype != info.dtype:
                raise InternalError(
                    f"model {self.model_label} produced {arr.dtype} for output '{name}', "
                    f"config says {info.datatype}"
                )
            if name in self.output_reshapes:
                lead = arr.shape[:1] if info.max_batch_size > 0 else ()
                arr = arr.reshape(lead + info.dims)
            result[name] = arr
        if type(outputs) is ResponseOutputs:  # the model set response parameters: keep them
            return ResponseOutputs(result, outputs.parameters)
        return result


class ModelInstance:
    """One backend copy plus the thread that feeds it."""

    def __init__(
        self, name: str, backend: Backend, scheduler: Scheduler, shaper: OutputShaper, stats: ModelStats,
        cost: CostTracker, failure_threshold: int = 0, on_retired: Callable[[ModelInstance], bool] | None = None,
    ) -> None:
        self.name = name
        self.backend = backend
        self.lock = threading.Lock()
        # faults.py: the running execution as the watchdog sees it, and consecutive failures
        self.watched = Watched()
        self.failures = FailureCounter(failure_threshold)
        self.retired = ""  # why this instance was taken out of service ("" while it serves)
        # Returns whether other instances still serve the model (then this one stops pulling work;
        # the last one keeps pulling, to answer what is queued with the model's unavailability).
        self._on_retired = on_retired
        self._others_serve = False
        self._scheduler = scheduler
        self._shaper = shaper
        self._stats = stats
        self._cost = cost
        self._per_request = type(backend).wants_requests
        # The sequence batcher's hook (server/core/sequence_batcher.py): sees each batch's outcomes
        # before they are delivered, to keep implicit state and free the sequences for their next step.
        self._executed: Callable[[list[Job], list[Outcome]], None] | None = getattr(scheduler, "executed", None)
        self._thread = threading.Thread(target=self._serve, name=f"instance-{name}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def join(self, timeout: float | None = None) -> None:
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _serve(self) -> None:
        next_batch = self._scheduler.next_batch
        while True:
            jobs = next_batch()
            if jobs is None:
                return
            if self.retired:  # the model version is being given up: answer, never run
                error = ModelUnavailable(f"model {self._shaper.model_label} is not available: {self.retired}")
                outcomes: list[Outcome] = [(None, error)] * len(jobs)
                self._stats.record_failure(len(jobs), 0, "OTHER")
            else:
                self.watched.begin(jobs)
                try:
                    with self.lock:
                        outcomes = self.execute(jobs)
                except BaseException as exc:  # a bug: fail this batch, keep the instance thread alive
                    log.exception("instance %s: unexpected failure", self.name)
                    outcomes = self.fail(jobs, exc)
                self.watched.end()  # if the watchdog answered these already, deliver_all skips them
            if self._executed is not None:
                self._executed(jobs, outcomes)
            jobs[0].loop.call_soon_threadsafe(deliver_all, jobs, outcomes)
            # Nothing of a finished batch may wait here for the next one: these locals would keep
            # its requests (and the received messages under their tensors) alive until then.
            del jobs, outcomes
            if self.retired and self._others_serve:
                return  # the other instances take the work from now on

    def execute(self, jobs: list[Job]) -> list[Outcome]:
        """Run the jobs as one backend execution; one outcome per job. Caller holds `lock`."""
        outcomes = self._execute(jobs)
        if logs.verbose():
            self._log_batch(jobs, outcomes)
        return outcomes

    def _execute(self, jobs: list[Job]) -> list[Outcome]:
        if self._per_request:
            return self._execute_requests(jobs)
        if len(jobs) == 1:
            job = jobs[0]
            if job.cancelled():  # the client gave up: never run it
                return [(None, None)]
            return [self._execute_one(job)]
        live = [job for job in jobs if not job.cancelled()]
        if not live:
            return [(None, None)] * len(jobs)
        started = perf_counter_ns()
        sizes = [job.request.batch_size for job in live]
        total = sum(sizes)
        shaper = self._shaper
        try:
            inputs = shaper.backend_inputs(concat_inputs([job.request.inputs for job in live]), total)
            prepared = perf_counter_ns()
            outputs = self.backend.execute(inputs)
            executed = perf_counter_ns()
            parts = split_outputs(outputs, sizes)
            results = [shaper.response(part, job.request.requested_outputs) for part, job in zip(
                parts, live, strict=True)]
        except Exception as exc:
            return self._failed(jobs, live, _as_error(exc, shaper.model_label, self.name))
        finished = perf_counter_ns()
        self._record_success(live, total, (started, prepared, executed, finished))
        self._cost.record(total, executed - prepared)
        self._succeeded()
        if len(live) == len(jobs):
            return [(result, None) for result in results]
        by_job = dict(zip(map(id, live), results, strict=True))
        return [(by_job.get(id(job)), None) for job in jobs]

    def _log_batch(self, jobs: list[Job], outcomes: list[Outcome]) -> None:
        """--log-verbose 1: one line per execution, naming its requests."""
        failed = sum(1 for _, error in outcomes if error is not None)
        log.debug("model %s instance %s executed %d request(s), %d item(s), %d failed; ids %s",
                  self._shaper.model_label, self.name, len(jobs), sum(j.request.batch_size for j in jobs), failed,
                  [j.request.id for j in jobs][:16], extra={"model": self._shaper.model_label})

    def expired(self, jobs: list[Job], timeout_s: float) -> None:
        """The watchdog's call (its own thread): `jobs` ran past the execution timeout. Answer them
        now, interrupt the backend if it can be, and count the failure."""
        error = ExecutionTimeout(
            f"model {self._shaper.model_label} instance {self.name}: the execution ran past its timeout of "
            f"{timeout_s:g} s; the requests were answered without waiting for it")
        interrupted = self.backend.interrupt(str(error))
        log.error("%s%s", error, "; the backend was interrupted" if interrupted else
                  "; the backend cannot be interrupted and keeps this instance busy until it returns")
        self._stats.record_failure(len(jobs), 0)
        loop = jobs[0].loop
        outcomes: list[Outcome] = [(None, error)] * len(jobs)
        try:
            loop.call_soon_threadsafe(deliver_all, jobs, outcomes)
        except RuntimeError:  # the loop has closed (shutdown)
            pass
        self._count_failure(error)

    def _succeeded(self) -> None:
        if not self.watched.expired:  # a late success after a timeout does not clear the record
            self.failures.succeeded()

    def _count_failure(self, error: BaseException) -> None:
        reason = self.failures.failed(error)
        if reason and not self.retired:
            self.retired = reason
            log.error("model %s instance %s taken out of service: %s", self._shaper.model_label, self.name, reason)
            if self._on_retired is not None:
                self._others_serve = self._on_retired(self)

    def _execute_one(self, job: Job) -> Outcome:
        """The common case without batching: no concat, no split."""
        started = perf_counter_ns()
        request = job.request
        shaper = self._shaper
        try:
            inputs = request.inputs
            if shaper.input_reshapes:
                inputs = shaper.backend_inputs(inputs, request.batch_size)
            prepared = perf_counter_ns()
            outputs = self.backend.execute(inputs)
            executed = perf_counter_ns()
            result = shaper.response(outputs, request.requested_outputs)
        except Exception as exc:
            return self._failed([job], [job], _as_error(exc, shaper.model_label, self.name))[0]
        finished = perf_counter_ns()
        enqueued = job.enqueued_ns
        stats = self._stats
        stats.record_execution(
            request.batch_size, 1, prepared - started, executed - prepared, finished - executed,
            started - enqueued, finished - enqueued, finished_ns=finished,
        )
        if stats.latencies is not None:
            stats.latencies.add((finished - enqueued, started - enqueued, prepared - started, executed - prepared,
                                 finished - executed))
        if request.trace is not None:
            request.trace.compute = (enqueued, started, prepared, executed, finished)
        self._cost.record(request.batch_size, executed - prepared)
        self._succeeded()
        return (result, None)

    def _execute_requests(self, jobs: list[Job]) -> list[Outcome]:
        """For request-aware backends (Python models): each request goes in with its id,
        parameters and requested outputs, and an error fails only its own request."""
        live = [job for job in jobs if not job.cancelled()]
        if not live:
            return [(None, None)] * len(jobs)
        started = perf_counter_ns()
        try:
            requests = self.backend_requests(live)
            prepared = perf_counter_ns()
            answers = self.backend.execute_requests(requests)
        except Exception as exc:
            return self._failed(jobs, live, _as_error(exc, self._shaper.model_label, self.name))
        return self.finish_requests(jobs, live, answers, started, prepared)

    def backend_requests(self, live: list[Job]) -> list[BackendRequest]:
        """The jobs as a request-aware backend takes them (framework-side shapes)."""
        shaper = self._shaper
        return [
            BackendRequest(
                shaper.backend_inputs(job.request.inputs, job.request.batch_size), job.request.id,
                job.request.parameters, job.request.requested_outputs, job.request.sink, job.cancelled,
            )
            for job in live
        ]

    def finish_requests(
        self, jobs: list[Job], live: list[Job], answers: list[Any], started: int, prepared: int
    ) -> list[Outcome]:
        """Shape a request-aware backend's answers into outcomes and record the statistics."""
        shaper = self._shaper
        if len(answers) != len(live):
            error = InternalError(f"model {shaper.model_label} answered {len(answers)} of {len(live)} requests")
            return self._failed(jobs, live, error)
        executed = perf_counter_ns()
        self._succeeded()  # the model answered (some answers may be errors of their own requests)
        outcome_of: dict[int, Outcome] = {}
        succeeded: list[Job] = []
        failed: list[Job] = []
        for job, answer in zip(live, answers, strict=True):
            try:
                if isinstance(answer, Exception):
                    raise answer
                if job.request.sink is not None:  # decoupled: the responses went to the sink
                    outcome_of[id(job)] = (answer, None)
                    succeeded.append(job)
                    continue
                outcome_of[id(job)] = (shaper.response(answer, job.request.requested_outputs), None)
                succeeded.append(job)
            except Exception as exc:
                outcome_of[id(job)] = (None, _as_error(exc, shaper.model_label, self.name))
                failed.append(job)
        finished = perf_counter_ns()
        if succeeded:
            self._record_success(succeeded, sum(job.request.batch_size for job in succeeded),
                                 (started, prepared, executed, finished))
            self._cost.record(sum(job.request.batch_size for job in live), executed - prepared)
        failed = [job for job in failed if not job.padding]
        if failed:
            self._stats.record_failure(len(failed), finished * len(failed) - sum(job.enqueued_ns for job in failed))
        return [outcome_of.get(id(job), (None, None)) for job in jobs]

    def _record_success(self, jobs: list[Job], total: int, times: tuple[int, int, int, int]) -> None:
        """Statistics, latency samples and traces of the jobs of one execution that succeeded
        (`total` items; a sequence batcher's null rows among them count in the batch only).
        `times`: started, inputs prepared, backend returned, outputs shaped (perf_counter_ns)."""
        started, prepared, executed, finished = times
        counted = [job for job in jobs if not job.padding]  # a sequence batcher's null rows are not counted
        padding = total - sum(job.request.batch_size for job in counted) if len(counted) != len(jobs) else 0
        self._stats.record_execution(
            total, len(counted), prepared - started, executed - prepared, finished - executed,
            sum(started - job.enqueued_ns for job in counted),
            finished * len(counted) - sum(job.enqueued_ns for job in counted), padding, finished,
        )
        jobs = counted
        latencies = self._stats.latencies
        if latencies is not None:
            for job in jobs:
                latencies.add((finished - job.enqueued_ns, started - job.enqueued_ns, prepared - started,
                               executed - prepared, finished - executed))
        _trace(jobs, started, prepared, executed, finished)

    def fail(self, jobs: list[Job], exc: BaseException) -> list[Outcome]:
        """Outcomes for jobs whose execution raised `exc` (mapped to the right status)."""
        error = _as_error(exc, self._shaper.model_label, self.name) if isinstance(exc, Exception) else \
            InternalError(f"model {self._shaper.model_label} failed: {exc!r}")
        return self._failed(jobs, jobs, error)

    def _failed(self, jobs: list[Job], live: list[Job], error: NereidError) -> list[Outcome]:
        now = perf_counter_ns()
        counted = [job for job in live if not job.padding]  # null requests are not counted
        self._stats.record_failure(len(counted), sum(now - job.enqueued_ns for job in counted))
        if not isinstance(error, InvalidInput):  # a client's bad input says nothing about the instance
            self._count_failure(error)
        return [(None, error)] * len(jobs)

    def close(self) -> None:
        try:
            self.backend.close()
        except Exception:
            log.exception("instance %s: close failed", self.name)


def _trace(jobs: list[Job], started: int, prepared: int, executed: int, finished: int) -> None:
    """Hand the execution's timestamps to the traced requests among `jobs` (server/tracing)."""
    for job in jobs:
        trace = job.request.trace
        if trace is not None:
            trace.compute = (job.enqueued_ns, started, prepared, executed, finished)


def _as_error(exc: Exception, model_label: str, instance: str) -> NereidError:
    if isinstance(exc, NereidError):
        return exc
    if isinstance(exc, BackendInputError):
        return InvalidInput(f"model {model_label}: {exc}")
    if isinstance(exc, BackendStatusError):  # the model chose the status and the message: pass both on
        return ModelStatusError(str(exc), ErrorCode[exc.code])
    log.warning("instance %s: execution failed: %s", instance, exc)
    return InternalError(f"model {model_label} failed: {exc}")
