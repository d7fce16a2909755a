"""When to close a dynamic batch: a pure function of the queue and the clock.

Triton's rules (dynamic_batch_scheduler.cc, GetDynamicBatch), reduced to what a
free instance needs to know: take the first N queued requests now, or wait.
- Requests join in arrival order (highest priority level first) until the next
  would exceed `max_batch_size` or has different non-batch dims; then the batch
  is closed and sent (the largest preferred size inside it, if any).
- A batch that reaches `max_batch_size` goes at once; so does the largest preferred
  size that the queued requests can form (the rest wait for the next batch).
- Otherwise it goes when the oldest request in it has waited `max_queue_delay`
  (then whole, preferred sizes or not); with a delay of 0 it goes at once.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Protocol


class Queued(Protocol):
    """What the policy reads of a queued request."""

    @property
    def batch_size(self) -> int: ...

    @property
    def enqueued_ns(self) -> int: ...

    @property
    def shape_key(self) -> Hashable: ...


@dataclass(frozen=True)
class BatchPolicy:
    max_batch_size: int
    preferred: tuple[int, ...] = ()  # ascending
    max_queue_delay_ns: int = 0

    def decide(self, queue: Sequence[Queued], now_ns: int) -> tuple[int, int | None]:
        """(n, wait_ns): take the first n requests now if n > 0; else wait wait_ns
        (None: until something is enqueued)."""
        if not queue:
            return 0, None
        key = queue[0].shape_key
        total = 0
        count = 0
        preferred_count = 0
        closed = False
        for item in queue:
            if item.shape_key != key or total + item.batch_size > self.max_batch_size:
                closed = True
                break
            total += item.batch_size
            count += 1
            if total in self.preferred:
                preferred_count = count
            if total == self.max_batch_size:
                closed = True
                break
        if count == 0:  # a single request larger than the batch limit cannot happen (validated)
            return 1, None
        # The delay runs from the oldest request in the batch (priorities may put a newer one first).
        waited = now_ns - min(item.enqueued_ns for item in queue[:count])
        delay = self.max_queue_delay_ns
        if delay and waited >= delay:  # expired: the whole pending batch goes, preferred sizes or not
            return count, None
        if closed or preferred_count:
            return (preferred_count or count), None
        if not delay:  # no delay: whatever formed goes now
            return count, None
        return 0, delay - waited
