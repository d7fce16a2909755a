"""`--model-load-retry-count` (tritonserver's flag): a failed load is tried again N times, then UNAVAILABLE.

Python models count their own attempts: `initialize` appends a line to `attempts.txt` in the
model directory and raises until it has been called FAILS times, so a test can tell exactly
how often the server tried.
"""

from __future__ import annotations

import re
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.grpc import service_pb2, service_pb2_grpc
from util import ServerProcess, client, expect_rpc_error, python_config, scaled, write_model

from server.cli import build_parser, settings_from_args

FLAKY = '''import os
import triton_python_backend_utils as pb_utils

FAILS = {fails}


class TritonPythonModel:
    def initialize(self, args):
        path = os.path.join(args["model_repository"], "attempts.txt")
        with open(path, "a") as f:
            f.write("attempt\\n")
        with open(path) as f:
            attempt = len(f.readlines())
        if attempt <= FAILS:
            raise RuntimeError(f"flaky start: attempt {{attempt}} failed")

    def execute(self, requests):
        return [pb_utils.InferenceResponse(output_tensors=[
            pb_utils.Tensor("OUTPUT0", pb_utils.get_input_tensor_by_name(r, "INPUT0").as_numpy())]) for r in requests]
'''

CORRUPT_CONFIG = """name: "corrupt"
platform: "onnxruntime_onnx"
max_batch_size: 0
input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ 4 ] } ]
output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 4 ] } ]
"""

RETRY_RE = re.compile(r"model '(\w+)' version 1 failed to load \(attempt (\d+) of (\d+)\), retrying: (.*)")


def _python_model(repo: Path, name: str, fails: int) -> Path:
    source = FLAKY.format(fails=fails).encode()
    return write_model(repo, name, python_config(name), files={"1/model.py": source})


def _build_repo(repo: Path) -> Path:
    write_model(repo, "corrupt", CORRUPT_CONFIG, files={"1/model.onnx": b"this is not an ONNX model"})
    _python_model(repo, "flaky_once", fails=1)  # fails on the first attempt only
    _python_model(repo, "always_fails", fails=1000)
    return repo


def _attempts(repo: Path, name: str) -> int:
    path = repo / name / "attempts.txt"
    return len(path.read_text().splitlines()) if path.exists() else 0


def _retries(srv: ServerProcess, name: str) -> list[tuple[int, int, str]]:
    """(attempt, of, reason) of every retry warning the server logged for `name`."""
    found = []
    for line in srv.log.splitlines():
        match = RETRY_RE.search(line)
        if match and match.group(1) == name:
            assert line.startswith("W"), f"a retry is logged at WARNING: {line}"
            found.append((int(match.group(2)), int(match.group(3)), match.group(4)))
    return found


def _rows(srv: ServerProcess, name: str) -> list[tuple[str, str, str]]:
    return [(r.version, r.state, r.reason) for r in client(srv).get_model_repository_index().models if r.name == name]


@pytest.fixture(scope="module")
def retry_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _build_repo(tmp_path_factory.mktemp("retry_repo"))


@pytest.fixture(scope="module")
def retry_server(retry_repo: Path):
    server = ServerProcess([retry_repo], ["--model-load-retry-count", "2"])
    yield server
    server.stop()


def test_corrupt_model_fails_after_one_plus_n_attempts(retry_server: ServerProcess, retry_repo: Path) -> None:
    pytest.importorskip("onnxruntime")
    rows = _rows(retry_server, "corrupt")
    assert [(v, s) for v, s, _ in rows] == [("1", "UNAVAILABLE")]
    reason = rows[0][2]
    assert str(retry_repo / "corrupt" / "1" / "model.onnx") in reason
    retries = _retries(retry_server, "corrupt")
    assert [(a, of) for a, of, _ in retries] == [(1, 3), (2, 3)]
    assert all(r == reason for _, _, r in retries)  # the same error each time, and it names the file
    assert retry_server.log.count("model 'corrupt' version 1 failed to load: ") == 1  # the final error, once


def test_last_error_is_reported_after_every_attempt_failed(retry_server: ServerProcess, retry_repo: Path) -> None:
    assert _attempts(retry_repo, "always_fails") == 3
    rows = _rows(retry_server, "always_fails")
    assert [(v, s) for v, s, _ in rows] == [("1", "UNAVAILABLE")]
    assert "flaky start: attempt 3 failed" in rows[0][2]  # the last attempt's error, not the first
    retries = _retries(retry_server, "always_fails")
    assert [(a, of) for a, of, _ in retries] == [(1, 3), (2, 3)]
    assert "attempt 1 failed" in retries[0][2] and "attempt 2 failed" in retries[1][2]


def test_model_that_fails_once_is_ready_after_a_retry(retry_server: ServerProcess, retry_repo: Path) -> None:
    assert _rows(retry_server, "flaky_once") == [("1", "READY", "")]
    assert _attempts(retry_repo, "flaky_once") == 2
    assert [(a, of) for a, of, _ in _retries(retry_server, "flaky_once")] == [(1, 3)]
    data = np.arange(4, dtype=np.float32)
    inp = grpcclient.InferInput("INPUT0", [4], "FP32")
    inp.set_data_from_numpy(data)
    result = client(retry_server).infer("flaky_once", [inp], client_timeout=30)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), data)


def test_default_is_a_single_attempt(tmp_path: Path, server_factory) -> None:
    repo = _build_repo(tmp_path)
    srv = server_factory(repo)
    assert _attempts(repo, "flaky_once") == 1
    assert _attempts(repo, "always_fails") == 1
    assert [(v, s) for v, s, _ in _rows(srv, "flaky_once")] == [("1", "UNAVAILABLE")]
    assert "flaky start: attempt 1 failed" in _rows(srv, "flaky_once")[0][2]
    assert not RETRY_RE.search(srv.log), "no retry without --model-load-retry-count"


def test_explicit_load_rpc_retries(tmp_path: Path, server_factory) -> None:
    _python_model(tmp_path, "flaky_once", fails=1)
    _python_model(tmp_path, "always_fails", fails=1000)
    srv = server_factory(tmp_path, "--model-control-mode", "explicit", "--model-load-retry-count", "1")
    client(srv).load_model("flaky_once")
    assert _rows(srv, "flaky_once") == [("1", "READY", "")]
    assert _attempts(tmp_path, "flaky_once") == 2
    stub = service_pb2_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(srv.url))
    error = expect_rpc_error(grpc.StatusCode.INVALID_ARGUMENT, stub.RepositoryModelLoad,
                             service_pb2.RepositoryModelLoadRequest(model_name="always_fails"), timeout=scaled(60))
    assert "flaky start: attempt 2 failed" in (error.details() or "")
    assert _attempts(tmp_path, "always_fails") == 2


def test_flag_parsing() -> None:
    parser = build_parser()
    assert settings_from_args(parser.parse_args(["serve", "--model-repository", "."])).model_load_retry_count == 0
    args = parser.parse_args(["serve", "--model-repository", ".", "--model-load-retry-count", "3"])
    assert settings_from_args(args).model_load_retry_count == 3
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "--model-repository", ".", "--model-load-retry-count", "-1"])
