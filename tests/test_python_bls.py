"""Business logic scripting (BLS): Python models calling other models in the server, through
tritonclient over gRPC, as Triton's python_backend documents it (`InferenceRequest.exec`,
`async_exec` in an `async def execute`, `get_output_tensor_by_name`, `is_model_ready`,
`load_model`, `unload_model`, request `timeout()` and `trace()`).

Every model here is written for the test, Triton-style, importing `triton_python_backend_utils`.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from util import MODEL_REPOSITORY, ServerProcess, client, identity_config, scaled, write_model

PY_HEADER = "import asyncio, json, os\nimport numpy as np\nimport triton_python_backend_utils as pb_utils\n\n"

# Triton's BLS example shape: forward the two INT32 inputs to the ONNX `simple` model and
# return its outputs, taken with get_output_tensor_by_name.
BLS_SIMPLE = PY_HEADER + '''
class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            bls = pb_utils.InferenceRequest(
                model_name="simple", requested_output_names=["OUTPUT0", "OUTPUT1"],
                inputs=[pb_utils.get_input_tensor_by_name(request, "INPUT0"),
                        pb_utils.get_input_tensor_by_name(request, "INPUT1")])
            answer = bls.exec()
            if answer.has_error():
                raise pb_utils.TritonModelException(answer.error().message())
            out0 = pb_utils.get_output_tensor_by_name(answer, "OUTPUT0")
            out1 = pb_utils.get_output_tensor_by_name(answer, "OUTPUT1")
            responses.append(pb_utils.InferenceResponse(output_tensors=[
                pb_utils.Tensor("OUTPUT0", out0.as_numpy()), pb_utils.Tensor("OUTPUT1", out1.as_numpy())]))
        return responses
'''
BLS_SIMPLE_CONFIG = """name: "bls_simple"
backend: "python"
max_batch_size: 0
input [ { name: "INPUT0" data_type: TYPE_INT32 dims: [ -1, 16 ] },
        { name: "INPUT1" data_type: TYPE_INT32 dims: [ -1, 16 ] } ]
output [ { name: "OUTPUT0" data_type: TYPE_INT32 dims: [ -1, 16 ] },
         { name: "OUTPUT1" data_type: TYPE_INT32 dims: [ -1, 16 ] } ]
