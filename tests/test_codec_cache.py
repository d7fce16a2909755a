"""Unit tests (no server) for the codec's per-model caches: accepted input signatures and
response templates (server/protocol/codec.py). A cached shape must never let a bad request
through, and the caches stay bounded however many shapes clients send."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.grpc import service_pb2 as pb

from server.core.model import Model
from server.errors import InvalidInput
from server.protocol.codec import decode_infer_request, encode_infer_response
from server.protocol.wire import encode_varint

CONFIG = """
name: "ragged"
platform: "onnxruntime_onnx"
max_batch_size: 8
input [ { name: "X" data_type: TYPE_FP32 dims: [ -1 ] } ]
output [ { name: "Y" data_type: TYPE_FP32 dims: [ -1 ] } ]
"""


@pytest.fixture
def model(tmp_path: Path) -> Model:
    config = mc.ModelConfig()
    text_format.Parse(CONFIG, config)
    return Model(config, tmp_path, 1)


def request(shape: list[int], datatype: str = "FP32", nbytes: int | None = None) -> pb.ModelInferRequest:
    msg = pb.ModelInferRequest(model_name="ragged")
    msg.inputs.add(name="X", datatype=datatype, shape=shape)
    count = int(np.prod(shape))
    msg.raw_input_contents.append(np.arange(count, dtype=np.float32).tobytes()[:nbytes])
    return msg


def test_cached_shape_still_checks_byte_count_and_datatype(model: Model) -> None:
    decoded = decode_infer_request(request([2, 3]), model)
    np.testing.assert_array_equal(decoded.inputs["X"], np.arange(6, dtype=np.float32).reshape(2, 3))
    assert decoded.batch_size == 2
    with pytest.raises(InvalidInput, match="input byte size mismatch for input 'X' for model 'ragged'. "
                       "Expected 24, got 20"):
        decode_infer_request(request([2, 3], nbytes=20), model)
    with pytest.raises(InvalidInput, match="data-type is 'INT32'"):
        decode_infer_request(request([2, 3], datatype="INT32"), model)
    again = decode_infer_request(request([2, 3]), model)  # the cached path gives the same answer
    np.testing.assert_array_equal(again.inputs["X"], decoded.inputs["X"])


def test_rejected_shapes_are_never_cached(model: Model) -> None:
    for _ in range(2):  # the second time would be a cache hit if errors were cached
        with pytest.raises(InvalidInput, match="batch-size must be <= 8"):
            decode_infer_request(request([9, 1]), model)
        with pytest.raises(InvalidInput, match="negative dimension"):
            decode_infer_request(request([1, -1]), model)


def test_caches_stay_bounded(model: Model) -> None:
    for width in range(1, 400):
        decoded = decode_infer_request(request([1, width]), model)
        response = pb.ModelInferResponse.FromString(
            b"".join(encode_infer_response(model, "r", {"Y": decoded.inputs["X"]})))
        assert list(response.outputs[0].shape) == [1, width]
        assert response.id == "r"
        assert np.frombuffer(response.raw_output_contents[0], np.float32).size == width
    assert len(model.wire_cache["inputs"]) <= 256
    assert len(model.wire_cache["responses"]) <= 256


def test_response_template_does_not_leak_between_requests(model: Model) -> None:
    first = pb.ModelInferResponse.FromString(b"".join(encode_infer_response(
        model, "a", {"Y": np.ones((1, 2), np.float32)})))
    second = pb.ModelInferResponse.FromString(b"".join(encode_infer_response(
        model, "", {"Y": np.zeros((1, 2), np.float32)})))
    assert first.id == "a" and second.id == ""
    assert len(second.raw_output_contents) == 1 and len(second.outputs) == 1
    assert second.model_name == "ragged" and second.model_version == "1"
    assert np.frombuffer(second.raw_output_contents[0], np.float32).tolist() == [0.0, 0.0]


OPTIONAL = """
name: "opt"
platform: "onnxruntime_onnx"
max_batch_size: 8
input [ { name: "A" data_type: TYPE_FP32 dims: [ 2 ] },
        { name: "B" data_type: TYPE_FP32 dims: [ 2 ] optional: true } ]
