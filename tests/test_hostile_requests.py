"""Hostile and malformed requests (issue 9, defects 7 and 8): each gets the right status with a
one-line message, the log does not fill up, and the server keeps answering."""

from __future__ import annotations

import os

import grpc
import numpy as np
import pytest
from tritonclient.grpc import service_pb2 as pb
from util import ServerProcess, expect_rpc_error, identity_config, raw_request, write_model

INVALID = grpc.StatusCode.INVALID_ARGUMENT
INFER = "/inference.GRPCInferenceService/ModelInfer"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    repo = tmp_path_factory.mktemp("hostile")
    write_model(repo, "f", identity_config("f", [("INPUT0", "FP32", [4])], max_batch_size=4))
    write_model(repo, "b", identity_config("b", [("INPUT0", "BOOL", [4])]))
    write_model(repo, "i", identity_config("i", [("INPUT0", "INT32", [4])]))
    srv = ServerProcess([repo], ["--log-verbose", "1"])
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def channel(server: ServerProcess):
    with server.channel() as ch:
        yield ch


def raw(channel: grpc.Channel, method: str, body: bytes) -> bytes:
    return channel.unary_unary(method)(body, timeout=10)


def good(channel: grpc.Channel) -> None:
    data = np.arange(4, dtype=np.float32).reshape(1, 4)
    answer = pb.ModelInferResponse.FromString(
        raw(channel, INFER, raw_request("f", [("INPUT0", "FP32", data)]).SerializeToString()))
    assert np.frombuffer(answer.raw_output_contents[0], np.float32).tolist() == [0, 1, 2, 3]


METHODS = [
    "/inference.GRPCInferenceService/ServerLive",
    "/inference.GRPCInferenceService/ModelReady",
    "/inference.GRPCInferenceService/ModelMetadata",
    "/inference.GRPCInferenceService/RepositoryModelLoad",
    INFER,
    "/grpc.health.v1.Health/Check",
]
GARBAGE = [b"\xff", b"\x0a\xff\xff\xff\xff\x0f", b"\x08", b"\x3a\x05ab", os.urandom(64) + b"\xff\xff"]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("body", GARBAGE, ids=[f"garbage{i}" for i in range(len(GARBAGE))])
def test_undecodable_body_is_invalid_argument_in_one_line(channel, method: str, body: bytes) -> None:
    err = expect_rpc_error(INVALID, raw, channel, method, body)
    assert "\n" not in err.details() and "malformed" in err.details(), err.details()


def test_garbage_on_a_stream_answers_that_request_only(server: ServerProcess) -> None:
    with server.channel() as ch:
        call = ch.stream_stream("/inference.GRPCInferenceService/ModelStreamInfer")
        data = np.ones((1, 4), np.float32)
        bodies = [b"\xff", raw_request("f", [("INPUT0", "FP32", data)], request_id="ok").SerializeToString()]
        answers = [pb.ModelStreamInferResponse.FromString(a) for a in call(iter(bodies), timeout=10)]
    errors = [a.error_message for a in answers if a.error_message]
    assert len(answers) == 2 and len(errors) == 1 and "malformed" in errors[0], answers
    assert [a.infer_response.id for a in answers if not a.error_message] == ["ok"]


def test_a_flood_of_bad_requests_logs_a_few_lines(server: ServerProcess, channel) -> None:
    before = len(server.lines)
    for _ in range(300):
        with pytest.raises(grpc.RpcError):
            raw(channel, INFER, b"\xff")
    good(channel)
    new = server.lines[before:]
    assert len(new) <= 20, "\n".join(new[-30:])
    assert not any("Traceback" in line for line in new)


def _request(model: str = "f", version: str = "", **kwargs) -> pb.ModelInferRequest:
    data = kwargs.pop("data", np.ones((1, 4), np.float32))
    datatype = kwargs.pop("datatype", "FP32")
    request = raw_request(model, [("INPUT0", datatype, data)], version=version)
    for key, (field, value) in kwargs.items():  # e.g. priority=("int64_param", 1)
        setattr(request.parameters[key], field, value)
    return request


def _two_typed_fields() -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="i")
    tensor = request.inputs.add(name="INPUT0", datatype="INT32", shape=[4])
    tensor.contents.int_contents.extend([1, 2, 3, 4])
    tensor.contents.fp32_contents.extend([1, 2, 3, 4])
    return request


