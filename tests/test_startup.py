"""Startup: a taken port is one clear line and exit code 1; --strict-readiness keeps Triton's meaning."""

from __future__ import annotations

import re
import socket
import subprocess
import time

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.utils import InferenceServerException
from util import PYTHON, ROOT, ServerProcess, identity_config, scaled, write_model


def test_port_in_use_is_one_line_and_exit_1(tmp_path) -> None:
    write_model(tmp_path, "m", identity_config("m", [("INPUT0", "FP32", [2])]))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            [PYTHON, "-m", "server.cli", "serve", "--model-repository", str(tmp_path), "--grpc-address", "127.0.0.1",
             "--grpc-port", str(port), "--http-port", "0"],
            cwd=ROOT, capture_output=True, text=True, timeout=scaled(60),
        )
    assert done.returncode == 1, done.stderr
    lines = done.stderr.strip().splitlines()
    assert lines == [f"nereid: could not bind 127.0.0.1:{port}: address already in use"], done.stderr


def _health(srv: ServerProcess) -> int:
    with srv.channel() as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=10).status


def _repo_with_a_broken_model(tmp_path):
    write_model(tmp_path, "good", identity_config("good", [("INPUT0", "FP32", [2])]))
    write_model(tmp_path, "broken", identity_config("broken", [("INPUT0", "FP32", [2])]).replace(
        'backend: "identity"', 'backend: "no_such_backend"'))
    return tmp_path


def test_strict_readiness_false_is_ready_whatever_the_models_did(tmp_path) -> None:
    """Triton's meaning: ready once live and the repository has been loaded, whatever each model
    did; the failed model is still reported, and the good one serves."""
    srv = ServerProcess([_repo_with_a_broken_model(tmp_path)], ["--strict-readiness", "false"])
    try:
        client = grpcclient.InferenceServerClient(srv.url)
        assert client.is_server_ready()
        assert _health(srv) == health_pb2.HealthCheckResponse.SERVING
        assert client.is_model_ready("good") and not client.is_model_ready("broken")
    finally:
        srv.stop()


def test_strict_readiness_true_is_not_ready_with_a_failed_model(tmp_path) -> None:
    srv = ServerProcess([_repo_with_a_broken_model(tmp_path)], ["--strict-readiness", "true"])
    try:
        assert not grpcclient.InferenceServerClient(srv.url).is_server_ready()
        assert _health(srv) == health_pb2.HealthCheckResponse.NOT_SERVING
    finally:
        srv.stop()



def test_inference_while_models_load_is_unavailable_not_not_found(tmp_path) -> None:
    """The listener opens before the models load (so that liveness answers); an inference
    request for a model still loading is UNAVAILABLE, which a client's retry policy retries,
    as the refused connection Triton gives before it has loaded. NOT_FOUND once loaded."""
    write_model(tmp_path, "slow", identity_config("slow", [("INPUT0", "FP32", [2])], execute_delay_ms=2000, extra=(
        'model_warmup [ { name: "w" batch_size: 1 count: 1\n'
        '  inputs { key: "INPUT0" value: { data_type: TYPE_FP32 dims: [ 2 ] zero_data: true } } } ]\n')))
    proc = subprocess.Popen(  # not ServerProcess: it waits until the models are loaded
        [PYTHON, "-m", "server.cli", "serve", "--model-repository", str(tmp_path), "--grpc-address", "127.0.0.1",
         "--grpc-port", "0", "--metrics-address", "127.0.0.1", "--metrics-port", "0", "--http-port", "0"],
        cwd=ROOT, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        port = next(int(m.group(1)) for line in proc.stderr
                    if (m := re.search(r"Started GRPCInferenceService at 127\.0\.0\.1:(\d+)", line)))
        c = grpcclient.InferenceServerClient(f"127.0.0.1:{port}")
        inp = grpcclient.InferInput("INPUT0", [2], "FP32")
        inp.set_data_from_numpy(np.ones(2, np.float32))
        with pytest.raises(InferenceServerException) as loading:
            c.infer("slow", [inp], client_timeout=10)
        assert loading.value.status() == "StatusCode.UNAVAILABLE", loading.value
        assert "starting" in loading.value.message(), loading.value
        deadline = time.monotonic() + scaled(30)
        while not c.is_server_ready():
            assert time.monotonic() < deadline, "never ready"
            time.sleep(0.1)
        np.testing.assert_array_equal(c.infer("slow", [inp], client_timeout=10).as_numpy("OUTPUT0"), np.ones(2))
        with pytest.raises(InferenceServerException) as unknown:
            c.infer("nope", [inp], client_timeout=10)
        assert unknown.value.status() == "StatusCode.NOT_FOUND", unknown.value
        c.close()
    finally:
        proc.terminate()
        proc.wait(scaled(30))
