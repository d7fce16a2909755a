"""Managed-platform routes (server/http/platforms.py, docs/PLATFORMS.md) on real servers, over
plain HTTP: SageMaker's /ping and /invocations, Vertex AI's AIP_* health and predict routes.
Ports are free ones (flag 0 and the logged port, or an env port picked free), never 8080."""

from __future__ import annotations

import json
import re
import socket
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
from util import ServerProcess, http_request, identity_config, scaled, write_model

SAGEMAKER_RE = re.compile(r"Started Sagemaker HTTPService at [^ ]+:(\d+)")
VERTEX_RE = re.compile(r"Started Vertex AI HTTPService at [^ ]+:(\d+)")
BODY = {"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [4], "data": [1.0, 2.5, -3.0, 4.0]}]}


call = http_request


def logged_port(server: ServerProcess, pattern: re.Pattern[str]) -> int:
    return int(server.wait_for_log(pattern, 10).group(1))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
def one_model_repo(tmp_path: Path) -> Path:
    write_model(tmp_path, "only", identity_config("only", [("INPUT0", "FP32", [4])]))
    return tmp_path


@pytest.fixture
def two_model_repo(tmp_path: Path) -> Path:
    write_model(tmp_path, "first", identity_config("first", [("INPUT0", "FP32", [4])]))
    write_model(tmp_path, "second", identity_config("second", [("INPUT0", "FP32", [4])], outputs=["OTHER"]))
    return tmp_path


def test_sagemaker_ping_and_invocations(two_model_repo: Path, server_factory: Callable[..., ServerProcess],
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SAGEMAKER_TRITON_DEFAULT_MODEL_NAME", "second")
    server = server_factory(two_model_repo, "--allow-sagemaker", "true", "--sagemaker-port", "0")
    port = logged_port(server, SAGEMAKER_RE)
    assert port != server.http_port
    assert call(port, "GET", "/ping")[0] == 200
    status, headers, body = call(port, "POST", "/invocations", json.dumps(BODY).encode(),
                                 {"Content-Type": "application/json"})
    assert status == 200, body
    answer = json.loads(body)
    assert answer["model_name"] == "second"  # the default model, not the first one
    assert answer["outputs"] == [{"name": "OTHER", "datatype": "FP32", "shape": [4], "data": [1.0, 2.5, -3.0, 4.0]}]
    # Binary tensors: the JSON header's length travels in SageMaker's Content-Type.
    header = json.dumps({"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [4],
                                     "parameters": {"binary_data_size": 16}}],
                         "parameters": {"binary_data_output": True}}).encode()
    raw = struct.pack("<4f", 5, 6, 7, 8)
    status, headers, body = call(port, "POST", "/invocations", header + raw, {
        "Content-Type": f"application/vnd.sagemaker-triton.binary+json;json-header-size={len(header)}"})
    assert status == 200, body
    size = int(headers["content-type"].rsplit("=", 1)[1])
    assert headers["content-type"].startswith("application/vnd.sagemaker-triton.binary+json;json-header-size=")
    assert struct.unpack("<4f", body[size:]) == (5, 6, 7, 8)
    # Triton's SageMaker server answers a failed invocation and an unknown route with 400.
    status, _, body = call(port, "POST", "/invocations", b'{"inputs": [{"name": "NOPE", "datatype": "FP32", '
                           b'"shape": [1], "data": [1]}]}')
    assert status == 400 and "NOPE" in json.loads(body)["error"]
    status, _, body = call(port, "POST", "/invocations", json.dumps(BODY).encode(), {"Content-Encoding": "br"})
    assert status == 400 and "br" in json.loads(body)["error"]  # 501 on /v2
    assert call(port, "GET", "/v2/health/ready")[0] == 400
    assert call(port, "POST", "/ping")[0] == 405


