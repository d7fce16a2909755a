"""The load API's parameters: a JSON `config` override and `file:<version>/<name>` byte overrides.

tritonclient's `load_model(name, config=..., files=...)` sends the config as
`parameters["config"].string_param` and each file as
`parameters["file:1/model.onnx"].bytes_param`. Files form a complete model
directory of their own (the repository's copy is ignored), so they need the
config; they are written to a private temporary directory that the manager
deletes once no loaded version uses it any more.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from tritonclient.grpc import model_config_pb2 as mc

from server.errors import InvalidInput
from server.repository.config import config_from_json
from server.repository.safepath import check_model_name, override_relpath, override_target

CONFIG_KEY = "config"
FILE_PREFIX = "file:"


@dataclass
class LoadRequest:
    """A validated RepositoryModelLoad: which model, and what replaces what is on disk."""

    name: str
    config: mc.ModelConfig | None = None
    files: dict[str, bytes] = field(default_factory=dict)

    @property
    def overridden(self) -> bool:
        return self.config is not None or bool(self.files)


def parse_load_parameters(name: str, parameters: Mapping[str, object]) -> LoadRequest:
    """Check the parameters of a load request; every problem is an InvalidInput naming the key."""
    check_model_name(name)
    request = LoadRequest(name=name)
    for key, value in parameters.items():
        if key == CONFIG_KEY:
            if not isinstance(value, str) or not value.strip():
                raise InvalidInput(f"load of '{name}': parameter 'config' must be a non-empty JSON string")
            # A parse error is a ConfigError: INVALID_ARGUMENT with the parser's position.
            request.config = config_from_json(value, f"'config' parameter of the load of '{name}'")
        elif key.startswith(FILE_PREFIX):
            if not isinstance(value, bytes):
                raise InvalidInput(f"load of '{name}': parameter '{key}' must be bytes (bytes_param)")
            override_relpath(key)
            request.files[key] = value
        else:
            raise InvalidInput(
                f"load of '{name}': unknown parameter '{key}'; expected 'config' or 'file:<version>/<name>'"
            )
    if request.files and request.config is None:
        raise InvalidInput(
            f"load of '{name}': file overrides need the 'config' parameter too (the override "
            "directory replaces the whole model directory, config.pbtxt included)"
        )
    return request


def write_override_dir(request: LoadRequest) -> Path:
    """Write the override files to a fresh private directory; returns `<tmp>/<model name>`."""
    root = Path(tempfile.mkdtemp(prefix="nereid-override-"))
    model_dir = root / request.name
    model_dir.mkdir(mode=0o700)
    try:
        for key, data in sorted(request.files.items()):
            target = override_target(model_dir, key)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise
    return model_dir


def remove_override_dir(model_dir: Path) -> None:
    """Delete a directory made by `write_override_dir` (its parent is the private temp root)."""
    root = model_dir.parent
    if root.name.startswith("nereid-override-"):
        shutil.rmtree(root, ignore_errors=True)
