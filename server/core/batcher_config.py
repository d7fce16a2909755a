"""Build a DynamicBatchScheduler from a model's `dynamic_batching` config (or None without one)."""

from __future__ import annotations

from tritonclient.grpc import model_config_pb2 as mc

from server.core.batch_policy import BatchPolicy
from server.core.dynamic_batcher import DynamicBatchScheduler, QueuePolicy, Reject


def _queue_policy(policy: mc.ModelQueuePolicy, default_limit: int) -> QueuePolicy:
    return QueuePolicy(
        delay_on_timeout=policy.timeout_action == mc.ModelQueuePolicy.DELAY,
        default_timeout_ns=policy.default_timeout_microseconds * 1000,
        allow_timeout_override=policy.allow_timeout_override,
        max_queue_size=policy.max_queue_size or default_limit,
    )


def make_batcher(config: mc.ModelConfig, reject: Reject, default_limit: int = 0) -> DynamicBatchScheduler | None:
    """The model's batcher; `default_limit` bounds each priority level's queue where the config
    sets no max_queue_size (Nereid's --model-queue-limit; Triton leaves it unbounded)."""
    if config.WhichOneof("scheduling_choice") != "dynamic_batching" or config.max_batch_size <= 0:
        return None
    db = config.dynamic_batching
    preferred = tuple(sorted(p for p in db.preferred_batch_size if 0 < p <= config.max_batch_size))
    policy = BatchPolicy(config.max_batch_size, preferred, db.max_queue_delay_microseconds * 1000)
    levels = int(db.priority_levels) or 1
    default = _queue_policy(db.default_queue_policy, default_limit)
    policies = {level: default for level in range(1, levels + 1)}
    for level, override in db.priority_queue_policy.items():
        policies[int(level)] = _queue_policy(override, default_limit)
    return DynamicBatchScheduler(policy, levels, int(db.default_priority_level) or 1, policies, reject)
