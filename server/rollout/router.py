"""Every model's rollout, held by the registry (the process that owns the models).

The registry reads `rollout.yaml` where it loads the model (`prepare`, on a loader
thread) and installs it with the swap (`install`, on the event loop). A request naming no
version is routed by `choose`; every inference of a model under a rollout goes through
`infer`, which times it, counts its errors (the rollback window) and sends shadow copies.
Decisions (rollback, promote, abort) are saved in `<model>/.rollout-state.json` (hidden, so
poll mode does not take it for a change) and restored when the same policy is loaded again,
after a restart or by another replica sharing the repository.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import threading
from collections.abc import Callable, Coroutine
from pathlib import Path
from time import perf_counter
from typing import Any

import numpy as np

from server.core.model import Model
from server.core.state import ModelState
from server.rollout.decisions import (
    STATE_FILENAME,
    Decision,
    StateWatcher,
    decisions_in,
    new_replica_id,
    read_state,
    write_state,
)
from server.rollout.policy import POLICY_FILENAME, PolicyError, parse_policy
from server.rollout.state import ModelRollout
from server.types import InferenceRequest

log = logging.getLogger("nereid.rollout")

__all__ = ["STATE_FILENAME", "Prepared", "Rollouts", "lookup_in", "prepare"]

Lookup = Callable[[str, int], "Model | None"]  # (model, version) -> its READY copy, or None


class Prepared:
    """What a load read from the model folder: a rollout, an error, or nothing (no rollout.yaml)."""

    def __init__(self, rollout: ModelRollout | None = None, error: str = "", path: Path | None = None) -> None:
        self.rollout, self.error, self.path = rollout, error, path


def prepare(name: str, model_dir: Path, replica: str = "local") -> Prepared:
    """Read and check `<model_dir>/rollout.yaml` and the decisions saved for it (loader thread)."""
    path = model_dir / POLICY_FILENAME
    try:
        text = path.read_bytes()
    except FileNotFoundError:
        return Prepared()
    except OSError as exc:
        return Prepared(error=f"{POLICY_FILENAME} ignored: cannot read it: {exc.strerror or exc}")
    try:
        import yaml

        policy = parse_policy(yaml.safe_load(text))
    except (PolicyError, ValueError) as exc:
        return Prepared(error=f"{POLICY_FILENAME} ignored: {exc}")
    except Exception as exc:  # yaml.YAMLError and kin
        return Prepared(error=f"{POLICY_FILENAME} ignored: not valid YAML: {exc}")
    rollout = ModelRollout(name, policy, hashlib.sha256(text).hexdigest(), replica=replica)
    saved = read_state(model_dir)
    decisions = decisions_in(saved, rollout.digest)
    if decisions is not None:
        restored = bool(rollout.merge(decisions, count=False))
    else:  # a file written before format 2 (or none)
        restored = isinstance(saved, dict) and rollout.restore(saved)
    if restored:
        log.info("rollout of model '%s': restored saved decisions (weights %s)", name, rollout.weights)
    return Prepared(rollout, path=model_dir)


def _agree(expected: dict[str, np.ndarray], got: dict[str, np.ndarray], atol: float, rtol: float) -> bool:
    for name, want in expected.items():
        have = got.get(name)
        if have is None or have.shape != want.shape:
            return False
        if want.dtype.kind in "OSUVb" or (atol == 0 and rtol == 0):
            if not np.array_equal(want, have):
                return False
        elif not np.allclose(want, have, rtol=rtol, atol=atol, equal_nan=True):
            return False
    return True


class Rollouts:
    """Rollouts by model name, with the lookups they need from the registry."""

    def __init__(self, lookup: Lookup) -> None:
        self._lookup = lookup
        self._models: dict[str, ModelRollout] = {}
        self.errors: dict[str, str] = {}  # model -> why its rollout.yaml is ignored
        self._paths: dict[str, Path] = {}
        self._shadow_tasks: set[asyncio.Task[None]] = set()
        self._shadow_inflight: dict[str, int] = {}
        self.replica = new_replica_id()  # this server in the shared decision log (decisions.py)
        self._watcher = StateWatcher()

    # -- configuration (the registry's swap, on the event loop) --

    def install(self, name: str, prepared: Prepared) -> None:
        current = self._models.get(name)
        self.errors.pop(name, None)
        if prepared.error:
            self.errors[name] = prepared.error
            log.error("model '%s': %s", name, prepared.error)
        new = prepared.rollout
        if new is None:
            self._models.pop(name, None)
            return
        if current is not None and current.digest == new.digest:
            return  # the same policy: keep its live state and counters
        if prepared.path is not None:
            self._paths[name] = prepared.path
        new.on_change = self._save
        self._models[name] = new
        log.info("rollout of model '%s': weights %s, stable %d, shadow %s", name, new.weights, new.stable,
                 list(new.policy.shadows) or "none")

    def forget(self, name: str) -> None:
        self._models.pop(name, None)
        self.errors.pop(name, None)

    def _save(self, rollout: ModelRollout) -> None:
        """Merge the decisions into the shared file off the loop (a failure is logged, the decision stands)."""
        path = self._paths.get(rollout.name)
        if path is None:
            return
        mine = list(rollout.log.values())  # Decisions are frozen: the snapshot is safe to hand over

        def write() -> None:
            try:
                write_state(path, rollout.digest, mine, rollout.summary)
            except OSError as exc:
                log.warning("rollout of model '%s': could not save its decisions in %s: %s", rollout.name,
                            path / STATE_FILENAME, exc.strerror or exc)

        threading.Thread(target=write, name="nereid-rollout-save", daemon=True).start()

    # -- decisions of other replicas (the shared file, watched) --

    async def watch(self, interval: float) -> None:
        """Every `interval` seconds, stat each rollout's state file (on a thread) and apply what
        other replicas decided. Runs until cancelled."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(interval)
            dirs = {n: self._paths[n] for n in self._models if n in self._paths}
            try:
                changed = await loop.run_in_executor(None, self._watcher.scan, dirs)
            except Exception:
                log.exception("rollout: looking at the shared decision files failed; trying again")
                continue
            for name, data in changed:
                self.apply_saved(name, data)

    def apply_saved(self, name: str, data: Any) -> list[Decision]:
        """Apply the decisions a (re)read state file holds for the model's current policy; write
        ours back when the file lacks some (a writer that raced without the lock)."""
        rollout = self._models.get(name)
        if rollout is None:
            return []
        decisions = decisions_in(data, rollout.digest)
        new = rollout.merge(decisions or [])
        for d in new:
            if d.replica == self.replica:
                continue
            versions = ", ".join(map(str, d.versions)) or "none"
            what = {"rollback": f"rollback of version {versions}", "abort": f"abort (version(s) {versions} to 0)",
                    "promote": f"promotion of version {versions} {d.why}"}[d.kind]
            overruled = d.kind == "promote" and d.versions[0] != rollout.stable
            log.warning("rollout of model '%s': applied %s decided by another replica (%s)%s%s", name, what,
                        d.replica, f": {d.why}" if d.kind == "rollback" else "",
                        " -- overruled: a rollback or abort of that version it had not seen" if overruled else "",
                        extra={"model": name})
        if new:
            log.info("rollout of model '%s': weights now %s, stable %d", name, rollout.weights, rollout.stable)
        known = {d.id for d in decisions or ()}
        if any(d not in known for d in rollout.log if not d.startswith("legacy/")):
            self._save(rollout)
        return new

    # -- queries --

    def get(self, name: str) -> ModelRollout | None:
        return self._models.get(name)

    def all(self) -> list[ModelRollout]:
        return [self._models[n] for n in sorted(self._models)]

    def ready(self, name: str) -> Callable[[int], bool]:
        return lambda version: self._lookup(name, version) is not None

    def choose(self, name: str, key: str | None) -> Model | None:
        """The version for a request naming none, or None to fall back to the default (latest ready)."""
        rollout = self._models.get(name)
        if rollout is None:
            return None
        version = rollout.choose(self.ready(name), key)
        return None if version is None else self._lookup(name, version)

    def reason(self, name: str, version: int) -> str:
        rollout = self._models.get(name)
        if rollout is None:
            return self.errors.get(name, "")
        return rollout.reason(version, self.ready(name))

    # -- the request path --

    def infer(self, model: Model, request: InferenceRequest) -> Coroutine[Any, Any, dict[str, np.ndarray]]:
        """`model.infer(request)`, observed when the model is under a rollout (else exactly that)."""
        rollout = self._models.get(model.name)
        if rollout is None:
            return model.infer(request)
        return self._observed(rollout, model, request)

    async def _observed(self, rollout: ModelRollout, model: Model, request: InferenceRequest
                        ) -> dict[str, np.ndarray]:
        started = perf_counter()
        try:
            outputs = await model.infer(request)
        except asyncio.CancelledError:
            raise
        except Exception:
            rollout.observe(model.version, perf_counter() - started, False)
            raise
        rollout.observe(model.version, perf_counter() - started, True)
        if rollout.policy.shadows and not request.classification and request.sink is None:
            self._shadow(rollout, model, request, outputs)
        return outputs

    def _shadow(self, rollout: ModelRollout, primary: Model, request: InferenceRequest,
                outputs: dict[str, np.ndarray]) -> None:
        """Send a copy to each READY shadow version; never awaited by the client's request."""
        limit = rollout.policy.shadow.max_inflight
        for version in rollout.policy.shadows:
            if version == primary.version:
                continue
            target = self._lookup(rollout.name, version)
            if target is None:
                continue
            stats = rollout.stats[version]
            if self._shadow_inflight.get(rollout.name, 0) >= limit:
                stats.shadow_dropped += 1
                continue
            copy = InferenceRequest(inputs=request.inputs, batch_size=request.batch_size, id=request.id,
                                    requested_outputs=request.requested_outputs, parameters=request.parameters)
            self._shadow_inflight[rollout.name] = self._shadow_inflight.get(rollout.name, 0) + 1
            task = asyncio.get_running_loop().create_task(self._run_shadow(rollout, target, copy, outputs))
            self._shadow_tasks.add(task)
            task.add_done_callback(self._shadow_tasks.discard)

    async def _run_shadow(self, rollout: ModelRollout, target: Model, request: InferenceRequest,
                          expected: dict[str, np.ndarray]) -> None:
        stats = rollout.stats[target.version]
        started = perf_counter()
        try:
            got = await target.infer(request)
        except Exception:
            stats.shadow_errors += 1
            return
        finally:
            self._shadow_inflight[rollout.name] -= 1
        stats.shadow_latency.observe(perf_counter() - started)
        stats.shadow_compared += 1
        shadow = rollout.policy.shadow
        try:
            if _agree(expected, got, shadow.atol, shadow.rtol):
                stats.shadow_agreed += 1
        except (TypeError, ValueError):  # outputs that cannot be compared do not agree
            pass


def lookup_in(models: Callable[[str], Any]) -> Lookup:
    """A Lookup over the registry's entries: the READY copy of (model, version), or None."""
    def lookup(name: str, version: int) -> Model | None:
        entry = models(name)
        if entry is None:
            return None
        model: Model | None = entry.versions.get(version)
        return model if model is not None and model.state is ModelState.READY else None

    return lookup
