"""An ensemble's own config (`platform: "ensemble"`), checked before anything is loaded.

What can be checked from the ensemble's config alone is checked here, with Triton's messages
(core `model_config_utils.cc` ValidateEnsembleSchedulingConfig): no instance groups,
optimization or warmup, every step names a model and maps inputs and outputs, an ensemble
tensor is written by at most one step, and the data flow from the ensemble inputs reaches every
ensemble output with no tensor left dangling. Where Triton only says that an output "is not
written", the message also names a cycle when the tensors feeding it form one.

Checks that need the step models' configs (datatypes, shapes, batch sizes) run when the
ensemble loads, once its steps are loaded (server/core/ensemble_plan.py).
"""

from __future__ import annotations

from tritonclient.grpc import model_config_pb2 as mc

from server.errors import ConfigError

ENSEMBLE_PLATFORM = "ensemble"


def is_ensemble(config: mc.ModelConfig) -> bool:
    return config.platform == ENSEMBLE_PLATFORM


def step_models(config: mc.ModelConfig) -> list[str]:
    """The model names the ensemble's steps call, in step order, each once."""
    return list(dict.fromkeys(step.model_name for step in config.ensemble_scheduling.step if step.model_name))


def check_ensemble_config(config: mc.ModelConfig, where: str) -> None:
    """Raise ConfigError (prefixed with `where`, the config file) if the ensemble config is invalid."""
    problem = ensemble_config_problem(config)
    if problem:
        raise ConfigError(f"{where}: {problem}")


def ensemble_config_problem(config: mc.ModelConfig) -> str:
    """Triton's message for the first thing wrong with an ensemble config; '' if none."""
    name = config.name
    if config.HasField("ensemble_scheduling") and not is_ensemble(config):
        return (f"ensemble scheduling cannot be set for model '{name}' whose platform is not "
                f"{ENSEMBLE_PLATFORM}")
    if config.backend:
        return f"ensemble '{name}' must not specify a backend (got '{config.backend}')"
    if len(config.instance_group):
        return f"instance group should not be specified for ensemble '{name}'"
    if config.HasField("optimization"):
        return f"optimization should not be specified for ensemble '{name}'"
    if len(config.model_warmup):
        return f"model_warmup can not be specified for ensemble '{name}'"
    if config.WhichOneof("scheduling_choice") != "ensemble_scheduling" or not len(config.ensemble_scheduling.step):
        return f"must specify 'step' for ensemble '{name}'"
    producers: dict[str, int] = {}  # ensemble tensor -> the step that writes it
    consumers: dict[str, list[int]] = {}  # ensemble tensor -> the steps that read it
    for index, step in enumerate(config.ensemble_scheduling.step):
        for field in ("model_name", "input_map", "output_map"):
            if not len(getattr(step, field)):
                return f"must specify '{field}' in step {index} of ensemble '{name}'"
        if step.model_version < -1:
            return (f"step {index} of ensemble '{name}': model_version must be -1 (the latest) or a "
                    f"version number, got {step.model_version}")
        for tensor in step.output_map.values():
            if tensor in producers:
                return f"ensemble tensor '{tensor}' can appear in an output map only once for ensemble '{name}' " \
                       f"step {index}"
            producers[tensor] = index
        for tensor in step.input_map.values():
            consumers.setdefault(tensor, []).append(index)
    return _data_flow_problem(config, producers, consumers)


def _data_flow_problem(config: mc.ModelConfig, producers: dict[str, int], consumers: dict[str, list[int]]) -> str:
    """Walk the data flow from the ensemble inputs: which tensors can ever exist."""
    name = config.name
    steps = config.ensemble_scheduling.step
    known = set(producers) | set(consumers)
    for tensor in config.input:
        if tensor.name not in known:
            return f"ensemble input '{tensor.name}' for ensemble {name}' is not used"
        if tensor.name in producers:
            return (f"ensemble tensor '{tensor.name}' is an input of ensemble '{name}' and must not also be "
                    f"written by step {producers[tensor.name]}")
    ready = {t.name for t in config.input}
    done: set[int] = set()
    progress = True
    while progress:
        progress = False
        for index, step in enumerate(steps):
            if index not in done and all(t in ready for t in step.input_map.values()):
                done.add(index)
                ready.update(step.output_map.values())
                progress = True
    outputs = {t.name for t in config.output}
    for tensor in config.output:
        if tensor.name not in known:
            return f"ensemble output '{tensor.name}' for ensemble {name}' is not used"
        if tensor.name not in ready:
            message = f"output '{tensor.name}' for ensemble '{name}' is not written"
            source = _missing_source(tensor.name, producers, steps, ready)
            if source and source != tensor.name:
                message += f": at least one of its depending tensors, '{source}', is not connected"
            cycle = _cycle_through(tensor.name, producers, steps)
            if cycle:
                message += f" (ensemble tensors form a cycle: {' -> '.join(repr(t) for t in cycle)})"
            return message
    for tensor in sorted(known - outputs):
        if tensor not in ready or not consumers.get(tensor):
            return f"ensemble tensor '{tensor}' is unused in ensemble '{name}'"
    return ""


def _missing_source(tensor: str, producers: dict[str, int], steps, ready: set[str]) -> str:  # type: ignore[no-untyped-def]
    """Follow unready inputs upstream from `tensor` to the first one nothing writes (Triton's hint)."""
    seen: set[str] = set()
    current = tensor
    while True:
        seen.add(current)
        index = producers.get(current)
        if index is None:
            return current
        upstream = [t for t in sorted(steps[index].input_map.values()) if t not in ready and t not in seen]
        if not upstream:
            return current
        current = upstream[0]


def _cycle_through(tensor: str, producers: dict[str, int], steps) -> list[str]:  # type: ignore[no-untyped-def]
    """A cycle of ensemble tensors upstream of `tensor` (each written from the one before), or []."""
    path: list[str] = []
    on_path: set[str] = set()
    finished: set[str] = set()

    def visit(current: str) -> list[str]:
        if current in on_path:
            return path[path.index(current):] + [current]
        if current in finished:
            return []
        index = producers.get(current)
        if index is None:
            finished.add(current)
            return []
        path.append(current)
        on_path.add(current)
        for upstream in sorted(steps[index].input_map.values()):
            cycle = visit(upstream)
            if cycle:
                return cycle
        path.pop()
        on_path.discard(current)
        finished.add(current)
        return []

    cycle = visit(tensor)
    return list(reversed(cycle))
