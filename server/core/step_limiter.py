"""`ensemble_scheduling { max_inflight_requests: N }`: at most N requests in flight at each step.

Triton's meaning (core `ensemble_scheduler.cc` StepInflightRequestLimiter, docs
"Managing Memory Usage in Ensemble Models"): one limiter per step, shared by every request to
the ensemble; a step request holds a slot from when it is sent to the step model until its
final response; an ensemble request that wants to send one more waits for a slot. This bounds
what piles up between a fast step (typically a decoupled one answering many times) and a
slow one. 0 (the default) means no limit and costs nothing.

Triton gives up waiting after a long timeout and sends the request anyway, logging an error,
to avoid a deadlock; here the slots are released by the step requests themselves (never by
the waiting ensemble request), so waiting cannot deadlock and there is no timeout.
"""

from __future__ import annotations

import asyncio
from collections import deque


class StepLimiter:
    """A counting semaphore for one step, on the event loop (FIFO, cancellation-safe)."""

    __slots__ = ("limit", "inflight", "_waiters")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.inflight = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    async def acquire(self) -> None:
        if self.inflight < self.limit and not self._waiters:
            self.inflight += 1
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter  # release() handed its slot to this waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():  # the slot came just as we were cancelled: pass it on
                self.release()
            else:
                self._waiters.remove(waiter)
            raise

    def release(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot goes straight to the waiter: inflight stays
                return
        self.inflight -= 1

    def released(self, _: object) -> None:
        """release() as a done callback of the task that held the slot."""
        self.release()


def step_limiters(limit: int, steps: int) -> list[StepLimiter] | None:
    """One limiter per step, or None when the config sets no limit."""
    return [StepLimiter(limit) for _ in range(steps)] if limit > 0 else None
