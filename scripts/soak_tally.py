"""What the soak's clients saw (scripts/soak.py): one thread-safe tally of every request.

Each request ends in exactly one class:

  ok         a valid request answered OK with the right output
  rejected   an invalid request refused with the status its case expects
  cancelled  a request the client itself gave up on (deadline or explicit cancel), seen as
             DEADLINE_EXCEEDED or CANCELLED by the client
  raced      a request the client meant to cancel that was answered before the cancel landed
  failed     anything else: a valid request that did not get OK (UNKNOWN, INTERNAL, a
             CANCELLED the client did not cause, ...), an invalid one with the wrong status,
             a wrong output, no answer in time
"""

from __future__ import annotations

import threading
from collections import Counter
from typing import Any

import numpy as np

MAX_EXAMPLES = 20  # failures kept with their message; the rest are only counted


def status_name(code: Any) -> str:
    """'INVALID_ARGUMENT' from a grpc.StatusCode or tritonclient's 'StatusCode.INVALID_ARGUMENT'."""
    text = code.name if hasattr(code, "name") else str(code)
    return text.removeprefix("StatusCode.") if text else "NO_STATUS"


class Tally:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.sent: Counter[str] = Counter()  # traffic kind -> requests sent
        self.classes: Counter[tuple[str, str]] = Counter()  # (traffic kind, class) -> requests
        self.rejected: Counter[tuple[str, str]] = Counter()  # (case, status)
        self.cancelled: Counter[tuple[str, str]] = Counter()  # (how, status)
        self.raced: Counter[str] = Counter()
        self.failed: Counter[tuple[str, str]] = Counter()  # (case, status)
        self.examples: list[str] = []
        self.latency: dict[str, list[float]] = {}  # "unary id_direct" -> seconds
        self.versions: dict[str, Counter[str]] = {}  # model -> version -> answers

    def _fail(self, kind: str, case: str, status: str, detail: str) -> None:
        self.failed[(case, status)] += 1
        self.classes[(kind, "failed")] += 1
        if len(self.examples) < MAX_EXAMPLES:
            self.examples.append(f"{kind}/{case}: {status}: {detail[:300]}")

    def good(self, kind: str, label: str, model: str, version: str, seconds: float) -> None:
        with self._lock:
            self.sent[kind] += 1
            self.classes[(kind, "ok")] += 1
            self.latency.setdefault(label, []).append(seconds)
            if model:
                self.versions.setdefault(model, Counter())[version] += 1

    def good_untimed(self, kind: str) -> None:
        """A valid request answered OK whose latency is not meaningful on its own."""
        with self._lock:
            self.sent[kind] += 1
            self.classes[(kind, "ok")] += 1

    def refused(self, kind: str, case: str, status: str, expected: frozenset[str], detail: str = "") -> None:
        """An invalid request came back with `status`; `expected` are the statuses that are right for it."""
        with self._lock:
            self.sent[kind] += 1
            if status in expected:
                self.rejected[(case, status)] += 1
                self.classes[(kind, "rejected")] += 1
            else:
                self._fail(kind, case, status, f"expected {'/'.join(sorted(expected))}; {detail}")

    def gave_up(self, kind: str, how: str, status: str, expected: str, detail: str = "") -> None:
        """A request the client cancelled (or let its deadline expire) came back with `status`."""
        with self._lock:
            self.sent[kind] += 1
            if status == expected:
                self.cancelled[(how, status)] += 1
                self.classes[(kind, "cancelled")] += 1
            elif status == "OK":
                self.raced[how] += 1
                self.classes[(kind, "raced")] += 1
            else:
                self._fail(kind, how, status, f"expected {expected} (client-side cancel); {detail}")

    def bad(self, kind: str, case: str, status: str, detail: str, count_sent: bool = True) -> None:
        """A request that should have succeeded did not (or answered wrongly)."""
        with self._lock:
            if count_sent:
                self.sent[kind] += 1
            self._fail(kind, case, status, detail)

    # -- reading --

    def totals(self) -> dict[str, int]:
        with self._lock:
            return {
                "sent": sum(self.sent.values()),
                "ok": sum(n for (_, cls), n in self.classes.items() if cls == "ok"),
                "rejected": sum(self.rejected.values()),
                "cancelled": sum(self.cancelled.values()),
                "raced": sum(self.raced.values()),
                "failed": sum(self.failed.values()),
            }

    def snapshot(self) -> dict[str, Any]:
        """Every number, JSON-ready."""
        with self._lock:
            latency = {label: percentiles(values) for label, values in sorted(self.latency.items())}
            by_kind: dict[str, dict[str, int]] = {}
            for kind, n in self.sent.items():
                by_kind[kind] = {"sent": n}
            for (kind, cls), n in self.classes.items():
                by_kind.setdefault(kind, {"sent": 0})[cls] = n
            out: dict[str, Any] = {
                "by_kind": by_kind,
                "rejected_by_case": {f"{case} {status}": n for (case, status), n in sorted(self.rejected.items())},
                "rejected_by_status": _by_second(self.rejected),
                "cancelled_by_how": {f"{how} {status}": n for (how, status), n in sorted(self.cancelled.items())},
                "raced_by_how": dict(self.raced),
                "failed_by_case": {f"{case} {status}": n for (case, status), n in sorted(self.failed.items())},
                "failed_by_status": _by_second(self.failed),
                "failure_examples": list(self.examples),
                "latency_ms": latency,
                "versions": {m: dict(sorted(c.items())) for m, c in sorted(self.versions.items())},
            }
        out.update(self.totals())
        return out


def _by_second(counter: Counter[tuple[str, str]]) -> dict[str, int]:
    out: Counter[str] = Counter()
    for (_, status), n in counter.items():
        out[status] += n
    return dict(sorted(out.items()))


def percentiles(seconds: list[float]) -> dict[str, float]:
    """count, p50/p90/p99/max in milliseconds."""
    if not seconds:
        return {"count": 0}
    arr = np.asarray(seconds) * 1000.0
    p50, p90, p99 = np.percentile(arr, [50, 90, 99])
    return {"count": int(arr.size), "p50": round(float(p50), 2), "p90": round(float(p90), 2),
            "p99": round(float(p99), 2), "max": round(float(arr.max()), 2)}
