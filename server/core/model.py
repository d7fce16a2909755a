"""One model version: its config, instances, scheduler, statistics and state."""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
import os
from collections.abc import Callable, Coroutine
from dataclasses import replace
from pathlib import Path
from time import monotonic, perf_counter_ns, sleep
from typing import Any

import numpy as np
from tritonclient.grpc import model_config_pb2 as mc

from backends.base import Backend, BackendError
from backends.registry import backend_class
from server.core.batcher_config import make_batcher
from server.core.classification import Labels, classify_outputs, load_labels
from server.core.dynamic_batcher import DynamicBatchScheduler
from server.core.faults import WATCHDOG, execution_timeout_s, failure_threshold
from server.core.instance import (
    CostTracker,
    ModelInstance,
    Outcome,
    OutputShaper,
    deliver_all,
)
from server.core.latency import RequestLatencies
from server.core.limits import ServingLimits
from server.core.placement import Placement, place_instances, visible_gpus
from server.core.scheduler import DirectScheduler, Job, Scheduler
from server.core.sequence_batcher import SequenceBatcher
from server.core.sequence_config import sequence_settings
from server.core.signature import TensorInfo
from server.core.spec import build_spec
from server.core.state import ModelState
from server.core.stats import ModelStats
from server.core.warmup import build_samples, run_warmup
from server.errors import ExecutionTimeout, ModelUnavailable, NereidError
from server.types import InferenceRequest

log = logging.getLogger("nereid.model")


# What an out-of-process backend provides so the event loop can await it (backends/python.py).
_AWAITABLE = ("submit", "collect", "pending_fd", "pending_alive", "pending_ready", "model_ns")

# Models whose measured compute per request is below this run on the event loop
# when an instance is idle: a thread hand-off costs more than they do.
DEFAULT_INLINE_US = 100.0


