"""The classification extension (`InferRequestedOutput(name, class_count=k)`) through a real server.

The repository is the one scripts/gen_triton_compat.py writes: a quick-start style image
classifier (FP32 [N, 1000] with 1000 labels; TorchScript) and identity models of every
classifiable datatype with a short labels file, where the expected strings are worked out here
from the values sent (Triton's format: C's %f for floats, decimal integers, `value:index[:label]`).

Every case but the stream runs over gRPC and over HTTP/REST (`via`: tritonclient.grpc or
tritonclient.http, whose `InferRequestedOutput(class_count=k)` sends `"classification": k` in the
output's parameters), with the same strings, shapes and errors.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from transports import TRANSPORTS, open_stub
from tritonclient.grpc import service_pb2
from util import (
    PYTHON,
    ROOT,
    ServerProcess,
    client,
    expect_error,
    expect_rpc_error,
    output_array,
    raw_request,
    require,
    scaled,
    write_model,
)

torch = require("torch")  # the image classifier is TorchScript
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

GENERATOR = ROOT / "scripts" / "gen_triton_compat.py"
LABELS = [b"zero", b"one", b"", b"three", b"four"]  # SHORT_LABELS in the generator
IMAGE = (3, 8, 8)


@pytest.fixture(scope="module")
def cls_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("cls_repo")
    proc = subprocess.run([PYTHON, str(GENERATOR), str(repo), "--only", "classification"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    identity = ('backend: "identity"\nmax_batch_size: 0\n'
                'input [ { name: "IN" data_type: TYPE_FP32 dims: [ -1 ] } ]\n')
    write_model(repo, "cls_missing_labels", identity
                + 'output [ { name: "OUT" data_type: TYPE_FP32 dims: [ -1 ] label_filename: "nope.txt" } ]\n')
    write_model(repo, "cls_outside_labels", identity
                + 'output [ { name: "OUT" data_type: TYPE_FP32 dims: [ -1 ] label_filename: "../x.txt" } ]\n')
    write_model(repo, "cls_crlf_labels", identity
                + 'output [ { name: "OUT" data_type: TYPE_FP32 dims: [ -1 ] label_filename: "l.txt" } ]\n',
                files={"l.txt": b"a\r\nb"})
    return repo


@pytest.fixture(scope="module")
def cls_server(cls_repo: Path):
    server = ServerProcess([cls_repo])
    yield server
    server.stop()


def _input(name: str, arr: np.ndarray, datatype: str) -> grpcclient.InferInput:
    inp = grpcclient.InferInput(name, list(arr.shape), datatype)
    inp.set_data_from_numpy(arr)
    return inp


class Via:
    """One transport's tritonclient: the client, its inputs and requested outputs (one API both ways)."""

    def __init__(self, server: ServerProcess, transport: str) -> None:
        self.transport = transport
        self.lib: Any = httpclient if transport == "http" else grpcclient
        self.client: Any = (httpclient.InferenceServerClient(server.http_url, network_timeout=scaled(60))
                            if transport == "http" else client(server))

    def input(self, name: str, arr: np.ndarray, datatype: str) -> Any:
        inp = self.lib.InferInput(name, list(arr.shape), datatype)
        inp.set_data_from_numpy(arr)
        return inp

    def output(self, name: str, class_count: int = 0) -> Any:
        return self.lib.InferRequestedOutput(name, class_count=class_count)

    def infer(self, model: str, inputs: list[Any], outputs: list[Any] | None = None) -> Any:
        return self.client.infer(model, inputs, outputs=outputs)


def out_meta(result: Any, name: str) -> tuple[str, list[int]]:
    """(datatype, shape) of an output: tritonclient.http answers a dict, tritonclient.grpc a message."""
    out = result.get_output(name)
    if isinstance(out, dict):
        return out["datatype"], list(out["shape"])
    return out.datatype, list(out.shape)


