"""Schedulers hand work to model instances; instances PULL it when they are free.

Triton's scheduler interface has three verbs (enqueue, inflight count, stop);
`next_batch` is what an instance thread calls to get its next piece of work.
The direct scheduler (no `dynamic_batching`) gives one request at a time to
whichever instance asks first, which spreads requests over the instances.
"""

from __future__ import annotations

import abc
import asyncio
import queue
from typing import Any

from server.errors import ServerUnavailable
from server.types import InferenceRequest


class Job:
    """One request waiting for, or being run by, an instance."""

    __slots__ = ("request", "future", "loop", "enqueued_ns", "level", "deadline_ns", "shape_key", "queue_state",
                 "abandoned", "padding")

    def __init__(
        self, request: InferenceRequest, future: asyncio.Future[Any] | None, loop: asyncio.AbstractEventLoop,
        enqueued_ns: int,
    ) -> None:
        self.request = request
        self.future = future  # None when run inline on the event loop
        self.loop = loop
        self.enqueued_ns = enqueued_ns
        self.level = 0  # priority level (dynamic batcher)
        self.deadline_ns: int | None = None  # queue timeout (dynamic batcher)
        self.shape_key: tuple[Any, ...] = ()  # non-batch dims; requests batch only with equal keys
        # dynamic batcher: which queue entry is live (0 main queue, 1 delayed queue, 2 none: taken or dropped),
        # so entries left behind in its deques and deadline heap are recognised as dead in O(1)
        self.queue_state = 0
        self.abandoned = False  # the client gave up while the job ran awaited on the loop (no future)
        # A sequence batcher's null request (a row that keeps the others in their slots): it runs,
        # but statistics do not count it, as Triton does not (server/core/sequence_batcher.py).
        self.padding = False

    @property
    def batch_size(self) -> int:
        return self.request.batch_size

    def cancelled(self) -> bool:
        """The client gave up (deadline, cancel): before the job ran, or while it runs."""
        return self.abandoned or self.future is not None and self.future.done()


class Scheduler(abc.ABC):
    @abc.abstractmethod
    def enqueue(self, job: Job) -> None:
        """Accept a job from the event loop; never blocks."""

    @abc.abstractmethod
    def next_batch(self) -> list[Job] | None:
        """Block until there is work for the calling instance; None means stop."""

    @abc.abstractmethod
    def pending(self) -> int:
        """Jobs queued and not yet taken by an instance."""

    @abc.abstractmethod
    def stop(self, instances: int) -> None:
        """Wake every instance so it exits after the work already queued."""


class DirectScheduler(Scheduler):
    """No batching: a FIFO queue that free instances pull single requests from."""

    def __init__(self, limit: int = 0) -> None:
        # SimpleQueue is implemented in C; get() blocks without holding the GIL.
        self._queue: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._limit = limit  # most requests waiting for an instance (--model-queue-limit); 0: unbounded

    def enqueue(self, job: Job) -> None:
        if self._limit and self._queue.qsize() >= self._limit:
            raise ServerUnavailable("Exceeds maximum queue size")
        self._queue.put(job)

    def next_batch(self) -> list[Job] | None:
        job = self._queue.get()
        return None if job is None else [job]

    def pending(self) -> int:
        return self._queue.qsize()

    def stop(self, instances: int) -> None:
        for _ in range(instances):
            self._queue.put(None)
