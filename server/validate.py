"""`nereid validate PATH...`: check a model repository without serving it.

Operators run it in CI before dropping a version into a live repository. It
uses the same code the server loads with (config normalisation, version
policy, warmup sample building, Model.load), so what it accepts loads; on top
it compares the config with what the model file itself declares. Every
problem is one line naming the file, `<path>: error: <what>`; the exit status
is 1 when there is any error, 0 otherwise (warnings alone do not fail).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from tritonclient.grpc import model_config_pb2 as mc

from backends.base import Backend, Signature, TensorSpec
from backends.registry import backend_class
from server.core.ensemble_plan import steps_problem
from server.core.model import Model
from server.core.signature import TensorInfo
from server.core.spec import tensor_specs
from server.core.warmup import build_samples
from server.repository.config import load_model_config, select_versions
from server.repository.ensemble_config import is_ensemble, step_models
from server.repository.layout import ModelDir, is_version_name, scan_model_dir
from server.settings import Settings


@dataclass(frozen=True)
class Problem:
    path: Path
    message: str
    severity: str = "error"  # or "warning"

    def line(self) -> str:
        message = self.message
        prefix = f"{self.path}: "
        if message.startswith(prefix):  # config errors already name their file
            message = message[len(prefix):]
        return f"{self.path}: {self.severity}: {message}"


def _compatible(config_dims: tuple[int, ...], model_dims: tuple[int, ...]) -> bool:
    return len(config_dims) == len(model_dims) and all(
        a == -1 or b == -1 or a == b for a, b in zip(config_dims, model_dims, strict=True))


def _check_signature(config: mc.ModelConfig, model_file: Path, signature: Signature) -> Iterator[Problem]:
    """The config's tensors against the model file's own: names, datatypes, dims."""
    lead = (-1,) if config.max_batch_size > 0 else ()
    for kind, specs, actual in (("input", tensor_specs(config.input), signature.inputs),
                                ("output", tensor_specs(config.output), signature.outputs)):
        by_name = {t.name: t for t in actual}
        for spec in specs:
            found: TensorSpec | None = by_name.get(spec.name)
            if found is None:
                yield Problem(model_file, f"config {kind} '{spec.name}' is not in the model; its {kind}s are "
                                          f"{sorted(by_name)}")
                continue
            if found.datatype != spec.datatype:
                yield Problem(model_file, f"{kind} '{spec.name}': config says {spec.datatype}, the model has "
                                          f"{found.datatype}")
            dims = lead + (spec.reshape if spec.reshape is not None else spec.dims)
            if found.dims and not _compatible(dims, found.dims):
                yield Problem(model_file, f"{kind} '{spec.name}': config shape {list(dims)} (batch dim included) "
                                          f"does not fit the model's {list(found.dims)}")


def _check_version(model_dir: ModelDir, config: mc.ModelConfig, cls: type[Backend], version: int,
                   load: bool) -> Iterator[Problem]:
    version_dir = model_dir.version_dir(version)
    model_file = version_dir / config.default_model_filename
    if cls.needs_model_file:
        if not model_file.exists():
            yield Problem(model_file, "model file does not exist")
            return
        try:
            signature = cls.describe(model_file)
        except Exception as exc:
            if not load:
                yield Problem(model_file, f"cannot read the model file: {exc}")
                return
            signature = None  # the load below is the authority, and says why it fails
        mismatches = list(_check_signature(config, model_file, signature)) if signature is not None else []
        if mismatches:  # a load would only fail again for the same reason
            yield from mismatches
            return
    if load:
        model = Model(config, model_dir.path, version)
        try:
            model.load()
        except Exception as exc:
            yield Problem(version_dir, f"does not load on this machine: {model.reason or exc}")
            return
        model.unload(5.0)


def _check_ensemble(model_dir: ModelDir, config: mc.ModelConfig, settings: Settings) -> Iterator[Problem]:
    """An ensemble: a version folder, and steps that exist and fit their models' configs (the
    step models' own problems are reported under their own names)."""
    if not select_versions(config, model_dir.versions):
        yield Problem(model_dir.path, f"the version policy selects none of the version folders "
                                      f"{list(model_dir.versions) or '(none)'} (an ensemble needs an empty "
                                      "version folder, e.g. 1/)")
    configs: dict[str, mc.ModelConfig] = {}
    missing = []
    for step in step_models(config):
        found = [r / step for r in settings.model_repositories if (r / step).is_dir()]
        if not found:
            missing.append(step)
            continue
        try:
            configs[step] = load_model_config(scan_model_dir(found[0]), settings)
        except Exception:
            return  # reported as that model's own problem
    if missing:
        yield Problem(model_dir.config_path, f"ensemble {config.name} contains models that are not available: "
                                             f"{', '.join(missing)}")
        return
    problem = steps_problem(config, configs)
    if problem:
        yield Problem(model_dir.config_path, problem)


