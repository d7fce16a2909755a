"""Python models run inside the server (`nereid_in_process`), through a real server and tritonclient.

The same Triton-style `model.py` files as the stub tests (test_python_backend.py), with
`parameters { key: "nereid_in_process" value: { string_value: "true" } }` in their configs: they
must behave as in a stub, except that no stub process exists and they run in the server's pid.
"""

from __future__ import annotations

import json
import os
import re
import threading
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from test_python_backend import ADD_SUB, BROKEN_INIT, PROBE, PROBE_CONFIG, PY_HEADER, _fp32, probe_spec
from util import ServerProcess, client, expect_error, scaled, write_model

from server.exit_guard import children

IN_PROCESS = 'parameters { key: "nereid_in_process" value: { string_value: "true" } }\n'

# Reports how many requests its `execute` got (BATCH) and doubles its input.
BATCHES = PY_HEADER + '''
class TritonPythonModel:
    def execute(self, requests):
        n = len(requests)
        out = []
        for r in requests:
            x = pb_utils.get_input_tensor_by_name(r, "INPUT0").as_numpy()
            out.append(pb_utils.InferenceResponse([pb_utils.Tensor("OUTPUT0", x * 2),
                                                   pb_utils.Tensor("BATCH", np.full((x.shape[0], 1), n, np.int32))]))
        return out
'''

BATCHES_CONFIG = """name: "inproc_batches"
backend: "python"
max_batch_size: 8
input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ 2 ] } ]
output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 2 ] }, { name: "BATCH" data_type: TYPE_INT32 dims: [ 1 ] } ]
dynamic_batching { max_queue_delay_microseconds: 300000 }
""" + IN_PROCESS

# Two models whose files have the same names (model.py, helper.py, consts.py) and a module global:
# each must see its own.
SAME_NAMES = PY_HEADER + '''
import helper
from .consts import VALUE

CALLS = 0

class TritonPythonModel:
    def execute(self, requests):
        global CALLS
        CALLS += 1
        return [pb_utils.InferenceResponse([pb_utils.Tensor("OUTPUT0", np.full(4, helper.VALUE * 100 + VALUE * 10
                                            + CALLS, np.float32))]) for _ in requests]
'''

# A model with no helper.py of its own: `import helper` in execute must not find another model's.
NO_HELPER = PY_HEADER + '''
class TritonPythonModel:
    def execute(self, requests):
        try:
            import helper
            found = float(helper.VALUE)
        except ImportError:
            found = -1.0
        return [pb_utils.InferenceResponse([pb_utils.Tensor("OUTPUT0", np.full(4, found, np.float32))])
                for _ in requests]
'''

# Says which thread called its execute; a first element of -9 calls sys.exit(3).
THREADS = PY_HEADER + '''
import sys, threading

class TritonPythonModel:
    def execute(self, requests):
        if pb_utils.get_input_tensor_by_name(requests[0], "INPUT0").as_numpy()[0] == -9:
            sys.exit(3)
        name = threading.current_thread().name.encode()
        return [pb_utils.InferenceResponse([pb_utils.Tensor("OUTPUT0", pb_utils.get_input_tensor_by_name(
            r, "INPUT0").as_numpy()), pb_utils.Tensor("THREAD", np.array([name], dtype=np.object_))]) for r in requests]
'''

# Logs from initialize, execute and finalize (pb_utils.Logger reaches the server's log).
LOGS = PY_HEADER + '''
class TritonPythonModel:
    def initialize(self, args):
        pb_utils.Logger.log_info("inproc-logs: initialized " + args["model_instance_name"])

    def execute(self, requests):
        pb_utils.Logger.log_warn("inproc-logs: executing")
        return [pb_utils.InferenceResponse([pb_utils.Tensor("OUTPUT0", pb_utils.get_input_tensor_by_name(
            r, "INPUT0").as_numpy())]) for r in requests]

    def finalize(self):
        pb_utils.Logger.log_info("inproc-logs: finalized pid %d" % os.getpid())
'''

# Calls another model through business logic scripting.
BLS = PY_HEADER + '''
class TritonPythonModel:
    def execute(self, requests):
        out = []
        for r in requests:
            try:
                pb_utils.InferenceRequest(model_name="inproc_probe", inputs=r.inputs(),
                                          requested_output_names=["OUTPUT0"]).exec()
                out.append(pb_utils.InferenceResponse([pb_utils.get_input_tensor_by_name(r, "INPUT0")]))
            except pb_utils.TritonModelException as exc:
                out.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(exc.message())))
        return out
'''

# Returns a response sender's answer (default mode) and responds asynchronously to the other request.
SENDER = PY_HEADER + '''
class TritonPythonModel:
    async def execute(self, requests):
        for r in requests:
            x = pb_utils.get_input_tensor_by_name(r, "INPUT0").as_numpy()
            sender = r.get_response_sender()
            sender.send(pb_utils.InferenceResponse([pb_utils.Tensor("OUTPUT0", x + 1)], parameters={"via": "sender"}),
                        flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        return None
'''


