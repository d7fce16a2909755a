"""Triton's published examples on Nereid, called as their clients call them (switched to gRPC).

Repositories come from tests/compat/: python_examples.py (NVIDIA's python_backend `examples/`)
and docs_examples.py (Triton's `docs/examples/` model repository and the clients of
`client/src/python/examples/`). One server per repository. Each test names the example and
client it follows and asserts what that client asserts (its expected values and its exit
conditions).
"""

from __future__ import annotations

import queue
import urllib.request
from functools import partial

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from compat.docs_examples import build_docs_examples, densenet_reference, inception_scale, labels, ppm
from compat.python_examples import build_python_examples
from tritonclient.grpc import model_config_pb2, service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException, deserialize_bytes_tensor, np_to_triton_dtype
from util import ServerProcess, client, expect_error, require, scaled

# ---------------------------------------------------------------------------
# python_backend examples


@pytest.fixture(scope="module")
def py_server(tmp_path_factory: pytest.TempPathFactory):
    repo = build_python_examples(tmp_path_factory.mktemp("python_examples"))
    server = ServerProcess([repo])
    yield server
    server.stop()


def _fp32_pair(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    return rng.random(4, dtype=np.float32), rng.random(4, dtype=np.float32)


def _add_sub_inputs(a: np.ndarray, b: np.ndarray) -> list[grpcclient.InferInput]:
    inputs = [grpcclient.InferInput("INPUT0", list(a.shape), np_to_triton_dtype(a.dtype)),
              grpcclient.InferInput("INPUT1", list(b.shape), np_to_triton_dtype(b.dtype))]
    inputs[0].set_data_from_numpy(a)
    inputs[1].set_data_from_numpy(b)
    return inputs


ADD_SUB_OUTPUTS = [grpcclient.InferRequestedOutput("OUTPUT0"), grpcclient.InferRequestedOutput("OUTPUT1")]


@pytest.mark.parametrize("model", ["add_sub", "pytorch", "custom_metrics", "bls_async",
                                   "nobatch_auto_complete"])
def test_add_sub_family_client(py_server: ServerProcess, model: str) -> None:
    """examples/add_sub/client.py (and pytorch/, custom_metrics/, bls/async_client.py, auto_complete/):
    sum and difference of two random FP32 [4] vectors."""
    rng = np.random.default_rng(1)
    a, b = _fp32_pair(rng)
    with client(py_server) as c:
        result = c.infer(model, _add_sub_inputs(a, b), request_id="1", outputs=ADD_SUB_OUTPUTS)
    assert result.get_response().id == "1"
    np.testing.assert_allclose(result.as_numpy("OUTPUT0"), a + b, rtol=1e-6)
    np.testing.assert_allclose(result.as_numpy("OUTPUT1"), a - b, rtol=1e-6)


def test_bls_sync_client(py_server: ServerProcess) -> None:
    """examples/bls/sync_client.py: MODEL_NAME picks the BLS target (add_sub, then pytorch); an
    undefined model is an error the client prints."""
    rng = np.random.default_rng(2)
    a, b = _fp32_pair(rng)
    with client(py_server) as c:
        for target in ("add_sub", "pytorch"):
            inputs = _add_sub_inputs(a, b) + [grpcclient.InferInput("MODEL_NAME", [1], "BYTES")]
            inputs[2].set_data_from_numpy(np.array([target], dtype=np.object_))
            result = c.infer("bls_sync", inputs, request_id="1", outputs=ADD_SUB_OUTPUTS)
            np.testing.assert_allclose(result.as_numpy("OUTPUT0"), a + b, rtol=1e-6)
            np.testing.assert_allclose(result.as_numpy("OUTPUT1"), a - b, rtol=1e-6)
        inputs = _add_sub_inputs(a, b) + [grpcclient.InferInput("MODEL_NAME", [1], "BYTES")]
        inputs[2].set_data_from_numpy(np.array(["undefined_model"], dtype=np.object_))
        with pytest.raises(InferenceServerException) as info:
            c.infer("bls_sync", inputs, request_id="1", outputs=ADD_SUB_OUTPUTS)
        assert "undefined_model" in info.value.message()


class _Collector:
    """The examples' UserData + callback: every stream result or error lands in one queue."""

    def __init__(self) -> None:
        self.items: queue.Queue = queue.Queue()

    def callback(self, result, error) -> None:  # type: ignore[no-untyped-def]
        self.items.put(error if error else result)

    def take(self, count: int) -> list:
        got = []
        for _ in range(count):
            item = self.items.get(timeout=scaled(20))
            if isinstance(item, InferenceServerException):
                raise item
            got.append(item)
        return got


def test_square_client(py_server: ServerProcess) -> None:
    """examples/decoupled/square_client.py: four requests IN = 4, 2, 0, 1 on one stream; request i
    gets IN[i] responses each OUT = IN[i] (none for 0)."""
    in_values = [4, 2, 0, 1]
    collector = _Collector()
    with client(py_server) as c:
        c.start_stream(callback=partial(_Collector.callback, collector))
        for i, value in enumerate(in_values):
            inputs = [grpcclient.InferInput("IN", [1], "INT32")]
            inputs[0].set_data_from_numpy(np.array([value], dtype=np.int32))
            c.async_stream_infer(model_name="square_int32", inputs=inputs, request_id=str(i),
                                 outputs=[grpcclient.InferRequestedOutput("OUT")])
        results = collector.take(sum(in_values))
        c.stop_stream()
    assert collector.items.empty()
    by_id: dict[str, list[np.ndarray]] = {}
    for result in results:
        by_id.setdefault(result.get_response().id, []).append(result.as_numpy("OUT"))
    for i, value in enumerate(in_values):
        got = by_id.get(str(i), [])
        assert len(got) == value, (i, got)
        for out in got:
            np.testing.assert_array_equal(out, np.array([value], dtype=np.int32))


def test_repeat_client(py_server: ServerProcess) -> None:
    """examples/decoupled/repeat_client.py: one request IN = [4, 2, 0, 1] answered by four
    responses OUT = 4, 2, 0, 1 with IDX = 0..3, in order."""
    in_values = [4, 2, 0, 1]
    collector = _Collector()
    inputs = [grpcclient.InferInput("IN", [len(in_values)], "INT32"),
              grpcclient.InferInput("DELAY", [len(in_values)], "UINT32"),
              grpcclient.InferInput("WAIT", [1], "UINT32")]
    inputs[0].set_data_from_numpy(np.array(in_values, dtype=np.int32))
    inputs[1].set_data_from_numpy(np.full(len(in_values), 2, dtype=np.uint32))
    inputs[2].set_data_from_numpy(np.array([5], dtype=np.uint32))
    with client(py_server) as c:
        c.start_stream(callback=partial(_Collector.callback, collector))
        c.async_stream_infer(model_name="repeat_int32", inputs=inputs, request_id="0",
                             outputs=[grpcclient.InferRequestedOutput("OUT"), grpcclient.InferRequestedOutput("IDX")])
        results = collector.take(len(in_values))
        c.stop_stream()
    assert [r.get_response().id for r in results] == ["0"] * len(in_values)
    assert [int(r.as_numpy("OUT")[0]) for r in results] == in_values
    assert [int(r.as_numpy("IDX")[0]) for r in results] == list(range(len(in_values)))


@pytest.mark.parametrize("model, factor", [("bls_decoupled_sync", 1), ("bls_decoupled_async", 2)])
def test_bls_decoupled_client(py_server: ServerProcess, model: str, factor: int) -> None:
    """examples/bls_decoupled/{sync,async}_client.py: SUM = IN * IN (one BLS stream to
    square_int32) or 2 * IN * IN (two at once), for IN = 4, 2, 0, 1."""
    with client(py_server) as c:
        for value in (4, 2, 0, 1):
            data = np.array([value], dtype=np.int32)
            inputs = [grpcclient.InferInput("IN", [1], "INT32")]
            inputs[0].set_data_from_numpy(data)
            result = c.infer(model, inputs, request_id="1", outputs=[grpcclient.InferRequestedOutput("SUM")])
            np.testing.assert_array_equal(result.as_numpy("SUM"), factor * data * data)


def test_custom_metrics_client(py_server: ServerProcess) -> None:
    """examples/custom_metrics/client.py: after one inference the metrics page has the model's
    counter with its HELP, TYPE and labelled sample."""
    rng = np.random.default_rng(3)
    a, b = _fp32_pair(rng)
    with client(py_server) as c:
        c.infer("custom_metrics", _add_sub_inputs(a, b), request_id="1", outputs=ADD_SUB_OUTPUTS)
    assert py_server.metrics_port, "the metrics endpoint is on by default"
    with urllib.request.urlopen(f"http://127.0.0.1:{py_server.metrics_port}/metrics", timeout=scaled(10)) as page:
        text = page.read().decode()
    for pattern in ("# HELP requests_process_latency_ns Cumulative time spent processing requests",
                    "# TYPE requests_process_latency_ns counter",
                    'requests_process_latency_ns{model="custom_metrics",version="1"}'):
        assert pattern in text, pattern


@pytest.mark.parametrize("code", [2, 3, 4, 5, 7])
def test_bls_error_code_propagation(py_server: ServerProcess, code: int) -> None:
    """examples/bls_error_code/test_error_code_propagation.py: the code error_source puts in its
    TritonError reaches the BLS caller unchanged (not INTERNAL)."""
    inputs = [grpcclient.InferInput("ERROR_CODE", [1], "INT32")]
    inputs[0].set_data_from_numpy(np.array([code], dtype=np.int32))
    with client(py_server) as c:
        result = c.infer("bls_error_caller", inputs, outputs=[grpcclient.InferRequestedOutput("RECEIVED_CODE"),
                                                               grpcclient.InferRequestedOutput("ERROR_MESSAGE")])
    assert int(result.as_numpy("RECEIVED_CODE")[0]) == code
    assert result.as_numpy("ERROR_MESSAGE")[0].decode() == f"Test error with code {code}"


GRPC_CODE_OF_TRITON_ERROR = {2: "NOT_FOUND", 3: "INVALID_ARGUMENT", 4: "UNAVAILABLE", 5: "UNIMPLEMENTED",
                             7: "CANCELLED"}


@pytest.mark.parametrize("code", sorted(GRPC_CODE_OF_TRITON_ERROR))
def test_error_source_called_directly(py_server: ServerProcess, code: int) -> None:
    """The same error_source called by a client: the gRPC status matches the TritonError code and
    the message is the model's, unprefixed."""
    inputs = [grpcclient.InferInput("ERROR_CODE", [1], "INT32")]
    inputs[0].set_data_from_numpy(np.array([code], dtype=np.int32))
    with client(py_server) as c:
        error = expect_error(GRPC_CODE_OF_TRITON_ERROR[code], c.infer, "error_source", inputs)
    assert error.message() == f"Test error with code {code}"


@pytest.mark.parametrize("model, max_batch, dynamic", [("nobatch_auto_complete", 0, False),
                                                        ("batch_auto_complete", 4, True)])
def test_auto_complete_client(py_server: ServerProcess, model: str, max_batch: int, dynamic: bool) -> None:
    """examples/auto_complete/client.py: the served config is the one auto_complete_config made
    from a config that only names the model."""
    with client(py_server) as c:
        config = c.get_model_config(model, as_json=True)["config"]
        assert int(config.get("max_batch_size", 0)) == max_batch
        assert [(i["name"], i["data_type"], [int(d) for d in i["dims"]]) for i in config["input"]] == [
            ("INPUT0", "TYPE_FP32", [4]), ("INPUT1", "TYPE_FP32", [4])]
        assert [(o["name"], o["data_type"], [int(d) for d in o["dims"]]) for o in config["output"]] == [
            ("OUTPUT0", "TYPE_FP32", [4]), ("OUTPUT1", "TYPE_FP32", [4])]
        assert ("dynamic_batching" in config) == dynamic
        if max_batch:
            a = np.arange(8, dtype=np.float32).reshape(2, 4)
            b = np.ones((2, 4), dtype=np.float32)
            result = c.infer(model, _add_sub_inputs(a, b), outputs=ADD_SUB_OUTPUTS)
            np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a + b)
            np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), a - b)


