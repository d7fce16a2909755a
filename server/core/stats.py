"""Per model-version statistics with Triton's meaning (ModelStatistics RPC).

Updated from instance threads, so every update takes the lock; the critical
sections are a handful of integer additions.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field


@dataclass
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, ns: int, count: int = 1) -> None:
        self.count += count
        self.ns += ns


@dataclass
class BatchStats:
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)


class ModelStats:
    """Cumulative counters for one model version."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.last_inference_ms = 0
        self.inference_count = 0  # batch items
        self.execution_count = 0  # backend executions
        self.success = Duration()
        self.fail = Duration()
        self.queue = Duration()
        self.compute_input = Duration()
        self.compute_infer = Duration()
        self.compute_output = Duration()
        self.batch: dict[int, BatchStats] = {}

    def record_execution(
        self, batch_size: int, requests: int, input_ns: int, infer_ns: int, output_ns: int
    ) -> None:
        """One backend execution that served `requests` requests with `batch_size` items in all."""
        with self._lock:
            self.last_inference_ms = time.time_ns() // 1_000_000
            self.inference_count += batch_size
            self.execution_count += 1
            # Per-request compute figures: each request in the batch is charged the batch's time.
            self.compute_input.add(input_ns * requests, requests)
            self.compute_infer.add(infer_ns * requests, requests)
            self.compute_output.add(output_ns * requests, requests)
            stats = self.batch.get(batch_size)
            if stats is None:
                stats = self.batch[batch_size] = BatchStats()
            stats.compute_input.add(input_ns)
            stats.compute_infer.add(infer_ns)
            stats.compute_output.add(output_ns)

    def record_success(self, total_ns: int, queue_ns: int) -> None:
        with self._lock:
            self.success.add(total_ns)
            self.queue.add(queue_ns)

    def record_failure(self, total_ns: int) -> None:
        with self._lock:
            self.fail.add(total_ns)
