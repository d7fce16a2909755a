"""ServerLive, ServerReady, ModelReady, ServerMetadata, ModelMetadata and ModelConfig
through tritonclient.grpc against real servers."""

from __future__ import annotations

import json
import shutil

import grpc
import pytest
from transports import HttpStub, http_status_of
from tritonclient.grpc import model_config_pb2 as mc
from util import ID_MAX_BATCH, IDENTITY_DATATYPES, MODEL_REPOSITORY, ServerProcess, client, expect_error

import server

# -- liveness and readiness --


def test_server_live_and_ready(identity_server: ServerProcess, onnx_server: ServerProcess) -> None:
    for srv in (identity_server, onnx_server):
        c = client(srv)
        assert c.is_server_live() is True
        assert c.is_server_ready() is True


def test_server_not_ready_when_a_model_failed(failure_server: ServerProcess) -> None:
    c = client(failure_server)
    assert c.is_server_live() is True
    assert c.is_server_ready() is False  # strict readiness: every model must be READY


def test_model_ready_true_for_loaded_models(identity_server: ServerProcess, onnx_server: ServerProcess) -> None:
    assert client(identity_server).is_model_ready("id_FP32") is True
    assert client(identity_server).is_model_ready("id_FP32", "1") is True
    for name in ("simple", "mlp", "mlp_compute", "string_lower", "add_sub_autocomplete", "datatypes_onnx"):
        assert client(onnx_server).is_model_ready(name) is True, name


# Every per-model RPC refuses an unknown model or version, and a version that is not a number,
# with the same code and a message naming what was asked for (ModelReady answers "not ready" for
# an unknown version of a known model instead). (rpc, model, version, code, fragments)
MODEL_RPC_ERRORS = [
    (rpc, *case)
    for rpc in ("is_model_ready", "get_model_metadata", "get_model_config", "get_inference_statistics")
    for case in (
        ("no_such_model", "", "NOT_FOUND", ("'no_such_model'",)),
        ("id_versions", "7", "NOT_FOUND", ("'id_versions'", "7")),
        ("id_versions", "2", "NOT_FOUND", ("'id_versions'", "2")),  # on disk, outside the version policy
        ("id_versions", "abc", "INVALID_ARGUMENT", ("'abc'",)),
        ("id_versions", "1.5", "INVALID_ARGUMENT", ("'1.5'",)),
        ("id_versions", "-x", "INVALID_ARGUMENT", ("'-x'",)),
    )
    if not (rpc == "is_model_ready" and case[2] == "NOT_FOUND" and case[1])
]


@pytest.mark.parametrize("rpc,model,version,code,fragments", MODEL_RPC_ERRORS,
                         ids=[f"{r[0]}-{r[1]}-{r[2] or 'latest'}" for r in MODEL_RPC_ERRORS])
def test_per_model_rpc_errors(identity_server: ServerProcess, rpc: str, model: str, version: str, code: str,
                              fragments: tuple[str, ...]) -> None:
    err = expect_error(code, getattr(client(identity_server), rpc), model, version)
    for fragment in fragments:
        assert fragment in err.message(), f"{fragment!r} not in {err.message()!r}"


# The same table over HTTP/REST (transports.py): the route of each RPC, the HTTP status Triton
# gives the code, and the gRPC message word for word in `{"error": ...}`. Model readiness is the
# exception Triton makes: an unknown model or version is just "not ready" (400, no body).
HTTP_ROUTE = {"is_model_ready": "/ready", "get_model_metadata": "", "get_model_config": "/config",
              "get_inference_statistics": "/stats"}


@pytest.mark.parametrize("rpc,model,version,code,fragments", MODEL_RPC_ERRORS,
                         ids=[f"{r[0]}-{r[1]}-{r[2] or 'latest'}" for r in MODEL_RPC_ERRORS])