def check_model(model_dir: ModelDir, settings: Settings, load: bool) -> Iterator[Problem]:
    for entry in sorted(os.listdir(model_dir.path)):
        path = model_dir.path / entry
        if path.is_dir() and entry[:1].isdigit() and not is_version_name(entry):
            yield Problem(path, "ignored: version folders are decimal numbers without a leading zero", "warning")
    config_file = model_dir.config_path
    try:
        config = load_model_config(model_dir, settings)
    except Exception as exc:
        yield Problem(config_file, str(exc))
        return
    if is_ensemble(config):
        yield from _check_ensemble(model_dir, config, settings)
        return
    try:
        cls = backend_class(config.backend)
    except Exception as exc:
        yield Problem(config_file, str(exc))
        return
    mbs = config.max_batch_size
    optional = {t.name for t in config.input if t.optional}
    inputs = {s.name: TensorInfo.from_spec(s, mbs, s.name in optional) for s in tensor_specs(config.input)}
    try:
        build_samples(config.model_warmup, inputs, model_dir.path, mbs, str(config_file))
    except Exception as exc:
        yield Problem(config_file, str(exc))
        load = False  # the load would fail again in its warmup
    versions = select_versions(config, model_dir.versions)
    if not versions:
        yield Problem(model_dir.path, f"the version policy selects none of the version folders "
                                      f"{list(model_dir.versions) or '(none)'}")
    for version in versions:
        yield from _check_version(model_dir, config, cls, version, load)


def validate(settings: Settings, load: bool = True) -> tuple[int, list[Problem]]:
    """(number of models checked, problems) for every repository in `settings`."""
    problems: list[Problem] = []
    seen: dict[str, Path] = {}
    checked = 0
    for repository in settings.model_repositories:
        if not repository.is_dir():
            problems.append(Problem(repository, "model repository is not a directory"))
            continue
        for path in sorted(p for p in repository.iterdir() if p.is_dir() and not p.name.startswith(".")):
            if path.name in seen:
                problems.append(Problem(path, f"model '{path.name}' also appears in {seen[path.name]}; "
                                              "model names must be unique across repositories"))
                continue
            seen[path.name] = path
            checked += 1
            problems.extend(check_model(scan_model_dir(path), settings, load))
    return checked, problems


def run_validate(settings: Settings, load: bool = True, out: TextIO | None = None) -> int:
    """Print one line per problem and a summary; 1 if any error, else 0."""
    stream = out or sys.stdout
    checked, problems = validate(settings, load)
    for problem in problems:
        print(problem.line(), file=stream)
    errors = sum(1 for p in problems if p.severity == "error")
    warnings = len(problems) - errors
    print(f"checked {checked} model(s) in {', '.join(map(str, settings.model_repositories))}: "
          f"{errors} error(s), {warnings} warning(s)", file=stream)
    return 1 if errors else 0
