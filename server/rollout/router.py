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
import json
import logging
import os
import threading
from collections.abc import Callable, Coroutine
from pathlib import Path
from time import perf_counter
from typing import Any

import numpy as np

from server.core.model import Model
from server.core.state import ModelState
from server.rollout.policy import POLICY_FILENAME, PolicyError, parse_policy
from server.rollout.state import ModelRollout
from server.types import InferenceRequest

log = logging.getLogger("nereid.rollout")

STATE_FILENAME = ".rollout-state.json"

Lookup = Callable[[str, int], "Model | None"]  # (model, version) -> its READY copy, or None


class Prepared:
    """What a load read from the model folder: a rollout, an error, or nothing (no rollout.yaml)."""

    def __init__(self, rollout: ModelRollout | None = None, error: str = "", path: Path | None = None) -> None:
        self.rollout, self.error, self.path = rollout, error, path


def prepare(name: str, model_dir: Path) -> Prepared:
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
    rollout = ModelRollout(name, policy, hashlib.sha256(text).hexdigest())
    try:
        saved = json.loads((model_dir / STATE_FILENAME).read_text(encoding="utf-8"))
        if isinstance(saved, dict) and rollout.restore(saved):
            log.info("rollout of model '%s': restored saved decisions (weights %s)", name, rollout.weights)
    except (OSError, ValueError):
        pass
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
        """Persist the decisions off the loop (a tiny file; a failure is logged, the decision stands)."""
        path = self._paths.get(rollout.name)
        if path is None:
            return
        data = json.dumps(rollout.decisions(), indent=1)

        def write() -> None:
            target = path / STATE_FILENAME
            temporary = path / f"{STATE_FILENAME}.{os.getpid()}.tmp"
            try:
                temporary.write_text(data, encoding="utf-8")
                os.replace(temporary, target)
            except OSError as exc:
                log.warning("rollout of model '%s': could not save its decisions in %s: %s", rollout.name,
                            target, exc.strerror or exc)

        threading.Thread(target=write, name="nereid-rollout-save", daemon=True).start()

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
