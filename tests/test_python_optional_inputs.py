"""A Python model whose inputs are all optional, asked with no inputs at all (issue 9, defect 10).

Triton hands such a request to the model's execute() with no input tensors (its own
qa/L0_input_validation `input_all_optional` model). The stub mirrors the server's
input arena only once some request carried bytes, so the very first request of a stub
used to find no arena and crash it: the client got INTERNAL and the stub was restarted.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from util import ServerProcess, client, write_model

# Answers how many inputs it got and their names (and never fails on a missing one).
ALL_OPTIONAL = '''import json, os
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            names = sorted(t.name() for t in request.inputs())
            empty = [t.name() for t in request.inputs() if t.as_numpy().size == 0]
            summary = json.dumps({"inputs": names, "empty": sorted(empty), "pid": os.getpid()})
            responses.append(pb_utils.InferenceResponse([
                pb_utils.Tensor("OUTPUT0", np.array([1], dtype=np.float32)),
                pb_utils.Tensor("SEEN", np.array([summary.encode()], dtype=np.object_)),
            ]))
        return responses
'''

ALL_OPTIONAL_CONFIG = """name: "{name}"
backend: "python"
input [
  {{ name: "INPUT0" data_type: TYPE_FP32 dims: [ -1 ] optional: true }},
  {{ name: "INPUT1" data_type: TYPE_FP32 dims: [ -1 ] optional: true }},
  {{ name: "TEXT" data_type: TYPE_STRING dims: [ -1 ] optional: true }}
]
output [
  {{ name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 1 ] }},
  {{ name: "SEEN" data_type: TYPE_STRING dims: [ 1 ] }}
]
instance_group [ {{ kind: KIND_CPU count: 1 }} ]
"""


@pytest.fixture(scope="module")
def optional_server(tmp_path_factory: pytest.TempPathFactory):
    repo: Path = tmp_path_factory.mktemp("optional_repo")
    for name in ("all_optional", "all_optional_fresh"):
        write_model(repo, name, ALL_OPTIONAL_CONFIG.format(name=name), files={"1/model.py": ALL_OPTIONAL.encode()})
    server = ServerProcess([repo])
    yield server
    server.stop()


def _seen(result) -> dict:
    import json

    return json.loads(result.as_numpy("SEEN")[0])


def test_no_inputs_reaches_execute_on_a_fresh_stub(optional_server: ServerProcess) -> None:
    """The first request a stub ever sees has no inputs: it must reach execute() (no crash)."""
    c = client(optional_server)
    result = c.infer("all_optional_fresh", inputs=[], client_timeout=30)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), np.array([1], dtype=np.float32))
    first = _seen(result)
    assert first["inputs"] == []
    again = _seen(c.infer("all_optional_fresh", inputs=[], client_timeout=30))
    assert again["pid"] == first["pid"], "the stub was restarted"
    assert "python stub process" not in optional_server.log


def test_no_inputs_after_inputs_and_empty_tensors(optional_server: ServerProcess) -> None:
    c = client(optional_server)
    x = grpcclient.InferInput("INPUT0", [3], "FP32")
    x.set_data_from_numpy(np.arange(3, dtype=np.float32))
    first = _seen(c.infer("all_optional", inputs=[x], client_timeout=30))
    assert first["inputs"] == ["INPUT0"]
    assert _seen(c.infer("all_optional", inputs=[], client_timeout=30))["inputs"] == []
    # Zero-element tensors (numeric and BYTES) cross without bytes too.
    empty = grpcclient.InferInput("INPUT1", [0], "FP32")
    empty.set_data_from_numpy(np.zeros(0, dtype=np.float32))
    text = grpcclient.InferInput("TEXT", [0], "BYTES")
    text.set_data_from_numpy(np.array([], dtype=np.object_))
    seen = _seen(c.infer("all_optional", inputs=[empty, text], client_timeout=30))
    assert seen["inputs"] == ["INPUT1", "TEXT"] and seen["empty"] == ["INPUT1", "TEXT"]
    assert seen["pid"] == first["pid"], "the stub was restarted"
    assert "python stub process" not in optional_server.log
