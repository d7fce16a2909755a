"""The soak's model repository and the reload it performs halfway (scripts/soak.py).

Five kinds of model, so that every scheduling path and every backend kind the soak can run
without a GPU is under load when the reload happens:

  id_direct   identity FP32 [4], batchable, no dynamic batcher (direct scheduler)
  id_batched  identity FP32 [4] with a dynamic batcher (requests from several clients merge)
  id_large    identity FP32 [-1], no batching: ~1 MB requests, valid and rejected
  id_slow     identity FP32 [4] with a dynamic batcher that sleeps SLOW_MS per batch: client
              deadlines and cancellations land while requests run or wait in its queue
  mlp         the example ONNX model (onnxruntime), copied from model_repository/
  py_echo     a Python-backend model (a stub process per instance) that echoes INPUT0; a request
              starting with PY_SLOW_MARKER sleeps SLOW_MS, so cancelled requests and valid ones
              share its stubs

The reload adds version 2 of id_batched, id_slow, mlp and py_echo (staged under a hidden name, then
renamed into place, as docs/LIFECYCLE.md recommends) and rewrites id_direct's config.pbtxt
with a new `soak_generation` parameter. With the default version policy (latest 1) the
server must load each version 2, switch to it, and retire version 1 without failing a
request.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE_REPOSITORY = ROOT / "model_repository"

SLOW_MS = 150
PY_SLOW_MARKER = -6.0  # py_echo sleeps SLOW_MS on a request that starts with this value
RELOADED_VERSION = "2"
# Models that get a version 2 folder, and the model whose config changes in place.
NEW_VERSION_MODELS = ("id_batched", "id_slow", "mlp", "py_echo")
CONFIG_MODEL = "id_direct"
GENERATION_KEY = "soak_generation"

PY_ECHO = f'''import time

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    """Echoes INPUT0 as OUTPUT0 (the soak's Python-backend model). A request whose first
    element is {PY_SLOW_MARKER} sleeps {SLOW_MS} ms first, so that clients can cancel it while it runs."""

    def execute(self, requests):
        responses = []
        for request in requests:
            arr = pb_utils.get_input_tensor_by_name(request, "INPUT0").as_numpy()
            if arr.size and arr.reshape(-1)[0] == {PY_SLOW_MARKER}:
                time.sleep({SLOW_MS / 1000})
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("OUTPUT0", np.array(arr))]))
        return responses
'''


def _identity(name: str, dims: str, max_batch: int, extra: str = "") -> str:
    return (
        f'name: "{name}"\nbackend: "identity"\nmax_batch_size: {max_batch}\n'
        f'input [ {{ name: "INPUT0" data_type: TYPE_FP32 dims: [ {dims} ] }} ]\n'
        f'output [ {{ name: "OUTPUT0" data_type: TYPE_FP32 dims: [ {dims} ] }} ]\n{extra}'
    )


def direct_config(generation: int) -> str:
    return _identity(
        CONFIG_MODEL, "4", 8,
        f'parameters: {{ key: "{GENERATION_KEY}" value: {{ string_value: "{generation}" }} }}\n'
        "instance_group [ { kind: KIND_CPU count: 2 } ]\n",
    )


CONFIGS = {
    "id_batched": _identity(
        "id_batched", "4", 8,
        "dynamic_batching { max_queue_delay_microseconds: 500 }\ninstance_group [ { kind: KIND_CPU count: 1 } ]\n",
    ),
    "id_large": _identity("id_large", "-1", 0),
    "id_slow": _identity(
        "id_slow", "4", 8,
        f'parameters: {{ key: "execute_delay_ms" value: {{ string_value: "{SLOW_MS}" }} }}\n'
        "dynamic_batching { max_queue_delay_microseconds: 2000 }\n"
        "instance_group [ { kind: KIND_CPU count: 2 } ]\n",
    ),
    "py_echo": (
        'name: "py_echo"\nbackend: "python"\nmax_batch_size: 8\n'
        'input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ 4 ] } ]\n'
        'output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 4 ] } ]\n'
        "instance_group [ { kind: KIND_CPU count: 2 } ]\n"
    ),
}
MODELS = ("id_direct", "id_batched", "id_large", "id_slow", "mlp", "py_echo")


def build_repository(repo: Path) -> None:
    """Write every model's config and version 1 into `repo` (an empty directory)."""
    (repo / CONFIG_MODEL / "1").mkdir(parents=True)
    (repo / CONFIG_MODEL / "config.pbtxt").write_text(direct_config(1), encoding="utf-8")
    for name, config in CONFIGS.items():
        (repo / name / "1").mkdir(parents=True)
        (repo / name / "config.pbtxt").write_text(config, encoding="utf-8")
    (repo / "py_echo" / "1" / "model.py").write_text(PY_ECHO, encoding="utf-8")
    source = EXAMPLE_REPOSITORY / "mlp"
    (repo / "mlp" / "1").mkdir(parents=True)
    shutil.copy2(source / "config.pbtxt", repo / "mlp" / "config.pbtxt")
    shutil.copy2(source / "1" / "model.onnx", repo / "mlp" / "1" / "model.onnx")


def stage_new_versions(repo: Path) -> None:
    """Copy version 1 of each model in NEW_VERSION_MODELS to version 2, atomically (hidden
    staging folder, then rename), and rewrite CONFIG_MODEL's config atomically."""
    for name in NEW_VERSION_MODELS:
        staging = repo / name / f".incoming-{RELOADED_VERSION}"
        shutil.copytree(repo / name / "1", staging)
        os.rename(staging, repo / name / RELOADED_VERSION)
    config = repo / CONFIG_MODEL / "config.pbtxt"
    tmp = config.with_name(".config.pbtxt.tmp")
    tmp.write_text(direct_config(2), encoding="utf-8")
    os.replace(tmp, config)


def direct_config_override_json() -> str:
    """CONFIG_MODEL's generation-2 config as the JSON a RepositoryModelLoad `config` override carries."""
    return json.dumps({
        "name": CONFIG_MODEL,
        "backend": "identity",
        "max_batch_size": 8,
        "input": [{"name": "INPUT0", "data_type": "TYPE_FP32", "dims": [4]}],
        "output": [{"name": "OUTPUT0", "data_type": "TYPE_FP32", "dims": [4]}],
        "parameters": {GENERATION_KEY: {"string_value": "2"}},
        "instance_group": [{"kind": "KIND_CPU", "count": 2}],
    })
