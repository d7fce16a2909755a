"""Python models (Triton's python backend API) through a real server and tritonclient.

Every model here is a Triton-style `model.py` that imports `triton_python_backend_utils`
unchanged; each instance runs in its own stub process.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from util import ServerProcess, client, expect_error, scaled, write_model

PY_HEADER = "import json, os, time\nimport numpy as np\nimport triton_python_backend_utils as pb_utils\n\n"

# Triton's add_sub example, as Triton users write it.
ADD_SUB = PY_HEADER + '''
class TritonPythonModel:
    def initialize(self, args):
        self.model_config = model_config = json.loads(args["model_config"])
        out0 = pb_utils.get_output_config_by_name(model_config, "OUTPUT0")
        out1 = pb_utils.get_output_config_by_name(model_config, "OUTPUT1")
        self.dtype0 = pb_utils.triton_string_to_numpy(out0["data_type"])
        self.dtype1 = pb_utils.triton_string_to_numpy(out1["data_type"])

    def execute(self, requests):
        responses = []
        for request in requests:
            in_0 = pb_utils.get_input_tensor_by_name(request, "INPUT0")
            in_1 = pb_utils.get_input_tensor_by_name(request, "INPUT1")
            out_0 = pb_utils.Tensor("OUTPUT0", (in_0.as_numpy() + in_1.as_numpy()).astype(self.dtype0))
            out_1 = pb_utils.Tensor("OUTPUT1", (in_0.as_numpy() - in_1.as_numpy()).astype(self.dtype1))
            responses.append(pb_utils.InferenceResponse(output_tensors=[out_0, out_1]))
        return responses

    def finalize(self):
        import sys
        print("add_sub: finalize called", file=sys.stderr)
'''

ADD_SUB_CONFIG = """name: "py_add_sub"
backend: "python"
max_batch_size: 8
input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ 4 ] }, { name: "INPUT1" data_type: TYPE_FP32 dims: [ 4 ] } ]
output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 4 ] }, { name: "OUTPUT1" data_type: TYPE_FP32 dims: [ 4 ] } ]
instance_group [ { kind: KIND_CPU count: 2 } ]
"""

# Echoes its input; a first element of -1 gets an error response, -2 raises, -3 kills the stub,
# -4 spins in Python (holding the stub's GIL) for 1.5 s. PID reports the stub's process id.
PROBE = PY_HEADER + '''
class TritonPythonModel:
    def initialize(self, args):
        self.args = args

    def execute(self, requests):
        responses = []
        for request in requests:
            arr = pb_utils.get_input_tensor_by_name(request, "INPUT0").as_numpy()
            first = arr.reshape(-1)[0] if arr.size else 0
            if first == -1:
                responses.append(pb_utils.InferenceResponse(
                    output_tensors=[], error=pb_utils.TritonError("first element must not be -1")))
                continue
            if first == -5:
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(
                    "bad input", pb_utils.TritonError.INVALID_ARG)))
                continue
            if first == -2:
                raise ValueError("model refuses -2")
            if first == -3:
                os._exit(7)
            if first == -6:
                time.sleep(0.3)
            if first == -4:
                end = time.monotonic() + 1.5
                while time.monotonic() < end:
                    pass
            meta = {"args": self.args, "id": request.request_id(),
                    "parameters": json.loads(request.parameters()),
                    "requested": request.requested_output_names()}
            out = [pb_utils.Tensor("OUTPUT0", arr),
                   pb_utils.Tensor("PID", np.full(arr.shape[:1], os.getpid(), dtype=np.int64)),
                   pb_utils.Tensor("META", np.array([json.dumps(meta).encode()] * arr.shape[0], dtype=np.object_))]
            responses.append(pb_utils.InferenceResponse(output_tensors=out))
        return responses
'''

PROBE_CONFIG = """name: "py_probe"
backend: "python"
max_batch_size: 16
input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ -1 ] } ]
output [
  { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ -1 ] },
  { name: "PID" data_type: TYPE_INT64 dims: [ 1 ] reshape: { shape: [ ] } },
  { name: "META" data_type: TYPE_STRING dims: [ 1 ] reshape: { shape: [ ] } }
]
instance_group [ { kind: KIND_CPU count: 2 } ]
"""

# Cheap: echoes its input; a first element of -6 sleeps 0.3 s, -3 kills the stub.
LEAN = PY_HEADER + '''
class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            arr = pb_utils.get_input_tensor_by_name(request, "INPUT0").as_numpy()
            if arr.reshape(-1)[0] == -6:
                time.sleep(0.3)
            if arr.reshape(-1)[0] == -3:
                os._exit(7)
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("OUTPUT0", arr)]))
        return responses
'''

LEAN_CONFIG = """name: "py_lean"
backend: "python"
max_batch_size: 8
input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ 2 ] } ]
output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 2 ] } ]
instance_group [ { kind: KIND_CPU count: 1 } ]
"""

# BYTES in, BYTES out (upper-cased), no batching.
UPPER = PY_HEADER + '''
class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            text = pb_utils.get_input_tensor_by_name(request, "TEXT").as_numpy()
            upper = np.array([t.upper() for t in text.reshape(-1)], dtype=np.object_).reshape(text.shape)
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("UPPER", upper)]))
        return responses
'''

UPPER_CONFIG = """backend: "python"
input [ { name: "TEXT" data_type: TYPE_STRING dims: [ -1 ] } ]
output [ { name: "UPPER" data_type: TYPE_STRING dims: [ -1 ] } ]
"""

# No config.pbtxt at all: backend guessed from model.py, I/O from auto_complete_config.
AUTO = PY_HEADER + '''
class TritonPythonModel:
    @staticmethod
    def auto_complete_config(auto_complete_model_config):
        auto_complete_model_config.add_input({"name": "X", "data_type": "TYPE_INT32", "dims": [3]})
        auto_complete_model_config.add_output({"name": "Y", "data_type": "TYPE_INT32", "dims": [3]})
        auto_complete_model_config.set_max_batch_size(4)
        return auto_complete_model_config

    def execute(self, requests):
        return [pb_utils.InferenceResponse([pb_utils.Tensor("Y", pb_utils.get_input_tensor_by_name(r, "X")
                .as_numpy() * 2)]) for r in requests]
'''

BROKEN_INIT = PY_HEADER + '''
class TritonPythonModel:
    def initialize(self, args):
        raise RuntimeError("cannot find my weights")

    def execute(self, requests):
        return []
'''

SIMPLE_IO = """backend: "python"
max_batch_size: 0
input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ 4 ] } ]
output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 4 ] } ]
"""


@pytest.fixture(scope="module")
def py_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("python_repo")
    write_model(repo, "py_add_sub", ADD_SUB_CONFIG, files={"1/model.py": ADD_SUB.encode()})
    write_model(repo, "py_probe", PROBE_CONFIG, files={"1/model.py": PROBE.encode()})
    write_model(repo, "py_upper", UPPER_CONFIG, files={"1/model.py": UPPER.encode()})
    write_model(repo, "py_auto", None, files={"1/model.py": AUTO.encode()})
    write_model(repo, "py_broken_init", SIMPLE_IO, files={"1/model.py": BROKEN_INIT.encode()})
    write_model(repo, "py_no_file", SIMPLE_IO)
    write_model(repo, "py_lean", LEAN_CONFIG, files={"1/model.py": LEAN.encode()})
    write_model(repo, "good_identity", 'backend: "identity"\n' + SIMPLE_IO.split("\n", 1)[1])
    return repo


@pytest.fixture(scope="module")
def py_server(py_repo: Path):
    server = ServerProcess([py_repo])
    yield server
    server.stop()


def _fp32(name: str, arr: np.ndarray) -> grpcclient.InferInput:
    inp = grpcclient.InferInput(name, list(arr.shape), "FP32")
    inp.set_data_from_numpy(arr)
    return inp


def test_add_sub_like_triton_example(py_server: ServerProcess) -> None:
    a = np.arange(8, dtype=np.float32).reshape(2, 4)
    b = np.ones((2, 4), dtype=np.float32)
    result = client(py_server).infer("py_add_sub", [_fp32("INPUT0", a), _fp32("INPUT1", b)])
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a + b)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), a - b)


def test_initialize_args(py_server: ServerProcess) -> None:
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    result = client(py_server).infer("py_probe", [_fp32("INPUT0", x)])
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), x)
    args = json.loads(result.as_numpy("META").reshape(-1)[0])["args"]
    assert args["model_name"] == "py_probe"
    assert args["model_version"] == "1"
    assert args["model_instance_kind"] == "CPU"
    assert args["model_instance_device_id"] == "0"
    assert args["model_instance_name"] in ("py_probe_0_0", "py_probe_0_1")
    assert args["model_repository"].endswith("py_probe")
    config = json.loads(args["model_config"])
    assert config["max_batch_size"] == 16
    assert config["input"][0]["dims"] == [-1]  # numbers, as Triton gives them, not int64 strings
    assert config["output"][1]["reshape"] == {"shape": []}
    assert config["input"][0]["optional"] is False  # every field present, as in Triton's JSON



def test_request_id_and_parameters_reach_the_model(py_server: ServerProcess) -> None:
    x = np.ones((1, 3), dtype=np.float32)
    result = client(py_server).infer(
        "py_probe", [_fp32("INPUT0", x)], request_id="req-42", parameters={"temperature": 3, "mode": "fast"})
    meta = json.loads(result.as_numpy("META").reshape(-1)[0])
    assert meta["id"] == "req-42"
    assert meta["parameters"] == {"temperature": 3, "mode": "fast"}


def test_requested_outputs_are_passed_to_the_model(py_server: ServerProcess) -> None:
    x = np.ones((1, 2), dtype=np.float32)
    result = client(py_server).infer("py_probe", [_fp32("INPUT0", x)], outputs=[
        grpcclient.InferRequestedOutput("META"), grpcclient.InferRequestedOutput("OUTPUT0")])
    assert json.loads(result.as_numpy("META").reshape(-1)[0])["requested"] == ["META", "OUTPUT0"]
    assert result.as_numpy("PID") is None


def probe_spec(model_dir: Path, parameters: dict[str, str] | None = None) -> Any:
    """The ModelSpec of a PROBE model (PROBE_CONFIG) at `model_dir`, for tests of the backend on
    its own (no server)."""
    from backends.base import ModelSpec, TensorSpec

    name = model_dir.name
    return ModelSpec(
        name=name, version=1, model_dir=model_dir, version_dir=model_dir / "1",
        model_file=model_dir / "1" / "model.py", max_batch_size=16,
        inputs=(TensorSpec("INPUT0", "FP32", (-1,)),),
        outputs=(TensorSpec("OUTPUT0", "FP32", (-1,)), TensorSpec("PID", "INT64", (1,)),
                 TensorSpec("META", "BYTES", (1,))),
        parameters=parameters or {},
        config_json=f'{{"name": "{name}", "max_batch_size": 16}}', instance_name="unit",
    )


def test_execute_requests_gives_each_request_its_outcome(py_repo: Path) -> None:
    """The backend on its own (no server): one pb_utils request per Request, one outcome each."""
    from backends.base import BackendError, BackendStatusError, Device, Request

    spec = probe_spec(py_repo / "py_probe")
    from backends.python import PythonBackend

    backend = PythonBackend()
    backend.load(spec, Device("CPU", 0))
    try:
        good = np.arange(4, dtype=np.float32).reshape(2, 2)
        outcomes = backend.execute_requests([
            Request({"INPUT0": good}, id="a", parameters={"k": "v"}, requested_outputs=("OUTPUT0", "META")),
            Request({"INPUT0": -np.ones((1, 2), np.float32)}, id="b"),
            Request({"INPUT0": np.full((1, 2), -5, np.float32)}, id="c"),
            Request({"INPUT0": good[:1]}, id="d"),
        ])
        assert isinstance(outcomes[0], dict) and set(outcomes[0]) == {"OUTPUT0", "META"}
        np.testing.assert_array_equal(outcomes[0]["OUTPUT0"], good)
        meta = json.loads(outcomes[0]["META"][0])
        assert (meta["id"], meta["parameters"], meta["requested"]) == ("a", {"k": "v"}, ["OUTPUT0", "META"])
        assert isinstance(outcomes[1], BackendStatusError) and outcomes[1].code == "INTERNAL"
        assert str(outcomes[1]) == "first element must not be -1"
        assert isinstance(outcomes[2], BackendStatusError) and outcomes[2].code == "INVALID_ARGUMENT"
        assert str(outcomes[2]) == "bad input"
        assert isinstance(outcomes[3], dict) and json.loads(outcomes[3]["META"][0])["id"] == "d"
        with pytest.raises(BackendError, match="ValueError: model refuses -2"):
            backend.execute_requests([Request({"INPUT0": np.full((1, 2), -2, np.float32)})])
        # The two halves: a bounded wait returns None while the model is still busy.
        backend.submit([Request({"INPUT0": np.full((1, 2), -6, np.float32)})])
        assert backend.collect(0.001) is None
        (late,) = backend.collect(None)  # type: ignore[misc]
        assert isinstance(late, dict) and late["OUTPUT0"].tolist() == [[-6, -6]]
    finally:
        backend.close()


def test_each_instance_is_its_own_process(py_server: ServerProcess) -> None:
    x = np.full((1, 2), -6, dtype=np.float32)  # -6: the model sleeps 0.3 s, so 4 clients need both instances
    pids: set[int] = set()
    lock = threading.Lock()

    def call() -> None:
        c = client(py_server)
        for _ in range(2):
            pid = int(c.infer("py_probe", [_fp32("INPUT0", x)]).as_numpy("PID").reshape(-1)[0])
            with lock:
                pids.add(pid)

    threads = [threading.Thread(target=call) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert py_server.proc.pid not in pids
    assert len(pids) == 2, pids  # count: 2 -> two stubs, both used under concurrency


def test_bytes_in_and_out(py_server: ServerProcess) -> None:
    text = np.array([b"hello", "wörld".encode(), b""], dtype=np.object_)
    inp = grpcclient.InferInput("TEXT", [3], "BYTES")
    inp.set_data_from_numpy(text)
    out = client(py_server).infer("py_upper", [inp]).as_numpy("UPPER")
    assert out.tolist() == [b"HELLO", "WöRLD".encode(), b""]


def test_large_tensor_grows_shared_memory(py_server: ServerProcess) -> None:
    x = np.random.default_rng(0).standard_normal((16, 200_000)).astype(np.float32)  # 12.8 MB
    out = client(py_server).infer("py_probe", [_fp32("INPUT0", x)]).as_numpy("OUTPUT0")
    np.testing.assert_array_equal(out, x)


# What py_probe does with a first element of: -1 an error response (pb_utils.TritonError, default
# code), -5 an error response with INVALID_ARG, -2 raises in execute(). (value, code, fragments)
MODEL_ERRORS = [
    (-1, "INTERNAL", ("first element must not be -1",)),
    (-5, "INVALID_ARGUMENT", ("bad input",)),
    (-2, "INTERNAL", ("ValueError: model refuses -2", "model.py:")),
]


@pytest.mark.parametrize("value,code,fragments", MODEL_ERRORS, ids=["error_response", "invalid_arg", "raises"])
def test_model_errors_fail_only_their_request(py_server: ServerProcess, value: float, code: str,
                                              fragments: tuple[str, ...]) -> None:
    c = client(py_server)
    err = expect_error(code, c.infer, "py_probe", [_fp32("INPUT0", np.full((1, 2), value, np.float32))])
    for fragment in fragments:
        assert fragment in err.message(), err.message()
    x = np.ones((1, 2), dtype=np.float32)
    np.testing.assert_array_equal(c.infer("py_probe", [_fp32("INPUT0", x)]).as_numpy("OUTPUT0"), x)


def test_crashed_stub_fails_its_request_and_restarts(py_server: ServerProcess) -> None:
    c = client(py_server)
    err = expect_error("INTERNAL", c.infer, "py_probe", [_fp32("INPUT0", np.full((1, 2), -3, np.float32))])
    assert "exited with code 7" in err.message()
    assert "a new stub was started" in err.message()
    x = np.ones((1, 2), dtype=np.float32)
    for _ in range(4):  # both instances answer again
        np.testing.assert_array_equal(c.infer("py_probe", [_fp32("INPUT0", x)]).as_numpy("OUTPUT0"), x)
    assert c.is_model_ready("py_probe")


def test_cancelled_request_frees_its_instance(py_server: ServerProcess) -> None:
    """A client that gives up on a running Python request gets DEADLINE_EXCEEDED; the stub's
    late answer is drained off the wire and both instances serve the next requests correctly."""
    c = client(py_server)
    for _ in range(2):  # one slow request per instance, both abandoned
        expect_error("DEADLINE_EXCEEDED", c.infer, "py_probe",
                     [_fp32("INPUT0", np.full((1, 2), -6, np.float32))], client_timeout=0.05)
    time.sleep(0.5)  # the stubs finish their 0.3 s of work
    for i in range(6):
        x = np.full((1, 3), float(i), dtype=np.float32)
        np.testing.assert_array_equal(c.infer("py_probe", [_fp32("INPUT0", x)]).as_numpy("OUTPUT0"), x)


def _others_while(py_server: ServerProcess, model: str, first: float, settle: float, count: int
                  ) -> tuple[float, bool, threading.Thread, list[np.ndarray]]:
    """Send `model` a slow request (first element `first`) from a thread, wait `settle` s, then
    time `count` requests to py_add_sub. Returns (their elapsed time, whether the slow one had
    already finished, its thread, its result once the thread is joined)."""
    done = threading.Event()
    answer: list[np.ndarray] = []

    def slow() -> None:
        x = np.full((1, 2), first, np.float32)
        answer.append(client(py_server).infer(model, [_fp32("INPUT0", x)]).as_numpy("OUTPUT0"))
        done.set()

    thread = threading.Thread(target=slow)
    thread.start()
    time.sleep(settle)
    c = client(py_server)
    started = time.monotonic()
    a = np.ones((1, 4), dtype=np.float32)
    for _ in range(count):
        c.infer("py_add_sub", [_fp32("INPUT0", a), _fp32("INPUT1", a)])
    return time.monotonic() - started, done.is_set(), thread, answer


def test_gil_heavy_model_does_not_stall_the_server(py_server: ServerProcess) -> None:
    elapsed, finished, thread, _ = _others_while(py_server, "py_probe", -4, 0.2, 20)
    assert not finished, "the spinning request should still be running"
    assert elapsed < scaled(1.0), f"20 requests to another model took {elapsed:.2f}s while a Python model spun"
    thread.join(scaled(10))


def _warm_cheap(c: grpcclient.InferenceServerClient, model: str) -> None:
    """Enough fast requests that the server knows the model's execute() is cheap (the stub
    times it), so it waits for the stub on the event loop, bounded, instead of going round
    the loop."""
    x = np.ones((1, 2), dtype=np.float32)
    for _ in range(50):
        np.testing.assert_array_equal(c.infer(model, [_fp32("INPUT0", x)]).as_numpy("OUTPUT0"), x)


def test_cheap_model_turning_slow_does_not_stall_the_loop(py_server: ServerProcess) -> None:
    """The bounded wait on the loop gives up after the budget: a request that turns slow
    (0.3 s) is finished off the loop while other models keep answering."""
    _warm_cheap(client(py_server), "py_lean")
    elapsed, finished, thread, answer = _others_while(py_server, "py_lean", -6, 0.05, 10)
    assert not finished, "the slow request should still be running"
    assert elapsed < scaled(0.2), f"10 requests to another model took {elapsed:.2f}s while a cheap model turned slow"
    thread.join(scaled(10))
    np.testing.assert_array_equal(answer[0], np.full((1, 2), -6, np.float32))


def test_cheap_model_crashing_in_the_bounded_wait_recovers(py_server: ServerProcess) -> None:
    c = client(py_server)
    _warm_cheap(c, "py_lean")
    err = expect_error("INTERNAL", c.infer, "py_lean", [_fp32("INPUT0", np.full((1, 2), -3, np.float32))])
    assert "exited with code 7" in err.message()
    x = np.full((1, 2), 3.0, dtype=np.float32)
    np.testing.assert_array_equal(c.infer("py_lean", [_fp32("INPUT0", x)]).as_numpy("OUTPUT0"), x)


def test_auto_complete_config_from_model(py_server: ServerProcess) -> None:
    c = client(py_server)
    config = c.get_model_config("py_auto").config
    assert config.backend == "python"
    assert config.max_batch_size == 4
    assert [i.name for i in config.input] == ["X"] and list(config.input[0].dims) == [3]
    x = np.arange(6, dtype=np.int32).reshape(2, 3)
    inp = grpcclient.InferInput("X", [2, 3], "INT32")
    inp.set_data_from_numpy(x)
    np.testing.assert_array_equal(c.infer("py_auto", [inp]).as_numpy("Y"), x * 2)


def test_failing_initialize_makes_only_that_model_unavailable(py_server: ServerProcess) -> None:
    rows = {r.name: r for r in client(py_server).get_model_repository_index().models}
    assert rows["py_broken_init"].state == "UNAVAILABLE"
    assert "RuntimeError: cannot find my weights" in rows["py_broken_init"].reason
    assert rows["py_no_file"].state == "UNAVAILABLE"
    assert "model.py" in rows["py_no_file"].reason
    assert rows["good_identity"].state == "READY"


def test_finalize_runs_on_shutdown(py_repo: Path) -> None:
    server = ServerProcess([py_repo])
    pids = set()
    c = client(server)
    for _ in range(4):
        result = c.infer("py_probe", [_fp32("INPUT0", np.ones((1, 1), np.float32))])
        pids.add(int(result.as_numpy("PID").reshape(-1)[0]))
    assert server.stop() == 0
    assert "add_sub: finalize called" in server.log
    for pid in pids:  # no stub outlives the server
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_example_text_features_feeds_the_mlp(onnx_server: ServerProcess, mlp_session) -> None:
    """model_repository/text_features (Python) in front of model_repository/mlp (ONNX)."""
    import importlib.util

    from util import MODEL_REPOSITORY

    spec = importlib.util.spec_from_file_location("tf_model", MODEL_REPOSITORY / "text_features" / "1" / "model.py")
    assert spec is not None and spec.loader is not None
    # The model imports triton_python_backend_utils: make it importable here too.
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "backends" / "pb_utils"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    texts = ["Hello, Nereid!", "Triton models run unchanged", "ünïcödé"]
    inp = grpcclient.InferInput("TEXT", [3, 1], "BYTES")
    inp.set_data_from_numpy(np.array([[t.encode()] for t in texts], dtype=np.object_))
    c = client(onnx_server)
    feats = c.infer("text_features", [inp]).as_numpy("FEATURES")
    np.testing.assert_allclose(feats, np.stack([module.features(t) for t in texts]), rtol=1e-6)
    mlp_in = grpcclient.InferInput("INPUT0", list(feats.shape), "FP32")
    mlp_in.set_data_from_numpy(feats)
    scores = c.infer("mlp", [mlp_in]).as_numpy("OUTPUT0")
    np.testing.assert_allclose(scores, mlp_session.run(None, {"INPUT0": feats})[0], rtol=1e-5, atol=1e-6)
    bad = grpcclient.InferInput("TEXT", [1, 1], "BYTES")
    bad.set_data_from_numpy(np.array([[b"\xff\xfe"]], dtype=np.object_))
    err = expect_error("INVALID_ARGUMENT", c.infer, "text_features", [bad])
    assert "TEXT must be UTF-8" in err.message()