def test_instance_kind(py_server: ServerProcess) -> None:
    """examples/instance_kind: a KIND_CPU instance group; the model sees its kind, device id and
    instance name in Triton's format."""
    x = np.zeros((1, 3), dtype=np.float32)
    inputs = [grpcclient.InferInput("INPUT0", [1, 3], "FP32")]
    inputs[0].set_data_from_numpy(x)
    with client(py_server) as c:
        facts = c.infer("instance_kind", inputs).as_numpy("KIND")[0]
    kind, device, name = (f.decode() for f in facts)
    assert kind == "CPU"
    assert device == "0"
    assert name in ("instance_kind_0_0", "instance_kind_0_1")


# ---------------------------------------------------------------------------
# docs/examples model repository and client/src/python/examples


@pytest.fixture(scope="module")
def docs_server(tmp_path_factory: pytest.TempPathFactory):
    require("onnx")
    repo = build_docs_examples(tmp_path_factory.mktemp("docs_examples"))
    server = ServerProcess([repo])
    yield server
    server.stop()


def _simple_inputs(a: np.ndarray, b: np.ndarray, datatype: str) -> list[grpcclient.InferInput]:
    inputs = [grpcclient.InferInput("INPUT0", list(a.shape), datatype),
              grpcclient.InferInput("INPUT1", list(b.shape), datatype)]
    inputs[0].set_data_from_numpy(a)
    inputs[1].set_data_from_numpy(b)
    return inputs