"""

# async def execute: one async_exec to each of three slow identity models, awaited together.
FANOUT = PY_HEADER + '''
class TritonPythonModel:
    async def execute(self, requests):
        responses = []
        for request in requests:
            x = pb_utils.get_input_tensor_by_name(request, "INPUT0")
            pending = [pb_utils.InferenceRequest(model_name=name, requested_output_names=["OUTPUT0"],
                                                 inputs=[x]).async_exec()
                       for name in ("slow_a", "slow_b", "slow_c")]
            answers = await asyncio.gather(*pending)
            total = np.zeros(4, dtype=np.float32)
            for answer in answers:
                if answer.has_error():
                    raise pb_utils.TritonModelException(answer.error().message())
                total += pb_utils.get_output_tensor_by_name(answer, "OUTPUT0").as_numpy()
            responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("OUTPUT0", total)]))
        return responses
'''

# One model that does what its request's parameters say and reports, as JSON in RESULT.
PROBE = PY_HEADER + '''
class TritonPythonModel:
    def initialize(self, args):
        try:  # BLS inference is only for execute, as in Triton
            pb_utils.InferenceRequest(model_name="id_fp32", requested_output_names=["OUTPUT0"],
                                      inputs=[pb_utils.Tensor("INPUT0", np.zeros(4, np.float32))]).exec()
            self.init_error = None
        except pb_utils.TritonModelException as exc:
            self.init_error = exc.message()

    @staticmethod
    def describe(answer, name="OUTPUT0"):
        if answer.has_error():
            return {"error": answer.error().message(), "code": answer.error().code()}
        out = pb_utils.get_output_tensor_by_name(answer, name)
        return {"output": out.as_numpy().tolist(), "names": [t.name() for t in answer.output_tensors()]}

    def run(self, request):
        params = json.loads(request.parameters())
        mode = params.get("mode", "exec")
        target = params.get("target", "id_fp32")
        x = pb_utils.get_input_tensor_by_name(request, "INPUT0").as_numpy()
        if mode == "exec":
            shape = json.loads(params.get("shape", "[4]"))
            tensor = pb_utils.Tensor(params.get("input_name", "INPUT0"), x.reshape(shape))
            answers = [pb_utils.InferenceRequest(model_name=target, requested_output_names=["OUTPUT0"],
                                                 inputs=[tensor]).exec()
                       for _ in range(int(params.get("times", 1)))]
            return self.describe(answers[-1])
        if mode == "trace":
            answer = pb_utils.InferenceRequest(model_name=target, requested_output_names=["OUTPUT0"],
                                               inputs=[pb_utils.Tensor("INPUT0", x)], trace=request.trace(),
                                               timeout=5_000_000).exec()
            return self.describe(answer)
        if mode == "decoupled_iter":
            answers = list(pb_utils.InferenceRequest(model_name=target, requested_output_names=["OUTPUT0"],
                                                     inputs=[pb_utils.Tensor("INPUT0", x)]).exec(decoupled=True))
            return {"count": len(answers), "first": self.describe(answers[0])}
        if mode == "ready":
            return {"ready": pb_utils.is_model_ready(target, params.get("version", ""))}
        if mode in ("load", "unload"):
            try:
                if mode == "load":
                    pb_utils.load_model(target)
                else:
                    pb_utils.unload_model(target)
            except pb_utils.TritonModelException as exc:
                return {"exception": exc.message()}
            return {"ok": True}
        if mode == "timeout":
            return {"timeout": request.timeout()}
        if mode == "init_error":
            return {"init_error": self.init_error}
        if mode == "pid":
            return {"pid": os.getpid()}
        raise ValueError(mode)

    def execute(self, requests):
        out = []
        for request in requests:
            result = json.dumps(self.run(request)).encode()
            out.append(pb_utils.InferenceResponse(
                output_tensors=[pb_utils.Tensor("RESULT", np.array([result], dtype=np.object_))]))
        return out
'''
PROBE_CONFIG = """name: "bls_probe"
backend: "python"
max_batch_size: 0
input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ 4 ] } ]
output [ { name: "RESULT" data_type: TYPE_STRING dims: [ 1 ] } ]
"""

# A Python target that refuses with INVALID_ARG.
REFUSER = PY_HEADER + '''
class TritonPythonModel:
    def execute(self, requests):
        refusal = pb_utils.TritonError("the target refuses", pb_utils.TritonError.INVALID_ARG)
        return [pb_utils.InferenceResponse(error=refusal) for _ in requests]
'''

SLOW_MS = 400


def _python_model(repo: Path, name: str, source: str, config: str) -> None:
    write_model(repo, name, config, files={"1/model.py": source.encode()})


def _fp32_config(name: str, extra: str = "") -> str:
    return identity_config(name, [("INPUT0", "FP32", [4])], extra=extra)


def build_repo(repo: Path) -> Path:
    shutil.copytree(MODEL_REPOSITORY / "simple", repo / "simple")
    _python_model(repo, "bls_simple", BLS_SIMPLE, BLS_SIMPLE_CONFIG)
    _python_model(repo, "bls_probe", PROBE, PROBE_CONFIG)
    _python_model(repo, "bls_fanout", FANOUT, _fp32_config("bls_fanout").replace('"identity"', '"python"'))
    _python_model(repo, "refuser", REFUSER, _fp32_config("refuser").replace('"identity"', '"python"'))
    write_model(repo, "id_fp32", _fp32_config("id_fp32"))
    write_model(repo, "id_batched", identity_config("id_batched", [("INPUT0", "FP32", [4])], max_batch_size=8,
                                                    extra="dynamic_batching { }\n"))
    for name in ("slow_a", "slow_b", "slow_c"):
        write_model(repo, name, identity_config(name, [("INPUT0", "FP32", [4])], execute_delay_ms=SLOW_MS))
    return repo


@pytest.fixture(scope="module")
def bls_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_repo(tmp_path_factory.mktemp("bls_repo"))


@pytest.fixture(scope="module")
def bls_server(bls_repo: Path):
    server = ServerProcess([bls_repo])
    yield server
    server.stop()


X = np.array([1.0, 2.0, 3.0, 4.0], dtype=np.float32)


def probe(srv: ServerProcess, x: np.ndarray = X, **params) -> dict:
    c = client(srv)
    inp = grpcclient.InferInput("INPUT0", [4], "FP32")
    inp.set_data_from_numpy(x)
    timeout = params.pop("request_timeout", None)
    result = c.infer("bls_probe", [inp], parameters={k: str(v) for k, v in params.items()}, timeout=timeout)
    return json.loads(result.as_numpy("RESULT")[0])


def inference_count(srv: ServerProcess, model: str) -> int:
    stats = client(srv).get_inference_statistics(model, as_json=True)
    return int(stats["model_stats"][0].get("inference_stats", {}).get("success", {}).get("count", 0))


def test_exec_runs_the_onnx_model_and_returns_its_outputs(bls_server: ServerProcess) -> None:
    c = client(bls_server)
    a = np.arange(32, dtype=np.int32).reshape(2, 16)
    b = np.full((2, 16), 3, dtype=np.int32)
    inputs = [grpcclient.InferInput("INPUT0", [2, 16], "INT32"), grpcclient.InferInput("INPUT1", [2, 16], "INT32")]
    inputs[0].set_data_from_numpy(a)
    inputs[1].set_data_from_numpy(b)
    result = c.infer("bls_simple", inputs)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a + b)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), a - b)


def test_exec_to_identity_and_batched_model(bls_server: ServerProcess) -> None:
    assert probe(bls_server) == {"output": X.tolist(), "names": ["OUTPUT0"]}
    answer = probe(bls_server, target="id_batched", shape="[1, 4]")
    assert answer["output"] == [X.tolist()]


def test_bls_goes_through_the_target_scheduler_not_the_network(bls_server: ServerProcess) -> None:
    """The target's statistics count each BLS call; the BLS model counts one request; and the
    stub process holds no TCP socket at all (its only socket is the one to its server)."""
    before_target = inference_count(bls_server, "id_fp32")
    before_probe = inference_count(bls_server, "bls_probe")
    assert probe(bls_server, times=5)["output"] == X.tolist()
    assert inference_count(bls_server, "id_fp32") - before_target == 5
    assert inference_count(bls_server, "bls_probe") - before_probe == 1
    pid = probe(bls_server, mode="pid")["pid"]
    sockets = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            sockets.add(link[len("socket:["):-1])
    assert sockets, "the stub should hold its socket to the server"
    tcp_inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table, encoding="ascii") as f:
            next(f)
            tcp_inodes.update(line.split()[9] for line in f)
    assert not sockets & tcp_inodes, "the stub opened a TCP connection"
    unix = open("/proc/net/unix", encoding="ascii").read()
    assert all(f" {inode}" in unix for inode in sockets), "every stub socket is a Unix socket"


def test_async_exec_fans_out_concurrently(bls_server: ServerProcess) -> None:
    c = client(bls_server)
    inp = grpcclient.InferInput("INPUT0", [4], "FP32")
    inp.set_data_from_numpy(X)
    c.infer("bls_fanout", [inp])  # warm: first calls start nothing, but keep timing honest
    started = time.monotonic()
    result = c.infer("bls_fanout", [inp])
    took = time.monotonic() - started
    np.testing.assert_allclose(result.as_numpy("OUTPUT0"), 3 * X)
    # Three 400 ms models one after the other would take 1.2 s; together, about 0.4 s.
    assert took < SLOW_MS / 1000 * 2.5, f"async_exec calls ran one after the other ({took:.2f} s)"
    for name in ("slow_a", "slow_b", "slow_c"):
        assert inference_count(bls_server, name) == 2


@pytest.mark.parametrize("params, message, code", [
    ({"target": "no_such_model"},
     "Model no_such_model - Error when running inference: Failed for execute the inference request. "
     "Model 'no_such_model' is not ready.", 1),
    ({"input_name": "WRONG"},
     "Model id_fp32 - Error when running inference: unexpected inference input 'WRONG' for model 'id_fp32'", 1),
    ({"shape": "[2, 2]"}, "unexpected shape for input 'INPUT0' for model 'id_fp32'", 1),
    ({"target": "refuser"}, "the target refuses", 3),
])
def test_target_errors_come_back_as_error_responses(bls_server: ServerProcess, params: dict, message: str,
                                                    code: int) -> None:
    answer = probe(bls_server, **params)
    assert message in answer["error"], answer
    assert answer["code"] == code


def test_exec_outside_execute_raises(bls_server: ServerProcess) -> None:
    assert probe(bls_server, mode="init_error") == {
        "init_error": "BLS is only supported during the 'execute' function."}


def test_request_timeout_and_trace(bls_server: ServerProcess) -> None:
    assert probe(bls_server, mode="timeout", request_timeout=123456) == {"timeout": 123456}
    assert probe(bls_server, mode="timeout") == {"timeout": 0}
    assert probe(bls_server, mode="trace")["output"] == X.tolist()


def test_decoupled_exec_of_a_plain_model_yields_its_one_response(bls_server: ServerProcess) -> None:
    assert probe(bls_server, mode="decoupled_iter") == {
        "count": 1, "first": {"output": X.tolist(), "names": ["OUTPUT0"]}}


def test_model_ready_and_load_api_outside_explicit_mode(bls_server: ServerProcess) -> None:
    assert probe(bls_server, mode="ready") == {"ready": True}
    assert probe(bls_server, mode="ready", target="no_such_model") == {"ready": False}
    assert probe(bls_server, mode="ready", version="1") == {"ready": True}
    assert probe(bls_server, mode="ready", version="7") == {"ready": False}
    assert probe(bls_server, mode="load") == {
        "exception": "explicit model load / unload is not allowed if polling is enabled"}
    assert probe(bls_server, mode="unload") == {
        "exception": "explicit model load / unload is not allowed if polling is enabled"}


def test_load_and_unload_in_explicit_mode(tmp_path: Path) -> None:
    repo = build_repo(tmp_path / "repo")
    server = ServerProcess([repo], ("--model-control-mode", "explicit", "--load-model", "bls_probe"))
    try:
        assert probe(server, mode="ready") == {"ready": False}
        assert "is not ready" in probe(server)["error"]
        assert probe(server, mode="load") == {"ok": True}
        assert probe(server, mode="ready") == {"ready": True}
        assert probe(server)["output"] == X.tolist()
        assert probe(server, mode="unload") == {"ok": True}
        assert probe(server, mode="ready") == {"ready": False}
        failed = probe(server, mode="load", target="no_such_model")["exception"]
        assert "no_such_model" in failed
    finally:
        server.stop()


def test_many_concurrent_bls_requests(bls_server: ServerProcess) -> None:
    """Clients' requests to the BLS model in parallel: each BLS answer reaches its own caller."""
    import concurrent.futures

    def one(i: int) -> list[float]:
        x = np.full(4, float(i), dtype=np.float32)
        return probe(bls_server, x=x, target="id_batched", shape="[1, 4]")["output"][0]

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(40), timeout=scaled(60)))
    assert results == [[float(i)] * 4 for i in range(40)]


