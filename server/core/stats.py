"""Per model-version statistics with Triton's meaning (ModelStatistics RPC).

Updated from instance threads and the event loop, so each execution takes the
lock once; the critical section is a handful of integer additions. Durations
are kept as flat [count, ns] lists to keep the hot path cheap.
"""

from __future__ import annotations

import threading
import time

DURATIONS = ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output")


class ModelStats:
    """Cumulative counters for one model version."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.last_inference_ms = 0
        self.inference_count = 0  # batch items
        self.execution_count = 0  # backend executions
        self.durations: dict[str, list[int]] = {name: [0, 0] for name in DURATIONS}
        # batch size -> [executions, input_ns, infer_ns, output_ns]
        self.batch: dict[int, list[int]] = {}

    def record_execution(
        self, batch_size: int, requests: int, input_ns: int, infer_ns: int, output_ns: int,
        queue_ns: int, success_ns: int,
    ) -> None:
        """One backend execution that served `requests` requests (`batch_size` items in all).

        `queue_ns` and `success_ns` are sums over those requests. As in Triton, each
        request is charged the whole batch's compute time.
        """
        d = self.durations
        with self._lock:
            self.last_inference_ms = time.time_ns() // 1_000_000
            self.inference_count += batch_size
            self.execution_count += 1
            for key, ns in (("compute_input", input_ns), ("compute_infer", infer_ns),
                            ("compute_output", output_ns)):
                entry = d[key]
                entry[0] += requests
                entry[1] += ns * requests
            entry = d["queue"]
            entry[0] += requests
            entry[1] += queue_ns
            entry = d["success"]
            entry[0] += requests
            entry[1] += success_ns
            per_batch = self.batch.get(batch_size)
            if per_batch is None:
                per_batch = self.batch[batch_size] = [0, 0, 0, 0]
            per_batch[0] += 1
            per_batch[1] += input_ns
            per_batch[2] += infer_ns
            per_batch[3] += output_ns

    def snapshot(self) -> ModelStats:
        """A consistent copy for reporting (counters from one moment, not torn by an execution)."""
        copy = ModelStats()
        with self._lock:
            copy.last_inference_ms = self.last_inference_ms
            copy.inference_count = self.inference_count
            copy.execution_count = self.execution_count
            copy.durations = {name: list(value) for name, value in self.durations.items()}
            copy.batch = {size: list(value) for size, value in self.batch.items()}
        return copy

    def record_failure(self, requests: int, total_ns: int) -> None:
        with self._lock:
            entry = self.durations["fail"]
            entry[0] += requests
            entry[1] += total_ns
