"""ModelInfer: outputs, requested subsets and order, ids, versions, batching limits, large messages."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from transports import TRANSPORTS, open_stub
from util import ServerProcess, client, expect_rpc_error, output_array, raw_request, scaled


# The raw-stub tests run over both transports (transports.py): gRPC, and the same requests and
# checks over Triton's HTTP/REST protocol.
@pytest.fixture(scope="module", params=TRANSPORTS)
def simple_stub(onnx_server: ServerProcess, request: pytest.FixtureRequest):
    with open_stub(onnx_server, request.param) as stub:
        yield stub


@pytest.fixture(scope="module", params=TRANSPORTS)
def id_stub(identity_server: ServerProcess, request: pytest.FixtureRequest):
    with open_stub(identity_server, request.param) as stub:
        yield stub


def simple_inputs(batch: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    a = rng.integers(-(2**20), 2**20, size=(batch, 16), dtype=np.int32)
    b = rng.integers(-(2**20), 2**20, size=(batch, 16), dtype=np.int32)
    return a, b


def simple_request(a: np.ndarray, b: np.ndarray, outputs: list[str] | None = None, request_id: str = ""):
    request = raw_request("simple", [("INPUT0", "INT32", a), ("INPUT1", "INT32", b)], request_id=request_id)
    for name in outputs or []:
        request.outputs.add(name=name)
    return request


def test_simple_all_outputs_raw_in_order(simple_stub) -> None:
    a, b = simple_inputs(3, seed=1)
    response = simple_stub.ModelInfer(simple_request(a, b), timeout=10)
    assert response.model_name == "simple"
    assert response.model_version == "1"
    assert [(o.name, o.datatype, list(o.shape)) for o in response.outputs] == [
        ("OUTPUT0", "INT32", [3, 16]), ("OUTPUT1", "INT32", [3, 16])]
    assert len(response.raw_output_contents) == 2
    for out in response.outputs:
        assert not out.HasField("contents")
    np.testing.assert_array_equal(output_array(response, 0), a + b)
    np.testing.assert_array_equal(output_array(response, 1), a - b)


@pytest.mark.parametrize("requested", [["OUTPUT0"], ["OUTPUT1"], ["OUTPUT1", "OUTPUT0"], ["OUTPUT0", "OUTPUT1"]])
def test_simple_requested_outputs_subset_and_order(simple_stub, requested: list[str]) -> None:
    a, b = simple_inputs(2, seed=len(requested))
    response = simple_stub.ModelInfer(simple_request(a, b, outputs=requested), timeout=10)
    assert [o.name for o in response.outputs] == requested
    assert len(response.raw_output_contents) == len(requested)
    expected = {"OUTPUT0": a + b, "OUTPUT1": a - b}
    for index, name in enumerate(requested):
        np.testing.assert_array_equal(output_array(response, index), expected[name])


def test_simple_via_tritonclient_with_requested_output(onnx_server: ServerProcess) -> None:
    a, b = simple_inputs(8, seed=5)  # batch == max_batch_size is allowed
    inputs = [grpcclient.InferInput("INPUT0", [8, 16], "INT32"), grpcclient.InferInput("INPUT1", [8, 16], "INT32")]
    inputs[0].set_data_from_numpy(a)
    inputs[1].set_data_from_numpy(b)
    result = client(onnx_server).infer(
        "simple", inputs, outputs=[grpcclient.InferRequestedOutput("OUTPUT1")], request_id="req-42")
    assert result.get_response().id == "req-42"
    assert result.as_numpy("OUTPUT0") is None
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), a - b)


@pytest.mark.parametrize("request_id", ["", "abc", "id with spaces \u00e9", "x" * 500])
def test_request_id_echoed(id_stub, request_id: str) -> None:
    data = np.array([[1.0, 2.0]], dtype=np.float32)
    response = id_stub.ModelInfer(raw_request("id_FP32", [("IN", "FP32", data)], request_id=request_id), timeout=10)
    assert response.id == request_id
    np.testing.assert_array_equal(output_array(response, 0), data)


def test_request_parameters_are_accepted(onnx_server: ServerProcess) -> None:
    """tritonclient sends `priority` as uint64_param and custom parameters as typed values."""
    a, b = simple_inputs(1, seed=9)
    inputs = [grpcclient.InferInput("INPUT0", [1, 16], "INT32"), grpcclient.InferInput("INPUT1", [1, 16], "INT32")]
    inputs[0].set_data_from_numpy(a)
    inputs[1].set_data_from_numpy(b)
    result = client(onnx_server).infer(
        "simple", inputs, priority=1, parameters={"custom_str": "v", "custom_int": 3, "custom_bool": True})
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a + b)


def test_identity_two_inputs_order_and_subset(id_stub) -> None:
    a = np.arange(8, dtype=np.float32).reshape(2, 4) / 3
    b = np.arange(8, dtype=np.int32).reshape(2, 4) - 4
    request = raw_request("id_pair", [("INPUT1", "INT32", b), ("INPUT0", "FP32", a)])  # inputs in any order
    response = id_stub.ModelInfer(request, timeout=10)
    # Without `outputs`, every config output comes back, in config order.
    assert [(o.name, o.datatype) for o in response.outputs] == [("OUTPUT0", "FP32"), ("OUTPUT1", "INT32")]
    np.testing.assert_array_equal(output_array(response, 0), a)
    np.testing.assert_array_equal(output_array(response, 1), b)
    request.outputs.add(name="OUTPUT1")
    response = id_stub.ModelInfer(request, timeout=10)
    assert [o.name for o in response.outputs] == ["OUTPUT1"]
    assert len(response.raw_output_contents) == 1
    np.testing.assert_array_equal(output_array(response, 0), b)


def test_zero_size_output_still_has_a_raw_entry(id_stub) -> None:
    request = raw_request("id_FP32", [("IN", "FP32", np.zeros((3, 0), np.float32))])
    response = id_stub.ModelInfer(request, timeout=10)
    assert len(response.raw_output_contents) == 1
    assert response.raw_output_contents[0] == b""
    assert list(response.outputs[0].shape) == [3, 0]


# -- versions --


@pytest.mark.parametrize("version,expected", [("", "3"), ("1", "1"), ("3", "3")])
def test_infer_version_selection(id_stub, version: str, expected: str) -> None:
    data = np.array([[0.5, -0.5]], dtype=np.float32)[0]
    response = id_stub.ModelInfer(raw_request("id_versions", [("INPUT0", "FP32", data)], version=version), timeout=10)
    assert response.model_version == expected
    np.testing.assert_array_equal(output_array(response, 0), data)


def test_infer_version_not_loaded_is_not_found(id_stub) -> None:
    data = np.zeros(2, np.float32)
    for version in ("2", "4"):  # 2 is on disk but outside the version policy; 4 does not exist
        err = expect_rpc_error(grpc.StatusCode.NOT_FOUND, id_stub.ModelInfer,
                               raw_request("id_versions", [("INPUT0", "FP32", data)], version=version), timeout=10)
        assert "id_versions" in err.details() and version in err.details()


# -- max_batch_size --


# (Batches above the maximum and a missing batch dimension: the table in test_bad_inputs.py.)


def test_every_batch_size_up_to_max(simple_stub) -> None:
    for batch in range(1, 9):
        a, b = simple_inputs(batch, seed=100 + batch)
        response = simple_stub.ModelInfer(simple_request(a, b), timeout=10)
        np.testing.assert_array_equal(output_array(response, 0), a + b)
        np.testing.assert_array_equal(output_array(response, 1), a - b)


# -- ONNX models computed on the client too --


def test_add_sub_autocomplete_infer(onnx_server: ServerProcess) -> None:
    rng = np.random.default_rng(21)
    a = rng.standard_normal((3, 4)).astype(np.float32)
    b = rng.standard_normal((3, 4)).astype(np.float32)
    inputs = [grpcclient.InferInput("INPUT0", [3, 4], "FP32"), grpcclient.InferInput("INPUT1", [3, 4], "FP32")]
    inputs[0].set_data_from_numpy(a)
    inputs[1].set_data_from_numpy(b)
    result = client(onnx_server).infer("add_sub_autocomplete", inputs)
    np.testing.assert_allclose(result.as_numpy("OUTPUT0"), a + b, rtol=1e-6)
    np.testing.assert_allclose(result.as_numpy("OUTPUT1"), a - b, rtol=1e-6)


def test_mlp_matches_in_process_onnxruntime(onnx_server: ServerProcess, mlp_session) -> None:
    rng = np.random.default_rng(22)
    x = rng.standard_normal((5, 64)).astype(np.float32)
    inp = grpcclient.InferInput("INPUT0", [5, 64], "FP32")
    inp.set_data_from_numpy(x)
    out = client(onnx_server).infer("mlp", [inp]).as_numpy("OUTPUT0")
    expected = mlp_session.run(["OUTPUT0"], {"INPUT0": x})[0]
    assert out.shape == (5, 16)
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)


# -- large messages (above grpcio's 4 MiB default) --


def test_16_mib_input_round_trips(identity_server: ServerProcess) -> None:
    n = 16 * 1024 * 1024 // 4
    data = np.random.default_rng(23).standard_normal((1, n)).astype(np.float32)
    assert data.nbytes == 16 * 1024 * 1024
    inp = grpcclient.InferInput("IN", [1, n], "FP32")
    inp.set_data_from_numpy(data)
    out = client(identity_server).infer("id_FP32", [inp], client_timeout=scaled(60)).as_numpy("OUT")
    assert out.tobytes() == data.tobytes()


def test_16_mib_bytes_input_round_trips(id_stub) -> None:
    rng = np.random.default_rng(24)
    items = [rng.bytes(int(size)) for size in rng.integers(0, 8192, size=4096)]
    while sum(len(i) for i in items) < 16 * 1024 * 1024:
        items.append(rng.bytes(8192))
    data = np.empty(len(items), dtype=np.object_)
    data[:] = items
    request = raw_request("id_BYTES", [("IN", "BYTES", data.reshape(1, -1))])
    assert len(request.raw_input_contents[0]) > 16 * 1024 * 1024
    response = id_stub.ModelInfer(request, timeout=scaled(60))
    assert [bytes(v) for v in output_array(response, 0).ravel()] == items

