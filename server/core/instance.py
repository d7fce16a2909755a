"""A model instance: one backend object driven by one worker thread.

The thread pulls work from the scheduler, runs the backend, shapes the outputs
for each request and hands results back to the event loop with one
`call_soon_threadsafe` per request. Model code never runs on the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from time import perf_counter_ns
from typing import Any

import numpy as np

from backends.base import Backend, BackendInputError
from server.core.scheduler import Job, Scheduler
from server.core.signature import TensorInfo
from server.core.stats import ModelStats
from server.errors import InternalError, InvalidInput, NereidError

log = logging.getLogger("nereid.instance")


def _deliver(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    """Runs on the event loop: complete the request unless the client already gave up."""
    if future.done():
        return
    if error is None:
        future.set_result(result)
    else:
        future.set_exception(error)


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
        if not self.input_reshapes:
            return inputs
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
        return result


class ModelInstance:
    """One backend copy plus the thread that feeds it."""

    def __init__(
        self, name: str, backend: Backend, scheduler: Scheduler, shaper: OutputShaper, stats: ModelStats
    ) -> None:
        self.name = name
        self.backend = backend
        self._scheduler = scheduler
        self._shaper = shaper
        self._stats = stats
        self._thread = threading.Thread(target=self._serve, name=f"instance-{name}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    def _serve(self) -> None:
        next_batch = self._scheduler.next_batch
        while True:
            jobs = next_batch()
            if jobs is None:
                return
            try:
                self.run(jobs)
            except BaseException:  # never let one batch kill the instance thread
                log.exception("instance %s: unexpected failure", self.name)

    def run(self, jobs: list[Job]) -> None:
        """Execute one batch of jobs (a single job without the dynamic batcher)."""
        jobs = [job for job in jobs if not job.future.done()]  # cancelled: drop before running
        if not jobs:
            return
        started = perf_counter_ns()
        if len(jobs) != 1:
            raise NotImplementedError("batched execution arrives with the dynamic batcher")
        job = jobs[0]
        request = job.request
        batch = request.batch_size
        try:
            inputs = self._shaper.backend_inputs(request.inputs, batch)
            computed = perf_counter_ns()
            outputs = self.backend.execute(inputs)
            executed = perf_counter_ns()
            result = self._shaper.response(outputs, request.requested_outputs)
        except NereidError as exc:
            self._fail(jobs, exc)
            return
        except BackendInputError as exc:
            self._fail(jobs, InvalidInput(f"model {self._shaper.model_label}: {exc}"))
            return
        except Exception as exc:
            log.warning("instance %s: execution failed: %s", self.name, exc)
            self._fail(jobs, InternalError(f"model {self._shaper.model_label} failed: {exc}"))
            return
        finished = perf_counter_ns()
        stats = self._stats
        stats.record_execution(batch, 1, computed - started, executed - computed, finished - executed)
        stats.record_success(finished - job.enqueued_ns, started - job.enqueued_ns)
        job.loop.call_soon_threadsafe(_deliver, job.future, result, None)

    def _fail(self, jobs: list[Job], error: NereidError) -> None:
        now = perf_counter_ns()
        for job in jobs:
            self._stats.record_failure(now - job.enqueued_ns)
            job.loop.call_soon_threadsafe(_deliver, job.future, None, error)

    def close(self) -> None:
        try:
            self.backend.close()
        except Exception:
            log.exception("instance %s: close failed", self.name)
