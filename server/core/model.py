"""One model version: what it is (config, tensors, scheduler, statistics, state) and where a
request goes.

This module is the version's map; the work lives beside it, one concern per module:

- lifecycle.py: the instances' life (created, warmed, watched, started, drained, closed);
- gathering.py: how a dynamically batched version forms groups on the event loop;
- execution.py: running a request on the event loop itself (inline or awaiting a stub);
- scheduler.py / dynamic_batcher.py / sequence_batcher.py: the queues instances pull from;
- instance.py: one instance's worker thread and its backend.

The repository builds a Model from a normalised config and a folder, loads it on a loader
thread and routes requests to it; nothing here knows about the repository.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from dataclasses import replace
from pathlib import Path
from time import perf_counter_ns
from typing import Any

import numpy as np
from tritonclient.grpc import model_config_pb2 as mc

from backends.base import BackendError
from backends.registry import backend_class
from server.core.batcher_config import make_batcher
from server.core.classification import Labels, classify_outputs, load_labels
from server.core.execution import DEFAULT_INLINE_US, RunBudget, result, run_awaiting, run_inline
from server.core.faults import execution_timeout_s, failure_threshold
from server.core.gathering import Gatherer
from server.core.instance import CostTracker, ModelInstance, Outcome, OutputShaper, deliver_all
from server.core.latency import RequestLatencies
from server.core.lifecycle import InstancePool, check_backend
from server.core.limits import ServingLimits
from server.core.response_cache import model_cache
from server.core.scheduler import DirectScheduler, Job, Scheduler
from server.core.sequence_batcher import SequenceBatcher
from server.core.sequence_config import sequence_settings
from server.core.signature import TensorInfo
from server.core.spec import build_spec
from server.core.state import ModelState
from server.core.stats import ModelStats
from server.core.warmup import build_samples
from server.errors import ModelUnavailable, NereidError
from server.types import InferenceRequest

log = logging.getLogger("nereid.model")

__all__ = ["DEFAULT_INLINE_US", "Model"]


class Model:
    """A loaded (or loading, or failed) version of a model."""

    def __init__(
        self, config: mc.ModelConfig, model_dir: Path, version: int, limits: ServingLimits | None = None
    ) -> None:
        limits = limits or ServingLimits(inline_us=DEFAULT_INLINE_US)
        self.config = config
        self.source_config = config  # as loaded from the repository (an ensemble's `config` may add to it)
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
        # Triton's response cache (response_cache.py) when the server and this config enable it.
        self.cache, self._cache_error = model_cache(config, limits.response_cache, version, self.stats)
        # Owned by the protocol layer (server/protocol/codec.py): wire-format templates for this model.
        self.wire_cache: dict[Any, Any] = {}
        self.state = ModelState.LOADING
        self.reason = ""
        self.inflight = 0
        self._batcher = make_batcher(config, self._reject, limits.queue_limit)
        self._scheduler: Scheduler = self._sequencer or self._batcher or DirectScheduler(limits.queue_limit)
        self._pool = InstancePool(self.label)
        self._cost = CostTracker()
        self._limits = limits
        self.timeout_s = 0.0  # execution timeout (faults.py); read from the config at load
        self.labels: Labels = {}  # each output's classification labels (classification.py); read at load
        # Called (from an instance thread) when this version stops serving because every instance
        # kept failing; the repository manager sets it to update readiness, health and the index.
        self.on_unavailable: Callable[[Model], None] | None = None
        self._budget = RunBudget(limits.inline_us * 1000.0)  # fitted to the backend at load
        # Dynamic batching: groups form on the event loop (gathering.py); preserve_ordering kept there.
        self._gatherer: Gatherer | None = None
        if self._batcher is not None:
            ordered = config.WhichOneof("scheduling_choice") == "dynamic_batching" and \
                config.dynamic_batching.preserve_ordering
            self._gatherer = Gatherer(self._batcher, self._cost, self._budget, self.stats, self._members,
                                      ordered, self.label)

    @property
    def _instances(self) -> list[ModelInstance]:
        """The instances serving now (empty before load and after unload)."""
        return self._pool.members

    def _members(self) -> list[ModelInstance]:
        return self._pool.members

    # -- lifecycle (runs on a loader thread, never on the event loop; the work is in lifecycle.py) --

    def load(self) -> None:
        """Create every instance; on any failure release what was made and raise BackendError."""
        pool = self._pool
        try:
            cls = backend_class(self.config.backend).variant(self.spec)
            try:
                self.timeout_s = execution_timeout_s(self.config, self._limits.execution_timeout_s)
                threshold = failure_threshold(self.config, self._limits.failure_threshold)
                self.labels = load_labels(self.config, self.spec.model_dir)
            except (ValueError, OSError, NereidError) as exc:
                raise BackendError(str(exc)) from None
            self._budget.fit(cls, self.timeout_s)
            check_backend(cls, self.spec, self.decoupled)
            if self._sequence_error:
                raise BackendError(self._sequence_error)
            if self._cache_error:
                raise BackendError(self._cache_error)
            sequencer = self._sequencer
            pulls: Callable[[], Scheduler] = sequencer.view if sequencer is not None else lambda: self._scheduler
            pool.create(cls, self.spec, self.config.instance_group, pulls,
                        OutputShaper(self.label, self._shaped_outputs, self.inputs), self.stats, self._cost,
                        threshold, self._instance_retired)
            self._warm()
            pool.watch(self.timeout_s)
        except BaseException as exc:
            pool.close()
            self.state = ModelState.UNAVAILABLE
            self.reason = str(exc)
            raise BackendError(str(exc)) from exc
        pool.start()
        self.state = ModelState.READY
        self.reason = ""

    def _warm(self) -> None:
        """Build the config's `model_warmup` samples and run them on every instance (warmup.py)."""
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
        self._pool.warm(samples, OutputShaper(self.label, self.outputs, self.inputs), self.decoupled)

    def _instance_retired(self, retired: ModelInstance) -> bool:
        """An instance kept failing (faults.py). Whether others still serve; if none does, this
        version becomes UNAVAILABLE with the reason (its queued requests are then answered by the
        last instance's thread) and the manager is told."""
        if self._pool.serving():
            return True
        if self.state is ModelState.READY:
            self.state = ModelState.UNAVAILABLE
            self.reason = f"every instance was taken out of service; instance {retired.name}: {retired.retired}"
            log.error("%s is UNAVAILABLE: %s", self.label, self.reason)
            if self.on_unavailable is not None:
                self.on_unavailable(self)
        return False

    def unload(self, timeout: float | None = None) -> None:
        """Stop taking requests, let the in-flight ones finish, then stop the instances and release the backends.

        The repository manager has already routed new requests elsewhere (state
        UNLOADING is set on the event loop together with the routing change), so
        `inflight` only falls from here on. `timeout` bounds the whole wait.
        """
        self.state = ModelState.UNLOADING
        self._pool.release(lambda: self.inflight, self._scheduler, timeout)
        self.state = ModelState.UNAVAILABLE
        self.reason = "unloaded"

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
        if self.cache is not None:  # answered from the response cache, or run and kept there
            return self.cache.infer(request, self._infer)
        return self._infer(request)

    async def _infer_classified(self, request: InferenceRequest) -> dict[str, np.ndarray]:
        cache = self.cache
        outputs = await (cache.infer(request, self._infer) if cache is not None else self._infer(request))
        assert request.classification is not None
        return classify_outputs(outputs, request.classification, self.labels, self.config.max_batch_size > 0)

    async def _infer(self, request: InferenceRequest) -> dict[str, np.ndarray]:
        """Run the request and return its outputs.

        Sequence models go to their sequence's slot; dynamically batched ones join this loop
        iteration's group (gathering.py). Otherwise a cheap model (measured compute per request
        under the inline budget) runs right here on the event loop when nothing is queued and an
        instance is idle, and a Python model is awaited from here (execution.py): on a busy core
        a thread hand-off costs several times what such a model computes. Everything else is
        queued for the instances' worker threads.
        """
        if self.state is not ModelState.READY:
            raise ModelUnavailable(f"{self.label} is not at ready state")
        loop = asyncio.get_running_loop()
        started = perf_counter_ns()
        if self._sequencer is not None:
            return await self._infer_sequence(request, loop, started)
        gatherer = self._gatherer
        if gatherer is not None:
            self.inflight += 1
            try:
                return await gatherer.infer(request, loop, started)
            finally:
                self.inflight -= 1
        budget = self._budget
        if budget.awaitable and not self._scheduler.pending():
            for instance in self._pool.members:
                if not instance.retired and instance.lock.acquire(blocking=False):
                    self.inflight += 1
                    try:
                        return await run_awaiting(instance, Job(request, None, loop, started), loop,
                                                  budget.wait_ns, self.stats, self.timeout_s, self.label)
                    finally:
                        self.inflight -= 1
        cost = self._cost.per_item_ns
        if cost is not None and cost * request.batch_size <= budget.inline_ns and not self._scheduler.pending():
            outcomes = run_inline(self._pool.members, [Job(request, None, loop, started)], self.label)
            if outcomes is not None:
                return result(outcomes[0])
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
