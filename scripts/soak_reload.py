"""The soak's mid-run reload (scripts/soak.py) and the check that it took effect.

Poll mode: new version folders and a changed config.pbtxt appear on disk and the poller picks
them up. Explicit mode: the same files appear, then RepositoryModelLoad loads each changed model
(the config change as a JSON `config` override, as tritonclient's load_model(config=...) sends it).
Either way the reload is seen when every changed model serves its new version (or config) and
version 1 is retired; the probes sent meanwhile must all succeed.
"""

from __future__ import annotations

import time
from pathlib import Path

import grpc
import numpy as np
from soak_repo import (
    CONFIG_MODEL,
    GENERATION_KEY,
    NEW_VERSION_MODELS,
    RELOADED_VERSION,
    direct_config_override_json,
    stage_new_versions,
)
from soak_traffic import INPUT_WIDTH, channel, raw_request
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc

LOAD_TIMEOUT = 120.0


def reload_models(url: str, repo: Path, control: str) -> None:
    """Put the new versions and config on disk; in explicit mode also load them by RPC."""
    stage_new_versions(repo)
    if control != "explicit":
        return
    with channel(url) as chan:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(chan)
        for model in NEW_VERSION_MODELS:
            stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name=model), timeout=LOAD_TIMEOUT)
        request = pb.RepositoryModelLoadRequest(model_name=CONFIG_MODEL)
        request.parameters["config"].string_param = direct_config_override_json()
        stub.RepositoryModelLoad(request, timeout=LOAD_TIMEOUT)


def _pending(stub: service_pb2_grpc.GRPCInferenceServiceStub) -> list[str]:
    """What has not switched yet (empty once the reload is complete). Probes must succeed."""
    waiting = []
    for model in NEW_VERSION_MODELS:
        data = np.zeros((1, INPUT_WIDTH.get(model, 4)), np.float32)
        version = stub.ModelInfer(raw_request(model, data), timeout=10).model_version
        if version != RELOADED_VERSION:
            waiting.append(f"{model} answers from version {version}")
    config = stub.ModelConfig(pb.ModelConfigRequest(name=CONFIG_MODEL), timeout=10).config
    generation = config.parameters[GENERATION_KEY].string_value if GENERATION_KEY in config.parameters else "?"
    if generation != "2":
        waiting.append(f"{CONFIG_MODEL} config generation {generation}")
    index = stub.RepositoryIndex(pb.RepositoryIndexRequest(ready=True), timeout=10).models
    for row in index:
        if row.name in NEW_VERSION_MODELS and row.version != RELOADED_VERSION:
            waiting.append(f"{row.name} version {row.version} still {row.state}")
    return waiting


def wait_for_reload(url: str, timeout: float) -> float:
    """Seconds until every change is served; TimeoutError naming what did not switch."""
    start = time.monotonic()
    with channel(url) as chan:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(chan)
        while True:
            try:
                waiting = _pending(stub)
            except grpc.RpcError as err:
                raise RuntimeError(f"a probe failed during the reload: {err.code().name}: {err.details()}") from None
            if not waiting:
                return time.monotonic() - start
            if time.monotonic() - start > timeout:
                raise TimeoutError(f"not reloaded after {timeout:.0f}s: {'; '.join(waiting)}")
            time.sleep(0.1)
