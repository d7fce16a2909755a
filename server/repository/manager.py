"""The index of models by name and version, and their loading.

Loading runs on a worker thread (never on the event loop), so loading one
model never stalls requests to others. Requests look models up through
`get`, two dict lookups on the hot path.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tritonclient.grpc import model_config_pb2 as mc

from server.core.model import Model
from server.core.state import ModelState
from server.errors import InvalidInput, ModelNotFound, ModelUnavailable, NereidError
from server.repository.config import load_model_config, select_versions
from server.repository.layout import ModelDir, scan_repository
from server.settings import Settings

log = logging.getLogger("nereid.repository")

StateListener = Callable[[str, bool], None]  # (model name, ready?)


@dataclass
class ModelEntry:
    """Everything known about one model directory."""

    name: str
    path: Path
    config: mc.ModelConfig | None = None
    versions: dict[int, Model] = field(default_factory=dict)
    # A failure that concerns the model as a whole (config error, duplicate name).
    error: str = ""
    # version -> reason, for versions that failed before a Model object existed.
    failed_versions: dict[int, str] = field(default_factory=dict)
    latest_ready: Model | None = None

    def refresh_latest(self) -> None:
        ready = [m for v, m in sorted(self.versions.items()) if m.state is ModelState.READY]
        self.latest_ready = ready[-1] if ready else None


@dataclass(frozen=True)
class IndexEntry:
    name: str
    version: str
    state: str
    reason: str


class RepositoryManager:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._models: dict[str, ModelEntry] = {}
        self._lock = threading.Lock()
        self._listeners: list[StateListener] = []

    def add_listener(self, listener: StateListener) -> None:
        """Called (from a loader thread) whenever a model's readiness may have changed."""
        self._listeners.append(listener)

    # -- loading --

    def scan(self) -> list[ModelDir]:
        found: dict[str, ModelDir] = {}
        duplicates: set[str] = set()
        for repository in self.settings.model_repositories:
            for model_dir in scan_repository(repository):
                if model_dir.name in found:
                    duplicates.add(model_dir.name)
                found[model_dir.name] = model_dir
        for name in duplicates:
            entry = ModelEntry(name=name, path=found[name].path, error="model appears in two or more repositories")
            self._models[name] = entry
            del found[name]
        return list(found.values())

    def load_all(self) -> None:
        """Load every model in the repositories (control mode `none`)."""
        for model_dir in self.scan():
            self.load_model_dir(model_dir)

    def load_model_dir(self, model_dir: ModelDir) -> ModelEntry:
        entry = ModelEntry(name=model_dir.name, path=model_dir.path)
        with self._lock:
            self._models[model_dir.name] = entry
        try:
            entry.config = load_model_config(model_dir, self.settings)
        except NereidError as exc:
            entry.error = str(exc)
            log.error("model '%s' failed to load: %s", model_dir.name, exc)
            self._notify(entry)
            return entry
        versions = select_versions(entry.config, model_dir.versions)
        if not versions:
            entry.error = f"no version of model '{model_dir.name}' to load (version folders: " \
                f"{list(model_dir.versions) or 'none'})"
            log.error("%s", entry.error)
        for version in versions:
            model = Model(entry.config, model_dir.path, version, self.settings.inline_compute_us)
            entry.versions[version] = model
            try:
                model.load()
                log.info("loaded model %s (backend %s)", model.label, entry.config.backend)
            except Exception as exc:
                log.error("model %s failed to load: %s", model.label, exc)
        entry.refresh_latest()
        self._notify(entry)
        return entry

    def _notify(self, entry: ModelEntry) -> None:
        ready = entry.latest_ready is not None
        for listener in self._listeners:
            listener(entry.name, ready)

    def unload_all(self, timeout: float | None = None) -> None:
        for entry in list(self._models.values()):
            for model in entry.versions.values():
                if model.state is ModelState.READY:
                    model.unload(timeout)
            entry.refresh_latest()

    # -- queries (event loop) --

    def get(self, name: str, version: str = "") -> Model:
        """The model version to serve, or the error Triton gives."""
        entry = self._models.get(name)
        if entry is None:
            raise ModelNotFound(f"Request for unknown model: '{name}' is not found")
        if not version:
            model = entry.latest_ready
            if model is None:
                if entry.error:
                    raise ModelUnavailable(f"'{name}' has no available versions: {entry.error}")
                raise ModelUnavailable(f"'{name}' has no available versions")
            return model
        try:
            number = int(version)
        except ValueError:
            raise InvalidInput(f"invalid model version '{version}' for '{name}': expected an integer") from None
        model = entry.versions.get(number)
        if model is None:
            raise ModelNotFound(f"Request for unknown model: '{name}' version {number} is not found")
        if model.state is not ModelState.READY:
            detail = f": {model.reason}" if model.reason else ""
            raise ModelUnavailable(f"'{name}' version {number} is not at ready state{detail}")
        return model

    def names(self) -> list[str]:
        return sorted(self._models)

    def entry(self, name: str) -> ModelEntry:
        entry = self._models.get(name)
        if entry is None:
            raise ModelNotFound(f"Request for unknown model: '{name}' is not found")
        return entry

    def loaded_models(self) -> list[Model]:
        return [m for name in self.names() for _, m in sorted(self._models[name].versions.items())]

    def index(self, ready_only: bool = False) -> list[IndexEntry]:
        rows: list[IndexEntry] = []
        for name in self.names():
            entry = self._models[name]
            if entry.error and not entry.versions:
                if not ready_only:
                    rows.append(IndexEntry(name, "", ModelState.UNAVAILABLE.value, entry.error))
                continue
            for version, model in sorted(entry.versions.items()):
                if ready_only and model.state is not ModelState.READY:
                    continue
                rows.append(IndexEntry(name, str(version), model.state.value, model.reason))
        return rows

    def is_ready(self) -> bool:
        """Strict readiness: every model that has a state is READY (or deliberately unloaded)."""
        for entry in self._models.values():
            if entry.error and not entry.versions:
                return False
            for model in entry.versions.values():
                if model.state is ModelState.READY:
                    continue
                if model.state is ModelState.UNAVAILABLE and model.reason == "unloaded":
                    continue
                return False
        return True

    def inflight(self) -> int:
        return sum(m.inflight for m in self.loaded_models())