def test_simple_grpc_infer_client(docs_server: ServerProcess) -> None:
    """simple_grpc_infer_client.py: INPUT0 = 0..15, INPUT1 = ones, batch 1; sum and difference."""
    a = np.arange(16, dtype=np.int32).reshape(1, 16)
    b = np.ones((1, 16), dtype=np.int32)
    with client(docs_server) as c:
        result = c.infer("simple", _simple_inputs(a, b, "INT32"), outputs=ADD_SUB_OUTPUTS,
                         headers={"test": "1"}, client_timeout=scaled(10))
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a + b)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), a - b)


def test_simple_grpc_async_infer_client(docs_server: ServerProcess) -> None:
    """simple_grpc_async_infer_client.py: async_infer with a callback."""
    a = np.arange(16, dtype=np.int32).reshape(1, 16)
    b = np.ones((1, 16), dtype=np.int32)
    collector = _Collector()
    with client(docs_server) as c:
        c.async_infer("simple", _simple_inputs(a, b, "INT32"), partial(_Collector.callback, collector),
                      outputs=ADD_SUB_OUTPUTS)
        (result,) = collector.take(1)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a + b)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), a - b)


def test_simple_grpc_string_infer_client(docs_server: ServerProcess) -> None:
    """simple_grpc_string_infer_client.py: the numbers as strings; outputs are strings to int()."""
    in0 = np.arange(16, dtype=np.int32).reshape(1, 16)
    in1 = np.ones((1, 16), dtype=np.int32)
    a = np.array([str(x).encode("utf-8") for x in in0.reshape(-1)], dtype=np.object_).reshape(1, 16)
    b = np.array([str(x).encode("utf-8") for x in in1.reshape(-1)], dtype=np.object_).reshape(1, 16)
    with client(docs_server) as c:
        result = c.infer("simple_string", _simple_inputs(a, b, "BYTES"), outputs=ADD_SUB_OUTPUTS)
    out0, out1 = result.as_numpy("OUTPUT0"), result.as_numpy("OUTPUT1")
    for i in range(16):
        assert int(out0[0][i]) == in0[0][i] + in1[0][i]
        assert int(out1[0][i]) == in0[0][i] - in1[0][i]


