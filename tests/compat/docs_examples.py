"""The repository of Triton's `docs/examples/`, as a user serves it to the client examples.

Model names, configs and results are those of Triton's docs repositories; the model files are
written here (the docs ship TensorFlow/custom-backend files Nereid does not run, so each is
re-made in ONNX or Python with the same behaviour):

  simple                the repository's own `simple` (ONNX, INT32 [16] add/sub, batching to 8)
  simple_string         BYTES [16] decimal numbers in, their sums and differences as text out
  simple_identity       the docs' Python identity over BYTES [-1]
  simple_dyna_sequence  oldest strategy, two instances, START/END/READY int32 and CORRID uint64
                        controls: OUTPUT = INPUT + START, plus the correlation id on END (what
                        the sequence clients with `--dyna` expect)
  densenet_onnx         an image classifier with densenet_onnx's config (data_0 FP32 [3,224,224]
                        NCHW, fc6_1 FP32 [1000] reshaped from [1000,1,1], densenet_labels.txt):
                        fc6_1 = W . mean_hw(data_0) + B
  image_preprocess      decodes a binary PPM (P6) image and scales it as image_client's INCEPTION
                        mode does, to FP32 [3,224,224]
  preprocess_densenet_ensemble
                        the ensemble of the two above, as docs' preprocess_inception_ensemble
                        (raw image bytes in, scores out) for ensemble_image_client.py
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
CLASSES = 1000
IMAGE = (3, 224, 224)


def labels() -> list[str]:
    return [f"class {i:04d}" for i in range(CLASSES)]


def densenet_weights() -> tuple[np.ndarray, np.ndarray]:
    """Fixed weights: W [1000, 3], B [1000], so that the top classes depend on the image colour."""
    rng = np.random.default_rng(2024)
    return rng.standard_normal((CLASSES, 3)).astype(np.float32), rng.standard_normal(CLASSES).astype(np.float32) * 0.1


def densenet_reference(chw: np.ndarray) -> np.ndarray:
    """What densenet_onnx answers for one preprocessed image (FP32 [3,224,224]): scores [1000]."""
    w, b = densenet_weights()
    return (w @ chw.reshape(3, -1).mean(axis=1, dtype=np.float32) + b).astype(np.float32)


def inception_scale(hwc: np.ndarray) -> np.ndarray:
    """image_client.py's INCEPTION scaling and its HWC -> CHW transpose for an NCHW model."""
    return np.transpose(hwc.astype(np.float32) / 127.5 - 1, (2, 0, 1)).astype(np.float32)


def ppm(hwc: np.ndarray) -> bytes:
    """A binary PPM (P6) file of an HxWx3 uint8 image: what ensemble_image_client sends as is."""
    h, w, _ = hwc.shape
    return f"P6\n{w} {h}\n255\n".encode() + np.ascontiguousarray(hwc, dtype=np.uint8).tobytes()