def test_per_model_rpc_errors_over_http(identity_server: ServerProcess, rpc: str, model: str, version: str,
                                        code: str, fragments: tuple[str, ...]) -> None:
    grpc_message = expect_error(code, getattr(client(identity_server), rpc), model, version).message()
    path = "/v2/models/" + model + (f"/versions/{version}" if version else "") + HTTP_ROUTE[rpc]
    status, _, body = HttpStub(identity_server).request("GET", path)
    if rpc == "is_model_ready" and code == "NOT_FOUND":
        assert (status, body) == (400, b"")
        return
    assert status == http_status_of(getattr(grpc.StatusCode, code)), body
    assert json.loads(body) == {"error": grpc_message}
    for fragment in fragments:
        assert fragment in grpc_message


def test_model_ready_versions_follow_the_version_policy(identity_server: ServerProcess) -> None:
    c = client(identity_server)
    # id_versions has folders 1, 2, 3 and policy specific [1, 3]: 2 exists on disk but is not loaded.
    assert c.is_model_ready("id_versions") is True
    assert c.is_model_ready("id_versions", "1") is True
    assert c.is_model_ready("id_versions", "2") is False
    assert c.is_model_ready("id_versions", "3") is True
    # id_latest has folders 1, 2 and the default policy latest{1}: only 2 is loaded.
    assert c.is_model_ready("id_latest", "1") is False
    assert c.is_model_ready("id_latest", "2") is True


def test_model_ready_false_for_failed_models(failure_server: ServerProcess) -> None:
    c = client(failure_server)
    assert c.is_model_ready("good") is True
    for name in ("broken_config", "missing_file", "no_version", "name_mismatch", "unknown_backend"):
        assert c.is_model_ready(name) is False, name
    assert c.is_model_ready("missing_file", "1") is False


# -- server metadata --


def test_server_metadata(identity_server: ServerProcess) -> None:
    meta = client(identity_server).get_server_metadata()
    assert meta.name == "nereid"
    assert meta.version == server.__version__
    extensions = list(meta.extensions)
    assert len(extensions) == len(set(extensions)), extensions
    # What works must be announced ...
    for ext in ("classification", "model_configuration", "statistics", "model_repository",
                "model_repository(unload_dependents)", "logging", "trace", "system_shared_memory"):
        assert ext in extensions
    # ... and what answers UNIMPLEMENTED must not be.
    for ext in ("cuda_shared_memory", "sequence"):
        assert ext not in extensions


# -- model metadata --


def test_model_metadata_batching_model(onnx_server: ServerProcess) -> None:
    meta = client(onnx_server).get_model_metadata("simple")
    assert meta.name == "simple"
    assert meta.platform == "onnxruntime_onnx"
    assert list(meta.versions) == ["1"]
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [
        ("INPUT0", "INT32", [-1, 16]), ("INPUT1", "INT32", [-1, 16])]
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.outputs] == [
        ("OUTPUT0", "INT32", [-1, 16]), ("OUTPUT1", "INT32", [-1, 16])]


def test_model_metadata_non_batching_model(onnx_server: ServerProcess) -> None:
    meta = client(onnx_server).get_model_metadata("string_lower")
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [("INPUT0", "BYTES", [-1])]
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.outputs] == [("OUTPUT0", "BYTES", [-1])]


def test_model_metadata_auto_completed_model(onnx_server: ServerProcess) -> None:
    meta = client(onnx_server).get_model_metadata("add_sub_autocomplete")
    assert meta.platform == "onnxruntime_onnx"
    assert {(t.name, t.datatype, tuple(t.shape)) for t in meta.inputs} == {
        ("INPUT0", "FP32", (-1, 4)), ("INPUT1", "FP32", (-1, 4))}
    assert {(t.name, t.datatype, tuple(t.shape)) for t in meta.outputs} == {
        ("OUTPUT0", "FP32", (-1, 4)), ("OUTPUT1", "FP32", (-1, 4))}


@pytest.mark.parametrize("datatype", IDENTITY_DATATYPES)
def test_model_metadata_identity_datatypes(identity_server: ServerProcess, datatype: str) -> None:
    meta = client(identity_server).get_model_metadata(f"id_{datatype}")
    assert meta.platform == "identity"
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [("IN", datatype, [-1, -1])]
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.outputs] == [("OUT", datatype, [-1, -1])]


def test_model_metadata_lists_ready_versions(identity_server: ServerProcess) -> None:
    c = client(identity_server)
    assert list(c.get_model_metadata("id_versions").versions) == ["1", "3"]
    assert list(c.get_model_metadata("id_latest").versions) == ["2"]
    assert list(c.get_model_metadata("id_versions", "3").versions) == ["1", "3"]


