"""The dynamic batcher without gRPC: BatchPolicy.decide, DynamicBatchScheduler with a fake
clock (`step`) and a real one (`next_batch` in a thread, bounded waits), batcher config,
and the numpy concat/split helpers. Semantics are Triton's (dynamic_batch_scheduler.cc)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc
from util import scaled

from server.core.batch_policy import BatchPolicy
from server.core.batcher_config import make_batcher
from server.core.batching import concat_inputs, same_shapes, split_outputs
from server.core.dynamic_batcher import DynamicBatchScheduler, QueuePolicy
from server.core.scheduler import Job
from server.errors import InvalidInput, NereidError, ServerUnavailable
from server.types import InferenceRequest

US = 1_000
MS = 1_000_000

# --------------------------------------------------------------------------- BatchPolicy.decide


@dataclass(frozen=True)
class Item:
    batch_size: int
    enqueued_ns: int = 0
    shape_key: tuple = (("IN", (4,)),)


def items(*sizes: int, at: int = 0) -> list[Item]:
    return [Item(size, at) for size in sizes]


def test_empty_queue_waits_for_an_arrival() -> None:
    assert BatchPolicy(8).decide([], 0) == (0, None)


def test_closes_at_max_batch_size_without_waiting() -> None:
    policy = BatchPolicy(4, (), 10 * MS)
    assert policy.decide(items(1, 1, 1, 1, 1, 1), 0) == (4, None)


def test_next_request_that_would_overflow_closes_the_batch() -> None:
    policy = BatchPolicy(4, (), 10 * MS)
    # 3 + 2 > 4: the batch is as full as it can get, so it goes now with one request
    assert policy.decide(items(3, 2), 0) == (1, None)


def test_requests_of_different_batch_sizes_combine() -> None:
    policy = BatchPolicy(8)
    assert policy.decide(items(1, 3, 2, 2), 0) == (4, None)
    assert policy.decide(items(4, 1, 3, 1), 0) == (3, None)  # 4+1+3 = 8, the 1 waits


def test_zero_delay_sends_whatever_is_queued_at_once() -> None:
    assert BatchPolicy(8).decide(items(1, 2), 0) == (2, None)


def test_preferred_size_reached_goes_at_once() -> None:
    policy = BatchPolicy(8, (2, 4), 10 * MS)
    assert policy.decide(items(1, 1), 0) == (2, None)
    assert policy.decide(items(1, 3), 0) == (2, None)
    assert policy.decide(items(2, 1, 1), 0) == (3, None)


def test_largest_preferred_size_inside_a_full_batch_is_sent() -> None:
    policy = BatchPolicy(8, (2, 4), 10 * MS)
    # the queue could fill 8, which is not preferred: the largest preferred inside it (4) goes
    assert policy.decide(items(1, 1, 1, 1, 1, 1, 1, 1, 1), 0) == (4, None)


def test_preferred_size_goes_at_once_even_when_more_requests_are_queued() -> None:
    """Triton marks the cursor at each preferred size while it keeps walking the queue; with a
    preferred size found and the delay not exceeded it sends that batch now (GetDynamicBatch:
    `best_preferred_batch_size != 0 && !delay_is_exceeded`). Three batch-1 requests with
    preferred sizes 2 and 4 give a batch of 2 at once, not a wait for the queue delay."""
    policy = BatchPolicy(8, (2, 4), 10 * MS)
    assert policy.decide(items(1, 1, 1), 0) == (2, None)
    assert policy.decide(items(1, 1, 1, 1, 1), 0) == (4, None)


def test_expired_delay_sends_the_whole_pending_batch_not_just_the_preferred_part() -> None:
    """Triton: once the oldest request has waited max_queue_delay, the preferred mark is
    ignored and the whole pending batch goes (`send_now` after the preferred check fails
    because `delay_is_exceeded`)."""
    policy = BatchPolicy(4, (2,), 1 * MS)
    assert policy.decide(items(1, 1, 1, 1, 1), 2 * MS) == (4, None)


def test_zero_delay_still_prefers_the_largest_preferred_size() -> None:
    """With max_queue_delay 0 Triton never counts the delay as exceeded
    (`delay_is_exceeded = pending_batch_delay_ns_ != 0 && ...`), so a preferred size that can
    be formed still wins over the whole pending batch."""
    assert BatchPolicy(8, (2, 4), 0).decide(items(1, 1, 1), 0) == (2, None)
    assert BatchPolicy(4, (2,), 0).decide(items(1, 1, 1, 1, 1), 0) == (2, None)
    assert BatchPolicy(8, (4,), 0).decide(items(1, 1, 1), 0) == (3, None)  # no preferred size reachable


def test_delay_runs_from_the_oldest_item_even_when_it_is_not_first() -> None:
    policy = BatchPolicy(8, (), 1 * MS)
    queue = [Item(1, 900 * US), Item(1, 0)]  # e.g. a newer high-priority request ahead of an older one
    assert policy.decide(queue, 1 * MS) == (2, None)
    assert policy.decide(queue, 500 * US) == (0, 500 * US)


def test_below_preferred_waits_the_remaining_delay_of_the_oldest_request() -> None:
    policy = BatchPolicy(8, (4,), 1 * MS)
    queue = [Item(1, 0), Item(1, 600 * US)]
    assert policy.decide(queue, 700 * US) == (0, 300 * US)  # from the OLDEST (t=0), not the newest
    assert policy.decide(queue, 1 * MS) == (2, None)
    assert policy.decide(queue, 5 * MS) == (2, None)


def test_no_preferred_sizes_waits_for_the_delay_then_sends_all() -> None:
    policy = BatchPolicy(8, (), 2 * MS)
    queue = items(1, 2)
    count, wait = policy.decide(queue, 0)
    assert (count, wait) == (0, 2 * MS)
    assert policy.decide(queue, 2 * MS) == (2, None)


def test_different_non_batch_shapes_never_merge() -> None:
    policy = BatchPolicy(8, (), 10 * MS)
    a = Item(1, 0, (("IN", (3,)),))
    b = Item(1, 0, (("IN", (5,)),))
    # a differing request closes the pending batch: it goes now, alone
    assert policy.decide([a, b, a], 0) == (1, None)
    assert policy.decide([b, a], 0) == (1, None)
    assert policy.decide([a, a, b], 0) == (2, None)


# --------------------------------------------------------------------------- DynamicBatchScheduler


class FakeFuture:
    """Just what Job.cancelled() reads."""

    def __init__(self) -> None:
        self._done = False

    def done(self) -> bool:
        return self._done

    def cancel(self) -> None:
        self._done = True


class Clock:
    def __init__(self) -> None:
        self.now = 0

    def __call__(self) -> int:
        return self.now


class Harness:
    def __init__(self, max_batch: int = 8, preferred: tuple[int, ...] = (), delay_ns: int = 0, levels: int = 1,
                 default_level: int = 1, policies: dict[int, QueuePolicy] | None = None,
                 clock: Callable[[], int] | None = None) -> None:
        self.clock: Any = clock or Clock()
        self.rejected: list[tuple[Job, NereidError]] = []
        self.sched = DynamicBatchScheduler(
            BatchPolicy(max_batch, preferred, delay_ns), levels, default_level, policies or {},
            lambda job, err: self.rejected.append((job, err)),
            clock=self.clock,
        )

    def job(self, name: str, batch: int = 1, shape: tuple[int, ...] = (4,), **params: object) -> Job:
        request = InferenceRequest({"IN": np.zeros((batch, *shape), np.float32)}, batch, name, None, dict(params))
        now = self.clock()
        job = Job(request, FakeFuture(), None, now)  # type: ignore[arg-type]
        self.sched.prepare(job, now)
        return job

    def add(self, name: str, batch: int = 1, shape: tuple[int, ...] = (4,), **params: object) -> Job:
        job = self.job(name, batch, shape, **params)
        self.sched.enqueue(job)
        return job

    def step_ids(self) -> list[str] | None:
        batch = self.sched.step()
        return None if batch is None else [job.request.id for job in batch]


def test_step_closes_at_max_batch_size() -> None:
    h = Harness(max_batch=4, delay_ns=10 * MS)
    for i in range(6):
        h.add(f"r{i}")
    assert h.step_ids() == ["r0", "r1", "r2", "r3"]
    assert h.sched.pending() == 2
    assert h.step_ids() is None  # 2 < 4 and the delay has not passed
    h.clock.now = 10 * MS
    assert h.step_ids() == ["r4", "r5"]
    assert h.sched.pending() == 0


def test_step_waits_for_delay_measured_from_the_oldest_request() -> None:
    h = Harness(max_batch=8, delay_ns=1 * MS)
    h.add("old")
    h.clock.now = 900 * US
    h.add("new")
    assert h.step_ids() is None
    h.clock.now = 1 * MS  # the oldest has waited 1 ms; the newest only 0.1 ms
    assert h.step_ids() == ["old", "new"]


def test_step_different_shapes_go_in_separate_batches() -> None:
    h = Harness(max_batch=8)
    h.add("a1", shape=(3,))
    h.add("b1", shape=(5,))
    h.add("a2", shape=(3,))
    assert h.step_ids() == ["a1"]
    assert h.step_ids() == ["b1"]
    assert h.step_ids() == ["a2"]


def test_step_mixed_batch_sizes_combine() -> None:
    h = Harness(max_batch=8)
    h.add("one", batch=1)
    h.add("three", batch=3)
    h.add("four", batch=4)
    h.add("two", batch=2)
    assert h.step_ids() == ["one", "three", "four"]
    assert h.step_ids() == ["two"]


def test_step_sends_largest_preferred_size() -> None:
    h = Harness(max_batch=8, preferred=(2, 4), delay_ns=10 * MS)
    for i in range(8):
        h.add(f"r{i}")
    # 8 fit (max) but 8 is not preferred: the largest preferred size (4) goes first
    assert h.step_ids() == ["r0", "r1", "r2", "r3"]
    assert h.step_ids() == ["r4", "r5", "r6", "r7"]
    h.add("last")
    assert h.step_ids() is None  # one left, below every preferred size: waits for the delay
    h.clock.now = 10 * MS
    assert h.step_ids() == ["last"]


def test_priority_level_1_is_served_first() -> None:
    h = Harness(max_batch=1, levels=2, default_level=2)
    h.add("low-a", priority=2)
    h.add("low-b")  # no priority: default level 2
    h.add("high", priority=1)
    assert h.step_ids() == ["high"]
    assert h.step_ids() == ["low-a"]
    assert h.step_ids() == ["low-b"]


def test_higher_priority_requests_lead_a_shared_batch() -> None:
    h = Harness(max_batch=8, levels=2, default_level=2)
    h.add("low")
    h.add("high", priority=1)
    assert h.step_ids() == ["high", "low"]


def test_delay_counts_from_the_oldest_request_across_priority_levels() -> None:
    """Triton measures the queue delay from the oldest request of the pending batch
    (queue_.OldestEnqueueTime()); a newer high-priority request at the head must not
    restart the wait for an older low-priority one that shares the batch."""
    h = Harness(max_batch=8, delay_ns=1 * MS, levels=2, default_level=2)
    h.add("low")  # t = 0
    h.clock.now = 900 * US
    h.add("high", priority=1)
    h.clock.now = 1 * MS  # "low" has waited the full delay
    assert h.step_ids() == ["high", "low"]


def test_priority_zero_means_the_default_level() -> None:
    h = Harness(levels=3, default_level=2)
    assert h.job("none").level == 2
    assert h.job("zero", priority=0).level == 2
    assert h.job("one", priority=1).level == 1
    assert h.job("three", priority=3).level == 3


def test_default_level_out_of_range_falls_back_to_1() -> None:
    h = Harness(levels=2, default_level=0)
    assert h.job("none").level == 1


@pytest.mark.parametrize("priority", [3, 100, -1, True, "1"])
def test_bad_priority_is_invalid_input(priority: object) -> None:
    h = Harness(levels=2, default_level=1)
    with pytest.raises(InvalidInput, match="priority"):
        h.job("bad", priority=priority)


def test_max_queue_size_rejects_with_unavailable() -> None:
    h = Harness(max_batch=1, policies={1: QueuePolicy(max_queue_size=2)})
    h.add("a")
    h.add("b")
    with pytest.raises(ServerUnavailable, match="Exceeds maximum queue size"):
        h.add("c")
    assert h.sched.pending() == 2
    assert h.step_ids() == ["a"]
    h.add("d")  # room again once one was taken
    assert h.step_ids() == ["b"]
    assert h.step_ids() == ["d"]


def test_max_queue_size_is_per_priority_level() -> None:
    h = Harness(max_batch=1, levels=2, default_level=2,
                policies={1: QueuePolicy(), 2: QueuePolicy(max_queue_size=1)})
    h.add("low")
    with pytest.raises(ServerUnavailable, match="Exceeds maximum queue size"):
        h.add("low2")
    h.add("high", priority=1)
    h.add("high2", priority=1)
    assert h.sched.pending() == 3


def test_reject_timeout_calls_reject_with_request_timeout_expired() -> None:
    h = Harness(max_batch=1, policies={1: QueuePolicy(default_timeout_ns=1 * MS)})
    h.add("a")
    h.add("b")
    assert h.step_ids() == ["a"]
    h.clock.now = 1 * MS
    assert h.step_ids() is None
    assert [(job.request.id, type(err), str(err)) for job, err in h.rejected] == [
        ("b", ServerUnavailable, "Request timeout expired")]
    assert h.sched.pending() == 0


def test_not_yet_expired_requests_run() -> None:
    h = Harness(max_batch=8, policies={1: QueuePolicy(default_timeout_ns=1 * MS)})
    h.add("a")
    h.clock.now = 1 * MS - 1
    assert h.step_ids() == ["a"]
    assert h.rejected == []


def test_delay_timeout_moves_the_request_behind_the_others() -> None:
    h = Harness(max_batch=1, policies={1: QueuePolicy(delay_on_timeout=True, default_timeout_ns=1 * MS)})
    h.add("a")  # deadline 1 ms
    h.clock.now = 500 * US
    h.add("b")  # deadline 1.5 ms
    h.add("c")
    h.clock.now = 1 * MS  # "a" timed out: DELAY sends it behind b and c, it is not rejected
    assert h.step_ids() == ["b"]
    assert h.step_ids() == ["c"]
    assert h.step_ids() == ["a"]
    assert h.rejected == []
    assert h.sched.pending() == 0


def test_delayed_requests_come_after_newer_arrivals_of_their_level() -> None:
    h = Harness(max_batch=1, policies={1: QueuePolicy(delay_on_timeout=True, default_timeout_ns=1 * MS)})
    h.add("a")
    h.clock.now = 2 * MS
    h.add("b")  # arrives after "a" expired
    assert h.step_ids() == ["b"]
    assert h.step_ids() == ["a"]


def test_timeout_override_only_shortens_and_only_when_allowed() -> None:
    allowed = Harness(policies={1: QueuePolicy(default_timeout_ns=100 * US, allow_timeout_override=True)})
    assert allowed.job("short", timeout=10).deadline_ns == 10 * US  # µs -> ns
    assert allowed.job("long", timeout=1000).deadline_ns == 100 * US  # cannot lengthen
    assert allowed.job("zero", timeout=0).deadline_ns == 100 * US
    assert allowed.job("none").deadline_ns == 100 * US

    denied = Harness(policies={1: QueuePolicy(default_timeout_ns=100 * US, allow_timeout_override=False)})
    assert denied.job("short", timeout=10).deadline_ns == 100 * US

    no_default = Harness(policies={1: QueuePolicy(allow_timeout_override=True)})
    assert no_default.job("set", timeout=50).deadline_ns == 50 * US
    assert no_default.job("none").deadline_ns is None

    without_policy = Harness()
    assert without_policy.job("ignored", timeout=50).deadline_ns is None


def test_timeout_override_rejects_at_the_shorter_deadline() -> None:
    h = Harness(max_batch=1, policies={1: QueuePolicy(default_timeout_ns=10 * MS, allow_timeout_override=True)})
    h.add("head")
    h.add("short", timeout=1000)  # 1 ms
    h.add("default")
    h.clock.now = 1 * MS
    assert h.step_ids() == ["head"]
    assert [job.request.id for job, _ in h.rejected] == ["short"]
    assert h.step_ids() == ["default"]


@pytest.mark.parametrize("timeout", [-5, 1.5, "10"])
def test_bad_timeout_parameter_is_invalid_input(timeout: object) -> None:
    h = Harness(policies={1: QueuePolicy(allow_timeout_override=True)})
    with pytest.raises(InvalidInput, match="timeout"):
        h.job("bad", timeout=timeout)


def test_cancelled_jobs_are_dropped_before_running() -> None:
    h = Harness(max_batch=8)
    a, b, c = h.add("a"), h.add("b"), h.add("c")
    b.future.cancel()  # type: ignore[union-attr]
    assert h.step_ids() == ["a", "c"]
    assert h.sched.pending() == 0
    for job in (a, c):
        assert not job.cancelled()


def test_all_cancelled_gives_no_batch_and_empty_queue() -> None:
    h = Harness(max_batch=8)
    jobs = [h.add(f"r{i}") for i in range(3)]
    for job in jobs:
        job.future.cancel()  # type: ignore[union-attr]
    assert h.step_ids() is None
    assert h.sched.pending() == 0


def test_cancelled_delayed_job_is_dropped() -> None:
    h = Harness(max_batch=1, policies={1: QueuePolicy(delay_on_timeout=True, default_timeout_ns=1 * MS)})
    a = h.add("a")
    h.clock.now = 1 * MS
    h.add("b")
    assert h.step_ids() == ["b"]  # "a" is now in the delayed queue
    a.future.cancel()  # type: ignore[union-attr]
    assert h.step_ids() is None
    assert h.sched.pending() == 0


def test_cancelled_requests_free_their_queue_slots_when_the_queue_is_full() -> None:
    """A client that gave up while queued does not hold a max_queue_size slot. Nothing takes a
    batch in between, so the queue is still full of entries when the next request comes: the
    cancelled ones must be swept out right there (enqueue's full-queue path) before anything is
    rejected, from the main queue and from the delayed one alike."""
    h = Harness(max_batch=1, policies={1: QueuePolicy(default_timeout_ns=1000 * MS, max_queue_size=2)})
    a = h.add("a")
    b = h.add("b")
    b.future.cancel()  # type: ignore[union-attr]
    assert h.sched.pending() == 2  # still counted: only the full-queue sweep can free b's slot
    c = h.add("c")  # b gave up: swept, so c fits
    assert h.sched.pending() == 2
    with pytest.raises(ServerUnavailable, match="Exceeds maximum queue size"):
        h.add("d")  # a and c are both live: really full
    assert h.step_ids() == ["a"] and h.step_ids() == ["c"] and h.step_ids() is None
    assert not c.cancelled() and not a.cancelled()
    assert h.sched._nearest_deadline() is None  # the swept job's deadline left with it

    # The same for a request that timed out into the delayed queue before its client gave up.
    h = Harness(max_batch=1, policies={1: QueuePolicy(delay_on_timeout=True, default_timeout_ns=1 * MS,
                                                       max_queue_size=2)})
    late = h.add("late")
    h.clock.now = 1 * MS
    h.add("fresh")
    assert h.step_ids() == ["fresh"]  # "late" timed out: it now waits in the delayed queue
    h.add("e")
    assert h.sched.pending() == 2
    late.future.cancel()  # type: ignore[union-attr]
    h.add("f")  # "late" gave up: swept from the delayed queue, so f fits
    with pytest.raises(ServerUnavailable, match="Exceeds maximum queue size"):
        h.add("g")
    assert h.step_ids() == ["e"] and h.step_ids() == ["f"] and h.step_ids() is None
    assert h.sched.pending() == 0


def test_enqueue_after_stop_is_unavailable() -> None:
    h = Harness()
    h.sched.stop(1)
    with pytest.raises(ServerUnavailable):
        h.add("late")


# --------------------------------------------------------------------------- queue timeouts under load


def rejected_ids(h: Harness) -> list[str]:
    return [job.request.id for job, _ in h.rejected]


def drain(h: Harness) -> list[list[str]]:
    batches = []
    while (ids := h.step_ids()) is not None:
        batches.append(ids)
    return batches


def chunks(ids: list[str], size: int) -> list[list[str]]:
    return [ids[i:i + size] for i in range(0, len(ids), size)]


def test_deep_queue_with_timeouts_drains_in_bounded_time() -> None:
    """20,000 queued requests with queue timeouts: expiry and batch formation must not scan the whole
    queue per decision (that drain took seconds; O(n^2)), and the results must be those of the scan.
    Level 1 REJECTs (every 5th of its requests with a 1 ms override), level 2 DELAYs."""
    n = 20_000
    h = Harness(max_batch=4, levels=2, default_level=2, policies={
        1: QueuePolicy(default_timeout_ns=100 * MS, allow_timeout_override=True),
        2: QueuePolicy(delay_on_timeout=True, default_timeout_ns=100 * MS)})
    high = [f"r{i}" for i in range(0, n, 2)]
    low = [f"r{i}" for i in range(1, n, 2)]
    short = {f"r{i}" for i in range(0, n, 10)}
    for i in range(n):
        if i % 2:
            h.add(f"r{i}")
        elif i % 10 == 0:
            h.add(f"r{i}", priority=1, timeout=1000)
        else:
            h.add(f"r{i}", priority=1)

    start = time.perf_counter()
    first = [h.step_ids() for _ in range(1000)]  # t = 0: level 1 first, in arrival order
    assert h.sched._nearest_deadline() == 1 * MS
    h.clock.now = 2 * MS  # the 1 ms overrides still queued are rejected, in arrival order
    second = [h.step_ids() for _ in range(1000)]
    assert h.sched._nearest_deadline() == 100 * MS
    h.clock.now = 200 * MS  # level 1's rest is rejected, all of level 2 moves to its delayed queue
    rest = drain(h)
    elapsed = time.perf_counter() - start

    assert first == chunks(high[:4000], 4)
    remaining = [i for i in high[4000:] if i not in short]
    assert second == chunks(remaining[:4000], 4)
    assert rest == chunks(low, 4)
    assert rejected_ids(h) == [i for i in high[4000:] if i in short] + remaining[4000:]
    assert all(str(err) == "Request timeout expired" for _, err in h.rejected)
    assert h.sched.pending() == 0
    assert h.sched._nearest_deadline() is None
    assert elapsed < scaled(2.0), f"draining {n} requests took {elapsed:.2f} s"


def test_expiry_follows_arrival_order_when_deadlines_do_not() -> None:
    """Overrides shorter than the default put deadlines out of arrival order. Requests that expire
    together are still rejected, or delayed, in arrival order (level 1 first), as a queue scan meets them."""
    h = Harness(max_batch=8, delay_ns=100 * MS, levels=2, default_level=2, policies={
        1: QueuePolicy(default_timeout_ns=10 * MS, allow_timeout_override=True),
        2: QueuePolicy(delay_on_timeout=True, default_timeout_ns=10 * MS, allow_timeout_override=True)})
    h.add("h-long", priority=1)  # 10 ms
    h.add("l-long")  # 10 ms
    h.add("l-2ms", timeout=2000)
    h.add("l-1ms", timeout=1000)
    h.add("h-3ms", priority=1, timeout=3000)
    h.add("h-1ms", priority=1, timeout=1000)
    h.add("l-5ms", timeout=5000)
    h.clock.now = 3 * MS
    assert h.step_ids() is None  # 5 live, below max and the queue delay has not passed
    assert rejected_ids(h) == ["h-3ms", "h-1ms"]
    assert h.sched.pending() == 5
    h.add("h-new", priority=1)
    h.clock.now = 100 * MS  # every deadline and the queue delay have passed
    assert h.step_ids() == ["l-2ms", "l-1ms", "l-long", "l-5ms"]
    assert rejected_ids(h) == ["h-3ms", "h-1ms", "h-long", "h-new"]
    assert h.sched.pending() == 0


def test_delay_and_reject_with_cancelled_jobs_in_the_middle() -> None:
    """Cancelled jobs are dropped wherever they are, also once their timeout passes (never rejected or
    delayed), and dead entries inside the window (cancelled, moved to the delayed queue) take no batch slot."""
    h = Harness(max_batch=3, delay_ns=100 * MS, levels=2, default_level=2, policies={
        1: QueuePolicy(default_timeout_ns=4 * MS, allow_timeout_override=True),
        2: QueuePolicy(delay_on_timeout=True, default_timeout_ns=10 * MS, allow_timeout_override=True)})
    h.add("x", priority=1)  # 4 ms
    y = h.add("y", priority=1, timeout=3000)
    h.add("z", priority=1, timeout=1000)
    w = h.add("w", priority=1, timeout=1000)  # cancelled: dropped when it expires, not rejected
    a = h.add("a", timeout=1000)
    h.add("b")  # 10 ms
    c = h.add("c", timeout=1000)
    h.add("d", timeout=2000)
    h.add("e")  # 10 ms
    for job in (y, w, c):
        job.future.cancel()  # type: ignore[union-attr]
    h.clock.now = 1 * MS  # z is rejected, a delayed, w and c dropped
    assert h.step_ids() == ["x", "b", "d"]
    assert rejected_ids(h) == ["z"]
    assert h.sched.pending() == 2  # e, and a in the delayed queue
    assert h.sched._nearest_deadline() == 10 * MS  # e's: d (2 ms) and x (4 ms) were taken
    h.clock.now = 2 * MS
    assert h.step_ids() is None  # e, a: below max and the queue delay has not passed
    a.future.cancel()  # type: ignore[union-attr]
    h.add("f")  # 12 ms
    h.add("g", priority=1)  # 6 ms
    h.clock.now = 7 * MS
    assert h.step_ids() is None  # g rejected, a dropped from the delayed queue
    assert rejected_ids(h) == ["z", "g"]
    assert h.sched.pending() == 2
    h.clock.now = 100 * MS  # e and f time out too (delayed), and the queue delay has passed
    assert h.step_ids() == ["e", "f"]
    assert rejected_ids(h) == ["z", "g"]
    assert h.sched.pending() == 0


def test_max_queue_size_counts_only_live_jobs_after_expiry() -> None:
    """Rejected requests free their slots at once, even while their dead entries are still in the deque
    (beyond the window the last decision looked at); delayed requests still hold theirs."""
    h = Harness(max_batch=2, delay_ns=100 * MS, levels=2, default_level=2, policies={
        1: QueuePolicy(default_timeout_ns=10 * MS, allow_timeout_override=True, max_queue_size=4),
        2: QueuePolicy(delay_on_timeout=True, default_timeout_ns=10 * MS, allow_timeout_override=True,
                       max_queue_size=4)})
    for name, timeout in (("a", 0), ("b", 0), ("c", 1000), ("d", 1000)):
        h.add(name, priority=1, timeout=timeout)
    with pytest.raises(ServerUnavailable, match="Exceeds maximum queue size"):
        h.add("full", priority=1)
    h.add("p")
    h.add("q", timeout=1000)
    h.add("r", timeout=1000)
    h.clock.now = 2 * MS  # c, d rejected; q, r delayed
    assert h.step_ids() == ["a", "b"]
    assert rejected_ids(h) == ["c", "d"]
    assert h.sched.pending() == 3
    for name in ("e", "f", "g", "h"):
        h.add(name, priority=1)
    with pytest.raises(ServerUnavailable, match="Exceeds maximum queue size"):
        h.add("full", priority=1)
    h.add("s")  # p, and the delayed q and r: one slot left
    with pytest.raises(ServerUnavailable, match="Exceeds maximum queue size"):
        h.add("full")
    assert drain(h) == [["e", "f"], ["g", "h"], ["p", "s"], ["q", "r"]]
    assert rejected_ids(h) == ["c", "d"]
    assert h.sched.pending() == 0


def test_taken_jobs_do_not_pile_up_in_the_deadline_heap() -> None:
    """A job taken before its deadline leaves a stale heap entry behind; with long timeouts those must be
    compacted away, or every served request (and its input tensors) would stay referenced until then."""
    h = Harness(max_batch=8, policies={1: QueuePolicy(default_timeout_ns=60_000 * MS)})
    for round_ in range(200):
        for i in range(8):
            h.add(f"r{round_}-{i}")
        assert h.step_ids() == [f"r{round_}-{i}" for i in range(8)]
    assert len(h.sched._deadlines) < 200


class Reference:
    """The queue semantics as first written, a full scan of every queue per decision: the oracle that the
    incremental scheduler is compared with. Keeps its own copy of deadlines (DELAY clears the job's)."""

    def __init__(self, policy: BatchPolicy, levels: int, policies: dict[int, QueuePolicy]) -> None:
        self.policy = policy
        self.policies = policies
        self.main: list[list[tuple[Job, int | None]]] = [[] for _ in range(levels)]
        self.delayed: list[list[Job]] = [[] for _ in range(levels)]
        self.rejected: list[str] = []

    def add(self, job: Job) -> None:
        self.main[job.level - 1].append((job, job.deadline_ns))

    def step(self, now: int) -> list[str] | None:
        for index, queue in enumerate(self.main):
            keep = []
            for job, deadline in queue:
                if job.cancelled():
                    continue
                if deadline is not None and deadline <= now:
                    if self.policies[index + 1].delay_on_timeout:
                        self.delayed[index].append(job)
                    else:
                        self.rejected.append(job.request.id)
                else:
                    keep.append((job, deadline))
            self.main[index] = keep
            self.delayed[index] = [job for job in self.delayed[index] if not job.cancelled()]
        order = [job for index, queue in enumerate(self.main) for job in [j for j, _ in queue] + self.delayed[index]]
        count, _ = self.policy.decide(order[:self.policy.max_batch_size], now)
        taken = {id(job) for job in order[:count]}
        self.main = [[entry for entry in queue if id(entry[0]) not in taken] for queue in self.main]
        self.delayed = [[job for job in queue if id(job) not in taken] for queue in self.delayed]
        return [job.request.id for job in order[:count]] or None


@pytest.mark.parametrize("seed", range(4))
def test_random_mixes_match_the_full_scan(seed: int) -> None:
    """Random arrivals (levels, overrides, shapes, batch sizes), cancellations anywhere (queued, delayed,
    expired) and clock steps give the same batches and rejections, in the same order, as the full scan."""
    rng = np.random.default_rng(seed)
    policies = {1: QueuePolicy(default_timeout_ns=3 * MS, allow_timeout_override=True),
                2: QueuePolicy(delay_on_timeout=True, default_timeout_ns=2 * MS, allow_timeout_override=True),
                3: QueuePolicy(allow_timeout_override=True, max_queue_size=40)}
    h = Harness(max_batch=4, preferred=(2,), delay_ns=1 * MS, levels=3, default_level=2, policies=policies)
    ref = Reference(h.sched.policy, 3, policies)
    queued: list[Job] = []
    for n in range(3000):
        op = rng.random()
        if op < 0.5:
            params = {"priority": int(rng.integers(0, 4))}
            if rng.random() < 0.5:
                params["timeout"] = int(rng.integers(0, 4000))
            shape = (4,) if rng.random() < 0.8 else (3,)
            try:
                job = h.add(f"r{n}", batch=int(rng.integers(1, 3)), shape=shape, **params)
            except ServerUnavailable:
                continue
            ref.add(job)
            queued.append(job)
        elif op < 0.6 and queued:
            queued[int(rng.integers(len(queued)))].future.cancel()  # type: ignore[union-attr]
        elif op < 0.75:
            h.clock.now += int(rng.integers(0, 1500 * US))
        else:
            assert h.step_ids() == ref.step(h.clock.now)
            assert rejected_ids(h) == ref.rejected
    h.clock.now += 100 * MS
    while (ids := ref.step(h.clock.now)) is not None:
        assert h.step_ids() == ids
    assert h.step_ids() is None
    assert rejected_ids(h) == ref.rejected
    assert h.sched.pending() == 0


# --------------------------------------------------------------------------- next_batch with a real clock


class Puller:
    """One instance thread calling next_batch until it returns None."""

    def __init__(self, sched: DynamicBatchScheduler) -> None:
        self.sched = sched
        self.batches: list[tuple[float, list[str]]] = []
        self.cond = threading.Condition()
        self.done = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            batch = self.sched.next_batch()
            with self.cond:
                if batch is None:
                    self.done = True
                else:
                    self.batches.append((time.monotonic(), [job.request.id for job in batch]))
                self.cond.notify_all()
            if batch is None:
                return

    def wait_batches(self, n: int, timeout: float = 5.0) -> list[tuple[float, list[str]]]:
        with self.cond:
            formed = self.cond.wait_for(lambda: len(self.batches) >= n, scaled(timeout))
            assert formed, f"batches so far: {self.batches}"
            return list(self.batches)

    def finish(self, timeout: float = 5.0) -> None:
        self.sched.stop(1)
        self.thread.join(scaled(timeout))
        assert not self.thread.is_alive(), "next_batch did not return None after stop()"


def real_harness(**kwargs: object) -> Harness:
    return Harness(clock=time.perf_counter_ns, **kwargs)  # type: ignore[arg-type]


def test_next_batch_blocks_until_enqueue() -> None:
    h = real_harness(max_batch=8)
    puller = Puller(h.sched)
    time.sleep(0.05)
    assert puller.batches == []
    h.add("a")
    assert puller.wait_batches(1)[0][1] == ["a"]
    puller.finish()


def test_next_batch_waits_the_queue_delay_then_sends() -> None:
    h = real_harness(max_batch=8, delay_ns=80 * MS)
    puller = Puller(h.sched)
    start = time.monotonic()
    h.add("a")
    h.add("b")
    (at, ids), = puller.wait_batches(1)
    assert ids == ["a", "b"]
    assert at - start >= 0.07, "sent before the queue delay"
    assert at - start < scaled(2.0)
    puller.finish()


def test_next_batch_full_batch_goes_before_the_delay() -> None:
    h = real_harness(max_batch=3, delay_ns=5_000 * MS)
    puller = Puller(h.sched)
    start = time.monotonic()
    for name in ("a", "b", "c"):
        h.add(name)
    (at, ids), = puller.wait_batches(1)
    assert ids == ["a", "b", "c"]
    assert at - start < scaled(1.0)
    puller.finish()


def test_next_batch_rejects_expired_requests_while_waiting() -> None:
    h = real_harness(max_batch=8, delay_ns=5_000 * MS, policies={1: QueuePolicy(default_timeout_ns=50 * MS)})
    puller = Puller(h.sched)
    h.add("a")
    deadline = time.monotonic() + scaled(3)
    while not h.rejected and time.monotonic() < deadline:
        time.sleep(0.01)
    assert [str(err) for _, err in h.rejected] == ["Request timeout expired"]
    assert h.sched.pending() == 0
    assert puller.batches == []
    puller.finish()


def test_stop_drains_queued_requests_then_returns_none() -> None:
    h = real_harness(max_batch=2, delay_ns=5_000 * MS)
    h.add("a")
    h.add("b")
    h.add("c")
    h.sched.stop(1)
    start = time.monotonic()
    assert [j.request.id for j in h.sched.next_batch() or []] == ["a", "b"]
    assert [j.request.id for j in h.sched.next_batch() or []] == ["c"]  # below max, sent without the delay
    assert h.sched.next_batch() is None
    assert time.monotonic() - start < scaled(1.0)


def test_stop_wakes_an_idle_instance() -> None:
    h = real_harness()
    puller = Puller(h.sched)
    time.sleep(0.02)
    puller.finish()
    assert puller.done


def test_two_instances_share_the_queue() -> None:
    h = real_harness(max_batch=1)
    pullers = [Puller(h.sched), Puller(h.sched)]
    for i in range(20):
        h.add(f"r{i}")
    deadline = time.monotonic() + scaled(5)
    while sum(len(p.batches) for p in pullers) < 20 and time.monotonic() < deadline:
        time.sleep(0.01)
    got = sorted(i for p in pullers for _, ids in p.batches for i in ids)
    assert got == sorted(f"r{i}" for i in range(20))
    h.sched.stop(2)
    for p in pullers:
        p.thread.join(scaled(5))
        assert not p.thread.is_alive()


# --------------------------------------------------------------------------- config -> scheduler


def parse_config(text: str) -> mc.ModelConfig:
    return text_format.Parse(text, mc.ModelConfig())


def test_make_batcher_reads_dynamic_batching() -> None:
    config = parse_config("""
        name: "m" max_batch_size: 16
        dynamic_batching {
          preferred_batch_size: [ 8, 4, 32 ]
          max_queue_delay_microseconds: 250
          priority_levels: 3
          default_priority_level: 2
          default_queue_policy { max_queue_size: 7 timeout_action: DELAY default_timeout_microseconds: 40 }
          priority_queue_policy { key: 1 value: { allow_timeout_override: true } }
        }""")
    batcher = make_batcher(config, lambda job, err: None)
    assert batcher is not None
    assert batcher.policy == BatchPolicy(16, (4, 8), 250 * US)  # sorted; 32 > max dropped
    assert (batcher.levels, batcher.default_level) == (3, 2)
    assert batcher._policies[2] == QueuePolicy(True, 40 * US, False, 7)
    assert batcher._policies[3] == batcher._policies[2]
    assert batcher._policies[1] == QueuePolicy(allow_timeout_override=True)


def test_make_batcher_none_without_dynamic_batching_or_batching() -> None:
    assert make_batcher(parse_config('name: "m" max_batch_size: 8'), lambda j, e: None) is None
    assert make_batcher(parse_config('name: "m" max_batch_size: 0 dynamic_batching {}'), lambda j, e: None) is None


# --------------------------------------------------------------------------- batching.py


def test_concat_inputs_keeps_request_order_and_dtypes() -> None:
    a = {"X": np.arange(6, dtype=np.float32).reshape(2, 3), "Y": np.array([[1]], np.int64).repeat(2, 0)}
    b = {"X": np.arange(6, 9, dtype=np.float32).reshape(1, 3), "Y": np.array([[7]], np.int64)}
    merged = concat_inputs([a, b])
    assert list(merged) == ["X", "Y"]
    np.testing.assert_array_equal(merged["X"], np.arange(9, dtype=np.float32).reshape(3, 3))
    np.testing.assert_array_equal(merged["Y"], [[1], [1], [7]])
    assert merged["X"].dtype == np.float32 and merged["Y"].dtype == np.int64


def test_concat_single_request_and_bytes() -> None:
    strings = np.array([[b"a", b"bc"]], dtype=object)
    merged = concat_inputs([{"S": strings}, {"S": np.array([[b"", b"d"]], dtype=object)}])
    assert merged["S"].tolist() == [[b"a", b"bc"], [b"", b"d"]]


def test_split_outputs_gives_views_of_each_requests_rows() -> None:
    out = {"O": np.arange(12, dtype=np.int32).reshape(6, 2), "P": np.arange(6, dtype=np.float64)}
    parts = split_outputs(out, [1, 3, 2])
    assert [p["O"].shape for p in parts] == [(1, 2), (3, 2), (2, 2)]
    np.testing.assert_array_equal(parts[1]["O"], [[2, 3], [4, 5], [6, 7]])
    np.testing.assert_array_equal(parts[2]["P"], [4.0, 5.0])
    assert all(np.shares_memory(p["O"], out["O"]) for p in parts)  # views, no copies


def test_concat_then_split_round_trips() -> None:
    rng = np.random.default_rng(0)
    requests = [{"X": rng.standard_normal((n, 5)).astype(np.float32)} for n in (1, 4, 2, 3)]
    merged = concat_inputs(requests)
    parts = split_outputs(merged, [r["X"].shape[0] for r in requests])
    for part, request in zip(parts, requests, strict=True):
        np.testing.assert_array_equal(part["X"], request["X"])


def test_split_outputs_rejects_a_wrong_batch_dimension() -> None:
    with pytest.raises(ValueError, match="output 'O'.*leading batch dimension of 3"):
        split_outputs({"O": np.zeros((4, 2))}, [1, 2])
    with pytest.raises(ValueError, match="output 'S'"):
        split_outputs({"S": np.float32(1.0).reshape(())}, [1])


def test_same_shapes() -> None:
    a = {"X": np.zeros((1, 3)), "Y": np.zeros((2, 4, 5))}
    assert same_shapes(a, {"X": np.zeros((7, 3)), "Y": np.zeros((1, 4, 5))})
    assert not same_shapes(a, {"X": np.zeros((1, 4)), "Y": np.zeros((2, 4, 5))})
    assert not same_shapes(a, {"X": np.zeros((1, 3))})
    assert not same_shapes(a, {"X": np.zeros((1, 3)), "Z": np.zeros((2, 4, 5))})