def _densenet_onnx() -> bytes:
    from lifecycle_util import IR_VERSION, OPSET
    from onnx import TensorProto, helper, numpy_helper

    w, b = densenet_weights()
    nodes = [
        helper.make_node("ReduceMean", ["data_0"], ["pooled"], axes=[2, 3], keepdims=1),
        helper.make_node("Conv", ["pooled", "W", "B"], ["fc6_1"], kernel_shape=[1, 1]),
    ]
    graph = helper.make_graph(
        nodes, "densenet_like",
        [helper.make_tensor_value_info("data_0", TensorProto.FLOAT, ["N", 3, 224, 224])],
        [helper.make_tensor_value_info("fc6_1", TensorProto.FLOAT, ["N", CLASSES, 1, 1])],
        initializer=[numpy_helper.from_array(w.reshape(CLASSES, 3, 1, 1), "W"), numpy_helper.from_array(b, "B")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="nereid-tests")
    model.ir_version = IR_VERSION
    return model.SerializeToString()


DENSENET_CONFIG = """name: "densenet_onnx"
platform: "onnxruntime_onnx"
max_batch_size : 1
input [
  {
    name: "data_0"
    data_type: TYPE_FP32
    format: FORMAT_NCHW
    dims: [ 3, 224, 224 ]
  }
]
output [
  {
    name: "fc6_1"
    data_type: TYPE_FP32
    dims: [ 1000 ]
    reshape { shape: [ 1000, 1, 1 ] }
    label_filename: "densenet_labels.txt"
  }
]
"""

SIMPLE_STRING_CONFIG = """name: "simple_string"
backend: "python"
max_batch_size: 8
input [
  { name: "INPUT0" data_type: TYPE_STRING dims: [ 16 ] },
  { name: "INPUT1" data_type: TYPE_STRING dims: [ 16 ] }
]
output [
  { name: "OUTPUT0" data_type: TYPE_STRING dims: [ 16 ] },
  { name: "OUTPUT1" data_type: TYPE_STRING dims: [ 16 ] }
]
"""

SIMPLE_STRING = '''
import numpy as np
import triton_python_backend_utils as pb_utils


def numbers(request, name):
    raw = pb_utils.get_input_tensor_by_name(request, name).as_numpy()
    return np.array([int(x) for x in raw.reshape(-1)], dtype=np.int64).reshape(raw.shape)


def text(values):
    return np.array([str(v).encode() for v in values.reshape(-1)], dtype=object).reshape(values.shape)


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            a, b = numbers(request, "INPUT0"), numbers(request, "INPUT1")
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("OUTPUT0", text(a + b)),
                                                         pb_utils.Tensor("OUTPUT1", text(a - b))]))
        return responses
'''

SIMPLE_IDENTITY_CONFIG = """name: "simple_identity"
backend: "python"
max_batch_size: 8
input [ { name: "INPUT0" data_type: TYPE_STRING dims: [ -1 ] } ]
output [ { name: "OUTPUT0" data_type: TYPE_STRING dims: [ -1 ] } ]
"""

SIMPLE_IDENTITY = '''
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        return [pb_utils.InferenceResponse([pb_utils.Tensor("OUTPUT0",
                                                            pb_utils.get_input_tensor_by_name(r, "INPUT0").as_numpy())])
                for r in requests]
'''

DYNA_CONFIG = """name: "simple_dyna_sequence"
backend: "python"
max_batch_size: 8
sequence_batching {
  max_sequence_idle_microseconds: 10000000
  oldest { max_candidate_sequences: 1024 max_queue_delay_microseconds: 10000 }
  control_input [
    { name: "START" control [ { kind: CONTROL_SEQUENCE_START int32_false_true: [ 0, 1 ] } ] },
    { name: "END" control [ { kind: CONTROL_SEQUENCE_END int32_false_true: [ 0, 1 ] } ] },
    { name: "READY" control [ { kind: CONTROL_SEQUENCE_READY int32_false_true: [ 0, 1 ] } ] },
    { name: "CORRID" control [ { kind: CONTROL_SEQUENCE_CORRID data_type: TYPE_UINT64 } ] }
  ]
}
input [ { name: "INPUT" data_type: TYPE_INT32 dims: [ 1 ] } ]
output [ { name: "OUTPUT" data_type: TYPE_INT32 dims: [ 1 ] } ]
instance_group [ { count: 2 kind: KIND_CPU } ]
"""

DYNA = '''
import numpy as np
import triton_python_backend_utils as pb_utils


def value(request, name):
    return pb_utils.get_input_tensor_by_name(request, name).as_numpy().reshape(-1)[0]


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            out = int(value(request, "INPUT")) + int(value(request, "START"))
            if value(request, "END"):
                out += int(value(request, "CORRID"))
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("OUTPUT",
                                                                         np.array([[out]], dtype=np.int32))]))
        return responses
'''

PREPROCESS_CONFIG = """name: "image_preprocess"
backend: "python"
max_batch_size: 1
input [ { name: "INPUT" data_type: TYPE_STRING dims: [ 1 ] } ]
output [ { name: "OUTPUT" data_type: TYPE_FP32 dims: [ 3, 224, 224 ] } ]
"""

PREPROCESS = '''
import numpy as np
import triton_python_backend_utils as pb_utils


def decode_ppm(data):
    fields, pos = [], 0
    while len(fields) < 4:  # magic, width, height, maxval: whitespace separated
        while data[pos:pos + 1].isspace():
            pos += 1
        end = pos
        while not data[end:end + 1].isspace():
            end += 1
        fields.append(data[pos:end])
        pos = end
    if fields[0] != b"P6":
        raise pb_utils.TritonModelException("image_preprocess reads binary PPM (P6) images")
    width, height = int(fields[1]), int(fields[2])
    pixels = np.frombuffer(data, dtype=np.uint8, count=width * height * 3, offset=pos + 1)
    return pixels.reshape(height, width, 3)


def resize_nearest(hwc, height, width):
    rows = np.arange(height) * hwc.shape[0] // height
    cols = np.arange(width) * hwc.shape[1] // width
    return hwc[rows][:, cols]


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            images = pb_utils.get_input_tensor_by_name(request, "INPUT").as_numpy()
            batch = []
            for raw in images.reshape(-1):
                hwc = resize_nearest(decode_ppm(bytes(raw)), 224, 224).astype(np.float32)
                batch.append(np.transpose(hwc / 127.5 - 1, (2, 0, 1)))
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("OUTPUT",
                                                                         np.stack(batch).astype(np.float32))]))
        return responses
'''

ENSEMBLE_CONFIG = """name: "preprocess_densenet_ensemble"
platform: "ensemble"
max_batch_size: 1
input [ { name: "INPUT" data_type: TYPE_STRING dims: [ 1 ] } ]
output [ { name: "OUTPUT" data_type: TYPE_FP32 dims: [ 1000 ] } ]
ensemble_scheduling {
  step [
    {
      model_name: "image_preprocess"
      model_version: -1
      input_map { key: "INPUT" value: "INPUT" }
      output_map { key: "OUTPUT" value: "preprocessed_image" }
    },
    {
      model_name: "densenet_onnx"
      model_version: -1
      input_map { key: "data_0" value: "preprocessed_image" }
      output_map { key: "fc6_1" value: "OUTPUT" }
    }
  ]
}
"""


def _model(repo: Path, name: str, config: str, files: dict[str, bytes]) -> None:
    folder = repo / name
    (folder / "1").mkdir(parents=True, exist_ok=True)
    (folder / "config.pbtxt").write_text(config, encoding="utf-8")
    for rel, data in files.items():
        (folder / rel).write_bytes(data)


def build_docs_examples(repo: Path) -> Path:
    """Write every model above into `repo` and return it."""
    shutil.copytree(ROOT / "model_repository" / "simple", repo / "simple")
    _model(repo, "simple_string", SIMPLE_STRING_CONFIG, {"1/model.py": SIMPLE_STRING.lstrip().encode()})
    _model(repo, "simple_identity", SIMPLE_IDENTITY_CONFIG, {"1/model.py": SIMPLE_IDENTITY.lstrip().encode()})
    _model(repo, "simple_dyna_sequence", DYNA_CONFIG, {"1/model.py": DYNA.lstrip().encode()})
    _model(repo, "densenet_onnx", DENSENET_CONFIG, {"1/model.onnx": _densenet_onnx(),
                                                     "densenet_labels.txt": "\n".join(labels()).encode() + b"\n"})
    _model(repo, "image_preprocess", PREPROCESS_CONFIG, {"1/model.py": PREPROCESS.lstrip().encode()})
    _model(repo, "preprocess_densenet_ensemble", ENSEMBLE_CONFIG, {})
    return repo
