"""One lifecycle action on one model: load what changed in the background, then decide the swap.

The rules (docs/LIFECYCLE.md), in the order they apply:

1. Parse the config (override or disk) and let the version policy pick the
   wanted versions among those on disk.
2. A wanted version whose serving copy was loaded from the same files with the
   same normalised config is kept as is; every other wanted version is loaded
   as a *new* copy while the old one keeps serving. A failed load is tried
   again up to `--model-load-retry-count` times before it counts as failed.
3. If everything wanted is READY, versions outside the policy are retired.
   If anything failed (or the config itself is broken), nothing is retired
   except versions whose folder was removed: the previous copies keep serving, and if the
   config changed they are reloaded with it (falling back to the old copy
   again if that fails too). Triton instead drops the whole action, and its
   POLL mode then stops retrying; here a later change on disk is retried.
4. A version that failed with exactly the same files and config is not
   retried by the poller (`retry_failed=False`), so a corrupt folder is not
   reloaded every scan; any change to it, or to the config, retries it.

`run_action` only builds models and returns an Outcome; the manager applies the
Outcome on the event loop (so routing changes atomically for requests) and
drains what it retires.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tritonclient.grpc import model_config_pb2 as mc

from server.core.ensemble import EnsembleModel, StepModels
from server.core.limits import ServingLimits
from server.core.model import Model
from server.core.state import ModelState
from server.repository.changes import ModelSnapshot
from server.repository.config import load_model_config, select_versions
from server.repository.ensemble_config import is_ensemble
from server.repository.entry import Failure, ModelEntry, VersionKey
from server.settings import Settings

log = logging.getLogger("nereid.repository")


@dataclass
class Source:
    """What to load a model from, and how eagerly."""

    snapshot: ModelSnapshot
    override: mc.ModelConfig | None = None
    override_dir: Path | None = None  # private directory of a file-override load
    force: bool = False  # reload every wanted version even when unchanged
    retry_failed: bool = True  # load again a version that failed with the same files and config


@dataclass
class Outcome:
    """The swap to apply: new rows and bookkeeping, and the copies to drain and unload."""

    config: mc.ModelConfig | None
    error: str
    rows: dict[int, Model]
    keys: dict[int, VersionKey]
    failures: dict[int, Failure]
    retire: list[tuple[Model, str]] = field(default_factory=list)
    loaded: list[Model] = field(default_factory=list)
    failed: dict[int, str] = field(default_factory=dict)  # failures of this very action
    covered: bool = False  # something was serving before the action

    @property
    def ok(self) -> bool:
        return not self.error and not self.failed


ShowLoading = Callable[[int, Model], None]


def serving_limits(settings: Settings) -> ServingLimits:
    return ServingLimits(
        inline_us=settings.inline_compute_us,
        queue_limit=settings.model_queue_limit,
        execution_timeout_s=settings.model_execution_timeout_secs,
        failure_threshold=settings.model_failure_threshold,
        latency_buckets_ms=settings.metrics_config.buckets_ms
        if settings.allow_metrics and settings.metrics_config.per_request else (),
        response_cache=settings.response_cache,
    )


def _build(config: mc.ModelConfig, path: Path, version: int, settings: Settings,
           steps: StepModels | None = None) -> tuple[Model | None, str]:
    try:
        if is_ensemble(config):
            if steps is None:
                return None, f"ensemble '{config.name}' cannot be loaded here: no model registry to find its steps in"
            model: Model = EnsembleModel(config, path, version, serving_limits(settings), steps)
        else:
            model = Model(config, path, version, serving_limits(settings))
    except Exception as exc:  # config passed validation, so this is unexpected: report, don't crash
        log.exception("model '%s' version %d: cannot set up", config.name, version)
        return None, f"cannot set up version {version}: {exc}"
    return model, ""


def _load(model: Model) -> str:
    """Load `model`; '' on success, else the reason (also left in model.reason)."""
    try:
        model.load()
    except Exception as exc:
        return model.reason or str(exc)
    return ""


def _build_and_load(config: mc.ModelConfig, path: Path, version: int, settings: Settings,
                    show: ShowLoading | None, steps: StepModels | None = None) -> tuple[Model | None, str]:
    """Build and load one version, retrying a failed load `--model-load-retry-count` times (Triton's flag).

    Runs on a loader thread. Each attempt uses a fresh Model: a failed load has
    released its instances, and a Model is not meant to be loaded twice. Only
    load failures are retried; a copy that cannot even be set up fails the same
    way every time. Returns the last copy tried (shown LOADING via `show` while
    it loads) and '' on success, else its reason.
    """
    attempts = 1 + settings.model_load_retry_count
    attempt = 1
    while True:
        model, problem = _build(config, path, version, settings, steps)
        if model is None:
            return None, problem
        if show is not None:
            show(version, model)
        problem = _load(model)
        if not problem or attempt == attempts or isinstance(model, EnsembleModel):
            return model, problem
        log.warning("model %s failed to load (attempt %d of %d), retrying: %s",
                    model.label, attempt, attempts, problem)
        attempt += 1


def run_action(entry: ModelEntry, source: Source, settings: Settings, show_loading: ShowLoading,
               steps: StepModels | None = None) -> Outcome:
    """Load whatever needs loading for `entry` from `source`; runs on a loader thread.
    `steps` is where an ensemble finds its step models (the registry)."""
    snap = source.snapshot
    model_dir = snap.model_dir()
    current = entry.serving()
    on_disk = set(snap.versions)
    config: mc.ModelConfig | None
    try:
        config = load_model_config(model_dir, settings, source.override)
        wanted = select_versions(config, model_dir.versions)
        error = "" if wanted else (
            f"no version of model '{snap.name}' to load: the version policy selects none of the version "
            f"folders {list(model_dir.versions) or '(none)'} in {snap.path}"
        )
    except Exception as exc:  # ConfigError, or an unknown backend named by the config
        config, wanted, error = None, [], str(exc)

    keep: dict[int, Model] = {}
    new: dict[int, tuple[Model, VersionKey]] = {}
    failed: dict[int, str] = {}
    failed_rows: dict[int, Model] = {}
    known_bad: set[int] = set()

    def attempt(version: int, key: VersionKey, show: bool) -> None:
        assert config is not None
        model, problem = _build_and_load(config, snap.path, version, settings, show_loading if show else None,
                                         steps)
        if problem:
            failed[version] = problem
            if model is not None:
                failed_rows[version] = model
        else:
            assert model is not None
            new[version] = (model, key)

    for version in wanted:
        assert config is not None
        key = VersionKey(snap.path, snap.extras, snap.versions[version])
        serving = current.get(version)
        if serving is not None and not source.force and entry.keys.get(version) == key \
                and serving.source_config == config:
            keep[version] = serving
            continue
        old = entry.failures.get(version)
        if not source.retry_failed and old is not None and old.key == key and old.config == config:
            known_bad.add(version)
            continue
        attempt(version, key, show=serving is None)

    def gone(version: int) -> bool:
        """The version's folder was removed (not merely absent from a different source directory)."""
        key = entry.keys.get(version)
        return version not in on_disk and (key is None or key.path == snap.path)

    fallback: dict[int, Model] = {}
    if failed or known_bad or error:
        fallback = {v: m for v, m in current.items() if not gone(v) and v not in keep and v not in new}
        if config is not None:  # the copies kept serving follow a changed config too
            for version in sorted(fallback):
                if version in failed or version in known_bad or version not in on_disk:
                    continue
                key = VersionKey(snap.path, snap.extras, snap.versions[version])
                if entry.keys.get(version) == key and fallback[version].source_config == config:
                    continue
                attempt(version, key, show=False)
                if version in new:
                    del fallback[version]

    serving_after: dict[int, Model] = {**fallback, **keep, **{v: m for v, (m, _) in new.items()}}
    rows = dict(serving_after)
    for version, model in entry.versions.items():  # retired, unloaded and known-bad rows stay while on disk
        if version not in rows and version in on_disk:
            rows[version] = model
    rows.update({v: m for v, m in failed_rows.items() if v not in serving_after})

    retire = []
    for version, model in sorted(current.items()):
        if serving_after.get(version) is model:
            continue
        if version in new:
            why = "replaced by a newly loaded copy"
        elif gone(version):
            why = "its version folder was removed"
        elif version not in on_disk:
            why = "not in the newly loaded model directory"
        else:
            why = "no longer selected by the version policy"
        retire.append((model, why))
    retired = {m.version for m, _ in retire} - set(serving_after)

    keys = {v: entry.keys[v] for v in serving_after if v not in new and v in entry.keys}
    keys.update({v: key for v, (_, key) in new.items()})
    # A failure stays on record while its version is on disk and neither served afresh nor retired.
    failures = {v: f for v, f in entry.failures.items()
                if v in on_disk and v not in new and v not in keep and v not in retired}
    for version, reason in failed.items():
        if version in retired:
            continue
        key = VersionKey(snap.path, snap.extras, snap.versions[version])
        failures[version] = Failure(key, config, reason, covered=bool(current))

    return Outcome(
        config=config, error=error, rows=rows, keys=keys, failures=failures, retire=retire,
        loaded=[m for m, _ in new.values()], failed=failed, covered=bool(current),
    )


def describe_failure(name: str, outcome: Outcome) -> str:
    """Triton's load-failure message: `load failed for model 'm': version 3 is at UNAVAILABLE state: ...;`."""
    parts = [f"version {v} is at {ModelState.UNAVAILABLE.value} state: {r};" for v, r in sorted(outcome.failed.items())]
    if outcome.error:
        parts.insert(0, outcome.error + ";")
    return f"load failed for model '{name}': " + " ".join(parts)
