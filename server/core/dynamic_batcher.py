"""The dynamic batch scheduler: priority queues, queue policies, batches pulled by free instances.

Instances call `next_batch` when they are free, so a batch is formed only when
something can run it and batches grow under load instead of piling up (Triton's
`WaitForPayloadSlotAvailable`). The decision itself is `BatchPolicy.decide`, a
pure function; the clock is injected so tests can step time.
"""

from __future__ import annotations

import collections
import heapq
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

# Job.queue_state. A deque entry is live only while its job's state names that deque; every other entry
# (job taken, cancelled, rejected, or moved to the delayed queue) is dead and skipped when met.
_QUEUED, _DELAYED, _GONE = 0, 1, 2


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
        # per level: requests in time order, then requests delayed by a DELAY timeout (both may hold dead entries)
        self._queues = [collections.deque[Job]() for _ in range(self.levels)]
        self._delayed = [collections.deque[Job]() for _ in range(self.levels)]
        self._live = [0] * self.levels  # live jobs per level: what max_queue_size limits
        self._count = 0
        # Without any queue timeout in the config, nothing can expire: no deadline heap, no expiry work.
        self._timeouts = any(p.default_timeout_ns or p.allow_timeout_override for p in queue_policies.values())
        # (deadline_ns, arrival seq, job) of jobs with a timeout, so expiry and the next wake-up look at the
        # top only instead of scanning every queued job (O(n^2) batch formation under a deep queue).
        self._deadlines: list[tuple[int, int, Job]] = []
        self._timed = 0  # live entries in _deadlines; the rest are stale
        self._seq = itertools.count()
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
        index = job.level - 1
        with self._cond:
            if self._stopped:
                raise ServerUnavailable("Server is stopping: the model is not accepting requests")
            if policy and policy.max_queue_size and self._live[index] >= policy.max_queue_size:
                self._sweep_cancelled(index)  # only at the limit: clients that gave up free their slots
                if self._live[index] >= policy.max_queue_size:
                    raise ServerUnavailable("Exceeds maximum queue size")
            self._queues[index].append(job)  # job.queue_state is already _QUEUED, a new Job's default
            self._live[index] += 1
            self._count += 1
            if job.deadline_ns is not None:
                heapq.heappush(self._deadlines, (job.deadline_ns, next(self._seq), job))
                self._timed += 1
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

    def _sources(self, index: int) -> tuple[tuple[collections.deque[Job], int], ...]:
        """A level's deques in service order, each with the state its live entries' jobs are in."""
        return (self._queues[index], _QUEUED), (self._delayed[index], _DELAYED)

    def _head(self) -> list[Job]:
        """The first max_batch_size live jobs in service order (level 1 first: its queue, then its delayed
        requests, then level 2, ...). Dead entries met in that window are removed and cancelled jobs dropped
        there, so each costs O(1) once instead of a rebuild of whole deques on every decision."""
        view: list[Job] = []
        limit = self.policy.max_batch_size
        for index in range(self.levels):
            for source, state in self._sources(index):
                start = len(view)
                scanned = 0
                for job in source:
                    if len(view) >= limit:
                        break
                    scanned += 1
                    if job.queue_state != state:
                        continue
                    if job.cancelled():
                        self._drop(job)
                    else:
                        view.append(job)
                if scanned != len(view) - start:  # dead entries in the window: keep only its live jobs
                    for _ in range(scanned):
                        source.popleft()
                    source.extendleft(reversed(view[start:]))
                if len(view) >= limit:
                    return view
        return view

    def _take(self, count: int) -> list[Job]:
        """Pop the first `count` live jobs in service order: exactly the ones `_head` just showed the policy
        (cancellation is not re-checked here, so a late cancel cannot change what the policy decided on)."""
        batch: list[Job] = []
        for index in range(self.levels):
            before = len(batch)
            for source, state in self._sources(index):
                while source and len(batch) < count:
                    job = source.popleft()
                    if job.queue_state == state:
                        if job.deadline_ns is not None:  # only _QUEUED jobs still have one
                            self._timed -= 1
                        job.queue_state = _GONE
                        batch.append(job)
            self._live[index] -= len(batch) - before
            if len(batch) >= count:
                break
        self._count -= len(batch)
        return batch

    def _sweep_cancelled(self, index: int) -> None:
        """Drop the cancelled jobs of one level (O(queue); called only when its queue is full)."""
        for source, state in self._sources(index):
            for job in source:
                if job.queue_state == state and job.cancelled():
                    self._drop(job)

    def _drop(self, job: Job) -> None:
        """Forget a live queued job (cancelled or rejected); its deque and heap entries become dead."""
        if job.queue_state == _QUEUED and job.deadline_ns is not None:
            self._timed -= 1
        job.queue_state = _GONE
        self._live[job.level - 1] -= 1
        self._count -= 1

    def _expire(self, now: int) -> None:
        """Apply REJECT/DELAY to requests whose queue timeout passed (cancelled ones are just dropped).

        Only heap entries due by `now` are looked at. They are handled in level, then arrival order, the
        order a scan of the queues meets them, so rejections and the delayed queues keep that order."""
        if not self._timeouts:
            return
        heap = self._deadlines
        due: list[tuple[int, int, Job]] = []
        while heap and heap[0][0] <= now:
            _, seq, job = heapq.heappop(heap)
            if job.queue_state == _QUEUED:
                due.append((job.level, seq, job))
        due.sort()  # seqs are unique: jobs are never compared
        for level, _, job in due:
            policy = self._policies.get(level)
            if job.cancelled():
                self._drop(job)
            elif policy and policy.delay_on_timeout:
                self._timed -= 1
                job.deadline_ns = None
                job.queue_state = _DELAYED  # its entry in the main queue is now dead
                self._delayed[level - 1].append(job)
            else:
                self._drop(job)
                self._reject(job, ServerUnavailable("Request timeout expired"))
        if len(heap) > 2 * self._timed + 64:  # mostly stale: they would keep finished requests' tensors alive
            self._deadlines = [entry for entry in heap if entry[2].queue_state == _QUEUED]
            heapq.heapify(self._deadlines)

    def _nearest_deadline(self) -> int | None:
        """The earliest deadline of a live queued job, from the heap top (stale entries popped on the way)."""
        heap = self._deadlines
        while heap:
            job = heap[0][2]
            if job.queue_state == _QUEUED and not job.cancelled():
                return heap[0][0]
            heapq.heappop(heap)
            if job.queue_state == _QUEUED:  # cancelled: drop it rather than wake up for it
                self._drop(job)
        return None


def _uint(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidInput(f"request parameter '{name}' must be a non-negative integer, got {value!r}")
    return value