class Model:
    """A loaded (or loading, or failed) version of a model."""

    def __init__(
        self, config: mc.ModelConfig, model_dir: Path, version: int, limits: ServingLimits | None = None
    ) -> None:
        limits = limits or ServingLimits(inline_us=DEFAULT_INLINE_US)
        self.config = config
        self.name = config.name
        self.version = version
        self.version_str = str(version)
        self.label = f"'{self.name}' version {version}"
        self.spec = build_spec(config, model_dir, version)
        mbs = config.max_batch_size
        optional = {t.name for t in config.input if t.optional}
        self.inputs = {s.name: TensorInfo.from_spec(s, mbs, s.name in optional) for s in self.spec.inputs}
        self.outputs = {s.name: TensorInfo.from_spec(s, mbs) for s in self.spec.outputs}
        # sequence_batching (server/core/sequence_batcher.py): the backend also gets the control and
        # state tensors the scheduler fills; clients see only `input`/`output`.
        self._sequencer: SequenceBatcher | None = None
        self._shaped_outputs = self.outputs
        self._sequence_error = ""
        try:
            sequence = sequence_settings(config, model_dir)
        except (ValueError, OSError) as exc:
            sequence, self._sequence_error = None, str(exc)
        if sequence is not None:
            self.spec = replace(self.spec, inputs=self.spec.inputs + sequence.extra_inputs(),
                                outputs=self.spec.outputs + sequence.extra_outputs())
            self._shaped_outputs = {**self.outputs, **{s.name: TensorInfo.from_spec(s, mbs)
                                                       for s in sequence.extra_outputs()}}
            self._sequencer = SequenceBatcher(sequence, self.name, tuple(self.inputs), drop=self._reject)
        self.required_inputs = sum(1 for i in self.inputs.values() if not i.optional)
        # Zero or many responses per request, streamed (server/core/decoupled.py); never unary.
        self.decoupled = config.model_transaction_policy.decoupled
        self.stats = ModelStats(RequestLatencies(limits.latency_buckets_ms) if limits.latency_buckets_ms else None)
        # Owned by the protocol layer (server/protocol/codec.py): wire-format templates for this model.
        self.wire_cache: dict[Any, Any] = {}
        self.state = ModelState.LOADING
        self.reason = ""
        self.inflight = 0
        self._batcher = make_batcher(config, self._reject, limits.queue_limit)
        self._scheduler: Scheduler = self._sequencer or self._batcher or DirectScheduler(limits.queue_limit)
        self._instances: list[ModelInstance] = []
        self._cost = CostTracker()
        self._limits = limits
        self.timeout_s = 0.0  # execution timeout (faults.py); read from the config at load
        self.labels: Labels = {}  # each output's classification labels (classification.py); read at load
        # Called (from an instance thread) when this version stops serving because every instance
        # kept failing; the repository manager sets it to update readiness, health and the index.
        self.on_unavailable: Callable[[Model], None] | None = None
        self._inline_ns = limits.inline_us * 1000.0
        self._awaitable = False
        # Out-of-process models measured this cheap are awaited with a bounded blocking wait.
        self._wait_ns = -1.0
        # Requests that arrived during this event-loop iteration (None: no group is forming).
        self._arrivals: list[Job] | None = None
        self._group_size = 1.0  # moving average of groups formed by leaders that waited longer
        self._leaders = 0
        # preserve_ordering: each request returns only after the one before it has.
        self._ordered = config.WhichOneof("scheduling_choice") == "dynamic_batching" and \
            config.dynamic_batching.preserve_ordering
        self._last_turn: asyncio.Future[None] | None = None

    # -- lifecycle (runs on a loader thread, never on the event loop) --

    def load(self) -> None:
        """Create every instance; on any failure release what was made and raise BackendError."""
        try:
            cls = backend_class(self.config.backend)
            try:
                self.timeout_s = execution_timeout_s(self.config, self._limits.execution_timeout_s)
                threshold = failure_threshold(self.config, self._limits.failure_threshold)
                self.labels = load_labels(self.config, self.spec.model_dir)
            except (ValueError, OSError, NereidError) as exc:
                raise BackendError(str(exc)) from None
            if self.timeout_s:  # a model running on the event loop could not be timed out
                self._inline_ns = -1.0
            if cls.out_of_process:  # its process may hang: never wait for it unbounded on the event loop
                self._wait_ns, self._inline_ns = self._inline_ns, -1.0
                # ...but when it can say "done" through a file descriptor, the loop can await that
                # instead of parking a worker thread (a thread hop costs ~0.1 ms here).
                self._awaitable = all(hasattr(cls, a) for a in _AWAITABLE)
            if self.decoupled and not cls.supports_decoupled:
                raise BackendError(f"the {cls.name} backend does not support the decoupled transaction policy "
                                   "(model_transaction_policy { decoupled: true })")
            if cls.needs_model_file and not self.spec.model_file.exists():
                raise BackendError(f"model file {self.spec.model_file} does not exist")
            if self._sequence_error:
                raise BackendError(self._sequence_error)
            shaper = OutputShaper(self.label, self._shaped_outputs, self.inputs)
            for placement in self._placements(cls):
                backend = cls()
                backend.load(replace(self.spec, instance_name=placement.name), placement.device)
                pulls = self._sequencer.view() if self._sequencer is not None else self._scheduler
                instance = ModelInstance(placement.name, backend, pulls, shaper, self.stats, self._cost,
                                         threshold, self._instance_retired)
                self._instances.append(instance)
            self._warm(cls)
            if self.timeout_s:
                for instance in self._instances:
                    expired = functools.partial(_expired, instance, self.timeout_s)
                    WATCHDOG.watch(instance.watched, self.timeout_s, expired)
        except BaseException as exc:
            self._close_instances()
            self.state = ModelState.UNAVAILABLE
            self.reason = str(exc)
            raise BackendError(str(exc)) from exc
        for instance in self._instances:
            instance.start()
        self.state = ModelState.READY
        self.reason = ""

    def _instance_retired(self, retired: ModelInstance) -> bool:
        """An instance kept failing (faults.py). Whether others still serve; if none does, this
        version becomes UNAVAILABLE with the reason (its queued requests are then answered by the
        last instance's thread) and the manager is told."""
        if any(not i.retired for i in self._instances):
            return True
        if self.state is ModelState.READY:
            self.state = ModelState.UNAVAILABLE
            self.reason = f"every instance was taken out of service; instance {retired.name}: {retired.retired}"
            log.error("%s is UNAVAILABLE: %s", self.label, self.reason)
            if self.on_unavailable is not None:
                self.on_unavailable(self)
        return False

    def _placements(self, cls: type[Backend]) -> list[Placement]:
        """Where each instance runs (server/core/placement.py); raises PlacementError with a reason."""
        return place_instances(self.config.instance_group, visible_gpus(), cls.supports_gpu)

    def _warm(self, cls: type[Backend]) -> None:
        """Run the config's `model_warmup` on every instance, before the instance threads start
        and before READY, so no request meets a cold instance (server/core/warmup.py)."""
        if not len(self.config.model_warmup):
            return
        inputs = self.inputs
        if self._sequencer is not None:  # a sample may name control and state inputs, as in Triton
            mbs = self.config.max_batch_size
            inputs = {**inputs, **{s.name: TensorInfo.from_spec(s, mbs, True)
                                   for s in self._sequencer.settings.extra_inputs()}}
        samples = build_samples(self.config.model_warmup, inputs, self.spec.model_dir,
                                self.config.max_batch_size, str(self.spec.model_dir / "config.pbtxt"))
        if self._sequencer is not None:
            samples = [self._sequencer.warmup_sample(sample) for sample in samples]
        shaper = OutputShaper(self.label, self.outputs, self.inputs)
        run_warmup(self.label, samples, [(i.name, i.backend.execute) for i in self._instances], shaper,
                   decoupled=self.decoupled)

    def unload(self, timeout: float | None = None) -> None:
        """Stop taking requests, let the in-flight ones finish, then stop the instances and release the backends.

        The repository manager has already routed new requests elsewhere (state
        UNLOADING is set on the event loop together with the routing change), so
        `inflight` only falls from here on. `timeout` bounds the whole wait.
        """
        self.state = ModelState.UNLOADING
        deadline = None if timeout is None else monotonic() + timeout

        def remaining() -> float | None:
            return None if deadline is None else max(0.0, deadline - monotonic())

        while self.inflight > 0 and (deadline is None or monotonic() < deadline):
            sleep(0.005)
        if self.inflight > 0:
            log.warning("%s: unloading with %d request(s) still in flight after %.1fs",
                        self.label, self.inflight, timeout or 0.0)
        self._scheduler.stop(len(self._instances))
        for instance in self._instances:
            instance.join(remaining())
        for instance in self._instances:
            if instance.is_alive():  # still draining queued work: closing now would pull the backend from under it
                log.warning("%s: instance %s still busy after the timeout; not released", self.label, instance.name)
                continue
            # An inline execution on the event loop holds the instance lock: never close under it.
            wait = remaining()
            if not instance.lock.acquire(timeout=-1 if wait is None else wait):
                log.warning("%s: instance %s still busy; not released", self.label, instance.name)
                continue
            try:
                instance.close()
            finally:
                instance.lock.release()
        self._instances = []
        self.state = ModelState.UNAVAILABLE
        self.reason = "unloaded"

    def _close_instances(self) -> None:
        for instance in self._instances:
            instance.close()
        self._instances = []

    def pending(self) -> int:
        """Requests queued and not yet taken by an instance (Triton's pending request count)."""
        return self._scheduler.pending()

    # -- request path (event loop) --

    def _reject(self, job: Job, error: NereidError, reason: str = "REJECTED") -> None:
        """For the batcher's thread: fail one queued request (e.g. its queue timeout expired)."""
        self.stats.record_failure(1, perf_counter_ns() - job.enqueued_ns, reason)
        outcome: Outcome = (None, error)
        job.loop.call_soon_threadsafe(deliver_all, [job], [outcome])

    def infer(self, request: InferenceRequest) -> Coroutine[Any, Any, dict[str, np.ndarray]]:
        """Run the request (await the result) and return its outputs; those asked for as classes
        (the classification extension, classification.py) come back as their top-k class strings.
        A plain function returning the coroutine: the common case pays for no extra frame."""
        if request.classification:
            return self._infer_classified(request)
        return self._infer(request)

    async def _infer_classified(self, request: InferenceRequest) -> dict[str, np.ndarray]:
        outputs = await self._infer(request)
        assert request.classification is not None
        return classify_outputs(outputs, request.classification, self.labels, self.config.max_batch_size > 0)

    async def _infer(self, request: InferenceRequest) -> dict[str, np.ndarray]:
        """Run the request and return its outputs.

        A cheap model (measured compute per request under the inline budget) runs
        right here on the event loop when nothing is queued and an instance is idle:
        on a busy core a thread hand-off costs several times what such a model
        computes. Everything else is queued for the instances' worker threads.
        """
        if self.state is not ModelState.READY:
            raise ModelUnavailable(f"{self.label} is not at ready state")
        loop = asyncio.get_running_loop()
        started = perf_counter_ns()
        if self._sequencer is not None:
            return await self._infer_sequence(request, loop, started)
        if self._batcher is not None:
            return await self._infer_batched(request, loop, started)
        if self._awaitable and not self._scheduler.pending():
            for instance in self._instances:
                if not instance.retired and instance.lock.acquire(blocking=False):
                    self.inflight += 1
                    try:
                        return await self._run_awaiting(instance, Job(request, None, loop, started), loop)
                    finally:
                        self.inflight -= 1
        cost = self._cost.per_item_ns
        if cost is not None and cost * request.batch_size <= self._inline_ns and not self._scheduler.pending():
            outcomes = self._run_inline([Job(request, None, loop, started)])
            if outcomes is not None:
                return _result(outcomes[0])
        future: asyncio.Future[Any] = loop.create_future()
        self.inflight += 1
        try:
            try:
                self._scheduler.enqueue(Job(request, future, loop, started))
            except NereidError:  # queue full
                self.stats.record_failure(1, 0, "REJECTED")
                raise
            return await future
        except asyncio.CancelledError:
            self.stats.record_failure(1, perf_counter_ns() - started, "CANCELED")
            raise
        finally:
            self.inflight -= 1

    async def _infer_sequence(
        self, request: InferenceRequest, loop: asyncio.AbstractEventLoop, started: int
    ) -> dict[str, np.ndarray]:
        """A request of a sequence model: the sequence batcher routes it to its sequence's slot
        (or refuses it as Triton does); an instance thread runs it with the others of its batch."""
        future: asyncio.Future[Any] = loop.create_future()
        assert self._sequencer is not None
        self._sequencer.enqueue(Job(request, future, loop, started))
        self.inflight += 1
        try:
            return await future  # type: ignore[no-any-return]
        except asyncio.CancelledError:
            self.stats.record_failure(1, perf_counter_ns() - started, "CANCELED")
            self._sequencer.cancelled()  # its sequence ends now, freeing its slot (as Triton)
            raise
        finally:
            self.inflight -= 1

    async def _run_awaiting(
        self, instance: ModelInstance, job: Job, loop: asyncio.AbstractEventLoop
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
            return _result(instance.fail([job], exc)[0])
        prepared = perf_counter_ns()
        instance.watched.begin([job])
        handed_off = False
        # A cheap model (the stub's time per call under the inline budget): wait for the stub right here,
        # bounded by twice the budget (the hand-off costs about as much again), which skips a loop
        # round trip; a late reply falls through to the loop.
        cost = backend.model_ns()
        cheap = cost is not None and cost <= self._wait_ns
        collecting: concurrent.futures.Future[Any] | None = None
        try:
            if not (cheap and backend.pending_ready(2 * self._wait_ns / 1e9)):
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
            self.stats.record_failure(1, perf_counter_ns() - job.enqueued_ns, "CANCELED")
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
                f"model {self.label} instance {instance.name}: the execution ran past its timeout of "
                f"{self.timeout_s:g} s; the Python stub was stopped and restarted"))
        return _result(outcome)

    async def _infer_batched(
        self, request: InferenceRequest, loop: asyncio.AbstractEventLoop, started: int
    ) -> dict[str, np.ndarray]:
        """Join this loop iteration's arrivals, then run them together or queue them.

        The first arrival of an iteration leads: it yields once, or under load a few times
        (`_gathering`), so that requests arriving meanwhile join it, then runs the group inline
        or queues it. Its own result comes back without a future; the others await theirs.
        When batches do not form (one arrival per iteration), a request costs about what it
        costs without the batcher.
        """
        batcher = self._batcher
        assert batcher is not None
        job = Job(request, None, loop, started)
        batcher.prepare(job, started)
        self.inflight += 1
        try:
            arrivals = self._arrivals
            if arrivals is not None or self._ordered:  # a follower (or ordered: everyone awaits a future)
                future: asyncio.Future[Any] = loop.create_future()
                job.future = future
                if arrivals is None:
                    self._lead_later([job], loop)
                else:
                    arrivals.append(job)
                if self._ordered:
                    return await self._in_order(future, loop)
                return await future  # type: ignore[no-any-return]
            self._arrivals = [job]
            gather = self._gathering()
            try:
                for _ in range(gather):
                    await asyncio.sleep(0)
            except asyncio.CancelledError:  # hand the others on before leaving
                rest, self._arrivals = self._arrivals[1:], None
                if rest:
                    loop.call_soon(self._flush, rest)
                raise
            jobs, self._arrivals = self._arrivals, None
            if gather > 1:
                self._group_size += 0.1 * (len(jobs) - self._group_size)
            outcome = self._flush(jobs, job)
            if outcome is not None:
                return _result(outcome)
            assert job.future is not None
            return await job.future  # type: ignore[no-any-return]
        except asyncio.CancelledError:
            self.stats.record_failure(1, perf_counter_ns() - started, "CANCELED")
            raise
        finally:
            self.inflight -= 1

    def _gathering(self) -> int:
        """How many loop iterations a leader waits for others to join its group.

        One always: arrivals handed over by gRPC in the same iteration join for free. Unary
        calls under load, though, reach us about one per few iterations, so one iteration
        rarely forms a batch; waiting a few more (while the loop does other work) does. That
        pays only when groups really form, so the leader waits longer only while recent
        longer waits gathered more than one request on average, and every PROBE_EVERY-th
        leader waits longer anyway to find out whether load has arrived. Idle (concurrency
        1) this costs one probe in PROBE_EVERY requests a few loop iterations.
        """
        cost = self._inline_cost()
        if cost is None or cost > self._inline_ns:
            return 1  # groups do not run inline: the batcher's own queue gathers while instances are busy
        self._leaders += 1
        if self._group_size >= _GROUPS_FORM or self._leaders % _PROBE_EVERY == 0:
            return _GATHER_ITERATIONS
        return 1

    def _inline_cost(self) -> float | None:
        """The measured compute per batch item, if this model's groups may run inline at all
        (dynamic batching with no queue delay, cost measured); else None."""
        batcher = self._batcher
        if batcher is None or batcher.policy.max_queue_delay_ns:
            return None
        return self._cost.per_item_ns

    def _lead_later(self, jobs: list[Job], loop: asyncio.AbstractEventLoop) -> None:
        """Collect this iteration's arrivals into `jobs` and flush them once it ends."""
        self._arrivals = jobs

        def flush() -> None:
            group, self._arrivals = self._arrivals, None
            if group:
                self._flush(group)

        loop.call_soon(flush)

    async def _in_order(self, future: asyncio.Future[Any], loop: asyncio.AbstractEventLoop) -> Any:
        """Wait for our result, then for every earlier request to have returned (or failed).

        A request whose client cancels does not wait: it hands its turn on to the next one
        as soon as the previous request's turn is done."""
        previous, turn = self._last_turn, loop.create_future()
        self._last_turn = turn

        def pass_turn(_: object = None) -> None:
            if not turn.done():
                turn.set_result(None)

        try:
            try:
                result = await future
            except asyncio.CancelledError:
                raise
            except BaseException:
                if previous is not None and not previous.done():
                    await asyncio.shield(previous)
                raise
            if previous is not None and not previous.done():
                await asyncio.shield(previous)
            return result
        finally:
            if previous is None or previous.done():
                pass_turn()
            else:
                previous.add_done_callback(pass_turn)

    def _run_inline(self, jobs: list[Job]) -> list[Outcome] | None:
        """Run the jobs on the event loop on the first idle instance; None if none is idle."""
        for instance in self._instances:
            if not instance.retired and instance.lock.acquire(blocking=False):
                try:
                    return instance.execute(jobs)
                except Exception as exc:  # a bug: fail these requests rather than leave them hanging
                    log.exception("%s: inline execution failed", self.label)
                    return instance.fail(jobs, exc)
                finally:
                    instance.lock.release()
        return None

    def _flush(self, arrivals: list[Job], leader: Job | None = None) -> Outcome | None:
        """A leader's group: run it inline, in batches of at most max_batch_size, or queue it.

        With no queue delay, nothing queued and a cheap model, the group runs right here (no
        thread hand-off); otherwise (or for what is left when no instance is idle) it joins
        the batcher's queue, where a free instance pulls it. Returns the `leader`'s outcome
        when it ran inline (it has no future); if it was queued instead, it now has a future
        to await.
        """
        jobs = arrivals if len(arrivals) == 1 and arrivals[0] is leader else \
            [job for job in arrivals if job is leader or not job.cancelled()]
        batcher = self._batcher
        assert batcher is not None
        result: Outcome | None = None
        done = 0
        began = perf_counter_ns()
        for chunk in self._inline_chunks(jobs, batcher):
            if done and perf_counter_ns() - began > self._inline_ns:
                break  # slower than measured: the rest goes to the instances' threads
            outcomes = self._run_inline(chunk)
            if outcomes is None:  # no idle instance after all
                break
            deliver_all(chunk, outcomes)  # the leader has no future: skipped
            if leader is not None and result is None:
                for job, outcome in zip(chunk, outcomes, strict=True):
                    if job is leader:
                        result = outcome
            done += len(chunk)
        if done == len(jobs):
            return result
        if leader is not None and result is None:
            leader.future = leader.loop.create_future()
        for job in jobs[done:]:
            try:
                batcher.enqueue(job)
            except NereidError as exc:
                self.stats.record_failure(1, 0, "REJECTED")
                deliver_all([job], [(None, exc)])
        return result

    def _inline_chunks(self, jobs: list[Job], batcher: DynamicBatchScheduler) -> list[list[Job]]:
        """The group cut into batches of at most max_batch_size, if it may run inline (cheap
        model, no queue delay, nothing queued, all with the same non-batch dims); else []."""
        cost = self._inline_cost()
        if not jobs or cost is None or batcher.pending():
            return []
        policy = batcher.policy
        key = jobs[0].shape_key
        chunks: list[list[Job]] = [[]]
        total = size = 0
        for job in jobs:
            if job.shape_key != key:
                return []  # different non-batch dims: the batcher keeps them apart
            items = job.request.batch_size
            if size + items > policy.max_batch_size:
                chunks.append([])
                size = 0
            chunks[-1].append(job)
            size += items
            total += items
        return chunks if cost * total <= self._inline_ns else []


# Dynamic batching with no queue delay (Model._gathering): how many loop iterations a leader
# waits for others under load, how often it probes for load, and the mean group size that
# counts as "groups form". Measured: 10 iterations form unary groups of ~2.6 at concurrency 64.
_GATHER_ITERATIONS = 10
_PROBE_EVERY = 16
_GROUPS_FORM = 1.25


def _result(outcome: Outcome) -> dict[str, np.ndarray]:
    result, error = outcome
    if error is not None:
        raise error
    return result  # type: ignore[no-any-return]


_COLLECTORS: concurrent.futures.ThreadPoolExecutor | None = None


def _collectors() -> concurrent.futures.ThreadPoolExecutor:
    """Threads that finish a Python model's reply off the event loop: collecting it (a stub that
    died is restarted there) or draining it after a cancelled request. Futures of their own, so
    a cancelled request can free its instance exactly when that thread is done with the backend."""
    global _COLLECTORS
    if _COLLECTORS is None:
        _COLLECTORS = concurrent.futures.ThreadPoolExecutor(thread_name_prefix="nereid-collect")
    return _COLLECTORS


def _expired(instance: ModelInstance, timeout_s: float, jobs: list[Job]) -> None:
    instance.expired(jobs, timeout_s)


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