def _config(name: str, extra: str = "") -> str:
    return (f'name: "{name}"\nbackend: "python"\nmax_batch_size: 0\n'
            'input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ 4 ] } ]\n'
            'output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 4 ] } ]\n' + extra)


@pytest.fixture(scope="module")
def inproc_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("inproc_repo")
    write_model(repo, "inproc_probe", PROBE_CONFIG.replace('"py_probe"', '"inproc_probe"') + IN_PROCESS,
                files={"1/model.py": PROBE.encode()})
    write_model(repo, "stub_probe", PROBE_CONFIG.replace('"py_probe"', '"stub_probe"').replace("count: 2", "count: 1"),
                files={"1/model.py": PROBE.encode()})
    write_model(repo, "inproc_batches", BATCHES_CONFIG, files={"1/model.py": BATCHES.encode()})
    for name, value in (("same_a", 1), ("same_b", 2)):
        write_model(repo, name, _config(name, IN_PROCESS), files={
            "1/model.py": SAME_NAMES.encode(), "1/helper.py": f"VALUE = {value}\n".encode(),
            "1/consts.py": f"VALUE = {value + 4}\n".encode()})
    write_model(repo, "no_helper", _config("no_helper", IN_PROCESS), files={"1/model.py": NO_HELPER.encode()})
    write_model(repo, "inproc_bls", _config("inproc_bls", IN_PROCESS), files={"1/model.py": BLS.encode()})
    write_model(repo, "inproc_decoupled", _config("inproc_decoupled", IN_PROCESS +
                'model_transaction_policy { decoupled: true }\n'), files={"1/model.py": ADD_SUB.encode()})
    write_model(repo, "inproc_broken_init", _config("inproc_broken_init", IN_PROCESS),
                files={"1/model.py": BROKEN_INIT.encode()})
    write_model(repo, "inproc_bad_value", _config("inproc_bad_value", IN_PROCESS.replace('"true"', '"maybe"')),
                files={"1/model.py": ADD_SUB.encode()})
    return repo


@pytest.fixture(scope="module")
def inproc_server(inproc_repo: Path):
    server = ServerProcess([inproc_repo])
    yield server
    server.stop()


def _fails(code: str, pattern: str, model: str, inputs: list[grpcclient.InferInput], srv: ServerProcess) -> None:
    message = expect_error(code, client(srv).infer, model, inputs).message()
    assert re.search(pattern, message), message


def _children(pid: int) -> list[str]:
    """The command lines of `pid`'s child processes."""
    found = []
    for child in children(pid):
        try:
            found.append(Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ").decode())
        except OSError:
            continue  # gone meanwhile
    return found


def test_runs_in_the_server_process_with_the_stubs_arguments(inproc_server: ServerProcess) -> None:
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    result = client(inproc_server).infer("inproc_probe", [_fp32("INPUT0", x)], request_id="req-7",
                                         parameters={"temperature": 3, "mode": "fast"})
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), x)
    assert set(result.as_numpy("PID").reshape(-1).tolist()) == {inproc_server.proc.pid}
    meta = json.loads(result.as_numpy("META").reshape(-1)[0])
    assert meta["id"] == "req-7"
    assert meta["parameters"] == {"temperature": 3, "mode": "fast"}
    assert meta["requested"] == ["OUTPUT0", "PID", "META"]
    args = meta["args"]
    assert (args["model_name"], args["model_version"], args["model_instance_kind"]) == ("inproc_probe", "1", "CPU")
    assert args["model_instance_name"] in ("inproc_probe_0_0", "inproc_probe_0_1")
    assert args["model_repository"].endswith("inproc_probe")
    config = json.loads(args["model_config"])
    assert config["max_batch_size"] == 16 and config["input"][0]["dims"] == [-1]  # numbers, as the stub gives
    assert config["parameters"]["nereid_in_process"] == {"string_value": "true"}


def test_requested_outputs_reach_the_model(inproc_server: ServerProcess) -> None:
    result = client(inproc_server).infer("inproc_probe", [_fp32("INPUT0", np.ones((1, 2), np.float32))], outputs=[
        grpcclient.InferRequestedOutput("META"), grpcclient.InferRequestedOutput("OUTPUT0")])
    assert json.loads(result.as_numpy("META").reshape(-1)[0])["requested"] == ["META", "OUTPUT0"]
    assert result.as_numpy("PID") is None


