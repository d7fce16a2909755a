"""The `nereid_rollout_*` families: per-version requests, errors, latency, shares, decisions and
shadow agreement of models under a rollout (docs/ROLLOUTS.md), read from the registry's
Rollouts when scraped."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from server.rollout.router import Rollouts


class RolloutCollector:
    def __init__(self, rollouts: Rollouts) -> None:
        self._rollouts = rollouts

    def collect(self) -> Iterator[Any]:
        labels = ["model", "version"]
        share = GaugeMetricFamily("nereid_rollout_share", "Share (0-1) of requests without a version that "
                                  "this version takes now (READY versions only)", labels=labels)
        requests = CounterMetricFamily("nereid_rollout_requests", "Requests answered by this version "
                                       "under a rollout", labels=labels)
        errors = CounterMetricFamily("nereid_rollout_errors", "Requests of this version that failed", labels=labels)
        latency = HistogramMetricFamily("nereid_rollout_request_duration_seconds", "Inference latency of this "
                                        "version under a rollout", labels=labels)
        rollbacks = CounterMetricFamily("nereid_rollout_rollbacks", "Automatic rollbacks of this version "
                                        "(its weight set to 0)", labels=labels)
        promotions = CounterMetricFamily("nereid_rollout_promotions", "Promotions of this version to 100%",
                                         labels=labels)
        replica = CounterMetricFamily("nereid_rollout_replica_decisions", "Decisions another replica sharing "
                                      "the repository took (rollback, abort, promote) applied here",
                                      labels=["model", "version", "decision"])
        aborts = CounterMetricFamily("nereid_rollout_aborts", "Rollouts aborted by the operator", labels=["model"])
        compared = CounterMetricFamily("nereid_rollout_shadow_compared", "Shadow copies answered and compared "
                                       "with the serving version's outputs", labels=labels)
        agreed = CounterMetricFamily("nereid_rollout_shadow_agreed", "Shadow copies whose outputs agreed",
                                     labels=labels)
        shadow_errors = CounterMetricFamily("nereid_rollout_shadow_errors", "Shadow copies that failed",
                                            labels=labels)
        dropped = CounterMetricFamily("nereid_rollout_shadow_dropped", "Shadow copies not sent: too many in "
                                      "flight", labels=labels)
        agreement = GaugeMetricFamily("nereid_rollout_shadow_agreement_ratio", "Agreed / compared shadow copies",
                                      labels=labels)
        shadow_latency = HistogramMetricFamily("nereid_rollout_shadow_duration_seconds", "Inference latency of "
                                               "shadow copies", labels=labels)
        for rollout in self._rollouts.all():
            ready = self._rollouts.ready(rollout.name)
            shares = rollout.shares(ready)
            aborts.add_metric([rollout.name], rollout.aborts)
            for version, stats in sorted(rollout.stats.items()):
                values = [rollout.name, str(version)]
                if version in rollout.policy.shadows:
                    compared.add_metric(values, stats.shadow_compared)
                    agreed.add_metric(values, stats.shadow_agreed)
                    shadow_errors.add_metric(values, stats.shadow_errors)
                    dropped.add_metric(values, stats.shadow_dropped)
                    if stats.shadow_compared:
                        agreement.add_metric(values, stats.shadow_agreed / stats.shadow_compared)
                    shadow_latency.add_metric(values, stats.shadow_latency.cumulative(), stats.shadow_latency.total)
                    continue
                for kind, count in sorted(stats.replica.items()):
                    replica.add_metric([*values, kind], count)
                share.add_metric(values, shares.get(version, 0.0))
                requests.add_metric(values, stats.requests)
                errors.add_metric(values, stats.errors)
                latency.add_metric(values, stats.latency.cumulative(), stats.latency.total)
                rollbacks.add_metric(values, stats.rollbacks)
                promotions.add_metric(values, stats.promotions)
        yield from (share, requests, errors, latency, rollbacks, promotions, replica, aborts, compared, agreed,
                    shadow_errors, dropped, agreement, shadow_latency)