@pytest.fixture(params=TRANSPORTS)
def transport(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def via(cls_server: ServerProcess, transport: str) -> Via:
    return Via(cls_server, transport)


def _expected(row: np.ndarray, k: int, labels: list[bytes]) -> list[bytes]:
    """Top-k of one batch item as Triton writes it; ties in index order."""
    flat = row.ravel()
    order = sorted(range(flat.size), key=lambda i: (-float(flat[i]), i))[:k]
    out = []
    for i in order:
        value = b"%f" % float(flat[i]) if flat.dtype.kind == "f" else b"%d" % int(flat[i])
        text = value + b":%d" % i
        label = labels[i] if i < len(labels) else b""
        out.append(text + b":" + label if label else text)
    return out


def test_announced_in_server_metadata(cls_server: ServerProcess) -> None:
    assert "classification" in client(cls_server).get_server_metadata().extensions


def test_quick_start_image_classifier_top3(via: Via) -> None:
    """Triton's quick-start flow (image_client -c 3): a batch of images, class_count 3, labels."""
    c = via.client
    images = np.random.default_rng(7).random((2, *IMAGE), dtype=np.float32)
    plain = c.infer("image_classifier", [via.input("INPUT__0", images, "FP32")]).as_numpy("OUTPUT__0")
    assert plain.shape == (2, 1000) and plain.dtype == np.float32
    result = c.infer("image_classifier", [via.input("INPUT__0", images, "FP32")],
                     outputs=[via.output("OUTPUT__0", class_count=3)])
    assert out_meta(result, "OUTPUT__0") == ("BYTES", [2, 3])
    classes = result.as_numpy("OUTPUT__0")
    labels = [f"class {i:04d}".encode() for i in range(1000)]
    for row in range(2):
        assert classes[row].tolist() == _expected(plain[row], 3, labels)
    # The image_client's own parsing: value, index, label.
    value, index, label = classes[0][0].decode().split(":")
    assert int(index) == int(np.argmax(plain[0])) and label == f"class {int(index):04d}"
    assert abs(float(value) - float(plain[0].max())) < 1e-6


def test_unbatched_classifier_with_reshape(via: Via) -> None:
    """densenet_onnx style: no batching, output dims [1000] (reshape [1, 1000, 1, 1]): shape [k]."""
    c = via.client
    image = np.random.default_rng(8).random(IMAGE, dtype=np.float32)
    plain = c.infer("image_classifier_nobatch", [via.input("INPUT__0", image, "FP32")]).as_numpy("OUTPUT__0")
    result = c.infer("image_classifier_nobatch", [via.input("INPUT__0", image, "FP32")],
                     outputs=[via.output("OUTPUT__0", class_count=5)])
    assert out_meta(result, "OUTPUT__0")[1] == [5]
    assert result.as_numpy("OUTPUT__0").tolist() == _expected(plain, 5, [f"class {i:04d}".encode()
                                                                         for i in range(1000)])


CLASSIFIABLE = ("FP32", "FP64", "INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64")


@pytest.mark.parametrize("datatype", CLASSIFIABLE)
def test_every_classifiable_type_batched(via: Via, datatype: str) -> None:
    """Exact strings for each datatype: ties keep index order, labels by line (line 2 is empty,
    classes past the file have none), and k larger than the classes gives them all."""
    from tritonclient.utils import triton_to_np_dtype

    dtype = np.dtype(triton_to_np_dtype(datatype))
    values = np.array([[3, 7, 7, 1, 9, 0, 7], [5, 4, 3, 2, 1, 6, 0]], dtype=dtype)
    if dtype.kind == "f":
        values = values / np.array(4, dtype=dtype) - np.array(0.5, dtype=dtype)  # fractions and negatives
    elif dtype.kind == "i":
        values = values - np.array(4, dtype=dtype)  # negatives
    c = via.client
    for k in (1, 2, 4, 7, 20):  # k=2 cuts through the tied 7s (the tie path), k=4 takes them all
        result = c.infer("classify_identity", [via.input(f"IN_{datatype}", values, datatype)],
                         outputs=[via.output(f"OUT_{datatype}", class_count=k)])
        assert out_meta(result, f"OUT_{datatype}") == ("BYTES", [2, min(k, 7)])
        got = result.as_numpy(f"OUT_{datatype}")
        for row in range(2):
            assert got[row].tolist() == _expected(values[row], k, LABELS), (datatype, k, row)


def test_exact_format_examples(via: Via) -> None:
    """Spelled out, as Triton's std::to_string writes them."""
    values = np.array([0.5, -1.25, 123456.789, 2.0e-7], dtype=np.float32)
    result = via.infer(
        "classify_identity_nobatch", [via.input("IN_FP32", values, "FP32")],
        outputs=[via.output("OUT_FP32", class_count=4)])
    assert result.as_numpy("OUT_FP32").tolist() == [
        b"123456.789062:2", b"0.500000:0:zero", b"0.000000:3:three", b"-1.250000:1:one"]
    ints = np.array([10, 250, 3], dtype=np.uint8)
    result = via.infer(
        "classify_identity_nobatch", [via.input("IN_UINT8", ints, "UINT8")],
        outputs=[via.output("OUT_UINT8", class_count=2)])
    assert result.as_numpy("OUT_UINT8").tolist() == [b"250:1:one", b"10:0:zero"]


def test_unbatched_shape_is_k(via: Via) -> None:
    values = np.array([0.1, 0.9, 0.4], dtype=np.float64)
    result = via.infer(
        "classify_identity_nobatch", [via.input("IN_FP64", values, "FP64")],
        outputs=[via.output("OUT_FP64", class_count=2)])
    assert out_meta(result, "OUT_FP64")[1] == [2]
    assert result.as_numpy("OUT_FP64").tolist() == [b"0.900000:1:one", b"0.400000:2"]


def test_classified_and_plain_outputs_in_one_request(via: Via) -> None:
    a = np.array([[1.0, 3.0, 2.0]], dtype=np.float32)
    b = np.array([[4, 5, 6]], dtype=np.int32)
    result = via.infer(
        "classify_identity", [via.input("IN_FP32", a, "FP32"), via.input("IN_INT32", b, "INT32")],
        outputs=[via.output("OUT_FP32", class_count=2),
                 via.output("OUT_INT32")])
    assert result.as_numpy("OUT_FP32").tolist() == [[b"3.000000:1:one", b"2.000000:2"]]
    assert out_meta(result, "OUT_INT32")[0] == "INT32"
    np.testing.assert_array_equal(result.as_numpy("OUT_INT32"), b)


def test_plain_answer_after_a_classified_one_of_the_same_shape(via: Via) -> None:
    """The encoder caches response headers by output shapes: a classified [1, 2] BYTES output and a
    plain [1, 2] FP32 one of the same output must not share one."""
    c = via.client
    three = np.array([[1.0, 3.0, 2.0]], dtype=np.float32)
    classified = c.infer("classify_identity", [via.input("IN_FP32", three, "FP32")],
                         outputs=[via.output("OUT_FP32", class_count=2)])
    assert out_meta(classified, "OUT_FP32")[0] == "BYTES"
    two = np.array([[5.0, 6.0]], dtype=np.float32)
    plain = c.infer("classify_identity", [via.input("IN_FP32", two, "FP32")],
                    outputs=[via.output("OUT_FP32")])
    assert out_meta(plain, "OUT_FP32")[0] == "FP32"
    np.testing.assert_array_equal(plain.as_numpy("OUT_FP32"), two)
    again = c.infer("classify_identity", [via.input("IN_FP32", three, "FP32")],
                    outputs=[via.output("OUT_FP32", class_count=2)])
    assert again.as_numpy("OUT_FP32").tolist() == [[b"3.000000:1:one", b"2.000000:2"]]


def test_classification_over_a_stream(cls_server: ServerProcess) -> None:
    import queue

    answers: queue.Queue = queue.Queue()
    c = client(cls_server)
    c.start_stream(callback=lambda result, error: answers.put(error or result))
    try:
        values = np.array([[2, 9, 4]], dtype=np.int64)
        c.async_stream_infer("classify_identity", [_input("IN_INT64", values, "INT64")],
                             outputs=[grpcclient.InferRequestedOutput("OUT_INT64", class_count=2)])
        result = answers.get(timeout=30)
    finally:
        c.stop_stream()
    assert isinstance(result, grpcclient.InferResult), result
    assert result.as_numpy("OUT_INT64").tolist() == [[b"9:1:one", b"4:2"]]


@pytest.mark.parametrize("datatype", ["FP16", "BYTES"])
def test_unsupported_types_are_invalid_argument(via: Via, datatype: str) -> None:
    values = np.array([[b"a", b"b"]], dtype=object) if datatype == "BYTES" else np.ones((1, 2), dtype=np.float16)
    error = expect_error("INVALID_ARGUMENT", via.infer, "classify_identity",
                         [via.input(f"IN_{datatype}", values, datatype)],
                         outputs=[via.output(f"OUT_{datatype}", class_count=1)])
    assert f"class result not available for output 'OUT_{datatype}'" in error.message()
    assert f"unsupported type '{datatype}'" in error.message()


def _raw_classification(param: service_pb2.InferParameter) -> service_pb2.ModelInferRequest:
    request = raw_request("classify_identity_nobatch", [("IN_FP32", "FP32", np.ones(3, dtype=np.float32))])
    out = request.outputs.add(name="OUT_FP32")
    out.parameters["classification"].CopyFrom(param)
    return request


@pytest.mark.parametrize(("param", "text"), [
    (service_pb2.InferParameter(int64_param=0), "expected a class count > 0, got 0"),
    (service_pb2.InferParameter(int64_param=-3), "expected a class count > 0, got -3"),
    (service_pb2.InferParameter(string_param="3"), "invalid value type for 'classification' parameter"),
])
def test_bad_class_count_is_invalid_argument(cls_server: ServerProcess, param, text: str, transport: str) -> None:
    with open_stub(cls_server, transport) as stub:
        error = expect_rpc_error(grpc.StatusCode.INVALID_ARGUMENT, stub.ModelInfer, _raw_classification(param),
                                 timeout=30)
        assert text in error.details()
        # Raw protocol: a classified output travels as BYTES in raw_output_contents.
        response = stub.ModelInfer(_raw_classification(service_pb2.InferParameter(int64_param=2)), timeout=30)
        assert response.outputs[0].datatype == "BYTES" and list(response.outputs[0].shape) == [2]
        assert output_array(response, 0).tolist() == [b"1.000000:0:zero", b"1.000000:1:one"]


def test_label_files_at_load(cls_server: ServerProcess, via: Via) -> None:
    rows = {r.name: r for r in client(cls_server).get_model_repository_index().models}
    assert rows["cls_missing_labels"].state == "UNAVAILABLE"
    assert "label_filename 'nope.txt'" in rows["cls_missing_labels"].reason
    assert rows["cls_outside_labels"].state == "UNAVAILABLE"
    assert "label_filename" in rows["cls_outside_labels"].reason
    # A CRLF file keeps its '\r' (Triton splits on '\n' only); the last line needs no newline.
    result = via.infer(
        "cls_crlf_labels", [via.input("IN", np.array([1.0, 2.0], dtype=np.float32), "FP32")],
        outputs=[via.output("OUT", class_count=2)])
    assert result.as_numpy("OUT").tolist() == [b"2.000000:1:b", b"1.000000:0:a\r"]


def test_inf_and_nan_values(via: Via) -> None:
    """Non-finite values do not break the ranking: %f writes inf and nan; NaN ranks first (numpy
    orders it above every number; Triton's comparison sort leaves it wherever it lands)."""
    values = np.array([1.0, np.inf, np.nan, -np.inf, 2.0], dtype=np.float32)
    result = via.infer(
        "classify_identity_nobatch", [via.input("IN_FP32", values, "FP32")],
        outputs=[via.output("OUT_FP32", class_count=5)])
    assert result.as_numpy("OUT_FP32").tolist() == [
        b"nan:2", b"inf:1:one", b"2.000000:4:four", b"1.000000:0:zero", b"-inf:3:three"]
