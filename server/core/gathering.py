"""How a dynamically batched version forms batches on the event loop at zero queue delay.

Requests that arrive in one loop iteration are gathered and flushed together: the first
arrival of an iteration leads the group, yields once (or, under load, a few times) so that
requests gRPC hands over meanwhile join it, then runs the group. With no queue delay,
nothing queued and a cheap model the group runs inline as one batch and the leader gets
its own result directly (no future, no extra callback); the others get theirs through
futures. Otherwise the group joins the batcher's queue, where a free instance pulls it.

This is how batches form at zero delay without a thread hand-off per request, and why a
request costs about the same with the batcher as without it when batches do not form
(unary calls arrive about one per loop iteration). `preserve_ordering` is kept here too:
each request returns only after the one before it has returned.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from time import perf_counter_ns
from typing import Any

import numpy as np

from server.core.dynamic_batcher import DynamicBatchScheduler
from server.core.execution import RunBudget, result, run_inline
from server.core.instance import CostTracker, ModelInstance, Outcome, deliver_all
from server.core.scheduler import Job
from server.core.stats import ModelStats
from server.errors import NereidError
from server.types import InferenceRequest

# How many loop iterations a leader waits for others under load, how often it probes for
# load, and the mean group size that counts as "groups form". Measured: 10 iterations form
# unary groups of ~2.6 at concurrency 64.
_GATHER_ITERATIONS = 10
_PROBE_EVERY = 16
_GROUPS_FORM = 1.25


class Gatherer:
    """One batched version's groups: who leads, how long it waits, where the group runs."""

    def __init__(self, batcher: DynamicBatchScheduler, cost: CostTracker, budget: RunBudget, stats: ModelStats,
                 instances: Callable[[], Sequence[ModelInstance]], ordered: bool, label: str) -> None:
        self._batcher = batcher
        self._cost = cost
        self._budget = budget  # shared with the Model; fitted at load
        self._stats = stats
        self._instances = instances  # the version's current instances (none once unloaded)
        self._ordered = ordered
        self._label = label
        # Requests that arrived during this event-loop iteration (None: no group is forming).
        self._arrivals: list[Job] | None = None
        self._group_size = 1.0  # moving average of groups formed by leaders that waited longer
        self._leaders = 0
        self._last_turn: asyncio.Future[None] | None = None  # preserve_ordering: the latest request's turn

    async def infer(self, request: InferenceRequest, loop: asyncio.AbstractEventLoop,
                    started: int) -> dict[str, np.ndarray]:
        """Join this loop iteration's arrivals, then run them together or queue them.

        The first arrival of an iteration leads: it yields once, or under load a few times
        (`_gathering`), so that requests arriving meanwhile join it, then runs the group inline
        or queues it. Its own result comes back without a future; the others await theirs.
        """
        batcher = self._batcher
        job = Job(request, None, loop, started)
        batcher.prepare(job, started)
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
                    return await self._in_order(future, loop)  # type: ignore[no-any-return]
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
                return result(outcome)
            assert job.future is not None
            return await job.future  # type: ignore[no-any-return]
        except asyncio.CancelledError:
            self._stats.record_failure(1, perf_counter_ns() - started, "CANCELED")
            raise

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
        if cost is None or cost > self._budget.inline_ns:
            return 1  # groups do not run inline: the batcher's own queue gathers while instances are busy
        self._leaders += 1
        if self._group_size >= _GROUPS_FORM or self._leaders % _PROBE_EVERY == 0:
            return _GATHER_ITERATIONS
        return 1

    def _inline_cost(self) -> float | None:
        """The measured compute per batch item, if this model's groups may run inline at all
        (no queue delay, cost measured); else None."""
        if self._batcher.policy.max_queue_delay_ns:
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
                outputs = await future
            except asyncio.CancelledError:
                raise
            except BaseException:
                if previous is not None and not previous.done():
                    await asyncio.shield(previous)
                raise
            if previous is not None and not previous.done():
                await asyncio.shield(previous)
            return outputs
        finally:
            if previous is None or previous.done():
                pass_turn()
            else:
                previous.add_done_callback(pass_turn)

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
        inline_ns = self._budget.inline_ns
        outcome: Outcome | None = None
        done = 0
        began = perf_counter_ns()
        for chunk in self._inline_chunks(jobs):
            if done and perf_counter_ns() - began > inline_ns:
                break  # slower than measured: the rest goes to the instances' threads
            outcomes = run_inline(self._instances(), chunk, self._label)
            if outcomes is None:  # no idle instance after all
                break
            deliver_all(chunk, outcomes)  # the leader has no future: skipped
            if leader is not None and outcome is None:
                for job, each in zip(chunk, outcomes, strict=True):
                    if job is leader:
                        outcome = each
            done += len(chunk)
        if done == len(jobs):
            return outcome
        if leader is not None and outcome is None:
            leader.future = leader.loop.create_future()
        for job in jobs[done:]:
            try:
                batcher.enqueue(job)
            except NereidError as exc:
                self._stats.record_failure(1, 0, "REJECTED")
                deliver_all([job], [(None, exc)])
        return outcome

    def _inline_chunks(self, jobs: list[Job]) -> list[list[Job]]:
        """The group cut into batches of at most max_batch_size, if it may run inline (cheap
        model, no queue delay, nothing queued, all with the same non-batch dims); else []."""
        cost = self._inline_cost()
        batcher = self._batcher
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
        return chunks if cost * total <= self._budget.inline_ns else []