def test_no_stub_process_is_started(inproc_server: ServerProcess) -> None:
    c = client(inproc_server)
    for model in ("inproc_probe", "stub_probe"):  # both loaded and used
        c.infer(model, [_fp32("INPUT0", np.ones((1, 2), np.float32))])
    stubs = [cmd for cmd in _children(inproc_server.proc.pid) if "backends.python_stub" in cmd]
    assert len(stubs) == 1, stubs  # stub_probe's one instance; none for the in-process models


def test_several_requests_in_one_execute(inproc_server: ServerProcess) -> None:
    results: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def call(i: int) -> None:
        x = np.full((1, 2), i, np.float32)
        r = client(inproc_server).infer("inproc_batches", [_fp32("INPUT0", x)])
        results[i] = (r.as_numpy("OUTPUT0"), r.as_numpy("BATCH"))

    threads = [threading.Thread(target=call, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [0, 1, 2, 3]
    for i, (out, _) in results.items():
        assert out.tolist() == [[2 * i, 2 * i]]
    assert max(int(b.reshape(-1)[0]) for _, b in results.values()) > 1  # the batcher grouped them


def test_error_response_fails_only_its_request(inproc_server: ServerProcess) -> None:
    c = client(inproc_server)
    _fails("INTERNAL", "^first element must not be -1$", "inproc_probe",
           [_fp32("INPUT0", np.full((1, 2), -1, np.float32))], inproc_server)
    _fails("INVALID_ARGUMENT", "^bad input$", "inproc_probe",
           [_fp32("INPUT0", np.full((1, 2), -5, np.float32))], inproc_server)
    x = np.ones((1, 2), np.float32)
    np.testing.assert_array_equal(c.infer("inproc_probe", [_fp32("INPUT0", x)]).as_numpy("OUTPUT0"), x)


def test_exception_in_execute_fails_the_call(inproc_server: ServerProcess) -> None:
    c = client(inproc_server)
    _fails("INTERNAL", r"ValueError: model refuses -2 \(model.py:\d+ in execute\)", "inproc_probe",
           [_fp32("INPUT0", np.full((1, 2), -2, np.float32))], inproc_server)
    x = np.ones((1, 2), np.float32)
    np.testing.assert_array_equal(c.infer("inproc_probe", [_fp32("INPUT0", x)]).as_numpy("OUTPUT0"), x)


def test_models_with_the_same_file_names_do_not_share_modules(inproc_server: ServerProcess) -> None:
    c = client(inproc_server)
    x = np.zeros(4, np.float32)
    a1 = c.infer("same_a", [_fp32("INPUT0", x)]).as_numpy("OUTPUT0")[0]
    b1 = c.infer("same_b", [_fp32("INPUT0", x)]).as_numpy("OUTPUT0")[0]
    a2 = c.infer("same_a", [_fp32("INPUT0", x)]).as_numpy("OUTPUT0")[0]
    # helper.VALUE * 100 + consts.VALUE * 10 + calls so far (a module global of each model's own)
    assert (a1, b1, a2) == (100 + 50 + 1, 200 + 60 + 1, 100 + 50 + 2)
    # The helper modules were imported for their models only: none is left behind for others.
    assert c.infer("no_helper", [_fp32("INPUT0", x)]).as_numpy("OUTPUT0").tolist() == [-1.0] * 4


def test_cheap_model_runs_on_the_event_loop_and_async_execute_still_works(tmp_path: Path) -> None:
    """Measured cheap, an in-process model runs inline on the event loop as other in-process
    backends do (a generous --inline-compute-us makes sure it counts as cheap here); an
    `async def execute` still runs there, on a loop of its own."""
    write_model(tmp_path, "inproc_threads", _config("inproc_threads", IN_PROCESS).replace(
        "output [ ", 'output [ { name: "THREAD" data_type: TYPE_STRING dims: [ 1 ] }, '),
        files={"1/model.py": THREADS.encode()})
    write_model(tmp_path, "inproc_sender", _config("inproc_sender", IN_PROCESS), files={"1/model.py": SENDER.encode()})
    server = ServerProcess([tmp_path], ["--inline-compute-us", "1000000"])
    try:
        c = client(server)
        x = np.arange(4, dtype=np.float32)
        threads = [c.infer("inproc_threads", [_fp32("INPUT0", x)]).as_numpy("THREAD")[0].decode() for _ in range(4)]
        assert threads[0].startswith("instance-")  # not measured yet: the instance's worker thread
        assert not threads[-1].startswith("instance-"), threads  # measured cheap: on the event loop
        # sys.exit() there fails the request; it must not stop the server's event loop.
        _fails("INTERNAL", r"raised SystemExit\(3\)", "inproc_threads", [_fp32("INPUT0", np.full(4, -9, np.float32))],
               server)
        for _ in range(4):
            result = c.infer("inproc_sender", [_fp32("INPUT0", x)])
            np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), x + 1)
    finally:
        server.stop()


