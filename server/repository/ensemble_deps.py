"""Ensembles depend on their step models: what to load first, and what to load with them.

Triton keeps a dependency graph (core `model_repository_manager.cc`): an ensemble loads only
once its step models are loaded, loading an ensemble in explicit mode loads its step models
too, and ensembles that depend on each other in a circle fail with "circular dependency
between ensembles". The manager uses these helpers for startup, explicit loads and polls;
they read only configs on disk (a broken config is left for the load itself to report).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

from tritonclient.grpc import model_config_pb2 as mc

from server.repository.actions import Source
from server.repository.changes import snapshot_model
from server.repository.config import read_config
from server.repository.ensemble_config import is_ensemble, step_models


def source_steps(source: Source) -> list[str] | None:
    """The step models of the ensemble `source` would load; None if it is not an ensemble."""
    try:
        config = source.override if source.override is not None else read_config(source.snapshot.model_dir())
    except Exception:  # the load reports it
        return None
    return config_steps(config)


def config_steps(config: mc.ModelConfig | None) -> list[str] | None:
    if config is None or not is_ensemble(config):
        return None
    return step_models(config)


def with_steps(sources: Iterable[Source], serving: Callable[[str], bool],
               find: Callable[[str], Path | None]) -> list[Source]:
    """`sources` plus, for each ensemble among them, the step models (recursively) that are not
    serving yet and have a folder (`find`); a step without one is reported by the ensemble's load."""
    out = list(sources)
    names = {s.snapshot.name for s in out}
    index = 0
    while index < len(out):
        for step in source_steps(out[index]) or []:
            if step in names or serving(step):
                continue
            path = find(step)
            if path is not None:
                names.add(step)
                out.append(Source(snapshot_model(path, step)))
        index += 1
    return out


def load_waves(sources: Iterable[Source]) -> tuple[list[list[Source]], dict[str, str]]:
    """Sources in waves: every model in a wave depends only on models of earlier waves (or on
    models not being loaded now). Ensembles on a dependency cycle are left out, with the error."""
    remaining = {s.snapshot.name: s for s in sources}
    deps = {name: set(source_steps(source) or ()) - {name} for name, source in remaining.items()}
    waves: list[list[Source]] = []
    errors: dict[str, str] = {}
    while remaining:
        wave = [name for name in remaining if not deps[name] & remaining.keys()]
        if not wave:  # every remaining model waits on another: a cycle among them
            cycle = _cycle({n: deps[n] & remaining.keys() for n in remaining})
            message = "circular dependency between ensembles: " + " -> ".join(cycle)
            for name in dict.fromkeys(cycle):
                errors[name] = message
                del remaining[name]
            continue
        waves.append([remaining.pop(name) for name in sorted(wave)])
    return waves, errors


def _cycle(deps: dict[str, set[str]]) -> list[str]:
    """One cycle in `deps` (each model waits on another): [a, b, ..., a], each depending on the next."""
    start = min(deps)
    path = [start]
    while True:
        following = min(deps[path[-1]])
        if following in path:
            return path[path.index(following):] + [following]
        path.append(following)
