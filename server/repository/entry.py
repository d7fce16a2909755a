"""What the manager knows about one model: its version rows, what they were loaded from, failures.

`versions` holds one Model per version the index shows: the serving copy when
there is one, otherwise the last failed or unloaded copy. A reload builds the
new copy in the background; it replaces the row only once it is READY, so a
row is READY for as long as *some* copy of that version serves.

Readiness and index rows are computed here from the entry alone, so the rules
(docs/LIFECYCLE.md) sit in one small place.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from tritonclient.grpc import model_config_pb2 as mc

from server.core.model import Model
from server.core.state import ModelState
from server.repository.changes import Stamp

UNLOADED = "unloaded"


@dataclass(frozen=True)
class VersionKey:
    """Everything on disk a loaded version depends on, apart from the (normalised) config."""

    path: Path
    extras: Stamp
    version: Stamp


@dataclass(frozen=True)
class Failure:
    """A version that failed to load, and what it was loaded from (so the same files are not retried)."""

    key: VersionKey | None
    config: mc.ModelConfig | None
    reason: str
    # An older copy kept serving when it failed: a failed *update*, which does not
    # make the server unready as long as something still serves.
    covered: bool


@dataclass(frozen=True)
class IndexEntry:
    name: str
    version: str
    state: str
    reason: str


@dataclass
class ModelEntry:
    """Everything known about one model directory."""

    name: str
    path: Path
    config: mc.ModelConfig | None = None
    versions: dict[int, Model] = field(default_factory=dict)
    # A failure that concerns the model as a whole (config error, no version, duplicate name).
    error: str = ""
    error_covered: bool = False
    keys: dict[int, VersionKey] = field(default_factory=dict)  # of the serving copies
    failures: dict[int, Failure] = field(default_factory=dict)
    latest_ready: Model | None = None
    override_dir: Path | None = None  # private copy made by a load with file overrides
    unloaded: bool = False  # explicitly unloaded: readiness ignores it, as Triton's "unloaded"
    # Loaded only because an ensemble needed it (explicit mode): unloading that ensemble with
    # `unload_dependents` unloads it too, as Triton does with a model not loaded explicitly.
    as_step: bool = False

    def refresh_latest(self) -> None:
        ready = [m for _, m in sorted(self.versions.items()) if m.state is ModelState.READY]
        self.latest_ready = ready[-1] if ready else None

    def serving(self) -> dict[int, Model]:
        return {v: m for v, m in self.versions.items() if m.state is ModelState.READY}

    def is_ready(self) -> bool:
        """Strict readiness for this model.

        Like Triton: every version must be READY or deliberately unloaded, and a
        model that failed as a whole is not ready. Better than Triton: a version
        that is still LOADING or UNLOADING after startup does not count (a load
        in the background must not pull the pod out of rotation), nor does a
        failed update while an older copy keeps serving.
        """
        if self.unloaded:
            return True
        serving = self.latest_ready is not None
        if self.error and not (self.error_covered and serving):
            return False
        for version in self.failed_versions():
            failure = self.failures.get(version)
            if not (failure is not None and failure.covered and serving):
                return False
        return True

    def failed_versions(self) -> list[int]:
        """Versions whose last load failed and that no copy serves."""
        failed = []
        for version in sorted(set(self.versions) | set(self.failures)):
            model = self.versions.get(version)
            if model is None or (model.state is ModelState.UNAVAILABLE and model.reason != UNLOADED):
                failed.append(version)
        return failed

    def index_rows(self, ready_only: bool) -> list[IndexEntry]:
        """Triton's rows: one per version (a model-level failure without versions: one row, no version)."""
        if not self.versions and not self.failures:
            if self.error and not ready_only:
                return [IndexEntry(self.name, "", ModelState.UNAVAILABLE.value, self.error)]
            if not ready_only:
                return [IndexEntry(self.name, "", "", "")]
            return []
        rows = []
        if self.error and self.latest_ready is None and not ready_only:
            rows.append(IndexEntry(self.name, "", ModelState.UNAVAILABLE.value, self.error))
        for version in sorted(set(self.versions) | set(self.failures)):
            model = self.versions.get(version)
            if model is None:  # failed before a Model object could exist
                if not ready_only:
                    rows.append(IndexEntry(self.name, str(version), ModelState.UNAVAILABLE.value,
                                           self.failures[version].reason))
                continue
            if ready_only and model.state is not ModelState.READY:
                continue
            reason = self._serving_note(version) if model.state is ModelState.READY else model.reason
            rows.append(IndexEntry(self.name, str(version), model.state.value, reason))
        return rows

    def _serving_note(self, version: int) -> str:
        """Why a READY row still deserves a reason: a newer copy or config failed to load."""
        if self.error:
            return f"still serving the previous copy: {self.error}"
        failure = self.failures.get(version)
        if failure is not None:
            return f"still serving the previous copy; reload failed: {failure.reason}"
        return ""