def test_business_logic_scripting_is_refused_by_name(inproc_server: ServerProcess) -> None:
    _fails("INTERNAL", r"business logic scripting \(InferenceRequest.exec\) is not supported with nereid_in_process; "
           "remove the parameter to run the model in a stub process", "inproc_bls",
           [_fp32("INPUT0", np.zeros(4, np.float32))], inproc_server)


def test_unsupported_configs_and_failing_initialize_are_refused_at_load(inproc_server: ServerProcess) -> None:
    rows = {r.name: r for r in client(inproc_server).get_model_repository_index().models}
    assert rows["inproc_decoupled"].state == "UNAVAILABLE"
    assert ("the decoupled transaction policy (model_transaction_policy { decoupled: true }) is not supported "
            "with nereid_in_process; remove the parameter") in rows["inproc_decoupled"].reason
    assert rows["inproc_bad_value"].state == "UNAVAILABLE"
    assert 'nereid_in_process must be "true" or "false", got "maybe"' in rows["inproc_bad_value"].reason
    assert rows["inproc_broken_init"].state == "UNAVAILABLE"  # as in a stub: the exception and where
    assert re.search(r"failed to initialize: RuntimeError: cannot find my weights \(model.py:\d+ in initialize\)",
                     rows["inproc_broken_init"].reason), rows["inproc_broken_init"].reason
    assert rows["inproc_probe"].state == "READY"


def test_logger_and_finalize_on_unload(tmp_path: Path) -> None:
    write_model(tmp_path, "inproc_logs", _config("inproc_logs", IN_PROCESS), files={"1/model.py": LOGS.encode()})
    server = ServerProcess([tmp_path], ["--model-control-mode", "explicit", "--load-model", "inproc_logs"])
    try:
        server.wait_for_log(re.compile(r"model 'inproc_logs' \(model.py:\d+\): inproc-logs: initialized inproc_logs_0"),
                            scaled(10))
        c = client(server)
        x = np.arange(4, dtype=np.float32)
        np.testing.assert_array_equal(c.infer("inproc_logs", [_fp32("INPUT0", x)]).as_numpy("OUTPUT0"), x)
        server.wait_for_log(re.compile(r"model 'inproc_logs' \(model.py:\d+\): inproc-logs: executing"), scaled(10))
        assert "finalized" not in server.log
        c.unload_model("inproc_logs")
        server.wait_for_log(re.compile(rf"inproc-logs: finalized pid {server.proc.pid}\b"), scaled(10))
    finally:
        server.stop()


def test_backend_gives_each_request_of_one_call_its_outcome(inproc_repo: Path) -> None:
    """The backend on its own: one execute_requests call with several requests, mixed outcomes."""
    from backends.base import BackendError, BackendStatusError, Device, Request
    from backends.python import PythonBackend

    spec = probe_spec(inproc_repo / "inproc_probe", {"nereid_in_process": "true"})
    cls = PythonBackend.variant(spec)
    assert cls is not PythonBackend and not cls.out_of_process
    backend = cls()
    backend.load(spec, Device("CPU", 0))
    try:
        good = np.arange(4, dtype=np.float32).reshape(2, 2)
        outcomes = backend.execute_requests([
            Request({"INPUT0": good}, id="a", parameters={"k": "v"}, requested_outputs=("OUTPUT0", "META")),
            Request({"INPUT0": -np.ones((1, 2), np.float32)}, id="b"),
            Request({"INPUT0": np.full((1, 2), -5, np.float32)}, id="c"),
            Request({"INPUT0": good[:1]}, id="d", parameters={"sequence_id": 9, "sequence_start": True}),
        ])
        assert isinstance(outcomes[0], dict) and set(outcomes[0]) == {"OUTPUT0", "META"}
        np.testing.assert_array_equal(outcomes[0]["OUTPUT0"], good)
        meta = json.loads(outcomes[0]["META"][0])
        assert (meta["id"], meta["parameters"], meta["requested"]) == ("a", {"k": "v"}, ["OUTPUT0", "META"])
        assert isinstance(outcomes[1], BackendStatusError) and outcomes[1].code == "INTERNAL"
        assert str(outcomes[1]) == "first element must not be -1"
        assert isinstance(outcomes[2], BackendStatusError) and outcomes[2].code == "INVALID_ARGUMENT"
        assert isinstance(outcomes[3], dict)
        meta = json.loads(outcomes[3]["META"][0])
        assert (meta["id"], meta["parameters"]) == ("d", {})  # the sequence keys became correlation id and flags
        assert int(outcomes[3]["PID"][0]) == os.getpid()
        with pytest.raises(BackendError, match="ValueError: model refuses -2"):
            backend.execute_requests([Request({"INPUT0": np.full((1, 2), -2, np.float32)})])
    finally:
        backend.close()
    import sys

    assert not [name for name in sys.modules if name.startswith("_nereid_model_")]  # forgotten on close
