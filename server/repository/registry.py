"""The registry of models by name and version: lookups, the index, readiness, listeners.

Everything here is read on the event loop (requests look models up through
`get`, two dict lookups) and changed only through `_on_loop`, so a change is
atomic for requests. manager.py adds the actions that change it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path

from server.core.model import Model
from server.core.state import ModelState
from server.errors import InvalidInput, ModelNotFound, ModelUnavailable
from server.repository.entry import IndexEntry, ModelEntry
from server.rollout.router import Rollouts, lookup_in
from server.settings import Settings

log = logging.getLogger("nereid.repository")

StateListener = Callable[[str, bool], None]  # (model name, ready?)


def parse_version(version: str, name: str) -> int:
    """A requested model version: canonical decimal only ("1", "12"; not " 1", "01", "+1" or
    non-ASCII digits, which int() would take), so one version has one spelling."""
    if not (version.isascii() and version.isdigit() and version[0] != "0" and len(version) <= 18):
        raise InvalidInput(
            f"failed to get model version from specified version string '{version}' for model '{name}': "
            "version should be an integral value > 0, written in decimal without sign, spaces or leading zeros"
        )
    return int(version)


def model_paths(repository: Path) -> list[Path]:
    """The model directories of one repository (hidden entries skipped), sorted by name."""
    return sorted(Path(e.path) for e in os.scandir(repository) if e.is_dir() and not e.name.startswith("."))


class ModelRegistry:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._models: dict[str, ModelEntry] = {}
        self._listeners: list[StateListener] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        # Traffic policies (rollout.yaml): which version answers a request naming none (docs/ROLLOUTS.md).
        self.rollouts = Rollouts(lookup_in(self._models.get))

    def bind_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        """Call from the event loop's thread: changes then run there, between requests."""
        self._loop = loop
        self._loop_thread = threading.get_ident()

    def add_listener(self, listener: StateListener) -> None:
        """Called (from a loader thread) whenever a model's readiness may have changed."""
        self._listeners.append(listener)

    def _on_loop(self, fn: Callable[[], None]) -> None:
        """Run `fn` on the event loop and wait for it (directly when there is no running loop)."""
        loop = self._loop
        if loop is None or threading.get_ident() == self._loop_thread or not loop.is_running():
            fn()
            return
        done = threading.Event()
        errors: list[BaseException] = []

        def run() -> None:
            try:
                fn()
            except BaseException as exc:
                errors.append(exc)
            finally:
                done.set()

        try:
            loop.call_soon_threadsafe(run)
        except RuntimeError:  # the loop closed meanwhile
            fn()
            return
        while not done.wait(1.0):
            if not loop.is_running():
                break
        if errors:
            raise errors[0]

    def _notify(self, entry: ModelEntry) -> None:
        ready = entry.latest_ready is not None
        for listener in self._listeners:
            listener(entry.name, ready)

    def disk_names(self) -> set[str]:
        """The model directory names on disk. Lists folders, so it blocks on a slow filesystem:
        call it off the event loop (it reads only the settings, never the registry)."""
        names: set[str] = set()
        for repository in self.settings.model_repositories:
            try:
                names.update(p.name for p in model_paths(repository))
            except OSError:
                continue
        return names

    # -- queries (event loop) --

    def get(self, name: str, version: str = "") -> Model:
        """The model version to serve, or the error Triton gives."""
        entry = self._models.get(name)
        if entry is None:
            raise ModelNotFound(f"Request for unknown model: '{name}' is not found")
        if not version:
            model = entry.latest_ready
            if model is None:  # NOT_FOUND as Triton (clients retry UNAVAILABLE forever)
                if entry.error:
                    raise ModelNotFound(f"'{name}' has no available versions: {entry.error}")
                raise ModelNotFound(f"'{name}' has no available versions")
            return model
        number = parse_version(version, name)
        model = entry.versions.get(number)
        if model is None:
            raise ModelNotFound(f"Request for unknown model: '{name}' version {number} is not found")
        if model.state is not ModelState.READY:
            detail = f": {model.reason}" if model.reason else ""
            raise ModelUnavailable(f"'{name}' version {number} is not at ready state{detail}")
        return model

    def names(self) -> list[str]:
        return sorted(self._models)

    def known(self, name: str) -> bool:
        """Whether `name` is a model the registry knows (metrics label only those: a client's
        arbitrary names would otherwise grow the label set without bound)."""
        return name in self._models

    def has_ready_version(self, name: str) -> bool:
        """Whether `name` has a READY version now (its per-model health); read on the event loop."""
        entry = self._models.get(name)
        return entry is not None and entry.latest_ready is not None

    def states(self) -> list[tuple[str, str, str]]:
        """(model, version, state) of every version the registry holds."""
        return [(name, str(version), model.state.value) for name in self.names()
                for version, model in sorted(self._models[name].versions.items())]

    def entry(self, name: str) -> ModelEntry:
        entry = self._models.get(name)
        if entry is None:
            raise ModelNotFound(f"Request for unknown model: '{name}' is not found")
        return entry

    def loaded_models(self) -> list[Model]:
        return [m for name in self.names() for _, m in sorted(self._models[name].versions.items())]

    async def index_async(self, ready_only: bool = False) -> list[IndexEntry]:
        """`index` for RepositoryIndex: the folder listing runs on the default executor, so a slow or
        network filesystem cannot stall requests on the loop; the registry is then read on the loop.

        Not the loader threads: they may all be busy with long loads, just when clients watch the index.
        """
        on_disk = set() if ready_only else await asyncio.get_running_loop().run_in_executor(None, self.disk_names)
        return self.index(ready_only, on_disk)

    def index(self, ready_only: bool = False, on_disk: set[str] | None = None) -> list[IndexEntry]:
        """Every model directory, loaded or not (a never-loaded one: name only, as Triton).

        `on_disk` is `disk_names()` taken beforehand (off the loop); None lists the folders here.
        """
        if ready_only:
            names = set(self._models)
        else:
            names = set(self._models) | (self.disk_names() if on_disk is None else on_disk)
        rows: list[IndexEntry] = []
        for name in sorted(names):
            entry = self._models.get(name)
            if entry is None:
                rows.append(IndexEntry(name, "", "", ""))
            else:
                rows.extend(self._with_rollout(entry.index_rows(ready_only)))
        return rows

    def _with_rollout(self, rows: list[IndexEntry]) -> list[IndexEntry]:
        """The rollout's word on each version row: its share and role, or why it was rolled back."""
        out = []
        for row in rows:
            note = self.rollouts.reason(row.name, int(row.version)) if row.version else ""
            if note:
                row = IndexEntry(row.name, row.version, row.state, f"{row.reason}; {note}" if row.reason else note)
            out.append(row)
        return out

    def is_ready(self) -> bool:
        """Strict readiness over every model the manager knows (rules in entry.py)."""
        return all(entry.is_ready() for entry in list(self._models.values()))

    def inflight(self) -> int:
        return sum(m.inflight for m in self.loaded_models())
