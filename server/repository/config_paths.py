"""Every file a model config names, checked once during config normalisation.

A config (config.pbtxt, or a load's JSON override) can name files in several fields
of model_config.proto; each must lie inside the model's own folder, symlinks followed
(server/confine.py), and the ones Nereid may read must be regular files. This runs in
`load_model_config` before auto-complete reads a model file, so no backend, warmup or
auto-complete ever opens a path a config named without it being checked here.

Where each field's relative names start, as in Triton: `default_model_filename` and
`cc_model_filenames` in each version folder, `label_filename` in the model folder,
warmup `input_data_file` in `<model>/warmup/`, sequence `initial_state` `data_file` in
`<model>/initial_state/`, `model_operations.op_library_filename` in the model folder,
and the Python backend's `EXECUTION_ENV_PATH` after Triton's `$$TRITON_MODEL_DIRECTORY`
substitution. `runtime` names a backend library, never a model file: it must be a
plain file name.
"""

from __future__ import annotations

from pathlib import Path

from tritonclient.grpc import model_config_pb2 as mc

from server.confine import confine, require_regular
from server.core.sequence_config import INITIAL_STATE_DIR
from server.core.warmup import WARMUP_DIR
from server.errors import ConfigError
from server.repository.layout import ModelDir

EXECUTION_ENV_PATH = "EXECUTION_ENV_PATH"
# Replaced by the model's folder in EXECUTION_ENV_PATH (first occurrence), as Triton's python
# backend does (triton-inference-server/python_backend, src/python_be.cc, ModelState::ModelState).
MODEL_DIRECTORY_KEYWORD = "$$TRITON_MODEL_DIRECTORY"


def check_config_paths(config: mc.ModelConfig, model_dir: ModelDir, where: str) -> None:
    """Raise ConfigError (INVALID_ARGUMENT) for any file the config names outside the model's
    folder, or that exists inside it but is not a regular file."""
    try:
        _check(config, model_dir)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def _check(config: mc.ModelConfig, model_dir: ModelDir) -> None:
    root = model_dir.path
    for version in model_dir.versions:
        if config.default_model_filename:
            _file(root, config.default_model_filename, "default_model_filename", base=str(version))
        for capability, name in sorted(config.cc_model_filenames.items()):
            _file(root, name, f"cc_model_filenames['{capability}']", base=str(version))
    for output in config.output:
        if output.label_filename:
            _file(root, output.label_filename, f"output '{output.name}' label_filename")
    for index, warmup in enumerate(config.model_warmup):
        for name, spec in sorted(warmup.inputs.items()):
            if spec.WhichOneof("input_data_type") == "input_data_file":
                field = f"model_warmup '{warmup.name or index}' input '{name}' input_data_file"
                if not spec.input_data_file:
                    raise ConfigError(f"{field} is empty; name a file inside <model>/{WARMUP_DIR}/")
                _file(root, spec.input_data_file, field, base=WARMUP_DIR, keep_in_base=True)
    if config.WhichOneof("scheduling_choice") == "sequence_batching":
        for state in config.sequence_batching.state:
            for initial in state.initial_state:
                if initial.WhichOneof("state_data") == "data_file":
                    field = f"sequence_batching state '{state.input_name}' initial_state data_file"
                    _file(root, initial.data_file, field, base=INITIAL_STATE_DIR, keep_in_base=True)
    for library in config.model_operations.op_library_filename:
        _file(root, library, "model_operations op_library_filename")
    if config.runtime and (config.runtime in (".", "..") or any(c in config.runtime for c in "/\\\0")):
        raise ConfigError(f"runtime '{config.runtime}' must be a plain file name (the backend's library)")
    if config.backend == "python" and EXECUTION_ENV_PATH in config.parameters:
        _execution_env(root, config.parameters[EXECUTION_ENV_PATH].string_value)


def _file(root: Path, value: str, field: str, base: str = "", keep_in_base: bool = False) -> None:
    require_regular(confine(root, value, field, base, keep_in_base), field, value)


def _execution_env(root: Path, value: str) -> None:
    """Nereid runs Python models with its own interpreter; an execution environment is refused
    rather than ignored (the model would run without the packages it was packed with)."""
    field = f"parameters '{EXECUTION_ENV_PATH}'"
    path = value.replace(MODEL_DIRECTORY_KEYWORD, str(root), 1)
    confine(root, path, field)
    raise ConfigError(
        f"{field} '{value}': custom Python execution environments are not supported by Nereid; "
        "install the model's packages in the server's environment and remove this parameter"
    )
