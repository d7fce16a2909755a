"""ModelStats -> ModelStatisticsResponse messages."""

from __future__ import annotations

from tritonclient.grpc import service_pb2 as pb

from server.core.model import Model
from server.core.stats import Duration


def _duration(target: pb.StatisticDuration, source: Duration) -> None:
    target.count = source.count
    target.ns = source.ns


def model_statistics(model: Model) -> pb.ModelStatistics:
    stats = model.stats
    out = pb.ModelStatistics(
        name=model.name,
        version=model.version_str,
        last_inference=stats.last_inference_ms,
        inference_count=stats.inference_count,
        execution_count=stats.execution_count,
    )
    infer = out.inference_stats
    _duration(infer.success, stats.success)
    _duration(infer.fail, stats.fail)
    _duration(infer.queue, stats.queue)
    _duration(infer.compute_input, stats.compute_input)
    _duration(infer.compute_infer, stats.compute_infer)
    _duration(infer.compute_output, stats.compute_output)
    for size, batch in sorted(stats.batch.items()):
        entry = out.batch_stats.add(batch_size=size)
        _duration(entry.compute_input, batch.compute_input)
        _duration(entry.compute_infer, batch.compute_infer)
        _duration(entry.compute_output, batch.compute_output)
    return out
