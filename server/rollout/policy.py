"""The traffic policy of one model: `<model>/rollout.yaml`, parsed and checked (pure, no I/O but the read).

The file sits beside config.pbtxt, so it lives in the repository and survives restarts; a
change to it is a change to the model folder, which poll mode picks up like any other
(docs/ROLLOUTS.md). Every default is filled in here, once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

POLICY_FILENAME = "rollout.yaml"


class PolicyError(ValueError):
    """rollout.yaml is unreadable or says something this server cannot do; the message says what."""


@dataclass(frozen=True)
class Rollback:
    """When a canary is rolled back: over the last `window_s` seconds, with at least `min_requests`
    requests in that window, an error rate above `max_error_rate` or a p99 latency above `max_p99_ms`."""

    window_s: float = 30.0
    min_requests: int = 20
    max_error_rate: float = 0.01
    max_p99_ms: float | None = None


@dataclass(frozen=True)
class Shadow:
    """How a shadow version's outputs are compared with the serving version's (numpy.allclose;
    both 0 means exact equality)."""

    atol: float = 0.0
    rtol: float = 0.0
    max_inflight: int = 64  # shadow copies in flight at most; more are dropped (and counted), never queued


@dataclass(frozen=True)
class Policy:
    weights: dict[int, float]  # version -> share (any positive scale) for requests naming no version
    stable: int  # the version a rollback falls back on; every other weighted version is a canary
    shadows: tuple[int, ...] = ()
    sticky_parameter: str = ""  # request parameter whose value keeps a client on one version
    sticky_metadata: str = ""  # gRPC metadata key (HTTP header) doing the same
    rollback: Rollback | None = field(default_factory=Rollback)
    promote_after_s: float = 0.0  # a canary clean for this long (and min_requests) is promoted; 0: manual only
    shadow: Shadow = field(default_factory=Shadow)

    @property
    def canaries(self) -> tuple[int, ...]:
        return tuple(v for v in sorted(self.weights) if v != self.stable and self.weights[v] > 0)


def read_policy(model_dir: Path) -> Policy | None:
    """The model's policy, None when it has no rollout.yaml; PolicyError when the file is wrong."""
    path = model_dir / POLICY_FILENAME
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise PolicyError(f"cannot read {POLICY_FILENAME}: {exc.strerror or exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise PolicyError(f"{POLICY_FILENAME} is not valid YAML: {exc}") from None
    return parse_policy(data)


def _version(key: Any) -> int:
    if isinstance(key, bool) or not (isinstance(key, int) or (isinstance(key, str) and key.isdigit())):
        raise PolicyError(f"version {key!r}: expected a version number > 0")
    version = int(key)
    if version <= 0:
        raise PolicyError(f"version {key!r}: expected a version number > 0")
    return version


def _number(section: dict[str, Any], key: str, default: float | None, lowest: float = 0.0) -> float | None:
    value = section.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < lowest:
        raise PolicyError(f"'{key}': expected a number >= {lowest:g}, got {value!r}")
    return float(value)


def _section(data: dict[str, Any], key: str) -> dict[str, Any]:
    value = data.get(key) or {}
    if not isinstance(value, dict):
        raise PolicyError(f"'{key}': expected a mapping, got {value!r}")
    return value


KNOWN = {"weights", "stable", "shadow", "sticky", "rollback", "promote"}


def parse_policy(data: Any) -> Policy:
    """rollout.yaml's content (see docs/ROLLOUTS.md) -> Policy, every default filled in."""
    if not isinstance(data, dict):
        raise PolicyError(f"{POLICY_FILENAME} must be a mapping with 'weights', got {type(data).__name__}")
    unknown = sorted(set(map(str, data)) - KNOWN)
    if unknown:
        raise PolicyError(f"unknown key(s) {', '.join(unknown)}; expected {', '.join(sorted(KNOWN))}")
    raw_weights = _section(data, "weights")
    if not raw_weights:
        raise PolicyError("'weights' must give at least one version a share, e.g. {1: 95, 2: 5}")
    weights: dict[int, float] = {}
    for key in raw_weights:
        weights[_version(key)] = _number(raw_weights, key, 0.0) or 0.0
    if not any(w > 0 for w in weights.values()):
        raise PolicyError("'weights': at least one version needs a share above 0")
    stable_raw = data.get("stable")
    if stable_raw is None:  # the largest share, the older version on a tie
        stable = min(weights, key=lambda v: (-weights[v], v))
    else:
        stable = _version(stable_raw)
        if stable not in weights:
            raise PolicyError(f"'stable': version {stable} has no entry in 'weights'")
    shadow = _section(data, "shadow")
    shadows = tuple(sorted(_version(v) for v in (shadow.get("versions") or [])))
    both = set(shadows) & {v for v, w in weights.items() if w > 0}
    if both:
        raise PolicyError(f"version(s) {sorted(both)} cannot both take a share and be a shadow")
    sticky = _section(data, "sticky")
    parameter, metadata = str(sticky.get("parameter", "")), str(sticky.get("metadata", "")).lower()
    rollback_data = data.get("rollback", {})
    rollback = None
    if rollback_data is not False:
        section = _section(data, "rollback")
        max_rate = _number(section, "max_error_rate", 0.01)
        rollback = Rollback(window_s=_number(section, "window_s", 30.0, 0.001) or 30.0,
                            min_requests=int(_number(section, "min_requests", 20, 1) or 20),
                            max_error_rate=0.01 if max_rate is None else max_rate,
                            max_p99_ms=_number(section, "max_p99_ms", None))
    promote = _section(data, "promote")
    return Policy(
        weights=weights, stable=stable, shadows=shadows, sticky_parameter=parameter, sticky_metadata=metadata,
        rollback=rollback, promote_after_s=_number(promote, "after_clean_s", 0.0) or 0.0,
        shadow=Shadow(atol=_number(shadow, "atol", 0.0) or 0.0, rtol=_number(shadow, "rtol", 0.0) or 0.0,
                      max_inflight=int(_number(shadow, "max_inflight", 64, 1) or 64)),
    )
