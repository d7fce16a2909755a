"""An ensemble's steps checked against its step models' configs (pure; no I/O, no registry).

Runs when the ensemble loads (and again whenever one of its step models changes), since only
then are the step models' completed configs known. Triton's rules and messages (core
`ensemble_utils.cc` ValidateEnsembleConfig): every mapped input and output exists on the step
model, every required step input is mapped exactly once, no step maps two outputs to one
tensor, an ensemble tensor has one datatype and one shape wherever it appears (a -1 matches
anything; a batching model's [d...] matches a non-batching model's [-1, d...]), a step
model that batches allows at least the ensemble's max_batch_size, and no step mixes tensors
descending from different decoupled steps (`decoupled_flow`).
"""

from __future__ import annotations

from dataclasses import dataclass

from tritonclient.grpc import model_config_pb2 as mc

from server.core.signature import format_shape


@dataclass(frozen=True, slots=True)
class StepPlan:
    """One step: which model runs, and how its tensors map to ensemble tensors."""

    index: int
    model: str
    version: str  # "" for the latest ready version (model_version -1)
    inputs: tuple[tuple[str, str], ...]  # (step model input, ensemble tensor)
    outputs: tuple[tuple[str, str], ...]  # (step model output, ensemble tensor)

    @property
    def label(self) -> str:
        version = f" version {self.version}" if self.version else ""
        return f"step {self.index} (model '{self.model}'{version})"


def plan_steps(config: mc.ModelConfig) -> list[StepPlan]:
    return [
        StepPlan(index, step.model_name, "" if step.model_version < 0 else str(step.model_version),
                 tuple(sorted(step.input_map.items())), tuple(sorted(step.output_map.items())))
        for index, step in enumerate(config.ensemble_scheduling.step)
    ]


@dataclass(frozen=True, slots=True)
class _Node:
    """An ensemble tensor as one model sees it."""

    model: str
    datatype: int
    dims: tuple[int, ...]
    full_dims: tuple[int, ...]  # with the batch dim when that model batches

    @classmethod
    def of(cls, model: str, batching: bool, datatype: int, dims: tuple[int, ...]) -> _Node:
        return cls(model, datatype, dims, ((-1,) + dims) if batching else dims)


def _dims_match(a: tuple[int, ...], b: tuple[int, ...]) -> bool:
    return len(a) == len(b) and all(x == y or x == -1 or y == -1 for x, y in zip(a, b, strict=True))


def _consistency(seen: _Node, new: _Node, prefix: str) -> str:
    if seen.datatype != new.datatype:
        return (f"{prefix}inconsistent data type: {mc.DataType.Name(seen.datatype)} is inferred from model "
                f"{seen.model} while {mc.DataType.Name(new.datatype)} is inferred from model {new.model}")
    if not _dims_match(seen.dims, new.dims) and not _dims_match(seen.full_dims, new.full_dims):
        return (f"{prefix}inconsistent shape: {format_shape(seen.full_dims)} is inferred from model {seen.model} "
                f"while {format_shape(new.full_dims)} is inferred from model {new.model}")
    return ""


def _io_dims(tensor) -> tuple[int, ...]:  # type: ignore[no-untyped-def]
    return tuple(tensor.reshape.shape) if tensor.HasField("reshape") else tuple(tensor.dims)


def steps_problem(config: mc.ModelConfig, step_configs: dict[str, mc.ModelConfig]) -> str:
    """Triton's message for the first step that does not fit its model; '' when all fit.
    `step_configs` holds the completed config of every step model (by name)."""
    ensemble = config.name
    batching = config.max_batch_size > 0
    tensors: dict[str, _Node] = {}
    for tensor in list(config.input) + list(config.output):
        tensors[tensor.name] = _Node.of(ensemble, batching, tensor.data_type, _io_dims(tensor))
    for step in config.ensemble_scheduling.step:
        model = step.model_name
        step_config = step_configs[model]
        if step_config.max_batch_size and step_config.max_batch_size < config.max_batch_size:
            return (f"ensemble {ensemble} allows maximum batch size {config.max_batch_size}, but it contains "
                    f"model {model} which only allows maximum batch size to be {step_config.max_batch_size}")
        problem = _mapping_problem(ensemble, step, step_config, tensors)
        if problem:
            return problem
    return decoupled_flow(config, step_configs)[0]


def decoupled_flow(config: mc.ModelConfig, step_configs: dict[str, mc.ModelConfig]) -> tuple[str, bool]:
    """Whether the ensemble is decoupled (some step model is), and Triton's message when a step
    would mix tensors that came from different decoupled steps (or from one and the request):
    their responses could not be matched one to one. Triton labels each tensor with the
    decoupled step it descends from (core `ensemble_utils.cc` ValidateEnsembleConfig); a step
    (or the ensemble's outputs together) must see one label. Returns (problem or '', decoupled)."""
    ensemble = config.name
    label = {tensor.name: 0 for tensor in config.input}
    fresh = 0
    pending = list(config.ensemble_scheduling.step)
    while pending:
        ready = [step for step in pending if all(t in label for t in step.input_map.values())]
        if not ready:
            break  # not connected: the config checks report it
        for step in ready:
            pending.remove(step)
            sources = {label[t] for t in step.input_map.values()}
            if len(sources) > 1:
                return (f"in ensemble {ensemble}, step of model '{step.model_name}' receives inputs originated from "
                        "different decoupled models", False)
            out = min(sources, default=0)
            if step_configs[step.model_name].model_transaction_policy.decoupled:
                fresh += 1
                out = fresh
            for tensor in step.output_map.values():
                label[tensor] = out
    if len({label[t.name] for t in config.output if t.name in label}) > 1:
        return (f"in ensemble {ensemble}, step of model '{ensemble}' receives inputs originated from different "
                "decoupled models", False)
    return "", fresh > 0


def _mapping_problem(ensemble: str, step, step_config: mc.ModelConfig,  # type: ignore[no-untyped-def]
                     tensors: dict[str, _Node]) -> str:
    model = step.model_name
    batching = step_config.max_batch_size > 0
    inputs = {t.name: t for t in step_config.input}
    for model_input, tensor in sorted(step.input_map.items()):
        if model_input not in inputs:
            return (f"in ensemble {ensemble}, ensemble tensor {tensor} is mapping to non-existing input "
                    f"{model_input} in model {model}")
    for name, model_input in inputs.items():
        tensor = step.input_map.get(name)
        if tensor is None:
            if model_input.optional:
                continue
            return f"in ensemble {ensemble}, input {name} in model {model} is not mapped to any ensemble tensors"
        problem = _merge(tensors, tensor, _Node.of(model, batching, model_input.data_type,
                                                    tuple(model_input.dims)), ensemble)
        if problem:
            return problem
    outputs = {t.name: t for t in step_config.output}
    for model_output, tensor in sorted(step.output_map.items()):
        if model_output not in outputs:
            return (f"in ensemble {ensemble}, ensemble tensor {tensor} is mapped from non-existing output "
                    f"{model_output} in model {model}")
        out = outputs[model_output]
        problem = _merge(tensors, tensor, _Node.of(model, batching, out.data_type, tuple(out.dims)), ensemble)
        if problem:
            return problem
    return ""


def _merge(tensors: dict[str, _Node], tensor: str, node: _Node, ensemble: str) -> str:
    seen = tensors.get(tensor)
    if seen is None:
        tensors[tensor] = node
        return ""
    return _consistency(seen, node, f"in ensemble {ensemble}, ensemble tensor {tensor}: ")
