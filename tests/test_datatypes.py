"""Every datatype round-trips: through identity models (raw and typed `contents`) and
through the ONNX model `datatypes_onnx`. Outputs always come back in raw_output_contents."""

from __future__ import annotations

import zlib

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from transports import TRANSPORTS, open_stub
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc
from util import (
    NUMERIC_DATATYPES,
    ServerProcess,
    client,
    expect_rpc_error,
    output_array,
    random_array,
)

# Typed `contents` field per datatype (FP16 and BF16 have none: they must travel raw).
CONTENTS_FIELD = {
    "BOOL": "bool_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}

BYTES_SAMPLES = [
    b"", b"plain", b"\xff\xfe\xfd", b"\x00\x00", "h\u00e9llo \u2603".encode(), b"", b"x" * 300, b"\x80",
]


@pytest.fixture(scope="module", params=TRANSPORTS)
def stub(identity_server: ServerProcess, request: pytest.FixtureRequest):
    """A raw stub over gRPC, or the same requests over HTTP/REST (transports.py: typed contents
    travel as JSON `data`, raw ones as binary)."""
    with open_stub(identity_server, request.param) as made:
        yield made


def identity_roundtrip(srv: ServerProcess, datatype: str, data: np.ndarray, raw_dtype=None) -> np.ndarray:
    inp = grpcclient.InferInput("IN", list(data.shape), datatype)
    inp.set_data_from_numpy(data)
    result = client(srv).infer(f"id_{datatype}", [inp], outputs=[grpcclient.InferRequestedOutput("OUT")])
    response = result.get_response()
    assert [o.name for o in response.outputs] == ["OUT"]
    assert len(response.raw_output_contents) == 1
    assert response.outputs[0].datatype == datatype
    assert list(response.outputs[0].shape) == list(data.shape)
    return result.as_numpy("OUT")


# -- identity backend, raw_input_contents (tritonclient) --


@pytest.mark.parametrize("datatype", list(NUMERIC_DATATYPES))
def test_identity_numeric_roundtrip_raw(identity_server: ServerProcess, datatype: str) -> None:
    rng = np.random.default_rng(zlib.crc32(datatype.encode()) % 2**32)
    data = random_array(datatype, (3, 17), rng)
    out = identity_roundtrip(identity_server, datatype, data)
    assert out.dtype == data.dtype
    # Compare bit patterns so that NaN/-0.0 are checked exactly too.
    assert out.tobytes() == data.tobytes()


@pytest.mark.parametrize("datatype", ["FP32", "INT64", "BOOL", "BYTES"])
def test_identity_zero_element_tensor(identity_server: ServerProcess, datatype: str) -> None:
    dtype = np.object_ if datatype == "BYTES" else NUMERIC_DATATYPES[datatype]
    data = np.zeros((2, 0), dtype=dtype)
    out = identity_roundtrip(identity_server, datatype, data)
    assert out.shape == (2, 0)


def test_identity_bytes_roundtrip_raw(identity_server: ServerProcess) -> None:
    data = np.array(BYTES_SAMPLES, dtype=np.object_).reshape(2, 4)
    out = identity_roundtrip(identity_server, "BYTES", data)
    assert out.shape == (2, 4)
    assert [bytes(v) for v in out.ravel()] == BYTES_SAMPLES


def test_identity_bytes_all_empty_strings(identity_server: ServerProcess) -> None:
    data = np.array([b"", b"", b""], dtype=np.object_).reshape(1, 3)
    out = identity_roundtrip(identity_server, "BYTES", data)
    assert [bytes(v) for v in out.ravel()] == [b"", b"", b""]


def test_identity_bf16_roundtrip_raw(identity_server: ServerProcess) -> None:
    ml_dtypes = pytest.importorskip("ml_dtypes")
    data = np.array([[1.0, -2.5, 3.140625, 0.0, -0.0, 1e30, -1e-30, 65504.0]], dtype=ml_dtypes.bfloat16)
    out = identity_roundtrip(identity_server, "BF16", data)
    assert out.dtype == ml_dtypes.bfloat16
    assert out.tobytes() == data.tobytes()
    np.testing.assert_array_equal(out.astype(np.float32), data.astype(np.float32))


def test_identity_bf16_raw_bits(stub) -> None:
    """BF16 as raw 2-byte patterns, without any client helper."""
    rng = np.random.default_rng(7)
    bits = rng.integers(0, 2**16, size=(2, 9), dtype=np.uint16)
    request = pb.ModelInferRequest(model_name="id_BF16")
    request.inputs.add(name="IN", datatype="BF16", shape=[2, 9])
    request.raw_input_contents.append(bits.astype("<u2").tobytes())
    response = stub.ModelInfer(request, timeout=10)
    assert response.outputs[0].datatype == "BF16"
    assert list(response.outputs[0].shape) == [2, 9]
    assert response.raw_output_contents[0] == bits.astype("<u2").tobytes()


# -- identity backend, typed contents (hand-built ModelInferRequest) --


def _contents_request(datatype: str, data: np.ndarray) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=f"id_{datatype}", id=f"typed-{datatype}")
    tensor = request.inputs.add(name="IN", datatype=datatype, shape=list(data.shape))
    getattr(tensor.contents, CONTENTS_FIELD[datatype]).extend(data.ravel().tolist())
    return request