def _explicit_request(model: str, fill) -> service_pb2.ModelInferRequest:  # type: ignore[no-untyped-def]
    request = service_pb2.ModelInferRequest(model_name=model, model_version="")
    for name, datatype, values in fill:
        tensor = request.inputs.add(name=name, datatype=datatype, shape=[1, 16])
        if datatype == "BYTES":
            tensor.contents.bytes_contents.extend(values)
        else:
            tensor.contents.int_contents.extend(values)
    request.outputs.add(name="OUTPUT0")
    request.outputs.add(name="OUTPUT1")
    return request


def test_grpc_explicit_int_and_byte_content_clients(docs_server: ServerProcess) -> None:
    """grpc_explicit_int_content_client.py / grpc_explicit_byte_content_client.py: raw stubs,
    inputs in `contents.int_contents` / `contents.bytes_contents`, outputs read from
    raw_output_contents."""
    with docs_server.channel() as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        response = stub.ModelInfer(_explicit_request("simple", [("INPUT0", "INT32", list(range(16))),
                                                                ("INPUT1", "INT32", [1] * 16)]), timeout=scaled(10))
        sums = np.frombuffer(response.raw_output_contents[0], dtype=np.int32)
        diffs = np.frombuffer(response.raw_output_contents[1], dtype=np.int32)
        assert sums.tolist() == [i + 1 for i in range(16)]
        assert diffs.tolist() == [i - 1 for i in range(16)]
        response = stub.ModelInfer(_explicit_request(
            "simple_string", [("INPUT0", "BYTES", [str(i).encode() for i in range(16)]),
                              ("INPUT1", "BYTES", [b"1"] * 16)]), timeout=scaled(10))
        sums = deserialize_bytes_tensor(response.raw_output_contents[0])
        diffs = deserialize_bytes_tensor(response.raw_output_contents[1])
        assert [int(x) for x in sums] == [i + 1 for i in range(16)]
        assert [int(x) for x in diffs] == [i - 1 for i in range(16)]