def test_channel_keeps_read_ahead_messages_and_their_descriptors() -> None:
    """Several answers in flight at once: messages sent back to back, some with a descriptor,
    each come out whole with its own descriptor, and `buffered()` says when one is already here
    (the socket is then not readable)."""
    import socket

    from backends.python_bls import pack_tensors, unpack_tensors
    from backends.python_ipc import Channel

    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    sender, receiver = Channel(left), Channel(right)
    try:
        sent = []
        for i in range(6):
            if i % 2:
                metas, fd, size = pack_tensors([("T", np.full(3, i, dtype=np.int64))])
                sender.send(("m", i, metas, size), fd)
                os.close(fd)
            else:
                sender.send(("m", i, None, 0))
            sent.append(i)
        sender.send(("big", b"x" * 200_000))  # longer than the receive buffer
        got = []
        for i in sent:
            message, fd = receiver.recv()
            assert message[1] == i
            if i % 2:
                assert fd is not None
                (name, array), = unpack_tensors(message[2], fd, message[3])
                assert name == "T" and array.tolist() == [i] * 3
            else:
                assert fd is None
            got.append(i)
            if i == 0:  # the first read took the small messages behind it too
                assert receiver.buffered()
        message, fd = receiver.recv()
        assert message == ("big", b"x" * 200_000) and fd is None
        assert not receiver.buffered()
        assert got == sent
    finally:
        sender.close()
        receiver.close()