def _wrong_typed_field() -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="i")
    request.inputs.add(name="INPUT0", datatype="INT32", shape=[4]).contents.fp32_contents.extend([1, 2, 3, 4])
    return request


def _shm_input() -> pb.ModelInferRequest:
    request = _request()
    request.inputs[0].parameters["shared_memory_region"].string_param = "region0"
    request.inputs[0].parameters["shared_memory_byte_size"].int64_param = 16
    del request.raw_input_contents[:]
    return request


def _shm_output() -> pb.ModelInferRequest:
    request = _request()
    output = request.outputs.add(name="OUTPUT0")
    output.parameters["shared_memory_region"].string_param = "out0"
    return request


CASES = [
    ("version_space", lambda: _request(version=" 1"), INVALID, "version string ' 1'"),
    ("version_leading_zero", lambda: _request(version="01"), INVALID, "version string '01'"),
    ("version_plus", lambda: _request(version="+1"), INVALID, "version string '+1'"),
    ("version_arabic_digit", lambda: _request(version="\u0661"), INVALID, "version string"),
    ("version_huge", lambda: _request(version="9" * 30), INVALID, "version string"),
    ("bool_byte_2", lambda: _request("b", data=np.array([0, 1, 2, 1], np.uint8), datatype="BOOL"), INVALID,
     "BOOL elements must be bytes 0 or 1"),
    ("two_typed_fields", _two_typed_fields, INVALID, "binary data was already supplied"),
    ("wrong_typed_field", _wrong_typed_field, INVALID, "of type 'FP32', expected datatype 'INT32'"),
    ("priority_string", lambda: _request(priority=("string_param", "high")), INVALID, "'priority' parameter"),
    ("priority_negative", lambda: _request(priority=("int64_param", -1)), INVALID, "'priority', expected value >= 0"),
    ("priority_double", lambda: _request(priority=("double_param", 1.5)), INVALID, "'priority' parameter"),
    ("timeout_string", lambda: _request(timeout=("string_param", "5")), INVALID, "'timeout' parameter"),
    ("timeout_bool", lambda: _request(timeout=("bool_param", True)), INVALID, "'timeout' parameter"),
    ("sequence_start_int", lambda: _request(sequence_start=("int64_param", 1)), INVALID, "'sequence_start'"),
    ("reserved_triton_key", lambda: _request(triton_secret=("bool_param", True)), INVALID, "reserved for Triton"),
    ("shm_input", _shm_input, grpc.StatusCode.NOT_FOUND, "Unable to find shared memory region: 'region0'"),
    ("shm_output", _shm_output, INVALID, "'shared_memory_byte_size' must be specified along with"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_strictness(channel, case) -> None:
    _, build, code, fragment = case
    err = expect_rpc_error(code, raw, channel, INFER, build().SerializeToString())
    assert fragment in err.details(), err.details()
    good(channel)


def test_canonical_version_and_valid_parameters_still_work(channel) -> None:
    for request in (_request(version="1"), _request(priority=("uint64_param", 1)),
                    _request(priority=("int64_param", 0)), _request(timeout=("int64_param", 1000)),
                    _request(sequence_id=("string_param", "abc")), _request(custom=("double_param", 0.5))):
        answer = pb.ModelInferResponse.FromString(raw(channel, INFER, request.SerializeToString()))
        assert answer.model_version == "1"


def test_unloaded_model_is_not_found(tmp_path) -> None:
    """Triton answers NOT_FOUND for a model with no available version (clients retry UNAVAILABLE
    forever); a model being loaded or not yet loaded is the same case."""
    write_model(tmp_path, "m", identity_config("m", [("INPUT0", "FP32", [4])]))
    srv = ServerProcess([tmp_path], ["--model-control-mode", "explicit", "--load-model", "m"])
    try:
        with srv.channel() as ch:
            body = raw_request("m", [("INPUT0", "FP32", np.ones(4, np.float32))]).SerializeToString()
            raw(ch, INFER, body)
            ch.unary_unary("/inference.GRPCInferenceService/RepositoryModelUnload")(
                pb.RepositoryModelUnloadRequest(model_name="m").SerializeToString(), timeout=30)
            err = expect_rpc_error(grpc.StatusCode.NOT_FOUND, raw, ch, INFER, body)
            assert "'m' has no available versions" in err.details()
    finally:
        srv.stop()