def test_simple_identity(docs_server: ServerProcess) -> None:
    """docs/examples simple_identity (its Python model.py): BYTES in, the same BYTES out."""
    data = np.array([[b"hello", b"", b"\x00\xff"]], dtype=np.object_)
    inputs = [grpcclient.InferInput("INPUT0", [1, 3], "BYTES")]
    inputs[0].set_data_from_numpy(data)
    with client(docs_server) as c:
        out = c.infer("simple_identity", inputs).as_numpy("OUTPUT0")
    assert out.tolist() == data.tolist()


DYNA_VALUES = [11, 7, 5, 3, 2, 0, 1]


def test_simple_grpc_sequence_sync_infer_client_dyna(docs_server: ServerProcess) -> None:
    """simple_grpc_sequence_sync_infer_client.py --dyna: two integer sequences (1000, 1001) on
    simple_dyna_sequence; the first answer is INPUT + 1, then INPUT, and the last adds the
    correlation id."""
    results: dict[int, list[int]] = {1000: [], 1001: []}
    sequences = {1000: [0] + DYNA_VALUES, 1001: [100] + [-v for v in DYNA_VALUES]}
    with client(docs_server) as c:
        for sid, values in sequences.items():
            for i, value in enumerate(values):
                data = np.full((1, 1), value, dtype=np.int32)
                inputs = [grpcclient.InferInput("INPUT", [1, 1], "INT32")]
                inputs[0].set_data_from_numpy(data)
                result = c.infer("simple_dyna_sequence", inputs, outputs=[grpcclient.InferRequestedOutput("OUTPUT")],
                                 sequence_id=sid, sequence_start=i == 0, sequence_end=i == len(values) - 1)
                results[sid].append(int(result.as_numpy("OUTPUT")[0][0]))
    for i in range(len(DYNA_VALUES) + 1):
        expected0 = 1 if i == 0 else DYNA_VALUES[i - 1]
        expected1 = 101 if i == 0 else -DYNA_VALUES[i - 1]
        if i != 0 and DYNA_VALUES[i - 1] == 1:
            expected0 += 1000
            expected1 += 1001
        assert (results[1000][i], results[1001][i]) == (expected0, expected1), i