@pytest.mark.parametrize("datatype", [d for d in CONTENTS_FIELD if d != "BYTES"])
def test_identity_numeric_roundtrip_typed_contents(stub, datatype: str) -> None:
    rng = np.random.default_rng(zlib.crc32((datatype + "typed").encode()) % 2**32)
    data = random_array(datatype, (2, 5), rng)
    request = _contents_request(datatype, data)
    assert len(request.raw_input_contents) == 0
    response = stub.ModelInfer(request, timeout=10)
    assert response.id == f"typed-{datatype}"
    # Triton answers in raw_output_contents, never in typed contents.
    assert len(response.raw_output_contents) == 1
    assert not response.outputs[0].HasField("contents")
    out = output_array(response, 0)
    assert out.dtype == data.dtype
    assert out.tobytes() == data.tobytes()


def test_identity_bytes_roundtrip_typed_contents(stub) -> None:
    # JSON strings carry only UTF-8 text: over HTTP the samples that are not UTF-8 stay out.
    samples = [v for v in BYTES_SAMPLES if isinstance(stub, grpc_stub_type()) or _is_utf8(v)]
    data = np.array(samples, dtype=np.object_).reshape(len(samples) // 2, 2)
    response = stub.ModelInfer(_contents_request("BYTES", data), timeout=10)
    assert len(response.raw_output_contents) == 1
    out = output_array(response, 0)
    assert out.shape == data.shape
    assert [bytes(v) for v in out.ravel()] == samples


def grpc_stub_type() -> type:
    return service_pb2_grpc.GRPCInferenceServiceStub


def _is_utf8(value: bytes) -> bool:
    try:
        value.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def test_typed_contents_on_onnx_simple(onnx_server: ServerProcess) -> None:
    rng = np.random.default_rng(11)
    a = rng.integers(-1000, 1000, size=(3, 16), dtype=np.int32)
    b = rng.integers(-1000, 1000, size=(3, 16), dtype=np.int32)
    request = pb.ModelInferRequest(model_name="simple", id="typed-simple")
    for name, arr in (("INPUT0", a), ("INPUT1", b)):
        tensor = request.inputs.add(name=name, datatype="INT32", shape=[3, 16])
        tensor.contents.int_contents.extend(arr.ravel().tolist())
    with onnx_server.channel() as channel:
        response = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=10)
    assert [o.name for o in response.outputs] == ["OUTPUT0", "OUTPUT1"]
    assert len(response.raw_output_contents) == 2
    np.testing.assert_array_equal(output_array(response, 0), a + b)
    np.testing.assert_array_equal(output_array(response, 1), a - b)


# -- ONNX Runtime: datatypes_onnx (13 required inputs) --

ONNX_DATATYPES = [d for d in NUMERIC_DATATYPES] + ["BYTES"]


def _onnx_name(datatype: str) -> str:
    return "STRING" if datatype == "BYTES" else datatype


def _datatypes_onnx_inputs(length: int, seed: int) -> dict[str, tuple[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    tensors = {}
    for datatype in ONNX_DATATYPES:
        if datatype == "BYTES":
            words = [b"", b"abc", "\u00fcml\u00e4ut".encode(), b"Z" * 40, b"0"]
            arr = np.array([words[i % len(words)] for i in range(length)], dtype=np.object_)
        else:
            arr = random_array(datatype, (length,), rng)
        tensors[f"IN_{_onnx_name(datatype)}"] = (datatype, arr)
    return tensors


@pytest.mark.parametrize("length", [1, 7, 1000])
def test_datatypes_onnx_roundtrip(onnx_server: ServerProcess, length: int) -> None:
    tensors = _datatypes_onnx_inputs(length, seed=length)
    assert len(tensors) == 13
    inputs = []
    for name, (datatype, arr) in tensors.items():
        inp = grpcclient.InferInput(name, list(arr.shape), datatype)
        inp.set_data_from_numpy(arr)
        inputs.append(inp)
    result = client(onnx_server).infer("datatypes_onnx", inputs)
    response = result.get_response()
    assert len(response.raw_output_contents) == len(response.outputs) == 13
    for name, (datatype, arr) in tensors.items():
        out_name = "OUT_" + name[3:]
        out = result.as_numpy(out_name)
        assert out is not None, out_name
        assert result.get_output(out_name).datatype == datatype
        assert out.shape == arr.shape, out_name
        if datatype == "BYTES":
            assert [bytes(v) for v in out] == list(arr), out_name
        else:
            assert out.dtype == arr.dtype, out_name
            assert out.tobytes() == arr.tobytes(), out_name


def test_datatypes_onnx_missing_one_input(onnx_server: ServerProcess) -> None:
    tensors = _datatypes_onnx_inputs(4, seed=3)
    del tensors["IN_UINT16"]
    request = pb.ModelInferRequest(model_name="datatypes_onnx")
    for name, (datatype, arr) in tensors.items():
        request.inputs.add(name=name, datatype=datatype, shape=list(arr.shape))
        request.raw_input_contents.append(
            b"".join(len(v).to_bytes(4, "little") + v for v in arr) if datatype == "BYTES" else arr.tobytes())
    with onnx_server.channel() as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        err = expect_rpc_error(grpc.StatusCode.INVALID_ARGUMENT, stub.ModelInfer, request, timeout=10)
    assert "IN_UINT16" in err.details()


def test_string_lower_onnx(onnx_server: ServerProcess) -> None:
    words = ["Hello", "WORLD", "MiXeD Case", "", "\u00c4RGER"]
    data = np.array([w.encode() for w in words], dtype=np.object_)
    inp = grpcclient.InferInput("INPUT0", [len(words)], "BYTES")
    inp.set_data_from_numpy(data)
    out = client(onnx_server).infer("string_lower", [inp]).as_numpy("OUTPUT0")
    assert [bytes(v).decode() for v in out] == [w.lower() for w in words]
