"""Read `config.pbtxt`, fill Triton's defaults ONCE, validate. Every other module trusts the result.

Auto-complete follows Triton: the backend is guessed from the model file name,
and missing inputs/outputs (and max_batch_size) are read from the model file
through the backend's `describe`.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence

from google.protobuf import json_format, text_format
from tritonclient.grpc import model_config_pb2 as mc

from backends.base import Signature, TensorSpec
from backends.datatypes import PROTOCOL_NAMES, config_to_protocol, protocol_to_config
from backends.registry import (
    BACKEND_PLATFORM,
    DEFAULT_FILENAME,
    PLATFORM_BACKEND,
    backend_class,
    backend_for_file,
    gpu_unusable,
    supports_gpu,
)
from server.confine import require_regular
from server.core.placement import resolve_kind, visible_gpus
from server.core.sequence_config import normalize as normalize_sequence_batching
from server.errors import ConfigError
from server.repository.config_paths import check_config_paths
from server.repository.ensemble_config import check_ensemble_config, is_ensemble
from server.repository.layout import ModelDir
from server.settings import Settings

log = logging.getLogger("nereid.config")

# Nereid's bound on a model version's instances (Triton has none): a config or load override
# asking for 100,000 would otherwise exhaust the process's threads.
MAX_INSTANCES = 512

# Triton's default instance count on CPU: 2 for ONNX Runtime, 1 elsewhere.
_DEFAULT_CPU_COUNT = {"onnxruntime": 2}


def parse_config_text(text: str, source: str) -> mc.ModelConfig:
    """Parse protobuf text format; the error names the file, line and column."""
    config = mc.ModelConfig()
    try:
        text_format.Parse(text, config)
    except text_format.ParseError as exc:
        raise ConfigError(f"{source}: {exc}") from exc
    return config


def read_config(model_dir: ModelDir) -> mc.ModelConfig:
    """The config on disk, or an empty one when the model has no config.pbtxt."""
    path = model_dir.config_path
    if not require_regular(path, "config file", str(path)):  # a FIFO here would hang the loader
        return mc.ModelConfig()
    return parse_config_text(path.read_text(encoding="utf-8"), str(path))


def config_from_json(text: str, source: str) -> mc.ModelConfig:
    """A config given as JSON (the load API's `config` override)."""
    config = mc.ModelConfig()
    try:
        json_format.Parse(text, config)
    except (json_format.ParseError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{source}: {exc}") from exc
    return config


def select_versions(config: mc.ModelConfig, available: tuple[int, ...]) -> list[int]:
    """Which of the versions on disk the version policy serves (ascending)."""
    policy = config.version_policy
    which = policy.WhichOneof("policy_choice")
    if which == "all":
        return list(available)
    if which == "specific":
        wanted = set(policy.specific.versions)
        return [v for v in available if v in wanted]
    count = policy.latest.num_versions if which == "latest" else 1
    return list(available[-max(count, 1):]) if available else []


def _fill_backend_fields(config: mc.ModelConfig, model_dir: ModelDir) -> None:
    if config.platform and not config.backend:
        backend = PLATFORM_BACKEND.get(config.platform)
        if backend is None and config.platform != "ensemble":
            raise ConfigError(
                f"{model_dir.config_path}: unknown platform '{config.platform}'; "
                f"known: {', '.join(sorted(PLATFORM_BACKEND))}"
            )
        config.backend = backend or ""
    if not config.backend:
        config.backend = _guess_backend(model_dir)
    if not config.platform and config.backend in BACKEND_PLATFORM:
        config.platform = BACKEND_PLATFORM[config.backend]
    if not config.default_model_filename:
        config.default_model_filename = DEFAULT_FILENAME.get(config.backend, "")


def _guess_backend(model_dir: ModelDir) -> str:
    """Triton's rule: look at the file names in the first numeric version folder."""
    if not model_dir.versions:
        raise ConfigError(
            f"{model_dir.path}: no backend or platform in config and no version folder to guess it from"
        )
    first = model_dir.version_dir(model_dir.versions[0])
    for entry in sorted(os.listdir(first)):
        backend = backend_for_file(entry)
        if backend is not None:
            return backend
    raise ConfigError(
        f"{model_dir.config_path}: no 'backend' or 'platform' given and no model file in {first} "
        f"to guess it from (expected one of {', '.join(sorted(DEFAULT_FILENAME.values()))})"
    )


def _io_entries(specs: tuple[TensorSpec, ...], batching: bool) -> list[dict]:
    entries = []
    for spec in specs:
        dims = list(spec.dims[1:] if batching else spec.dims)
        entry: dict = {"name": spec.name, "data_type": protocol_to_config(spec.datatype)}
        if dims:
            entry["dims"] = dims
        else:  # a scalar per batch item: Triton uses dims [1] with an empty reshape
            entry["dims"] = [1]
            entry["reshape"] = {"shape": []}
        entries.append(entry)
    return entries


def _auto_complete_io(config: mc.ModelConfig, model_dir: ModelDir, settings: Settings) -> None:
    if len(config.input) and len(config.output):
        return
    if not model_dir.versions:
        return
    cls = backend_class(config.backend)
    model_file = model_dir.version_dir(model_dir.versions[-1]) / config.default_model_filename
    if not model_file.exists():
        return  # the load reports the missing file for the version concerned
    try:
        signature: Signature | None = cls.describe(model_file)
    except Exception as exc:  # a broken model file: say which
        raise ConfigError(f"{model_file}: unable to auto-complete config: {exc}") from exc
    if signature is None:
        raise ConfigError(
            f"{model_dir.config_path}: backend '{config.backend}' cannot read inputs/outputs from "
            f"its model file; list every input and output in config.pbtxt"
        )
    tensors = signature.inputs + signature.outputs
    batchable = bool(tensors) and all(t.dims and t.dims[0] == -1 for t in tensors)
    if signature.max_batch_size is not None:
        batchable = signature.max_batch_size > 0
    if config.max_batch_size > 0 and not batchable:
        raise ConfigError(
            f"{model_dir.config_path}: autofill failed for model '{config.name}': max_batch_size is "
            f"{config.max_batch_size} but the model's first dimensions are not all variable (-1), "
            "so it cannot batch; set max_batch_size: 0"
        )
    if config.max_batch_size == 0 and batchable and not len(config.input) and not len(config.output):
        default = int(settings.backend_setting(config.backend, "default-max-batch-size", "4"))
        if signature.max_batch_size is not None:
            default = signature.max_batch_size
        config.max_batch_size = default
        log.warning("model '%s': auto-completed max_batch_size to %d", config.name, default)
    batching = config.max_batch_size > 0
    patch: dict = {}
    if not len(config.input):
        patch["input"] = _io_entries(signature.inputs, batching)
    if not len(config.output):
        patch["output"] = _io_entries(signature.outputs, batching)
    json_format.ParseDict(patch, config)
    if batching and config.max_batch_size > 1 and config.WhichOneof("scheduling_choice") is None:
        config.dynamic_batching.SetInParent()


def _fill_instance_groups(config: mc.ModelConfig, visible: Sequence[int] | None = None) -> None:
    """Name every group, resolve KIND_AUTO to where the instances will really run (so the
    ModelConfig RPC tells the truth), list the GPUs of KIND_GPU groups, default the counts.
    A KIND_GPU group on a machine without GPUs is left as is: the load fails with a reason.
    KIND_AUTO (the default group too) stays on the CPU where the backend's framework cannot use
    the visible GPU (a CPU onnxruntime on a GPU machine), with a warning, instead of a failed load."""
    if visible is None:
        visible = visible_gpus()
    if not len(config.instance_group):
        config.instance_group.add()
    uses_gpu = supports_gpu(config.backend)
    if uses_gpu and visible and any(g.kind == mc.ModelInstanceGroup.KIND_AUTO for g in config.instance_group):
        reason = gpu_unusable(config.backend)
        if reason is not None:
            uses_gpu = False
            log.warning("model '%s': its KIND_AUTO instances run on the CPU although a GPU is visible: %s",
                        config.name, reason)
    for index, group in enumerate(config.instance_group):
        if not group.name:
            group.name = f"{config.name}_{index}"
        group.kind = resolve_kind(group.kind, group.gpus, visible, uses_gpu)
        if group.kind == mc.ModelInstanceGroup.KIND_GPU and not len(group.gpus):
            group.gpus.extend(visible)
        if group.count < 1:
            cpu = group.kind != mc.ModelInstanceGroup.KIND_GPU
            group.count = _DEFAULT_CPU_COUNT.get(config.backend, 1) if cpu else 1
    total = sum(g.count * max(len(g.gpus), 1) for g in config.instance_group)
    if total > MAX_INSTANCES:
        raise ConfigError(
            f"model '{config.name}': instance_group asks for {total} instances; at most {MAX_INSTANCES} per model "
            "(each is a thread, a Python model's also a process)")


def _validate_tensors(config: mc.ModelConfig, where: str) -> None:
    for kind, tensors in (("input", config.input), ("output", config.output)):
        seen: set[str] = set()
        for tensor in tensors:
            if not tensor.name:
                raise ConfigError(f"{where}: an {kind} has no name")
            if tensor.name in seen:
                raise ConfigError(f"{where}: {kind} '{tensor.name}' is declared twice")
            seen.add(tensor.name)
            type_name = mc.DataType.Name(tensor.data_type)
            if config_to_protocol(type_name) not in PROTOCOL_NAMES:
                raise ConfigError(f"{where}: {kind} '{tensor.name}' has no valid data_type (got {type_name})")
            if not len(tensor.dims):
                raise ConfigError(
                    f"{where}: {kind} '{tensor.name}' has empty dims; use dims: [ 1 ] with "
                    "reshape: { shape: [ ] } for a scalar"
                )
            if any(d < -1 for d in tensor.dims):
                raise ConfigError(f"{where}: {kind} '{tensor.name}' has invalid dims {list(tensor.dims)}")
            if tensor.HasField("reshape") and -1 not in tensor.dims and -1 not in tensor.reshape.shape:
                want, got = _count(tensor.dims), _count(tensor.reshape.shape)
                if want != got:
                    raise ConfigError(
                        f"{where}: {kind} '{tensor.name}': reshape {list(tensor.reshape.shape)} has "
                        f"{got} elements but dims {list(tensor.dims)} have {want}"
                    )
    # A Python model may take no inputs at all (it makes its outputs from nothing), as in Triton.
    if (not len(config.input) and config.backend != "python") or not len(config.output):
        raise ConfigError(f"{where}: model '{config.name}' must declare at least one input and one output")


def _count(dims) -> int:  # type: ignore[no-untyped-def]
    total = 1
    for d in dims:
        total *= d
    return total


def load_model_config(
    model_dir: ModelDir, settings: Settings, override: mc.ModelConfig | None = None
) -> mc.ModelConfig:
    """Read (or take) a model's config, auto-complete it and fill every default."""
    config = mc.ModelConfig()
    config.CopyFrom(override if override is not None else read_config(model_dir))
    where = str(model_dir.config_path)
    if not config.name:
        config.name = model_dir.name
    elif config.name != model_dir.name:
        raise ConfigError(f"{where}: config name '{config.name}' does not match directory '{model_dir.name}'")
    if config.max_batch_size < 0:
        raise ConfigError(f"{where}: max_batch_size must be >= 0, got {config.max_batch_size}")
    if is_ensemble(config) or config.HasField("ensemble_scheduling"):  # no backend, files or instances
        check_ensemble_config(config, where)
        _fill_version_policy(config)
        _validate_tensors(config, where)
        return config
    _fill_backend_fields(config, model_dir)
    # Before auto-complete opens the model file: every file the config names is confined here.
    check_config_paths(config, model_dir, where)
    if not settings.disable_auto_complete_config:
        _auto_complete_io(config, model_dir, settings)
    _fill_instance_groups(config)
    _fill_version_policy(config)
    normalize_sequence_batching(config)
    _validate_tensors(config, where)
    return config


def _fill_version_policy(config: mc.ModelConfig) -> None:
    if config.version_policy.WhichOneof("policy_choice") is None:
        config.version_policy.latest.num_versions = 1

