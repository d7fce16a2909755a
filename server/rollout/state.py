"""One model's rollout: the current shares, how each version is doing, and the decisions taken.

Everything here runs on the event loop (requests, the control RPC), so no lock is needed;
the metrics thread only reads counters. Time comes from an injected monotonic clock, so a
unit test can step the window without sleeping.
"""

from __future__ import annotations

import hashlib
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from server.errors import InvalidInput
from server.rollout.decisions import STOPS, Decision, replay
from server.rollout.policy import Policy
from server.rollout.window import Histogram, Window

log = logging.getLogger("nereid.rollout")

_P99_EVERY_S = 0.1  # the p99 (a sort of the window) is checked at most this often per version


@dataclass
class VersionStats:
    """Counters of one version under a rollout (metrics, status)."""

    window: Window
    requests: int = 0
    errors: int = 0
    latency: Histogram = field(default_factory=Histogram)
    since: float = 0.0  # when this version's current stint as a canary began (auto promotion)
    p99_checked: float = 0.0
    rollbacks: int = 0
    promotions: int = 0
    replica: dict[str, int] = field(default_factory=dict)  # decisions of other replicas applied here, by kind
    shadow_compared: int = 0
    shadow_agreed: int = 0
    shadow_errors: int = 0
    shadow_dropped: int = 0
    shadow_latency: Histogram = field(default_factory=Histogram)


def key_point(key: str) -> float:
    """A sticky key's fixed place in [0, 1): the same key always lands on the same place."""
    digest = hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


