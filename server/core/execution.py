"""Running requests from the event loop itself, without a hop to an instance's worker thread.

A thread hand-off costs about 0.1 ms on these machines, several times what a cheap model
computes (docs/ARCHITECTURE.md, "Where model code runs"). So a version may skip it in two
ways, both taken only when an instance is idle (its lock is free):

- `run_inline`: an in-process model measured cheaper than the inline budget runs right here,
  on the loop, under the instance's lock (the worker thread takes the same lock);
- `run_awaiting`: an out-of-process model (Python backend) is submitted to its stub from the
  loop, which then awaits the stub's completion file descriptor instead of parking a thread.

`RunBudget` says which of these a version may use; it is fitted to the backend at load.
Everything else goes through the scheduler to the instances' threads (server/core/instance.py).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from time import perf_counter_ns
from typing import Any

import numpy as np

from backends.base import Backend
from server.core.instance import ModelInstance, Outcome
from server.core.scheduler import Job
from server.core.stats import ModelStats
from server.errors import ExecutionTimeout

log = logging.getLogger("nereid.model")

# Models whose measured compute per request is below this run on the event loop
# when an instance is idle: a thread hand-off costs more than they do.
DEFAULT_INLINE_US = 100.0

# What an out-of-process backend provides so the event loop can await it (backends/python.py).
_AWAITABLE = ("submit", "collect", "pending_fd", "pending_alive", "pending_ready", "model_ns")


@dataclass(slots=True)
class RunBudget:
    """How one version's requests may run on the event loop (all times in ns; -1: never)."""

    inline_ns: float  # run inline when the measured compute per request is at most this
    wait_ns: float = -1.0  # out-of-process models measured this cheap: a bounded blocking wait for the reply
    awaitable: bool = False  # out-of-process and can say "done" through a file descriptor

    def fit(self, cls: type[Backend], timeout_s: float) -> None:
        """Fit the budget to the backend class and the execution timeout, at load."""
        if timeout_s:  # a model running on the event loop could not be timed out
            self.inline_ns = -1.0
        if cls.out_of_process:  # its process may hang: never wait for it unbounded on the event loop
            self.wait_ns, self.inline_ns = self.inline_ns, -1.0
            # ...but when it can say "done" through a file descriptor, the loop can await that
            # instead of parking a worker thread (a thread hop costs ~0.1 ms here).
            self.awaitable = all(hasattr(cls, a) for a in _AWAITABLE)


def result(outcome: Outcome) -> dict[str, np.ndarray]:
    """A request's outputs, or its error raised."""
    outputs, error = outcome
    if error is not None:
        raise error
    return outputs  # type: ignore[no-any-return]


def run_inline(instances: Sequence[ModelInstance], jobs: list[Job], label: str) -> list[Outcome] | None:
    """Run the jobs on the event loop on the first idle instance; None if none is idle."""
    for instance in instances:
        if not instance.retired and instance.lock.acquire(blocking=False):
            try:
                return instance.execute(jobs)
            except Exception as exc:  # a bug: fail these requests rather than leave them hanging
                log.exception("%s: inline execution failed", label)
                return instance.fail(jobs, exc)
            finally:
                instance.lock.release()
    return None


async def run_awaiting(
    instance: ModelInstance, job: Job, loop: asyncio.AbstractEventLoop, wait_ns: float, stats: ModelStats,
    timeout_s: float, label: str,
) -> dict[str, np.ndarray]:
    """Run one request on an out-of-process backend (Python models) from the event loop:
    submit, await the backend's completion fd, collect. The caller holds `instance.lock`;
    it is released here, or by a worker thread if this request is cancelled mid-way."""
    backend: Any = instance.backend
    started = perf_counter_ns()
    try:
        backend.submit(instance.backend_requests([job]))
    except BaseException as exc:
        instance.lock.release()
        return result(instance.fail([job], exc)[0])
    prepared = perf_counter_ns()
    instance.watched.begin([job])
    handed_off = False
    # A cheap model (the stub's time per call under the inline budget): wait for the stub right here,
    # bounded by twice the budget (the hand-off costs about as much again), which skips a loop
    # round trip; a late reply falls through to the loop.
    cost = backend.model_ns()
    cheap = cost is not None and cost <= wait_ns
    collecting: concurrent.futures.Future[Any] | None = None
    try:
        if not (cheap and backend.pending_ready(2 * wait_ns / 1e9)):
            ready: asyncio.Future[None] = loop.create_future()
            fd = backend.pending_fd()
            loop.add_reader(fd, _wake, ready)
            try:
                await ready
            finally:
                loop.remove_reader(fd)
                os.set_blocking(fd, True)  # uvloop makes a watched fd non-blocking; the backend reads it blocking
        answers: Any = backend.collect(0.0) if backend.pending_alive() else None
        if answers is None:  # the stub died (collecting restarts it) or replied in part: off the loop
            collecting = _collectors().submit(backend.collect, None)
            answers = await asyncio.wrap_future(collecting, loop=loop)
        outcome = instance.finish_requests([job], [job], answers, started, prepared)[0]
    except asyncio.CancelledError:
        job.abandoned = True  # the model may ask (request.is_cancelled())
        stats.record_failure(1, perf_counter_ns() - job.enqueued_ns, "CANCELED")
        handed_off = True
        if collecting is not None:  # that thread owns the backend until it is done
            collecting.add_done_callback(lambda _: instance.lock.release())
        else:
            _collectors().submit(_drain, backend, instance)  # frees the instance when done
        raise
    except Exception as exc:
        outcome = instance.fail([job], exc)[0]
        if collecting is None and backend.pending_fd() is not None:  # still submitted: take the reply off
            handed_off = True
            _collectors().submit(_drain, backend, instance)
    finally:
        expired = instance.watched.end()
        if not handed_off:
            instance.lock.release()
    if expired:  # the watchdog stopped the model (faults.py): say so, not how the stub died
        outcome = (None, ExecutionTimeout(
            f"model {label} instance {instance.name}: the execution ran past its timeout of "
            f"{timeout_s:g} s; the Python stub was stopped and restarted"))
    return result(outcome)


_COLLECTORS: concurrent.futures.ThreadPoolExecutor | None = None


def _collectors() -> concurrent.futures.ThreadPoolExecutor:
    """Threads that finish a Python model's reply off the event loop: collecting it (a stub that
    died is restarted there) or draining it after a cancelled request. Futures of their own, so
    a cancelled request can free its instance exactly when that thread is done with the backend."""
    global _COLLECTORS
    if _COLLECTORS is None:
        _COLLECTORS = concurrent.futures.ThreadPoolExecutor(thread_name_prefix="nereid-collect")
    return _COLLECTORS


def _wake(ready: asyncio.Future[None]) -> None:
    if not ready.done():
        ready.set_result(None)


def _drain(backend: Any, instance: ModelInstance) -> None:
    """After a cancelled awaited request: take the backend's answer off the wire, free the instance."""
    try:
        backend.collect(None)
    except Exception as exc:
        log.warning("instance %s: after a cancelled request: %s", instance.name, exc)
    finally:
        instance.lock.release()
