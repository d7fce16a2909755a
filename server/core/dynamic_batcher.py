"""The dynamic batch scheduler: priority queues, queue policies, batches pulled by free instances.

Instances call `next_batch` when they are free, so a batch is formed only when
something can run it and batches grow under load instead of piling up (Triton's
`WaitForPayloadSlotAvailable`). The decision itself is `BatchPolicy.decide`, a
pure function; the clock is injected so tests can step time.
"""

from __future__ import annotations

import collections
import itertools
import threading
from collections.abc import Callable
from dataclasses import dataclass
from time import perf_counter_ns
from typing import Any

from server.core.batch_policy import BatchPolicy
from server.core.scheduler import Job, Scheduler
from server.errors import InvalidInput, NereidError, ServerUnavailable


@dataclass(frozen=True)
class QueuePolicy:
    """Triton's ModelQueuePolicy for one priority level."""

    delay_on_timeout: bool = False  # TimeoutAction DELAY (else REJECT)
    default_timeout_ns: int = 0  # 0: none
    allow_timeout_override: bool = False
    max_queue_size: int = 0  # 0: unbounded


Reject = Callable[[Job, NereidError], None]


class DynamicBatchScheduler(Scheduler):
    def __init__(
        self, policy: BatchPolicy, levels: int, default_level: int, queue_policies: dict[int, QueuePolicy],
        reject: Reject, clock: Callable[[], int] = perf_counter_ns,
    ) -> None:
        self.policy = policy
        self.levels = max(levels, 1)
        self.default_level = default_level if 1 <= default_level <= self.levels else 1
        self._policies = queue_policies
        self._reject = reject
        self._clock = clock
        # per level: requests in time order, then requests delayed by a DELAY timeout
        self._queues = [collections.deque[Job]() for _ in range(self.levels)]
        self._delayed = [collections.deque[Job]() for _ in range(self.levels)]
        self._count = 0
        # Without any queue timeout in the config, nothing can expire: skip the O(n) scans.
        self._timeouts = any(p.default_timeout_ns or p.allow_timeout_override for p in queue_policies.values())
        self._cond = threading.Condition(threading.Lock())
        self._stopped = False

    # -- loop side --

    def level_for(self, priority: int) -> int:
        """Triton's priority parameter: 0 is the default level, 1 the highest."""
        if priority == 0:
            return self.default_level
        if priority > self.levels:
            raise InvalidInput(f"priority {priority} is out of range: this model has priority levels 1..{self.levels}")
        return priority

    def prepare(self, job: Job, now_ns: int) -> None:
        """Set the job's level, deadline and shape key from its request; raises on bad parameters."""
        params = job.request.parameters
        job.level = self.level_for(_uint(params.get("priority", 0), "priority")) if params else self.default_level
        policy = self._policies.get(job.level)
        timeout_ns = policy.default_timeout_ns if policy else 0
        if params and "timeout" in params:
            asked = _uint(params["timeout"], "timeout") * 1000
            if policy and policy.allow_timeout_override and asked and (not timeout_ns or asked < timeout_ns):
                timeout_ns = asked
        job.deadline_ns = now_ns + timeout_ns if timeout_ns else None
        key: tuple[Any, ...] = ()
        for name, arr in job.request.inputs.items():
            key += (name, arr.shape[1:])
        job.shape_key = key

    def enqueue(self, job: Job) -> None:
        policy = self._policies.get(job.level)
        with self._cond:
            if self._stopped:
                raise ServerUnavailable("Server is stopping: the model is not accepting requests")
            queue = self._queues[job.level - 1]
            if policy and policy.max_queue_size and len(queue) + len(self._delayed[job.level - 1]) >= \
                    policy.max_queue_size:
                raise ServerUnavailable("Exceeds maximum queue size")
            queue.append(job)
            self._count += 1
            self._cond.notify()

    def pending(self) -> int:
        return self._count

    def stop(self, instances: int) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify_all()

    # -- instance side --

    def next_batch(self) -> list[Job] | None:
        with self._cond:
            while True:
                now = self._clock()
                self._expire(now)
                view = self._head()
                if not view:
                    if self._stopped:
                        return None
                    self._cond.wait()
                    continue
                count, wait_ns = self.policy.decide(view, now)
                if count == 0 and self._stopped:
                    count = self.policy.decide(view, now + self.policy.max_queue_delay_ns)[0]
                if count:
                    return self._take(count)
                deadline = self._nearest_deadline()
                if deadline is not None:
                    wait_ns = min(wait_ns if wait_ns is not None else deadline - now, deadline - now)
                self._cond.wait(None if wait_ns is None else max(wait_ns, 0) / 1e9)

    def step(self) -> list[Job] | None:
        """Tests: one decision without blocking; None when the policy says wait."""
        with self._cond:
            now = self._clock()
            self._expire(now)
            view = self._head()
            count, _ = self.policy.decide(view, now)
            return self._take(count) if count else None

    def _head(self) -> list[Job]:
        """Queued jobs in service order, as many as could fill one batch (cancelled ones dropped)."""
        view: list[Job] = []
        limit = self.policy.max_batch_size
        for sources in (self._queues, self._delayed):
            for index, source in enumerate(sources):
                if any(job.cancelled() for job in itertools.islice(source, limit)):
                    before = len(source)
                    sources[index] = source = collections.deque(j for j in source if not j.cancelled())
                    self._count -= before - len(source)
        for queue, delayed in zip(self._queues, self._delayed, strict=True):
            for source in (queue, delayed):
                for job in source:
                    view.append(job)
                    if len(view) >= limit:
                        return view
        return view

    def _take(self, count: int) -> list[Job]:
        batch: list[Job] = []
        for queue, delayed in zip(self._queues, self._delayed, strict=True):
            for source in (queue, delayed):
                while source and len(batch) < count:
                    batch.append(source.popleft())
        self._count -= len(batch)
        return batch

    def _expire(self, now: int) -> None:
        """Apply REJECT/DELAY to requests whose queue timeout passed (and drop cancelled ones)."""
        if not self._timeouts:
            return
        for index, queue in enumerate(self._queues):
            if not queue:
                continue
            keep: collections.deque[Job] = collections.deque()
            for job in queue:
                if job.cancelled():
                    self._count -= 1
                elif job.deadline_ns is not None and job.deadline_ns <= now:
                    policy = self._policies.get(index + 1)
                    if policy and policy.delay_on_timeout:
                        job.deadline_ns = None
                        self._delayed[index].append(job)
                    else:
                        self._count -= 1
                        self._reject(job, ServerUnavailable("Request timeout expired"))
                else:
                    keep.append(job)
            self._queues[index] = keep
        for index, delayed in enumerate(self._delayed):
            if any(job.cancelled() for job in delayed):
                before = len(delayed)
                self._delayed[index] = collections.deque(j for j in delayed if not j.cancelled())
                self._count -= before - len(self._delayed[index])

    def _nearest_deadline(self) -> int | None:
        if not self._timeouts:
            return None
        deadlines = [j.deadline_ns for q in self._queues for j in q if j.deadline_ns is not None]
        return min(deadlines) if deadlines else None


def _uint(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidInput(f"request parameter '{name}' must be a non-negative integer, got {value!r}")
    return value