# -- model config --


def test_model_config_of_explicit_config(onnx_server: ServerProcess) -> None:
    config = client(onnx_server).get_model_config("simple").config
    assert config.name == "simple"
    assert config.platform == "onnxruntime_onnx"
    assert config.backend == "onnxruntime"
    assert config.max_batch_size == 8
    assert [(t.name, t.data_type, list(t.dims)) for t in config.input] == [
        ("INPUT0", mc.TYPE_INT32, [16]), ("INPUT1", mc.TYPE_INT32, [16])]
    assert [(t.name, t.data_type, list(t.dims)) for t in config.output] == [
        ("OUTPUT0", mc.TYPE_INT32, [16]), ("OUTPUT1", mc.TYPE_INT32, [16])]
    # Defaults are filled in: one CPU instance group (2 instances for ONNX Runtime, as Triton).
    assert len(config.instance_group) == 1
    assert config.instance_group[0].kind == mc.ModelInstanceGroup.KIND_CPU
    assert config.instance_group[0].count == 2
    assert config.version_policy.WhichOneof("policy_choice") == "latest"


def test_model_config_identity_defaults(identity_server: ServerProcess) -> None:
    config = client(identity_server).get_model_config("id_FP32").config
    assert config.backend == "identity"
    assert config.max_batch_size == ID_MAX_BATCH
    assert config.instance_group[0].count == 1
    assert "execute_delay_ms" not in config.parameters
    stats_config = client(identity_server).get_model_config("id_stats").config
    assert stats_config.parameters["execute_delay_ms"].string_value == "5"


def _assert_add_sub_autocompleted(config: mc.ModelConfig, max_batch_size: int) -> None:
    assert config.name == "add_sub_autocomplete"
    assert config.backend == "onnxruntime"
    assert config.platform == "onnxruntime_onnx"
    assert config.max_batch_size == max_batch_size
    assert sorted(t.name for t in config.input) == ["INPUT0", "INPUT1"]
    assert sorted(t.name for t in config.output) == ["OUTPUT0", "OUTPUT1"]
    for tensor in list(config.input) + list(config.output):
        assert tensor.data_type == mc.TYPE_FP32, tensor.name
        assert list(tensor.dims) == [4], tensor.name
    assert config.HasField("dynamic_batching")


def test_model_config_auto_complete(onnx_server: ServerProcess) -> None:
    config = client(onnx_server).get_model_config("add_sub_autocomplete").config
    _assert_add_sub_autocompleted(config, 4)


@pytest.fixture
def autocomplete_repo(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copytree(MODEL_REPOSITORY / "add_sub_autocomplete", repo / "add_sub_autocomplete")
    assert not (repo / "add_sub_autocomplete" / "config.pbtxt").exists()
    return repo


def test_model_config_backend_config_default_max_batch_size(autocomplete_repo, server_factory) -> None:
    pytest.importorskip("onnxruntime")
    srv = server_factory(autocomplete_repo, "--backend-config", "onnxruntime,default-max-batch-size=8")
    config = client(srv).get_model_config("add_sub_autocomplete").config
    _assert_add_sub_autocompleted(config, 8)
    assert list(client(srv).get_model_metadata("add_sub_autocomplete").inputs[0].shape) == [-1, 4]


def test_disable_auto_complete_config_fails_the_model(autocomplete_repo, server_factory) -> None:
    pytest.importorskip("onnxruntime")
    srv = server_factory(autocomplete_repo, "--disable-auto-complete-config")
    c = client(srv)
    assert c.is_server_live() is True
    assert c.is_model_ready("add_sub_autocomplete") is False
    rows = [r for r in c.get_model_repository_index().models if r.name == "add_sub_autocomplete"]
    assert len(rows) == 1
    row = rows[0]
    assert row.state == "UNAVAILABLE"
    reason = row.reason.lower()
    assert "add_sub_autocomplete" in reason
    assert "input" in reason and "output" in reason, row.reason
    expect_error("NOT_FOUND", c.get_model_config, "add_sub_autocomplete")