def test_sagemaker_port_from_environment_and_only_model(one_model_repo: Path,
                                                        server_factory: Callable[..., ServerProcess],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    port = free_port()
    monkeypatch.setenv("SAGEMAKER_BIND_TO_PORT", str(port))
    monkeypatch.delenv("SAGEMAKER_TRITON_DEFAULT_MODEL_NAME", raising=False)
    server = server_factory(one_model_repo, "--allow-sagemaker=true")
    assert logged_port(server, SAGEMAKER_RE) == port
    status, _, body = call(port, "POST", "/invocations", json.dumps(BODY).encode())
    assert status == 200 and json.loads(body)["model_name"] == "only"


def test_vertex_ai_health_predict_and_redirect(two_model_repo: Path, server_factory: Callable[..., ServerProcess],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    port = free_port()
    monkeypatch.setenv("AIP_HTTP_PORT", str(port))
    monkeypatch.setenv("AIP_HEALTH_ROUTE", "/v1/endpoints/e/deployedModels/m:health")
    monkeypatch.setenv("AIP_PREDICT_ROUTE", "/v1/endpoints/e/deployedModels/m:predict")
    monkeypatch.setenv("AIP_MODE", "PREDICTION")  # turns Vertex AI on, as in Triton
    server = server_factory(two_model_repo, "--vertex-ai-default-model", "first")
    assert logged_port(server, VERTEX_RE) == port
    assert call(port, "GET", "/v1/endpoints/e/deployedModels/m:health")[0] == 200
    status, _, body = call(port, "POST", "/v1/endpoints/e/deployedModels/m:predict", json.dumps(BODY).encode())
    assert status == 200, body
    answer = json.loads(body)
    assert answer["model_name"] == "first" and answer["outputs"][0]["data"] == [1.0, 2.5, -3.0, 4.0]
    # X-Vertex-Ai-Triton-Redirect reaches any KServe v2 route through the predict route.
    status, _, body = call(port, "POST", "/v1/endpoints/e/deployedModels/m:predict", json.dumps(BODY).encode(),
                           {"X-Vertex-Ai-Triton-Redirect": "v2/models/second/infer"})
    assert status == 200 and json.loads(body)["outputs"][0]["name"] == "OTHER"
    status, _, body = call(port, "POST", "/v1/endpoints/e/deployedModels/m:predict", None,
                           {"X-Vertex-Ai-Triton-Redirect": "v2/models/second/config"})
    assert status == 200 and json.loads(body)["name"] == "second"
    # Errors keep Triton's HTTP codes; an unknown route is 400.
    status, _, body = call(port, "POST", "/v1/endpoints/e/deployedModels/m:predict", None,
                           {"X-Vertex-Ai-Triton-Redirect": "v2/models/nope/config"})
    assert status == 404 and "nope" in json.loads(body)["error"]
    assert call(port, "GET", "/elsewhere")[0] == 400


def test_vertex_ai_needs_its_routes(one_model_repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AIP_PREDICT_ROUTE", raising=False)
    monkeypatch.setenv("AIP_HEALTH_ROUTE", "/health")
    with pytest.raises(RuntimeError, match="AIP_PREDICT_ROUTE is not defined for Vertex AI endpoint"):
        ServerProcess([one_model_repo], ["--allow-vertex-ai", "true", "--vertex-ai-port", "0"],
                      startup_timeout=scaled(20))


def test_vertex_ai_without_default_and_several_models(two_model_repo: Path,
                                                      server_factory: Callable[..., ServerProcess],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIP_HEALTH_ROUTE", "/health")
    monkeypatch.setenv("AIP_PREDICT_ROUTE", "/predict")
    server = server_factory(two_model_repo, "--allow-vertex-ai", "true", "--vertex-ai-port", "0")
    port = logged_port(server, VERTEX_RE)
    status, _, body = call(port, "POST", "/predict", json.dumps(BODY).encode())
    assert status == 400 and "only a single model" in json.loads(body)["error"]
