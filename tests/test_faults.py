"""Faults (issue 9): a backend that raises fails only its batch; one that hangs past its
execution timeout is reported and answered without holding anything else; an instance that
keeps failing is retired, and a version with none left is UNAVAILABLE with the reason."""

from __future__ import annotations

import concurrent.futures
import time

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from lifecycle_util import wait_until
from tritonclient.grpc import service_pb2 as pb
from util import ServerProcess, identity_config, raw_request, scaled, write_model

INFER = "/inference.GRPCInferenceService/ModelInfer"


def _call(channel: grpc.Channel, model: str, value: float = 1.0, dtype=np.float32, datatype="FP32",
          shape=(1, 4)) -> str:
    body = raw_request(model, [("INPUT0", datatype, np.full(shape, value, dtype))]).SerializeToString()
    try:
        channel.unary_unary(INFER)(body, timeout=scaled(30))
        return "OK"
    except grpc.RpcError as exc:
        return f"{exc.code().name}: {exc.details()}"


def _timed(channel: grpc.Channel, *args) -> tuple[str, float]:
    started = time.monotonic()
    outcome = _call(channel, *args)
    return outcome, time.monotonic() - started


def _index(channel: grpc.Channel, name: str) -> list[tuple[str, str, str]]:
    raw = channel.unary_unary("/inference.GRPCInferenceService/RepositoryIndex")(
        pb.RepositoryIndexRequest().SerializeToString(), timeout=10)
    return [(m.version, m.state, m.reason) for m in pb.RepositoryIndexResponse.FromString(raw).models
            if m.name == name]


def _health(channel: grpc.Channel, service: str) -> int:
    return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status


# The identity backend answers FP32 where this config promises INT32: every execution fails.
FAILING = identity_config("failing", [("INPUT0", "FP32", [4])], max_batch_size=4, instance_count=2).replace(
    'name: "OUTPUT0"\n    data_type: TYPE_FP32', 'name: "OUTPUT0"\n    data_type: TYPE_INT32')

# Python model: a first element of -9 hangs for a minute; anything else echoes.
HANGING = '''import time
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            arr = pb_utils.get_input_tensor_by_name(request, "INPUT0").as_numpy()
            if arr.reshape(-1)[0] == -9:
                time.sleep(60)
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("OUTPUT0", arr)]))
        return responses
'''
HANGING_CONFIG = """name: "py_hang"
backend: "python"
max_batch_size: 4
input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ 4 ] } ]
output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 4 ] } ]
instance_group [ { kind: KIND_CPU count: 1 } ]
parameters { key: "execution_timeout_ms" value: { string_value: "500" } }
"""


@pytest.fixture(scope="module")
def fault_server(tmp_path_factory: pytest.TempPathFactory):
    repo = tmp_path_factory.mktemp("faults")
    write_model(repo, "good", identity_config("good", [("INPUT0", "FP32", [4])], max_batch_size=4))
    write_model(repo, "failing", FAILING)
    # In-process backend that takes 3 s, with a 300 ms execution timeout; two instances.
    write_model(repo, "stuck", identity_config(
        "stuck", [("INPUT0", "FP32", [4])], max_batch_size=4, execute_delay_ms=3000, instance_count=2,
        extra='parameters { key: "execution_timeout_ms" value: { string_value: "300" } }\n'))
    write_model(repo, "py_hang", HANGING_CONFIG, files={"1/model.py": HANGING.encode()})
    srv = ServerProcess([repo], ["--model-failure-threshold", "3", "--exit-timeout-secs", "2"])
    yield srv
    srv.stop()


def test_failing_model_fails_only_its_own_requests_then_is_retired(fault_server: ServerProcess) -> None:
    with fault_server.channel() as channel:
        first = _call(channel, "failing")
        assert first.startswith("INTERNAL") and "config says INT32" in first, first
        assert _call(channel, "good") == "OK"
        # Three failures in a row retire an instance; with both gone the version is UNAVAILABLE.
        for _ in range(8):
            _call(channel, "failing")
        wait_until(lambda: _index(channel, "failing")[0][1] == "UNAVAILABLE", timeout=scaled(10),
                   what="the failing model to become UNAVAILABLE")
        version, state, reason = _index(channel, "failing")[0]
        assert "every instance was taken out of service" in reason and "failed 3 times in a row" in reason, reason
        assert _call(channel, "failing").startswith("NOT_FOUND: 'failing' has no available versions")
        assert _health(channel, "failing") == health_pb2.HealthCheckResponse.NOT_SERVING
        assert _health(channel, "") == health_pb2.HealthCheckResponse.NOT_SERVING  # strict readiness
        assert _call(channel, "good") == "OK"


def test_hung_in_process_model_is_timed_out_and_holds_nothing_else(fault_server: ServerProcess) -> None:
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        channels = [fault_server.channel() for _ in range(3)]
        hung = [pool.submit(_timed, channels[i], "stuck") for i in range(2)]  # both instances stuck
        time.sleep(0.1)
        good = _timed(channels[2], "good")
        results = [f.result() for f in hung]
    for outcome, took in results:
        assert outcome.startswith("DEADLINE_EXCEEDED") and "timeout of 0.3 s" in outcome, outcome
        assert took < scaled(2.0), results
    assert good[0] == "OK" and good[1] < scaled(1.0), good
    assert "cannot be interrupted" in fault_server.log
    for channel in channels:
        channel.close()


def test_hung_python_model_is_killed_and_restarted(fault_server: ServerProcess) -> None:
    with fault_server.channel() as channel:
        assert _call(channel, "py_hang", 1.0) == "OK"
        outcome, took = _timed(channel, "py_hang", -9.0)
        assert outcome.startswith("DEADLINE_EXCEEDED") and "timeout of 0.5 s" in outcome, outcome
        assert took < scaled(3.0), took
        # A new stub serves the next request.
        wait_until(lambda: _call(channel, "py_hang", 2.0) == "OK", timeout=scaled(20),
                   what="the restarted Python stub to answer")
