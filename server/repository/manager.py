"""Every change to the model registry: startup loading, poll actions, the load/unload RPCs.

Loads run on a pool of loader threads (`--model-load-thread-count`), never on
the event loop, so loading one model never stalls requests to others; actions
on one model are serialised by a per-model lock. The swap itself (new copies
in, old copies marked UNLOADING) runs on the event loop, in one callback: a
request either got the old copy before the swap (and is counted in its
`inflight`) or gets the new one. Old copies are then drained and unloaded on a
background thread. Lookups and the index live in registry.py.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import replace
from pathlib import Path

from server.core.ensemble import EnsembleModel
from server.core.model import Model
from server.core.state import ModelState
from server.errors import InvalidInput, ModelUnavailable, ServerUnavailable
from server.repository.actions import Outcome, Source, describe_failure, run_action
from server.repository.changes import ModelSnapshot, snapshot_model
from server.repository.ensemble_deps import config_steps, load_waves, source_steps, with_steps
from server.repository.entry import IndexEntry, ModelEntry
from server.repository.objstore import StoreError
from server.repository.overrides import parse_load_parameters, remove_override_dir, write_override_dir
from server.repository.registry import ModelRegistry, StateListener, model_paths
from server.repository.remote import RemoteRepositories
from server.repository.safepath import check_model_name, find_model_dir
from server.rollout.router import prepare as prepare_rollout
from server.settings import Settings

log = logging.getLogger("nereid.repository")

DUPLICATE = "model appears in two or more repositories"

__all__ = ["IndexEntry", "ModelEntry", "RepositoryManager", "Source", "StateListener"]


class RepositoryManager(ModelRegistry):
    """The registry plus every action that changes it: startup loads, poll actions, load/unload RPCs."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.loader = ThreadPoolExecutor(settings.model_load_thread_count, thread_name_prefix="nereid-loader")
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()
        self._draining: set[Model] = set()
        self._drains: list[threading.Thread] = []
        self._drains_lock = threading.Lock()
        self._override_dirs: set[Path] = set()
        self._overrides_lock = threading.Lock()
        self._closing = False
        self.load_failures: dict[str, int] = {}  # model -> failed loads (metrics)
        # s3:// and gs:// repositories: local mirrors, scanned like any other repository (remote.py).
        try:
            self.remote = RemoteRepositories.open(settings.object_store_repositories,
                                                  settings.model_repository_cache,
                                                  settings.model_repository_ready_marker)
        except StoreError as exc:
            raise SystemExit(f"nereid: {exc}") from None
        if self.remote.mirrors:
            self.settings = replace(settings, model_repositories=settings.model_repositories + self.remote.roots)
        self._explicit_chain = threading.local()  # ensembles whose explicit load is loading their steps
        self.add_listener(self._ensembles_follow)

    # -- discovery --

    def scan(self) -> dict[str, ModelSnapshot]:
        """Snapshot every model directory; a name found in two repositories is reported, not loaded."""
        found: dict[str, ModelSnapshot] = {}
        duplicates: set[str] = set()
        for repository in self.settings.model_repositories:
            try:
                paths = model_paths(repository)
            except OSError as exc:
                log.error("cannot scan model repository %s: %s", repository, exc)
                continue
            for path in paths:
                if path.name in found:
                    duplicates.add(path.name)
                found[path.name] = snapshot_model(path)
        for name in sorted(duplicates):
            snap = found.pop(name)
            if name not in self._models:
                entry = ModelEntry(name=name, path=snap.path, error=DUPLICATE)
                self._on_loop(lambda e=entry: self._models.__setitem__(e.name, e))  # type: ignore[misc]
                log.error("model '%s': %s", name, DUPLICATE)
        return found

    # -- startup --

    def load_startup(self) -> None:
        """Startup loading for `none` and `explicit` modes (the poller handles `poll`)."""
        if self.settings.model_control_mode == "explicit":
            self.load_named(self.settings.load_models)
        else:
            self.load_all()

    def load_all(self) -> None:
        """Load every model in the repositories, several at once."""
        self.remote.sync(stable=False)
        self.run_all(Source(snap) for snap in self.scan().values())

    def load_named(self, names: Iterable[str]) -> None:
        """Explicit mode's `--load-model` list ('*' means every model)."""
        names = list(names)
        if "*" in names:
            self.load_all()
            return
        sources = []
        for name in dict.fromkeys(names):
            try:
                path = self._find(name)
            except InvalidInput as exc:
                self._fail_model(name, str(exc))
                continue
            sources.append(Source(snapshot_model(path, name)))
        everything = with_steps(sources, self._serving, self._find_quietly)  # an ensemble's steps load too
        self.run_all(everything)
        for source in everything[len(sources):]:  # loaded only as steps (unload_dependents)
            entry = self._models.get(source.snapshot.name)
            if entry is not None:
                entry.as_step = True

    def run_all(self, sources: Iterable[Source]) -> None:
        """Load `sources`, several at once; an ensemble after the step models it needs (ensemble_deps.py)."""
        waves, cycles = load_waves(sources)
        for name, reason in sorted(cycles.items()):
            self._fail_model(name, reason)
        for wave in waves:
            futures = [self.loader.submit(self.apply, source) for source in wave]
            for future in wait(futures).done:
                if future.exception() is not None:
                    log.error("model action failed unexpectedly", exc_info=future.exception())

    # -- actions (loader threads) --

    def _lock_for(self, name: str) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(name, threading.Lock())

    def apply(self, source: Source) -> Outcome | None:
        """(Re)load a model from `source`, swap on success, keep serving on failure (actions.py)."""
        with self._lock_for(source.snapshot.name):
            return self._apply_locked(source)

    def _apply_locked(self, source: Source) -> Outcome | None:
        """`apply`, with the model's lock already held."""
        name = source.snapshot.name
        if self._closing:
            return None
        entry = self._models.get(name) or ModelEntry(name=name, path=source.snapshot.path)

        def show_loading(version: int, model: Model) -> None:
            def put() -> None:
                entry.versions[version] = model
                self._models.setdefault(name, entry)

            self._on_loop(put)

        outcome = run_action(entry, source, self.settings, show_loading, steps=self)
        rollout = prepare_rollout(name, source.snapshot.path, self.rollouts.replica)  # beside the config

        def swap() -> None:
            entry.versions = outcome.rows
            entry.keys, entry.failures = outcome.keys, outcome.failures
            entry.error, entry.error_covered = outcome.error, outcome.covered
            if outcome.config is not None:
                entry.config = outcome.config
            entry.path, entry.override_dir, entry.unloaded = source.snapshot.path, source.override_dir, False
            for model, _ in outcome.retire:
                model.state = ModelState.UNLOADING
            entry.refresh_latest()
            self._models[name] = entry
            self.rollouts.install(name, rollout)

        for model in outcome.loaded:
            model.on_unavailable = self._gave_up
        self._on_loop(swap)
        if source.override_dir is not None:  # only now that the entry shows it in use (_cleanup_overrides)
            with self._overrides_lock:
                self._override_dirs.add(source.override_dir)
        self._report(entry, outcome)
        self._notify(entry)
        self._retire(outcome.retire)
        self._hold_to_steps(entry)
        return outcome

    def _gave_up(self, model: Model) -> None:
        """A version stopped serving because every instance kept failing (core/faults.py); called
        from an instance thread. Routing, readiness and health follow; the index shows the reason."""
        entry = self._models.get(model.name)
        if entry is None or entry.versions.get(model.version) is not model:
            return
        self._on_loop(entry.refresh_latest)
        self._notify(entry)

    def remove(self, name: str) -> None:
        """The model's folder is gone (poll mode): stop routing to it, drain and unload it."""
        with self._lock_for(name):
            entry = self._models.get(name)
            if entry is None:
                return
            retire = [(m, "its model folder was removed") for m in entry.versions.values()
                      if m.state in (ModelState.READY, ModelState.LOADING)]

            def swap() -> None:
                for model, _ in retire:
                    model.state = ModelState.UNLOADING
                self._models.pop(name, None)
                self.rollouts.forget(name)

            self._on_loop(swap)
            log.info("model '%s' removed from the repository", name)
            for listener in self._listeners:
                listener(name, False)
            self._retire(retire)

    def require_explicit(self) -> None:
        """The load/unload RPCs exist only in explicit mode (Triton's code and message)."""
        if self.settings.model_control_mode != "explicit":
            raise ServerUnavailable("explicit model load / unload is not allowed if polling is enabled")

    def load_explicit(self, name: str, parameters: Mapping[str, object], as_step: bool = False) -> None:
        """RepositoryModelLoad: synchronous; raises InvalidInput with Triton's message on failure.
        `as_step`: loaded because an ensemble being loaded needs it, not by name."""
        request = parse_load_parameters(name, parameters)
        if request.files:
            path = write_override_dir(request)
            source = Source(snapshot_model(path, name), request.config, override_dir=path, force=True)
        else:
            source = Source(snapshot_model(self._find(name), name), request.config, force=request.overridden)
        self._load_steps_of(name, source)
        with self._lock_for(name):
            before = self._models.get(name)
            by_name_before = before is not None and not before.unloaded and not before.as_step
            outcome = self._apply_locked(source)
            entry = self._models.get(name)
            if entry is not None:
                # Marked under the lock, and a step load keeps a model loaded by name as it was: the
                # ensemble's look (not serving) may predate a load by name that won the lock first.
                entry.as_step = as_step and not by_name_before
        if outcome is None:
            if source.override_dir is not None:
                remove_override_dir(source.override_dir)
            raise ModelUnavailable(f"failed to load '{name}': the server is stopping")
        if not outcome.ok:
            raise InvalidInput(describe_failure(name, outcome))

    def _load_steps_of(self, name: str, source: Source) -> None:
        """Explicit mode, as Triton: loading an ensemble first loads its step models that are not
        serving (recursively). A step that fails to load fails the ensemble's load, with its reason."""
        steps = source_steps(source)
        if not steps:
            return
        chain: list[str] = getattr(self._explicit_chain, "names", [])
        if name in chain:
            cycle = chain[chain.index(name):] + [name]
            raise InvalidInput(f"load failed for model '{chain[0]}': circular dependency between ensembles: "
                               + " -> ".join(cycle))
        self._explicit_chain.names = chain + [name]
        try:
            for step in steps:
                if step == name or self._serving(step) or self._find_quietly(step) is None:
                    continue  # the ensemble's own load says what is wrong with such a step
                try:
                    self.load_explicit(step, {}, as_step=True)
                except InvalidInput as exc:
                    if "circular dependency" in str(exc):
                        raise
                    raise InvalidInput(f"load failed for model '{name}': ensemble '{name}' depends on '{step}' "
                                       f"which has no loaded version. Model '{step}' loading failed with error: "
                                       f"{exc}") from None
        finally:
            self._explicit_chain.names = chain

    def _serving(self, name: str) -> bool:
        entry = self._models.get(name)
        return entry is not None and entry.latest_ready is not None

    def _find_quietly(self, name: str) -> Path | None:
        try:
            return self._find(name)
        except InvalidInput:
            return None

    def _ensembles_follow(self, name: str, ready: bool) -> None:
        """A model's readiness may have changed: ensembles that call it follow (a listener)."""
        for entry in list(self._models.values()):
            steps = config_steps(entry.config)
            if not entry.unloaded and steps and name in steps:
                self._hold_to_steps(entry)

    def _hold_to_steps(self, entry: ModelEntry) -> None:
        """Hold an ensemble's versions against the step models serving now.

        A serving ensemble whose step stopped serving, or no longer fits, becomes UNAVAILABLE with
        Triton's reason; one that is UNAVAILABLE because of its steps is loaded again (on a loader
        thread) once they fit, as Triton reloads an ensemble whose missing step model appears.
        Called when a step changes (`_ensembles_follow`) and when the ensemble's own load ends
        (`apply`): a step that changed while the ensemble was loading found it still LOADING, or
        not yet registered, so its notice passed it by. Without the second look an ensemble that
        came out blocked would stay UNAVAILABLE though its steps serve by now (poll mode loads
        every model at once, so this happens at startup), and one that came out READY would
        claim readiness with a step gone."""
        for model in list(entry.versions.values()):
            if not isinstance(model, EnsembleModel):
                continue
            if model.state is ModelState.READY:
                problem = model.steps_problem()
                if problem:
                    self._block(entry, model, problem)
            elif model.state is ModelState.UNAVAILABLE and model.blocked and not model.steps_problem():
                self._retry_ensemble(entry)
                return

    def _block(self, entry: ModelEntry, model: EnsembleModel, problem: str) -> None:
        def flip() -> None:
            model.state, model.reason, model.blocked = ModelState.UNAVAILABLE, problem, True
            entry.refresh_latest()

        self._on_loop(flip)
        log.warning("%s is UNAVAILABLE: %s", model.label, problem)
        self._notify(entry)

    def _retry_ensemble(self, entry: ModelEntry) -> None:
        """Load a blocked ensemble again, on a loader thread, from what its entry holds then.

        The look (still registered, not unloaded, still blocked) and the source (its config and
        override directory) are taken under the model's lock, with the load: an unload RPC, a
        poll's removal or a newer load may run between the notice that queued this and the
        retry, and a look taken before them would undo the unload (the ensemble READY again
        after the client was told it was unloaded), bring a removed model back, or load the
        config those replaced."""
        if self._closing:
            return

        def retry() -> None:
            with self._lock_for(entry.name):
                current = self._models.get(entry.name)
                if current is not entry or entry.unloaded or self._closing:
                    return
                if any(isinstance(m, EnsembleModel) and m.state is ModelState.UNAVAILABLE and m.blocked
                       for m in entry.versions.values()):
                    self._apply_locked(Source(snapshot_model(entry.path, entry.name), entry.config,
                                              override_dir=entry.override_dir))

        try:
            self.loader.submit(retry)
        except RuntimeError:  # the loaders are shut down (stopping)
            pass

    def unload_explicit(self, name: str, unload_dependents: bool = False) -> None:
        """RepositoryModelUnload: stop routing, wait for in-flight requests, release the model.

        `unload_dependents`, as Triton's dependency graph: the step models of an unloaded
        ensemble that were loaded only because an ensemble needed them (not by name) and that
        no other ensemble uses are unloaded too, and theirs in turn."""
        check_model_name(name)
        with self._lock_for(name):
            entry = self._unload_locked(name)
        if unload_dependents:
            self._unload_dependents_of(entry)

    def _unload_dependents_of(self, ensemble: ModelEntry) -> None:
        """Each step is looked at and unloaded under its own lock: a load by name of the step
        that lands between the look and the unload would otherwise be undone."""
        for step in dict.fromkeys(config_steps(ensemble.config) or ()):
            with self._lock_for(step):
                if not self._dependent_to_unload(step):
                    continue
                log.info("unloading model '%s': loaded for ensemble '%s', which no longer needs it",
                         step, ensemble.name)
                entry = self._unload_locked(step)
            self._unload_dependents_of(entry)

    def _unload_locked(self, name: str) -> ModelEntry:
        """`unload_explicit` of one model, with its lock held; the entry it unloaded."""
        entry = self._models.get(name)
        if entry is None:
            raise InvalidInput(f"failed to unload '{name}': Model to be unloaded has not been served")
        retire = [m for m in entry.versions.values() if m.state in (ModelState.READY, ModelState.LOADING)]

        def swap() -> None:
            for model in retire:
                model.state = ModelState.UNLOADING
            entry.versions = {v: m for v, m in entry.versions.items() if m in retire or m.reason == "unloaded"}
            entry.failures, entry.keys, entry.error, entry.unloaded = {}, {}, "", True
            entry.override_dir = None  # deleted once the unload below has finished
            entry.refresh_latest()

        self._on_loop(swap)
        self._notify(entry)
        for model in retire:
            model.unload(self.settings.exit_timeout_secs)
            log.info("unloaded model %s", model.label)
        self._cleanup_overrides()
        return entry

    def _dependent_to_unload(self, step: str) -> bool:
        """A step model loaded only for ensembles, none of which (loaded or not) still lists it."""
        entry = self._models.get(step)
        if entry is None or entry.unloaded or not entry.as_step:
            return False
        return not any(step in (config_steps(other.config) or ()) for other in self._models.values()
                       if not other.unloaded and other.name != step)

    def disk_names(self) -> set[str]:
        return super().disk_names() | self.remote.names()

    def _find(self, name: str) -> Path:
        check_model_name(name)
        try:
            self.remote.sync_model(name)
        except StoreError as exc:
            raise InvalidInput(f"failed to load '{name}', failed to poll from model repository: {exc}") from None
        try:
            found = [r for r in self.settings.model_repositories if (r / name).is_dir()]
            if len(found) > 1:
                raise InvalidInput(f"failed to load '{name}': {DUPLICATE} ({', '.join(map(str, found))})")
            path = find_model_dir(name, self.settings.model_repositories)
        except OSError as exc:  # e.g. a path too long for the filesystem: the client's name, not our fault
            raise InvalidInput(
                f"failed to load '{name}', failed to poll from model repository: {exc.strerror}"
            ) from None
        if path is None:
            raise InvalidInput(
                f"failed to load '{name}', failed to poll from model repository: no directory '{name}' in "
                f"{', '.join(map(str, self.settings.model_repositories))}"
            )
        return path

    def _fail_model(self, name: str, reason: str) -> None:
        self.load_failures[name] = self.load_failures.get(name, 0) + 1
        entry = ModelEntry(name=name, path=Path(), error=reason)
        self._on_loop(lambda: self._models.__setitem__(name, entry))
        log.error("model '%s' failed to load: %s", name, reason)
        self._notify(entry)

    # -- draining and shutdown --

    def _retire(self, retire: list[tuple[Model, str]]) -> None:
        if not retire:
            self._cleanup_overrides()
            return
        for model, why in retire:
            log.info("unloading model %s: %s (once its in-flight requests finish)", model.label, why)
            self._draining.add(model)

        def drain() -> None:
            for model, _ in retire:
                try:
                    model.unload(self.settings.exit_timeout_secs)
                    log.info("unloaded model %s", model.label)
                finally:
                    self._draining.discard(model)
            self._cleanup_overrides()

        thread = threading.Thread(target=drain, name="nereid-drain", daemon=True)
        with self._drains_lock:  # loader threads retire at once: no list update may be lost (unload_all joins it)
            thread.start()  # before it joins the list: another retire keeps only the threads alive
            self._drains = [t for t in self._drains if t.is_alive()] + [thread]

    def _cleanup_overrides(self) -> None:
        """Delete private override directories that no loaded or draining copy uses any more.

        Runs on drain threads and loader threads at once. A load's directory joins the set
        only after its swap, under the same lock as this look: added before, as it was, a
        cleanup in the hop to the event loop found it in the set but in no entry yet (a reload
        keeps its new copy out of the registry until the swap) and deleted the folder the new
        copy was about to serve from."""
        with self._overrides_lock:
            live = {m.spec.model_dir for e in list(self._models.values()) for m in list(e.versions.values())
                    if m.state is not ModelState.UNAVAILABLE}
            live.update(m.spec.model_dir for m in list(self._draining))
            live.update(e.override_dir for e in list(self._models.values()) if e.override_dir is not None)
            unused = self._override_dirs - live
            self._override_dirs -= unused
        for path in unused:
            remove_override_dir(path)

    def close(self) -> None:
        """No new actions from now on (shutdown); a mirror download in progress stops at its next file."""
        self._closing = True
        self.remote.stop()

    def unload_all(self, timeout: float | None = None) -> None:
        self._closing = True
        self.loader.shutdown(wait=True)
        with self._drains_lock:
            drains = list(self._drains)
        for thread in drains:
            thread.join(timeout)
        for entry in list(self._models.values()):
            for model in entry.versions.values():
                if model.state in (ModelState.READY, ModelState.UNLOADING) and model not in self._draining:
                    model.unload(timeout)
            entry.refresh_latest()
        for path in list(self._override_dirs):
            remove_override_dir(path)
        self.remote.close()

    def _report(self, entry: ModelEntry, outcome: Outcome) -> None:
        if outcome.error or outcome.failed:
            self.load_failures[entry.name] = self.load_failures.get(entry.name, 0) + 1
        for model in outcome.loaded:
            log.info("loaded model %s (backend %s)", model.label, model.config.backend)
        serving = sorted(entry.serving())
        still = f"still serving version(s) {', '.join(map(str, serving))}" if serving else \
            f"no version of '{entry.name}' is serving"
        if outcome.error:
            log.error("model '%s' failed to load: %s; %s", entry.name, outcome.error, still)
        for version, reason in sorted(outcome.failed.items()):
            log.error("model '%s' version %d failed to load: %s; %s", entry.name, version, reason, still)
