"""ModelStats -> ModelStatisticsResponse messages."""

from __future__ import annotations

from tritonclient.grpc import service_pb2 as pb

from server.core.model import Model
from server.core.stats import DURATIONS


def _duration(target: pb.StatisticDuration, count: int, ns: int) -> None:
    target.count = count
    target.ns = ns


def model_statistics(model: Model) -> pb.ModelStatistics:
    stats = model.stats.snapshot()
    out = pb.ModelStatistics(
        name=model.name,
        version=model.version_str,
        last_inference=stats.last_inference_ms,
        inference_count=stats.inference_count,
        execution_count=stats.execution_count,
    )
    infer = out.inference_stats
    for name in DURATIONS:
        count, ns = stats.durations[name]
        _duration(getattr(infer, name), count, ns)
    _duration(infer.cache_hit, *stats.cache_hit)
    _duration(infer.cache_miss, *stats.cache_miss)
    for size, (executions, input_ns, infer_ns, output_ns) in sorted(stats.batch.items()):
        entry = out.batch_stats.add(batch_size=size)
        _duration(entry.compute_input, executions, input_ns)
        _duration(entry.compute_infer, executions, infer_ns)
        _duration(entry.compute_output, executions, output_ns)
    for index, durations in sorted(stats.responses.items()):
        response = out.response_stats[str(index)]
        for name, (count, ns) in durations.items():
            _duration(getattr(response, name), count, ns)
    return out
