"""RepositoryIndex states and reasons, and what a model that failed to load answers."""

from __future__ import annotations

import re

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.grpc import service_pb2, service_pb2_grpc
from util import BROKEN_CONFIG_LINE, ServerProcess, client, expect_error, expect_rpc_error

EXAMPLE_MODELS = ["add_sub_autocomplete", "datatypes_onnx", "mlp", "mlp_compute", "mlp_torch", "simple", "string_lower",
                  "text_features"]
FAILED_MODELS = ["broken_config", "missing_file", "name_mismatch", "no_version", "unknown_backend"]


def index_rows(srv: ServerProcess) -> dict[str, list]:
    rows: dict[str, list] = {}
    for row in client(srv).get_model_repository_index().models:
        rows.setdefault(row.name, []).append(row)
    return rows


def test_index_of_example_repository_all_ready(onnx_server: ServerProcess) -> None:
    rows = index_rows(onnx_server)
    assert sorted(rows) == EXAMPLE_MODELS
    for name, entries in rows.items():
        assert [(r.version, r.state, r.reason) for r in entries] == [("1", "READY", "")], name


def test_index_lists_each_loaded_version(identity_server: ServerProcess) -> None:
    rows = index_rows(identity_server)
    assert [(r.version, r.state) for r in rows["id_versions"]] == [("1", "READY"), ("3", "READY")]
    assert [(r.version, r.state) for r in rows["id_latest"]] == [("2", "READY")]


def test_index_states_of_failed_models(failure_server: ServerProcess) -> None:
    rows = index_rows(failure_server)
    assert sorted(rows) == sorted(["good", *FAILED_MODELS])
    assert [(r.version, r.state, r.reason) for r in rows["good"]] == [("1", "READY", "")]
    for name in FAILED_MODELS:
        for row in rows[name]:
            assert row.state == "UNAVAILABLE", (name, row)
            assert row.reason, f"{name}: a failed model must say why"


def _reason(srv: ServerProcess, name: str) -> str:
    rows = index_rows(srv)[name]
    assert len(rows) == 1, rows
    return rows[0].reason


def test_index_reason_for_broken_config_names_file_and_line(failure_server: ServerProcess, failure_repo) -> None:
    reason = _reason(failure_server, "broken_config")
    assert str(failure_repo / "broken_config" / "config.pbtxt") in reason
    assert re.search(rf"\b{BROKEN_CONFIG_LINE}:\d+\b", reason), f"no line {BROKEN_CONFIG_LINE} in: {reason}"


def test_index_reason_for_missing_model_file(failure_server: ServerProcess, failure_repo) -> None:
    rows = index_rows(failure_server)["missing_file"]
    assert [(r.version, r.state) for r in rows] == [("1", "UNAVAILABLE")]
    assert str(failure_repo / "missing_file" / "1" / "model.onnx") in rows[0].reason


def test_index_reason_for_name_mismatch(failure_server: ServerProcess) -> None:
    reason = _reason(failure_server, "name_mismatch")
    assert "other_name" in reason and "name_mismatch" in reason
    assert "config.pbtxt" in reason


def test_index_reason_for_model_without_versions(failure_server: ServerProcess) -> None:
    reason = _reason(failure_server, "no_version")
    assert "no_version" in reason and "version" in reason


def test_index_reason_for_unknown_backend(failure_server: ServerProcess) -> None:
    reason = _reason(failure_server, "unknown_backend")
    assert "no_such_backend" in reason


def test_index_ready_filter(failure_server: ServerProcess) -> None:
    stub = service_pb2_grpc.GRPCInferenceServiceStub(failure_server.channel())
    ready = stub.RepositoryIndex(service_pb2.RepositoryIndexRequest(ready=True), timeout=10)
    assert [(r.name, r.version, r.state) for r in ready.models] == [("good", "1", "READY")]
    everything = stub.RepositoryIndex(service_pb2.RepositoryIndexRequest(), timeout=10)
    assert len(everything.models) == 1 + len(FAILED_MODELS)


def test_index_unknown_repository_name(failure_server: ServerProcess) -> None:
    stub = service_pb2_grpc.GRPCInferenceServiceStub(failure_server.channel())
    err = expect_rpc_error(grpc.StatusCode.NOT_FOUND, stub.RepositoryIndex,
                           service_pb2.RepositoryIndexRequest(repository_name="elsewhere"), timeout=10)
    assert "elsewhere" in err.details()


# -- a model that is not ready --


def _infer_input() -> list[grpcclient.InferInput]:
    inp = grpcclient.InferInput("INPUT0", [4], "FP32")
    inp.set_data_from_numpy(np.arange(4, dtype=np.float32))
    return [inp]


@pytest.mark.parametrize("name", FAILED_MODELS)
def test_infer_on_failed_model_is_not_found(failure_server: ServerProcess, name: str) -> None:
    """No version serves: NOT_FOUND "has no available versions", as Triton (clients retry UNAVAILABLE
    forever), with the load error attached."""
    err = expect_error("NOT_FOUND", client(failure_server).infer, name, _infer_input())
    assert name in err.message() and "has no available versions" in err.message()


def test_infer_on_failed_version_is_unavailable(failure_server: ServerProcess) -> None:
    err = expect_error("UNAVAILABLE", client(failure_server).infer, "missing_file", _infer_input(), model_version="1")
    assert "missing_file" in err.message()


def test_good_model_still_serves_next_to_failed_ones(failure_server: ServerProcess) -> None:
    data = np.array([1.5, -2.0, 3.25, 0.0], dtype=np.float32)
    inp = grpcclient.InferInput("INPUT0", [4], "FP32")
    inp.set_data_from_numpy(data)
    result = client(failure_server).infer("good", [inp])
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), data)


def test_metadata_of_failed_model_is_not_found(failure_server: ServerProcess) -> None:
    expect_error("NOT_FOUND", client(failure_server).get_model_metadata, "missing_file")
    expect_error("NOT_FOUND", client(failure_server).get_model_config, "broken_config")