class ModelRollout:
    """The live state of one model's policy: shares, stable version, notes, per-version stats."""

    def __init__(self, name: str, policy: Policy, digest: str, clock: Callable[[], float] = time.monotonic,
                 replica: str = "local", wall: Callable[[], float] = time.time) -> None:
        self.name = name
        self.policy = policy
        self.digest = digest  # of rollout.yaml's text: persisted decisions apply only to the same policy
        self.clock = clock
        self.weights = dict(policy.weights)
        self.stable = policy.stable
        self.notes: dict[int, str] = {}
        self.aborts = 0
        self.on_change: Callable[[ModelRollout], None] | None = None  # persists decisions (router.py)
        self.replica, self.wall = replica, wall  # this server's id in decisions; their wall clock
        self.log: dict[str, Decision] = {}  # every decision known under this policy (decisions.py)
        self._seq = 0
        span = policy.rollback.window_s if policy.rollback else 30.0
        now = clock()
        self.stats = {v: VersionStats(Window(span), since=now)
                      for v in sorted(set(policy.weights) | set(policy.shadows))}

    def canaries(self) -> list[int]:
        return [v for v, w in sorted(self.weights.items()) if w > 0 and v != self.stable]

    # -- routing --

    def choose(self, ready: Callable[[int], bool], key: str | None) -> int | None:
        """The version for a request that names none: by weight among READY versions, at the
        key's fixed place when a sticky key is given; None when no weighted version is ready."""
        candidates = [(v, w) for v, w in sorted(self.weights.items()) if w > 0 and ready(v)]
        if not candidates:
            return None
        total = sum(w for _, w in candidates)
        point = (key_point(key) if key is not None else random.random()) * total
        for version, weight in candidates:
            point -= weight
            if point < 0:
                return version
        return candidates[-1][0]

    # -- outcomes --

    def observe(self, version: int, latency: float, ok: bool) -> None:
        """One answered request of `version`; may roll a canary back or promote it."""
        stats = self.stats.get(version)
        if stats is None:
            return
        stats.requests += 1
        stats.latency.observe(latency)
        if not ok:
            stats.errors += 1
        rule = self.policy.rollback
        if version == self.stable or self.weights.get(version, 0) <= 0:
            return
        now = self.clock()
        stats.window.add(now, latency, ok)
        if rule is None or stats.window.count < rule.min_requests:
            return
        window = stats.window
        if window.error_rate > rule.max_error_rate:
            self.roll_back(version, f"error rate {window.error_rate:.1%} ({window.errors} of {window.count}) "
                                    f"over the last {rule.window_s:g}s > {rule.max_error_rate:.1%}")
            return
        if rule.max_p99_ms is not None and now - stats.p99_checked >= _P99_EVERY_S:
            stats.p99_checked = now
            p99_ms = window.p99() * 1000.0
            if p99_ms > rule.max_p99_ms:
                self.roll_back(version, f"p99 latency {p99_ms:.1f} ms over the last {rule.window_s:g}s "
                                        f"({window.count} requests) > {rule.max_p99_ms:g} ms")
                return
        if self.policy.promote_after_s and now - stats.since >= self.policy.promote_after_s:
            self.promote(version, f"automatically, after {self.policy.promote_after_s:g}s within its thresholds")

    # -- decisions (a grow-only log, replayed: decisions.py) --

    def _decide(self, kind: str, versions: list[int], why: str) -> Decision:
        self._seq += 1
        seen = tuple(sorted(d.id for d in self.log.values() if d.kind in STOPS)) if kind == "promote" else ()
        decision = Decision(id=f"{self.replica}/{self._seq}", replica=self.replica, seq=self._seq, at=self.wall(),
                            kind=kind, versions=tuple(versions), why=why, seen=seen)
        self.log[decision.id] = decision
        self._replay()
        return decision

    def _replay(self) -> list[Decision]:
        state = replay(self.policy.weights, self.policy.stable, list(self.log.values()), self.replica)
        self.weights, self.stable, self.notes = state.weights, state.stable, state.notes
        return state.overruled

    def roll_back(self, version: int, why: str) -> None:
        self._decide("rollback", [version], why)
        self.stats[version].rollbacks += 1
        log.warning("rollout of model '%s': version %d rolled back (weight 0): %s", self.name, version, why,
                    extra={"model": self.name, "version": str(version)})
        self._changed()

    def promote(self, version: int | None = None, how: str = "by the operator") -> int:
        """The canary (or `version`) takes every share and becomes the stable version."""
        if version is None:
            canaries = self.canaries()
            if len(canaries) != 1:
                raise InvalidInput(f"model '{self.name}' has {len(canaries)} canaries "
                                   f"({', '.join(map(str, canaries)) or 'none'}): name the version to promote")
            version = canaries[0]
        if version not in self.weights:
            raise InvalidInput(f"model '{self.name}': version {version} has no entry in rollout.yaml 'weights'")
        self._decide("promote", [version], how)
        self.stats[version].promotions += 1
        log.warning("rollout of model '%s': version %d promoted %s (100%%)", self.name, version, how,
                    extra={"model": self.name, "version": str(version)})
        self._changed()
        return version

    def abort(self) -> list[int]:
        """Every canary to weight 0: the stable version serves everything."""
        stopped = self.canaries()
        self._decide("abort", stopped, "by the operator")
        self.aborts += 1
        log.warning("rollout of model '%s': aborted, version(s) %s to weight 0", self.name,
                    ", ".join(map(str, stopped)) or "none", extra={"model": self.name})
        self._changed()
        return stopped

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change(self)

    def merge(self, decisions: list[Decision], count: bool = True) -> list[Decision]:
        """Add decisions read from the shared file (another replica's, or this one's from before a
        restart); returns those that were new here. Never removes one: a stale file changes nothing."""
        new = [d for d in decisions if d.id not in self.log]
        if not new:
            return []
        for d in new:
            self.log[d.id] = d
            if count and d.replica != self.replica:
                for v in d.versions:
                    if v in self.stats:
                        self.stats[v].replica[d.kind] = self.stats[v].replica.get(d.kind, 0) + 1
        self._replay()
        return sorted(new, key=lambda d: d.order)

    def summary(self, decisions: list[Decision]) -> dict[str, Any]:
        """The state these decisions lead to, as saved beside them (for people and older servers)."""
        state = replay(self.policy.weights, self.policy.stable, decisions)
        return {"stable": state.stable, "weights": {str(v): w for v, w in state.weights.items()},
                "notes": {str(v): n for v, n in state.notes.items()}}

    # -- persisted decisions (router.py) --

    def decisions(self) -> dict[str, Any]:
        return {"digest": self.digest, "stable": self.stable,
                "weights": {str(v): w for v, w in self.weights.items()},
                "notes": {str(v): n for v, n in self.notes.items()}}

    def restore(self, saved: dict[str, Any]) -> bool:
        """Apply decisions saved for this same policy by a server before format 2 (weights, no log)."""
        if saved.get("digest") != self.digest:
            return False
        try:
            weights = {int(v): float(w) for v, w in saved["weights"].items()}
            stable = int(saved["stable"])
            notes = {int(v): str(n) for v, n in saved.get("notes", {}).items()}
        except (KeyError, TypeError, ValueError, AttributeError):
            return False
        if set(weights) != set(self.weights) or stable not in weights:
            return False
        # As decisions, so that later ones replay on top of them (a rollback is never lost).
        legacy: list[Decision] = []
        if stable != self.policy.stable:
            legacy.append(Decision("legacy/1", "legacy", 1, 0.0, "promote", (stable,), "(saved)"))
        for v, w in sorted(weights.items()):
            if w <= 0 < self.policy.weights.get(v, 0) and v != stable:
                why = notes.get(v, "").removeprefix("rolled back: ") or "(saved)"
                legacy.append(Decision(f"legacy/{v + 1}", "legacy", v + 1, 1.0, "rollback", (v,), why))
        self.merge(legacy, count=False)
        return True

    # -- what the index and the control RPC show --

    def role(self, version: int) -> str:
        if version in self.policy.shadows:
            return "shadow"
        if version == self.stable:
            return "stable"
        return "canary" if self.weights.get(version, 0) > 0 else "off"

    def reason(self, version: int, ready: Callable[[int], bool]) -> str:
        """The index's reason for a version under this rollout."""
        if version in self.policy.shadows:
            return "rollout: shadow (gets a copy of live traffic; its answers are compared, never returned)"
        if version not in self.weights:
            return "rollout: no share (explicit-version requests only)"
        share = self.shares(ready).get(version, 0.0)
        note = f"; {self.notes[version]}" if version in self.notes else ""
        return f"rollout: {self.role(version)}, {share:.1%} of requests without a version{note}"

    def shares(self, ready: Callable[[int], bool]) -> dict[int, float]:
        live = {v: w for v, w in self.weights.items() if w > 0 and ready(v)}
        total = sum(live.values())
        return {v: (live.get(v, 0.0) / total if total else 0.0) for v in self.weights}

    def status(self, ready: Callable[[int], bool]) -> dict[str, Any]:
        shares = self.shares(ready)
        rows = []
        for version, stats in sorted(self.stats.items()):
            window = stats.window
            window.trim(self.clock())
            row: dict[str, Any] = {
                "version": version, "role": self.role(version), "ready": ready(version),
                "weight": self.weights.get(version, 0.0), "share": shares.get(version, 0.0),
                "note": self.notes.get(version, ""), "requests": stats.requests, "errors": stats.errors,
                "window": {"requests": window.count, "errors": window.errors,
                           "error_rate": window.error_rate, "p99_ms": window.p99() * 1000.0},
                "rollbacks": stats.rollbacks, "promotions": stats.promotions,
                "replica_decisions": dict(stats.replica),
            }
            if version in self.policy.shadows:
                row["shadow"] = {"compared": stats.shadow_compared, "agreed": stats.shadow_agreed,
                                 "errors": stats.shadow_errors, "dropped": stats.shadow_dropped,
                                 "agreement": (stats.shadow_agreed / stats.shadow_compared
                                               if stats.shadow_compared else None)}
            rows.append(row)
        return {"model": self.name, "stable": self.stable, "aborts": self.aborts, "versions": rows,
                "replica": self.replica, "decisions": len(self.log),
                "sticky": {"parameter": self.policy.sticky_parameter, "metadata": self.policy.sticky_metadata}}
