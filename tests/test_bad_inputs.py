"""Malformed ModelInfer requests: each gets Triton's status code and a message that names
what was wrong; afterwards the server still answers good requests correctly.

Requests are built by hand with tritonclient's service_pb2 (tritonclient's own helpers
refuse to build most of them) and sent through a plain gRPC stub.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import grpc
import numpy as np
import pytest
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc
from util import ServerProcess, encode_bytes, expect_rpc_error, output_array, raw_request

INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND

A = np.array([[1.5, -2.0, 3.0, 4.25]], dtype=np.float32)  # id_pair INPUT0: FP32 [-1, 4]
B = np.array([[7, -8, 9, 10]], dtype=np.int32)  # id_pair INPUT1: INT32 [-1, 4]


def pair(*tensors: tuple[str, str, np.ndarray], model: str = "id_pair", version: str = "") -> pb.ModelInferRequest:
    return raw_request(model, list(tensors), version=version)


def good_pair() -> pb.ModelInferRequest:
    return pair(("INPUT0", "FP32", A), ("INPUT1", "INT32", B))


def manual(model: str, inputs: list[tuple[str, str, list[int]]], raw: list[bytes]) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model)
    for name, datatype, shape in inputs:
        request.inputs.add(name=name, datatype=datatype, shape=shape)
    request.raw_input_contents.extend(raw)
    return request


def _both_raw_and_contents() -> pb.ModelInferRequest:
    request = good_pair()
    request.inputs[0].contents.fp32_contents.extend(A.ravel().tolist())
    return request


def _typed_count_mismatch() -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="id_pair")
    t0 = request.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 4])
    t0.contents.fp32_contents.extend([1.0, 2.0, 3.0])
    t1 = request.inputs.add(name="INPUT1", datatype="INT32", shape=[1, 4])
    t1.contents.int_contents.extend([1, 2, 3, 4])
    return request


def _no_data_for_input() -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="id_pair")
    t0 = request.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 4])
    t0.contents.fp32_contents.extend([1.0, 2.0, 3.0, 4.0])
    request.inputs.add(name="INPUT1", datatype="INT32", shape=[1, 4])
    return request


def _unknown_output() -> pb.ModelInferRequest:
    request = good_pair()
    request.outputs.add(name="OUTPUT9")
    return request


def _duplicate_output() -> pb.ModelInferRequest:
    request = good_pair()
    request.outputs.add(name="OUTPUT0")
    request.outputs.add(name="OUTPUT0")
    return request


def _bytes(shape: list[int], data: bytes) -> pb.ModelInferRequest:
    return manual("id_bytes", [("INPUT0", "BYTES", shape)], [data])


def _typed_bytes(shape: list[int], items: list[bytes]) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="id_bytes")
    request.inputs.add(name="INPUT0", datatype="BYTES", shape=shape).contents.bytes_contents.extend(items)
    return request


def _typed_int(shape: list[int], values: list[int]) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="id_nobatch")
    request.inputs.add(name="INPUT0", datatype="INT32", shape=shape).contents.int_contents.extend(values)
    return request


def _typed_uint8_out_of_range() -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="id_UINT8")
    request.inputs.add(name="IN", datatype="UINT8", shape=[1, 2]).contents.uint_contents.extend([1, 300])
    return request


@dataclass(frozen=True)
class Case:
    id: str
    build: Callable[[], pb.ModelInferRequest]
    code: grpc.StatusCode
    names: tuple[str, ...]  # every one of these must appear in the message


HUGE = 2**62
I32 = np.int32

CASES = [
    # -- tensor metadata --
    Case("wrong_dtype", lambda: pair(("INPUT0", "INT32", A.view(I32)), ("INPUT1", "INT32", B)), INVALID, ("INPUT0",)),
    Case("unknown_dtype_string", lambda: manual("id_pair", [("INPUT0", "FLOAT", [1, 4]), ("INPUT1", "INT32", [1, 4])],
                                                [A.tobytes(), B.tobytes()]), INVALID, ("INPUT0",)),
    Case("wrong_shape", lambda: pair(("INPUT0", "FP32", np.zeros((1, 5), np.float32)), ("INPUT1", "INT32", B)),
         INVALID, ("INPUT0",)),
    Case("wrong_rank", lambda: pair(("INPUT0", "FP32", np.zeros((1, 2, 2), np.float32)), ("INPUT1", "INT32", B)),
         INVALID, ("INPUT0",)),
    Case("wrong_byte_count", lambda: manual("id_pair", [("INPUT0", "FP32", [1, 4]), ("INPUT1", "INT32", [1, 4])],
                                            [A.tobytes()[:-4], B.tobytes()]), INVALID, ("INPUT0",)),
    Case("too_many_bytes", lambda: manual("id_pair", [("INPUT0", "FP32", [1, 4]), ("INPUT1", "INT32", [1, 4])],
                                          [A.tobytes(), B.tobytes() + b"\0"]), INVALID, ("INPUT1",)),
    Case("missing_input", lambda: pair(("INPUT0", "FP32", A)), INVALID, ("INPUT1",)),
    Case("unknown_input", lambda: pair(("INPUT0", "FP32", A), ("INPUT1", "INT32", B), ("EXTRA", "FP32", A)),
         INVALID, ("EXTRA",)),
    Case("duplicate_input", lambda: pair(("INPUT0", "FP32", A), ("INPUT0", "FP32", A), ("INPUT1", "INT32", B)),
         INVALID, ("INPUT0",)),
    Case("both_raw_and_contents", _both_raw_and_contents, INVALID, ("INPUT0",)),
    Case("typed_count_mismatch", _typed_count_mismatch, INVALID, ("INPUT0",)),
    Case("no_data_for_input", _no_data_for_input, INVALID, ("INPUT1",)),
    Case("raw_count_too_many", lambda: manual("id_pair", [("INPUT0", "FP32", [1, 4]), ("INPUT1", "INT32", [1, 4])],
                                              [A.tobytes(), B.tobytes(), B.tobytes()]),
         INVALID, ("raw_input_contents",)),
    Case("raw_count_too_few", lambda: manual("id_pair", [("INPUT0", "FP32", [1, 4]), ("INPUT1", "INT32", [1, 4])],
                                             [A.tobytes()]), INVALID, ("raw_input_contents",)),
    Case("unknown_output", _unknown_output, INVALID, ("OUTPUT9",)),
    Case("duplicate_output", _duplicate_output, INVALID, ("OUTPUT0",)),
    # -- batching --
    Case("batch_above_max", lambda: pair(("INPUT0", "FP32", np.zeros((5, 4), np.float32)),
                                         ("INPUT1", "INT32", np.zeros((5, 4), I32))), INVALID, ("INPUT1",)),
    Case("batch_zero", lambda: pair(("INPUT0", "FP32", np.zeros((0, 4), np.float32)),
                                    ("INPUT1", "INT32", np.zeros((0, 4), I32))), INVALID, ("INPUT1",)),
    # When several inputs are wrong Triton names the last one (it checks them last to first).
    Case("no_batch_dim", lambda: pair(("INPUT0", "FP32", A[0]), ("INPUT1", "INT32", B[0])), INVALID, ("INPUT1",)),
    Case("batch_sizes_disagree", lambda: pair(("INPUT0", "FP32", np.zeros((2, 4), np.float32)),
                                              ("INPUT1", "INT32", np.zeros((3, 4), I32))), INVALID,
         ("INPUT0", "batch size does not match")),
    # -- model and version --
    Case("unknown_model", lambda: pair(("INPUT0", "FP32", A), model="no_such_model"), NOT_FOUND, ("no_such_model",)),
    Case("unknown_version", lambda: pair(("INPUT0", "FP32", A), ("INPUT1", "INT32", B), version="9"),
         NOT_FOUND, ("id_pair", "9")),
    Case("bad_version_string", lambda: pair(("INPUT0", "FP32", A), ("INPUT1", "INT32", B), version="v1"),
         INVALID, ("v1",)),
    # -- malformed BYTES --
    Case("bytes_truncated_length_prefix", lambda: _bytes([2], encode_bytes([b"ab"]) + b"\x01\x00"),
         INVALID, ("INPUT0",)),
    Case("bytes_truncated_prefix_only", lambda: _bytes([1], b"\x05\x00"), INVALID, ("INPUT0",)),
    Case("bytes_length_beyond_end", lambda: _bytes([1], (10).to_bytes(4, "little") + b"abc"), INVALID, ("INPUT0",)),
    Case("bytes_huge_length", lambda: _bytes([1], (2**32 - 1).to_bytes(4, "little") + b"abc"), INVALID, ("INPUT0",)),
    Case("bytes_trailing_bytes", lambda: _bytes([1], encode_bytes([b"abc"]) + b"xyz"), INVALID, ("INPUT0",)),
    Case("bytes_too_few_elements", lambda: _bytes([3], encode_bytes([b"a", b"b"])), INVALID, ("INPUT0",)),
    Case("bytes_empty_data_for_one", lambda: _bytes([1], b""), INVALID, ("INPUT0",)),
    # -- negative and overflowing dims --
    Case("negative_dim_bytes", lambda: _bytes([-1], b""), INVALID, ("INPUT0",)),
    Case("negative_dim_bytes_typed", lambda: _typed_bytes([-1], []), INVALID, ("INPUT0",)),
    Case("negative_dims_product_one", lambda: manual("id_nobatch", [("INPUT0", "INT32", [-1, -1])],
                                                     [np.int32(5).tobytes()]), INVALID, ("INPUT0",)),
    Case("negative_dims_product_four", lambda: manual("id_nobatch", [("INPUT0", "INT32", [-2, -2])],
                                                      [np.arange(4, dtype=I32).tobytes()]), INVALID, ("INPUT0",)),
    Case("negative_dims_typed", lambda: _typed_int([-2, -2], [1, 2, 3, 4]), INVALID, ("INPUT0",)),
    Case("negative_dims_typed_product_one", lambda: _typed_int([-1, -1], [5]), INVALID, ("INPUT0",)),
    Case("negative_and_zero_dim", lambda: manual("id_nobatch", [("INPUT0", "INT32", [-1, 0])], [b""]),
         INVALID, ("INPUT0",)),
    Case("negative_batch_dim", lambda: manual("id_pair", [("INPUT0", "FP32", [-1, 4]), ("INPUT1", "INT32", [-1, 4])],
                                              [A.tobytes(), B.tobytes()]), INVALID, ("INPUT1",)),
    Case("huge_dims", lambda: manual("id_nobatch", [("INPUT0", "INT32", [HUGE, HUGE])],
                                     [np.arange(4, dtype=I32).tobytes()]), INVALID, ("INPUT0",)),
    Case("huge_dims_wrapping_to_zero", lambda: manual("id_nobatch", [("INPUT0", "INT32", [2**32, 2**32])], [b""]),
         INVALID, ("INPUT0",)),
    Case("huge_dims_typed", lambda: _typed_int([HUGE, HUGE], [1, 2, 3, 4]), INVALID, ("INPUT0",)),
    Case("huge_dims_bytes", lambda: manual("id_bytes", [("INPUT0", "BYTES", [HUGE])], [encode_bytes([b"a"])]),
         INVALID, ("INPUT0",)),
    Case("huge_batch", lambda: manual("id_FP32", [("IN", "FP32", [HUGE, HUGE])], [A.tobytes()]), INVALID, ("IN",)),
    # -- typed contents that do not fit the type --
    Case("typed_value_out_of_range", _typed_uint8_out_of_range, INVALID, ("IN",)),
]


@pytest.fixture(scope="module")
def stub(identity_server: ServerProcess):
    channel = identity_server.channel()
    yield service_pb2_grpc.GRPCInferenceServiceStub(channel)
    channel.close()


def assert_good_requests_work(stub) -> None:
    response = stub.ModelInfer(good_pair(), timeout=10)
    np.testing.assert_array_equal(output_array(response, 0), A)
    np.testing.assert_array_equal(output_array(response, 1), B)
    items = [b"ok", b"", b"\xff"]
    response = stub.ModelInfer(_bytes([3], encode_bytes(items)), timeout=10)
    assert [bytes(v) for v in output_array(response, 0)] == items


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_request(stub, case: Case) -> None:
    err = expect_rpc_error(case.code, stub.ModelInfer, case.build(), timeout=10)
    for name in case.names:
        assert name in err.details(), f"{name!r} not in message: {err.details()}"
    assert_good_requests_work(stub)


def test_server_answers_after_every_bad_request(stub, identity_server: ServerProcess) -> None:
    """All bad requests in a row, then good ones: nothing is left broken."""
    for case in CASES:
        with pytest.raises(grpc.RpcError):
            stub.ModelInfer(case.build(), timeout=10)
    assert_good_requests_work(stub)
    assert identity_server.proc.poll() is None


def test_bad_dtype_on_onnx_model(onnx_server: ServerProcess) -> None:
    a = np.zeros((1, 16), np.float32)
    request = raw_request("simple", [("INPUT0", "FP32", a), ("INPUT1", "INT32", np.zeros((1, 16), I32))])
    with onnx_server.channel() as channel:
        onnx_stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        err = expect_rpc_error(INVALID, onnx_stub.ModelInfer, request, timeout=10)
        assert "INPUT0" in err.details() and "INT32" in err.details()
        x = np.arange(16, dtype=I32).reshape(1, 16)
        response = onnx_stub.ModelInfer(raw_request("simple", [("INPUT0", "INT32", x), ("INPUT1", "INT32", x)]),
                                        timeout=10)
        np.testing.assert_array_equal(output_array(response, 0), 2 * x)
        np.testing.assert_array_equal(output_array(response, 1), 0 * x)