output [ { name: "Y" data_type: TYPE_FP32 dims: [ 2 ] } ]
"""


def _opt_request(tmp_path: Path, name: str) -> tuple[Model, pb.ModelInferRequest]:
    """Model `opt` (input B optional) and a request carrying only input `name` as raw bytes."""
    config = mc.ModelConfig()
    text_format.Parse(OPTIONAL, config)
    msg = pb.ModelInferRequest(model_name="opt")
    msg.inputs.add(name=name, datatype="FP32", shape=[1, 2])
    msg.raw_input_contents.append(np.zeros(2, np.float32).tobytes())
    return Model(config, tmp_path, 1), msg


def test_optional_input_does_not_stand_in_for_a_missing_required_one(tmp_path: Path) -> None:
    opt, msg = _opt_request(tmp_path, "B")
    with pytest.raises(InvalidInput, match=r"expected number of inputs between 1 and 2 but got 1 inputs for model "
                       r"'opt'. Got input\(s\) \['B'\], but missing required input\(s\) \['A'\]"):
        decode_infer_request(msg, opt)
    msg.inputs.add(name="A", datatype="FP32", shape=[1, 2])
    msg.raw_input_contents.append(np.ones(2, np.float32).tobytes())
    assert sorted(decode_infer_request(msg, opt).inputs) == ["A", "B"]


def test_a_known_plain_input_still_gets_every_check_of_its_request(model: Model) -> None:
    """An input seen before without parameters or contents is found by its serialized bytes
    (codec.py): the same input with contents, shared memory parameters, a wrong byte count or
    twice in one request must still be refused as the first time."""
    decode_infer_request(request([2, 3]), model)
    assert len(model.wire_cache["plain_inputs"]) == 1  # the next requests take the cached path
    with_contents = request([2, 3])
    with_contents.inputs[0].contents.fp32_contents.extend([0.0] * 6)
    with pytest.raises(InvalidInput, match="contents field must not be specified when using raw_input_contents "
                       "for 'X' for model 'ragged'"):
        decode_infer_request(with_contents, model)
    in_shm = request([2, 3])
    in_shm.inputs[0].parameters["shared_memory_region"].string_param = "nowhere"
    in_shm.ClearField("raw_input_contents")
    with pytest.raises(InvalidInput, match="'shared_memory_byte_size' must be specified along with "
                       "'shared_memory_region' parameter for tensor 'X'"):
        decode_infer_request(in_shm, model)
    with pytest.raises(InvalidInput, match="Expected 24, got 20"):
        decode_infer_request(request([2, 3], nbytes=20), model)
    no_data = request([2, 3])
    no_data.ClearField("raw_input_contents")
    with pytest.raises(InvalidInput, match="unable to find data for input tensor 'X' for model 'ragged'"):
        decode_infer_request(no_data, model)
    assert len(model.wire_cache["plain_inputs"]) == 1  # none of those was remembered


def test_a_known_plain_input_sent_twice_is_refused(tmp_path: Path) -> None:
    opt, msg = _opt_request(tmp_path, "A")
    decode_infer_request(msg, opt)
    assert len(opt.wire_cache["plain_inputs"]) == 1
    msg.inputs.add(name="A", datatype="FP32", shape=[1, 2])  # found in the cache both times
    msg.raw_input_contents.append(np.zeros(2, np.float32).tobytes())
    with pytest.raises(InvalidInput, match="input 'A' already exists in request"):
        decode_infer_request(msg, opt)


def test_a_known_plain_output_does_not_stand_in_for_one_with_parameters(model: Model) -> None:
    """One output requested without parameters is remembered by its serialized bytes (codec.py);
    the same output asking for classification, or shared memory, is still read as asked."""
    plain = request([1, 2])
    plain.outputs.add(name="Y")
    assert decode_infer_request(plain, model).requested_outputs == ("Y",)
    assert decode_infer_request(plain, model).requested_outputs == ("Y",)  # from the cache
    assert len(model.wire_cache["plain_outputs"]) == 1
    classified = request([1, 2])
    classified.outputs.add(name="Y").parameters["classification"].int64_param = 2
    decoded = decode_infer_request(classified, model)
    assert decoded.requested_outputs == ("Y",) and decoded.classification == {"Y": 2}
    in_shm = request([1, 2])
    in_shm.outputs.add(name="Y").parameters["shared_memory_region"].string_param = "nowhere"
    with pytest.raises(InvalidInput, match="'shared_memory_byte_size' must be specified"):
        decode_infer_request(in_shm, model)
    unknown = request([1, 2])
    unknown.outputs.add(name="Z")
    with pytest.raises(InvalidInput, match="unexpected inference output 'Z' for model 'ragged'"):
        decode_infer_request(unknown, model)
    assert len(model.wire_cache["plain_outputs"]) == 1  # none of those was remembered


def _with_unknown_field(message: object, size: int) -> bytes:
    """`message` serialized with an unknown length-delimited field (number 1000) of `size` bytes:
    protobuf keeps it, and it is part of the message's serialized bytes."""
    return message.SerializeToString() + b"\xc2\x3e" + encode_varint(size) + b"u" * size  # type: ignore[attr-defined]


def test_plain_caches_keep_no_large_request_bytes(model: Model) -> None:
    """The serialized-bytes caches must not hold on to what a client padded its input or output
    with (unknown fields): a finished request's bytes would stay in memory with the model."""
    msg = request([2, 3])
    padded = pb.ModelInferRequest.InferInputTensor.FromString(_with_unknown_field(msg.inputs[0], 100_000))
    msg.inputs[0].CopyFrom(padded)
    msg.outputs.add().MergeFromString(_with_unknown_field(pb.ModelInferRequest.InferRequestedOutputTensor(
        name="Y"), 100_000))
    decoded = decode_infer_request(msg, model)
    assert decoded.inputs["X"].shape == (2, 3) and decoded.requested_outputs == ("Y",)
    kept = [*model.wire_cache.get("plain_inputs", {}), *model.wire_cache.get("plain_outputs", {})]
    assert all(len(key) < 1000 for key in kept), [len(key) for key in kept]
