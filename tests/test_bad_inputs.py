"""Malformed ModelInfer requests: each gets Triton's status code and a message that names
what was wrong; afterwards the server still answers good requests correctly.

Every bad-input case of the ModelInfer path lives in the one table below (CASES): the exact
status code is asserted, so an error raised some other way while decoding (a numpy or
protobuf exception turned into INTERNAL or UNKNOWN) fails its case, and so does a message
that does not name the input. Requests are built by hand with tritonclient's service_pb2
(tritonclient's own helpers refuse to build most of them) and sent through a plain gRPC stub,
to the identity models (or, for cases marked "onnx", the example ONNX models).
The same table runs over HTTP/REST too (tests/transports.py), with the same messages.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
import pytest
from transports import TRANSPORTS, NotExpressible, infer_body, open_stub
from tritonclient.grpc import service_pb2 as pb
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


def _typed_contents_for_raw_only(datatype: str) -> pb.ModelInferRequest:
    """FP16 and BF16 have no typed contents field: they must come in raw_input_contents."""
    request = pb.ModelInferRequest(model_name=f"id_{datatype}")
    request.inputs.add(name="IN", datatype=datatype, shape=[1, 2]).contents.fp32_contents.extend([1.0, 2.0])
    return request


def _raw(model: str, name: str, datatype: str, shape: list[int], nbytes: int) -> pb.ModelInferRequest:
    """One input whose raw bytes number `nbytes`, whatever its shape needs."""
    return manual(model, [(name, datatype, shape)], [bytes(range(256)) * (nbytes // 256) + bytes(nbytes % 256)])


def _pair_with_input0_bytes(nbytes: int) -> pb.ModelInferRequest:
    """id_pair with INPUT0 (FP32 [1, 4]: 16 bytes) given `nbytes` bytes; INPUT1 is right."""
    return manual("id_pair", [("INPUT0", "FP32", [1, 4]), ("INPUT1", "INT32", [1, 4])],
                  [(A.tobytes() * 2)[:nbytes], B.tobytes()])


def _simple(a: np.ndarray, b: np.ndarray, dtype0: str = "INT32") -> pb.ModelInferRequest:
    return raw_request("simple", [("INPUT0", dtype0, a), ("INPUT1", "INT32", b)])


@dataclass(frozen=True)
class Case:
    id: str
    build: Callable[[], pb.ModelInferRequest]
    code: grpc.StatusCode
    names: tuple[str, ...]  # every one of these must appear in the message
    server: str = "identity"  # or "onnx": the example model_repository


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
    # -- raw byte counts that are not a whole number of elements (the shape needs the count in the name) --
    Case("raw_one_byte_short", lambda: _pair_with_input0_bytes(15), INVALID, ("INPUT0", "15", "16")),
    Case("raw_one_byte_long", lambda: _pair_with_input0_bytes(17), INVALID, ("INPUT0", "17", "16")),
    Case("raw_one_byte_short_nobatch", lambda: _raw("id_nobatch", "INPUT0", "INT32", [2, 2], 15),
         INVALID, ("INPUT0", "15", "16")),
    Case("raw_one_byte_short_fp16", lambda: _raw("id_FP16", "IN", "FP16", [1, 2], 3), INVALID, ("'IN'", "3", "4")),
    Case("raw_one_byte_long_bf16", lambda: _raw("id_BF16", "IN", "BF16", [1, 2], 5), INVALID, ("'IN'", "5", "4")),
    Case("raw_one_byte_short_int64", lambda: _raw("id_INT64", "IN", "INT64", [1, 2], 15),
         INVALID, ("'IN'", "15", "16")),
    Case("raw_one_byte_long_fp64", lambda: _raw("id_FP64", "IN", "FP64", [1, 1], 9), INVALID, ("'IN'", "9", "8")),
    Case("raw_bytes_for_zero_elements", lambda: _raw("id_FP32", "IN", "FP32", [1, 0], 3), INVALID, ("'IN'", "3")),
    Case("missing_input", lambda: pair(("INPUT0", "FP32", A)), INVALID, ("INPUT1",)),
    Case("unknown_input", lambda: pair(("INPUT0", "FP32", A), ("INPUT1", "INT32", B), ("EXTRA", "FP32", A)),
         INVALID, ("EXTRA",)),
    Case("duplicate_input", lambda: pair(("INPUT0", "FP32", A), ("INPUT0", "FP32", A), ("INPUT1", "INT32", B)),
         INVALID, ("INPUT0",)),
    Case("both_raw_and_contents", _both_raw_and_contents, INVALID, ("INPUT0",)),
    Case("typed_contents_for_fp16", lambda: _typed_contents_for_raw_only("FP16"), INVALID, ("'IN'",)),
    Case("typed_contents_for_bf16", lambda: _typed_contents_for_raw_only("BF16"), INVALID, ("'IN'",)),
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
    # -- the same checks in front of an ONNX Runtime model (simple: INT32 [-1, 16] x2, max_batch_size 8) --
    Case("onnx_wrong_dtype", lambda: _simple(np.zeros((1, 16), np.float32), np.zeros((1, 16), I32), "FP32"),
         INVALID, ("INPUT0", "INT32"), server="onnx"),
    Case("onnx_batch_above_max", lambda: _simple(np.zeros((9, 16), I32), np.zeros((9, 16), I32)),
         INVALID, ("batch-size must be <= 8 for 'simple'",), server="onnx"),
    # Both inputs are wrong: Triton names the last one it checks (it checks last to first).
    Case("onnx_no_batch_dim", lambda: _simple(np.zeros(16, I32), np.zeros(16, I32)), INVALID,
         ("unexpected shape for input 'INPUT1' for model 'simple'. Expected [-1,16], got [16]",), server="onnx"),
]


# Cases whose request only the gRPC wire can express (transports.NotExpressible): they are not
# run over HTTP, where the same mistake cannot be sent.
GRPC_ONLY = frozenset({"raw_count_too_many", "raw_count_too_few", "typed_contents_for_fp16",
                       "typed_contents_for_bf16"})
# Cases whose HTTP message names the HTTP wire's own fields (JSON `data`, `binary_data_size`)
# where gRPC's names protobuf's, or where the HTTP framing finds the fault first (an input with
# no `data` is refused while the body is read, as Triton's HTTP server does). Every other case
# has the gRPC message word for word.
WORDED_APART = frozenset({"both_raw_and_contents", "negative_dim_bytes_typed", "typed_value_out_of_range"})
RUNS = [(transport, case) for case in CASES for transport in TRANSPORTS
        if transport == "grpc" or case.id not in GRPC_ONLY]


@pytest.fixture(scope="module")
def stubs(request: pytest.FixtureRequest) -> Iterator[Callable[[str, str], Any]]:
    """(server name, transport) -> a stub on it; a server is started (or the session's reused) on first use."""
    with ExitStack() as stack:
        made: dict[tuple[str, str], Any] = {}

        def get(server: str, transport: str) -> Any:
            if (server, transport) not in made:
                srv: ServerProcess = request.getfixturevalue(f"{server}_server")
                made[server, transport] = stack.enter_context(open_stub(srv, transport))
            return made[server, transport]

        yield get


def assert_good_requests_work(stub, server: str) -> None:
    if server == "onnx":
        x = np.arange(16, dtype=I32).reshape(1, 16)
        response = stub.ModelInfer(_simple(x, x), timeout=10)
        np.testing.assert_array_equal(output_array(response, 0), 2 * x)
        np.testing.assert_array_equal(output_array(response, 1), 0 * x)
        return
    response = stub.ModelInfer(good_pair(), timeout=10)
    np.testing.assert_array_equal(output_array(response, 0), A)
    np.testing.assert_array_equal(output_array(response, 1), B)
    items = [b"ok", b"", b"\xff"]
    response = stub.ModelInfer(_bytes([3], encode_bytes(items)), timeout=10)
    assert [bytes(v) for v in output_array(response, 0)] == items


@pytest.mark.parametrize("transport,case", RUNS, ids=[f"{t}-{c.id}" for t, c in RUNS])
def test_bad_request(stubs, transport: str, case: Case) -> None:
    """The exact code (over HTTP: the status Triton gives that code) and the names in the message;
    then good requests still get right answers (the cases run in table order on one server, so
    nothing a bad request leaves behind, such as a cached shape, can go unnoticed)."""
    stub = stubs(case.server, transport)
    err = expect_rpc_error(case.code, stub.ModelInfer, case.build(), timeout=10)
    for name in case.names:
        assert name in err.details(), f"{name!r} not in message: {err.details()}"
    if transport == "http" and case.id not in WORDED_APART:  # word for word what gRPC says for the same request
        grpc_err = expect_rpc_error(case.code, stubs(case.server, "grpc").ModelInfer, case.build(), timeout=10)
        assert err.details() == grpc_err.details()
    assert_good_requests_work(stub, case.server)


def test_grpc_only_cases_have_no_http_form() -> None:
    """The cases left out over HTTP are exactly those the HTTP wire cannot carry."""
    for case in CASES:
        try:
            infer_body(case.build())
        except NotExpressible:
            assert case.id in GRPC_ONLY, case.id
        else:
            assert case.id not in GRPC_ONLY, case.id
