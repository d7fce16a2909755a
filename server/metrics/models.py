"""Triton's per-model metric families, read from the models' statistics at scrape time.

Nothing here runs on the request path: the counters are the ModelStatistics counters the
instances already keep (core/stats.py), the histograms and summaries fold the per-request
samples models record when those are enabled (core/latency.py), and the queue depth is read
from each scheduler. Names, labels and help texts follow Triton's docs/user_guide/metrics.md.
"""

from __future__ import annotations

from collections.abc import Iterable

from server.core.latency import FIELDS
from server.core.model import Model
from server.core.state import ModelState
from server.metrics.config import MetricsConfig
from server.metrics.exposition import Family

FAILURE_REASONS = ("REJECTED", "CANCELED", "BACKEND", "OTHER")

_COUNTERS = (
    ("nv_inference_request_duration_us", "Cumulative inference request duration in microseconds "
     "(includes cached requests)", "success"),
    ("nv_inference_queue_duration_us", "Cumulative inference queuing duration in microseconds "
     "(includes cached requests)", "queue"),
    ("nv_inference_compute_input_duration_us", "Cumulative compute input duration in microseconds "
     "(does not include cached requests)", "compute_input"),
    ("nv_inference_compute_infer_duration_us", "Cumulative compute inference duration in microseconds "
     "(does not include cached requests)", "compute_infer"),
    ("nv_inference_compute_output_duration_us", "Cumulative inference compute output duration in microseconds "
     "(does not include cached requests)", "compute_output"),
)
# The response cache (server/core/response_cache.py), per model, as Triton's metrics.md names them.
_CACHE_COUNTERS = (
    ("nv_cache_num_hits_per_model", "Number of cache hits per model"),
    ("nv_cache_num_misses_per_model", "Number of cache misses per model"),
    ("nv_cache_hit_duration_per_model", "Total cache hit duration per model, in microseconds"),
    ("nv_cache_miss_duration_per_model", "Total cache miss (insert+lookup) duration per model, in microseconds"),
)
_SUMMARIES = (
    ("nv_inference_request_summary_us", "Summary of inference request duration in microseconds "
     "(includes cached requests)"),
    ("nv_inference_queue_summary_us", "Summary of inference queuing duration in microseconds "
     "(includes cached requests)"),
    ("nv_inference_compute_input_summary_us", "Summary of compute input duration in microseconds "
     "(does not include cached requests)"),
    ("nv_inference_compute_infer_summary_us", "Summary of compute inference duration in microseconds "
     "(does not include cached requests)"),
    ("nv_inference_compute_output_summary_us", "Summary of inference compute output duration in microseconds "
     "(does not include cached requests)"),
)


def model_families(models: Iterable[Model], config: MetricsConfig) -> list[Family]:
    success = Family("nv_inference_request_success", "Number of successful inference requests, all batch sizes",
                     "counter")
    failure = Family("nv_inference_request_failure", "Number of failed inference requests, all batch sizes",
                     "counter")
    count = Family("nv_inference_count", "Number of inferences performed (does not include cached requests)",
                   "counter")
    executions = Family("nv_inference_exec_count", "Number of model executions performed (does not include "
                        "cached requests)", "counter")
    pending = Family("nv_inference_pending_request_count", "Instantaneous number of pending requests awaiting "
                     "execution per-model.", "gauge")
    durations = [Family(name, text, "counter") for name, text, _ in _COUNTERS] if config.counter_latencies else []
    histogram = Family("nv_inference_first_response_histogram_ms", "Duration from request to first response in "
                       "milliseconds", "histogram")
    summaries = [Family(name, text, "summary") for name, text in _SUMMARIES]
    cache = [Family(name, text, "counter") for name, text in _CACHE_COUNTERS]
    for model in models:
        if model.state not in (ModelState.READY, ModelState.UNLOADING):
            continue
        labels = (("model", model.name), ("version", model.version_str))
        stats = model.stats.snapshot()
        success.sample(labels, stats.durations["success"][0])
        for reason in FAILURE_REASONS:
            failure.sample(labels, stats.failure_reasons.get(reason, 0), extra=(("reason", reason),))
        count.sample(labels, stats.inference_count)
        executions.sample(labels, stats.execution_count)
        pending.sample(labels, model.pending())
        if model.cache is not None:  # Triton reports these for models using the response cache only
            hits, misses = stats.cache_hit, stats.cache_miss
            for family, value in zip(cache, (hits[0], misses[0], hits[1] // 1000, misses[1] // 1000), strict=True):
                family.sample(labels, value)
        for family, (_, _, key) in zip(durations, _COUNTERS, strict=False):
            family.sample(labels, stats.durations[key][1] // 1000)
        latencies = model.stats.latencies
        if latencies is None:
            continue
        if config.histogram_latencies:
            buckets, total_count, total_ms = latencies.histogram()
            histogram.histogram(labels, buckets, total_count, total_ms)
        if config.summary_latencies:
            for field, family in enumerate(summaries):
                quantiles, total_count, total_us = latencies.summary(field, config.quantiles)
                family.summary(labels, quantiles, total_count, total_us)
    return [success, failure, count, executions, pending, *durations, *cache, histogram, *summaries]


assert len(_SUMMARIES) == len(FIELDS)