def _image(seed: int) -> np.ndarray:
    """An HxWx3 uint8 picture, 224x224 so that the client's resize is the identity."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, size=3)
    noise = rng.integers(0, 40, size=(224, 224, 3))
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def _top(scores: np.ndarray, k: int) -> list[tuple[float, int, str]]:
    names = labels()
    order = np.argsort(-scores, kind="stable")[:k]
    return [(float(scores[i]), int(i), names[i]) for i in order]


def _parse(entries: np.ndarray) -> list[tuple[float, int, str]]:
    """image_client.py's postprocess: each entry is "value:index:label"."""
    parsed = []
    for entry in entries:
        text = entry.decode() if isinstance(entry, bytes) else entry
        value, index, label = text.split(":", 2)
        parsed.append((float(value), int(index), label))
    return parsed


def _assert_top(got: list[tuple[float, int, str]], want: list[tuple[float, int, str]]) -> None:
    assert [(i, label) for _, i, label in got] == [(i, label) for _, i, label in want]
    np.testing.assert_allclose([v for v, _, _ in got], [v for v, _, _ in want], rtol=1e-4, atol=1e-5)


def test_image_client_classification(docs_server: ServerProcess) -> None:
    """image_client.py -m densenet_onnx -c 3 -s INCEPTION (gRPC): the metadata and config checks
    its parse_model makes, then top-3 "value:index:label" for one image."""
    with client(docs_server) as c:
        metadata = c.get_model_metadata("densenet_onnx")
        config = c.get_model_config("densenet_onnx").config
        # parse_model: one input, one output, FP32 output with one non-1 dim, an NCHW 3-dim input.
        assert len(metadata.inputs) == 1 and len(metadata.outputs) == 1
        assert len(config.input) == 1
        assert metadata.outputs[0].datatype == "FP32"
        assert list(metadata.outputs[0].shape) == [-1, 1000]
        assert config.max_batch_size == 1
        assert list(metadata.inputs[0].shape) == [-1, 3, 224, 224]
        assert model_config_pb2.ModelInput.Format.Name(config.input[0].format) == "FORMAT_NCHW"
        image = _image(7)
        batch = inception_scale(image)[np.newaxis]
        inputs = [grpcclient.InferInput(metadata.inputs[0].name, list(batch.shape), metadata.inputs[0].datatype)]
        inputs[0].set_data_from_numpy(batch)
        result = c.infer("densenet_onnx", inputs, request_id="0",
                         outputs=[grpcclient.InferRequestedOutput(metadata.outputs[0].name, class_count=3)])
    entries = result.as_numpy("fc6_1")
    assert entries.shape == (1, 3)
    _assert_top(_parse(entries[0]), _top(densenet_reference(inception_scale(image)), 3))


def test_ensemble_image_client(docs_server: ServerProcess) -> None:
    """ensemble_image_client.py (on a preprocess + densenet ensemble, as docs'
    preprocess_inception_ensemble): raw image file bytes in, top-3 classes out, labelled with the
    classifier's labels."""
    image = _image(11)
    raw = np.array([[ppm(image)]], dtype=np.object_)
    inputs = [grpcclient.InferInput("INPUT", [1, 1], "BYTES")]
    inputs[0].set_data_from_numpy(raw)
    with client(docs_server) as c:
        result = c.infer("preprocess_densenet_ensemble", inputs,
                         outputs=[grpcclient.InferRequestedOutput("OUTPUT", class_count=3)])
    entries = result.as_numpy("OUTPUT")
    assert entries.shape == (1, 3)
    _assert_top(_parse(entries[0]), _top(densenet_reference(inception_scale(image)), 3))
