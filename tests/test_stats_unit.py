"""Unit tests (no server) for server/core/stats.py: recorded executions fold into Triton's counters.

The fold runs column by column (stats.py `_fold`); these check it against the counters worked
out one record at a time, for one batch size (the unbatched common case) and for mixed ones,
with several requests per execution and a sequence batcher's padding rows.
"""

from __future__ import annotations

import random
import time

import pytest

from server.core import stats as stats_module
from server.core.stats import ModelStats

Record = tuple[int, int, int, int, int, int, int, int]


def _expected(records: list[Record]) -> tuple[int, int, dict[str, list[int]], dict[int, list[int]]]:
    """(inference_count, execution_count, durations, batch) as Triton counts them."""
    durations = {name: [0, 0] for name in stats_module.DURATIONS}
    batch: dict[int, list[int]] = {}
    inferences = 0
    for size, requests, input_ns, infer_ns, output_ns, queue_ns, success_ns, padding in records:
        inferences += size - padding
        for name, ns in (("compute_input", input_ns * requests), ("compute_infer", infer_ns * requests),
                         ("compute_output", output_ns * requests), ("queue", queue_ns), ("success", success_ns)):
            durations[name][0] += requests
            durations[name][1] += ns
        entry = batch.setdefault(size, [0, 0, 0, 0])
        entry[0] += 1
        entry[1] += input_ns
        entry[2] += infer_ns
        entry[3] += output_ns
    return inferences, len(records), durations, batch


def _records(seed: int, sizes: list[int], count: int) -> list[Record]:
    rng = random.Random(seed)
    records = []
    for _ in range(count):
        size = rng.choice(sizes)
        padding = rng.choice([0, 0, 1]) if size > 1 else 0
        records.append((size, rng.randint(1, 3), rng.randrange(10**6), rng.randrange(10**7), rng.randrange(10**5),
                        rng.randrange(10**7), rng.randrange(10**8), padding))
    return records


@pytest.mark.parametrize(("sizes", "count"), [
    ([1], 10),  # one batch size: folded as one group
    ([1, 2, 8, 64], 10),  # mixed sizes: folded per record
    ([1, 1, 1, 4], stats_module._FOLD_AT * 2 + 7),  # folds on the way (at _FOLD_AT), then in snapshot
])
def test_folded_counters_match_the_records(sizes: list[int], count: int) -> None:
    records = _records(count, sizes, count)
    stats = ModelStats()
    for record in records:
        stats.record_execution(*record)
    snapshot = stats.snapshot()
    inferences, executions, durations, batch = _expected(records)
    assert snapshot.inference_count == inferences
    assert snapshot.execution_count == executions
    assert snapshot.durations == durations
    assert snapshot.batch == batch
    assert stats.snapshot().durations == durations  # a second read adds nothing


def test_last_inference_is_the_latest_finish_in_wall_milliseconds() -> None:
    stats = ModelStats()
    assert stats.snapshot().last_inference_ms == 0
    finished = time.perf_counter_ns() - 5_000_000_000  # an execution that ended 5 s ago
    stats.record_execution(1, 1, 1, 1, 1, 1, 1, finished_ns=finished)
    stats.record_execution(1, 1, 1, 1, 1, 1, 1, finished_ns=finished - 10_000_000_000)  # an older one
    expected_ms = (time.time_ns() - 5_000_000_000) // 1_000_000
    assert abs(stats.snapshot().last_inference_ms - expected_ms) < 1000
    stats.record_execution(1, 1, 1, 1, 1, 1, 1)  # no time given: now
    assert abs(stats.snapshot().last_inference_ms - time.time_ns() // 1_000_000) < 1000
