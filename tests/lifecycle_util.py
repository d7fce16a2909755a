"""Helpers for the lifecycle tests: ONNX models whose answers reveal their version, polling, waiting."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from util import scaled

IR_VERSION = 10  # what the installed onnxruntime reads (scripts/gen_models.py pins the same)
OPSET = 17

# An ONNX model that answers OUTPUT0 = INPUT0 + version and OUTPUT1 = INPUT0 * 2.
ADD_CONFIG = """name: "{name}"
platform: "onnxruntime_onnx"
max_batch_size: 0
input [ {{ name: "INPUT0" data_type: TYPE_FP32 dims: [ 4 ] }} ]
output [ {{ name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 4 ] }}{extra_output} ]
instance_group [ {{ kind: KIND_CPU count: 1 }} ]
{extra}"""
OUTPUT1 = ',\n  { name: "OUTPUT1" data_type: TYPE_FP32 dims: [ 4 ] }'


def add_config(name: str, with_output1: bool = False, extra: str = "") -> str:
    return ADD_CONFIG.format(name=name, extra_output=OUTPUT1 if with_output1 else "", extra=extra)


def add_model_bytes(addend: float) -> bytes:
    """OUTPUT0 = INPUT0 + addend, OUTPUT1 = INPUT0 * 2 (FP32 [4])."""
    from onnx import TensorProto, helper, numpy_helper

    const = numpy_helper.from_array(np.full(4, addend, dtype=np.float32), "ADDEND")
    two = numpy_helper.from_array(np.full(4, 2.0, dtype=np.float32), "TWO")
    graph = helper.make_graph(
        [helper.make_node("Add", ["INPUT0", "ADDEND"], ["OUTPUT0"]),
         helper.make_node("Mul", ["INPUT0", "TWO"], ["OUTPUT1"])],
        "add_version",
        [helper.make_tensor_value_info("INPUT0", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("OUTPUT0", TensorProto.FLOAT, [4]),
         helper.make_tensor_value_info("OUTPUT1", TensorProto.FLOAT, [4])],
        initializer=[const, two],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="nereid-tests")
    model.ir_version = IR_VERSION
    return model.SerializeToString()


def write_version_atomically(model_dir: Path, version: int, files: dict[str, bytes]) -> Path:
    """The safe way to deploy (docs/LIFECYCLE.md): build `.staging-N/` (hidden), then rename it into place."""
    staging = model_dir / f".staging-{version}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for name, data in files.items():
        (staging / name).write_bytes(data)
    target = model_dir / str(version)
    old = model_dir / f".old-{version}"
    if target.exists():  # replacing a version: move the old folder aside first (rename is atomic)
        shutil.rmtree(old, ignore_errors=True)
        os.rename(target, old)
    os.rename(staging, target)
    shutil.rmtree(old, ignore_errors=True)
    return target


def wait_until(predicate: Callable[[], Any], timeout: float = 20.0, interval: float = 0.05,
               what: str | Callable[[], str] = "") -> Any:
    """Poll `predicate` until it returns something truthy; fail with `what` (or what it returns)
    after `timeout` seconds (scaled)."""
    timeout = scaled(timeout)
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    said = what() if callable(what) else what
    raise AssertionError(f"timed out after {timeout}s waiting for {said or predicate}; last value {last!r}")


def index_of(client: Any, name: str) -> list[tuple[str, str, str]]:
    """RepositoryIndex rows of one model as (version, state, reason)."""
    return [(r.version, r.state, r.reason) for r in client.get_model_repository_index().models if r.name == name]


def states(client: Any, name: str) -> dict[str, str]:
    """version -> state for one model."""
    return {version: state for version, state, _ in index_of(client, name)}


def infer_fp32(client: Any, name: str, data: np.ndarray, version: str = "", outputs: list[str] | None = None):
    """One FP32 request to INPUT0; returns tritonclient's InferResult."""
    import tritonclient.grpc as grpcclient

    inp = grpcclient.InferInput("INPUT0", list(data.shape), "FP32")
    inp.set_data_from_numpy(data)
    requested = [grpcclient.InferRequestedOutput(o) for o in outputs] if outputs else None
    return client.infer(name, [inp], model_version=version, outputs=requested, client_timeout=30)
