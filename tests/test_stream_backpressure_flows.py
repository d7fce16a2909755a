"""Back-pressure past a decoupled model: a decoupled ensemble's steps, and a BLS caller's
`exec(decoupled=True)` stream.

- An ensemble whose first step is a decoupled model (`burst`, 1 MB responses) and whose
  second copies each response: a client that does not read its stream holds the ensemble
  (it waits for room in its own window), which holds the step (it stops taking the decoupled
  model's responses), which holds the model (its sender blocks): the server grows by a few
  windows, not 400 MB, and the model has not sent everything. Cancelling releases the model.
- A Python model that calls `burst` with `exec(decoupled=True)` and does not iterate: the
  server stops passing the callee's answers on once a window of them waits in the caller's
  stub (the stub returns credit as the caller takes them), so neither the caller's stub (one
  shared-memory file per answer) nor the server holds them all, and the callee is held back;
  once the caller iterates, all arrive in order. A caller that lets go of its iterator
  releases the callee (cancels its request, even before it sent anything). Large answers
  after small ones do not deadlock on credit. Several un-iterated
  calls of one caller, more than its socket holds, do not block the server's event loop.

Shared memory is read machine-wide (/proc/meminfo Shmem), so other processes add noise;
the bound leaves room for it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from test_stream_backpressure import (
    BOUND_MB,
    BURST,
    MB,
    _burst,
    _burst_config,
    _channel,
    _open,
    _peaks,
    _read_burst,
    _read_burst_on_new_channel,
    _reset_peaks,
    _warm,
    give_up_on_a_held_stream,
)
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc
from util import ServerProcess, identity_config, raw_request, scaled, write_model


def _ensemble_config(name: str, step_model: str) -> str:
    return f"""name: "{name}"
platform: "ensemble"
max_batch_size: 0
input [ {{ name: "COUNT" data_type: TYPE_INT32 dims: [ 1 ] }}, {{ name: "SIZE" data_type: TYPE_INT32 dims: [ 1 ] }} ]
output [ {{ name: "OUT" data_type: TYPE_UINT8 dims: [ -1 ] }}, {{ name: "IDX" data_type: TYPE_UINT32 dims: [ 1 ] }} ]
ensemble_scheduling {{ step [
  {{ model_name: "{step_model}" model_version: -1 input_map {{ key: "COUNT" value: "COUNT" }}
    input_map {{ key: "SIZE" value: "SIZE" }} output_map {{ key: "OUT" value: "raw" }}
    output_map {{ key: "IDX" value: "IDX" }} }},
  {{ model_name: "copy" model_version: -1 input_map {{ key: "INPUT0" value: "raw" }}
    output_map {{ key: "OUTPUT0" value: "OUT" }} }}
] }}
"""


# Calls `burst1` with exec(decoupled=True) for COUNT responses of SIZE bytes. It takes
# TAKE of them, then: if TAKE >= 0, waits for a file `go` in its folder before taking the
# rest (checking each is in order and whole) and answers N = how many it took; if TAKE < 0,
# lets go of the iterator after taking -TAKE and answers at once.
CALLER = '''import os
import time
import numpy as np
import triton_python_backend_utils as pb_utils

TARGET = "burst1"


def size_of(i, size):
    return size


class TritonPythonModel:
    def initialize(self, args):
        self.folder = args["model_repository"]

    def execute(self, requests):
        answers = []
        for request in requests:
            count = pb_utils.get_input_tensor_by_name(request, "COUNT")
            size = pb_utils.get_input_tensor_by_name(request, "SIZE")
            take = int(pb_utils.get_input_tensor_by_name(request, "TAKE").as_numpy()[0])
            call = pb_utils.InferenceRequest(model_name=TARGET, inputs=[count, size],
                                             requested_output_names=["OUT", "IDX"])
            responses = call.exec(decoupled=True)
            got = 0
            size = int(size.as_numpy()[0])
            for response in responses:
                if response.has_error():
                    raise pb_utils.TritonModelException(response.error().message())
                out = pb_utils.get_output_tensor_by_name(response, "OUT")
                if out is None:
                    continue  # the final flag alone
                out = out.as_numpy()
                idx = int(pb_utils.get_output_tensor_by_name(response, "IDX").as_numpy()[0])
                n = size_of(got, size)
                if idx != got or len(out) != n or out[0] != got % 251 or out[-1] != (got + n - 1) % 251:
                    raise pb_utils.TritonModelException(f"response {idx} arrived as number {got}")
                got += 1
                if got == abs(take):
                    if take < 0:
                        break
                    go = os.path.join(self.folder, "go")
                    deadline = time.monotonic() + 120
                    while not os.path.exists(go) and time.monotonic() < deadline:
                        time.sleep(0.02)
            del responses
            answers.append(pb_utils.InferenceResponse([pb_utils.Tensor("N", np.array([got], np.int32))]))
        return answers
'''

CALLER_CONFIG = """name: "caller"
backend: "python"
max_batch_size: 0
input [ { name: "COUNT" data_type: TYPE_INT32 dims: [ 1 ] }, { name: "SIZE" data_type: TYPE_INT32 dims: [ 1 ] },
        { name: "TAKE" data_type: TYPE_INT32 dims: [ 1 ] } ]
output [ { name: "N" data_type: TYPE_INT32 dims: [ 1 ] } ]
instance_group [ { kind: KIND_CPU count: 1 } ]
"""

# A callee like BURST whose even responses are 8 bytes and odd ones SIZE, and its caller: a
# caller that took a small answer and waits, while the server holds a large one for lack of
# credit, must say what it took without being asked (else both wait for ever).
VARIED = BURST.replace("base[i % 251:i % 251 + size]", "base[i % 251:i % 251 + (size if i % 2 else 8)]")
VARIED_CALLER = CALLER.replace('TARGET = "burst1"', 'TARGET = "varied"').replace(
    "    return size\n", "    return size if i % 2 else 8\n")

# A decoupled callee that sends nothing until its request is cancelled (or 30 s passed), then
# writes `saw-cancel` (or `saw-timeout`) in its folder; and a caller that lets go of the
# iterator once the callee runs.
WAITER = '''import os
import time
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        self.folder = args["model_repository"]

    def execute(self, requests):
        for request in requests:
            with open(os.path.join(self.folder, "started"), "w") as f:
                f.write("started")
            deadline = time.monotonic() + 30
            while not request.is_cancelled() and time.monotonic() < deadline:
                time.sleep(0.02)
            seen = "cancel" if request.is_cancelled() else "timeout"
            with open(os.path.join(self.folder, f"saw-{seen}"), "w") as f:
                f.write(seen)
            request.get_response_sender().send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        return None
'''

DROPPER = '''import os
import time
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        self.started = os.path.join(os.path.dirname(args["model_repository"]), "waiter", "started")

    def execute(self, requests):
        answers = []
        for request in requests:
            inputs = [pb_utils.get_input_tensor_by_name(request, name) for name in ("COUNT", "SIZE")]
            responses = pb_utils.InferenceRequest(model_name="waiter", inputs=inputs,
                                                  requested_output_names=["OUT", "IDX"]).exec(decoupled=True)
            deadline = time.monotonic() + 10
            while not os.path.exists(self.started) and time.monotonic() < deadline:
                time.sleep(0.01)  # the callee runs (dropped before, its request would just not start)
            del responses
            answers.append(pb_utils.InferenceResponse([pb_utils.Tensor("N", np.array([0], np.int32))]))
        return answers
'''

# Starts TAKE calls to `many` (COUNT x SIZE each) with exec(decoupled=True), iterates none of
# them until a file `go` appears in its folder, then takes every response of each; answers N,
# the responses taken.
FANOUT = '''import os
import time
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        self.folder = args["model_repository"]

    def execute(self, requests):
        answers = []
        for request in requests:
            inputs = [pb_utils.get_input_tensor_by_name(request, name) for name in ("COUNT", "SIZE")]
            calls = int(pb_utils.get_input_tensor_by_name(request, "TAKE").as_numpy()[0])
            iterators = [pb_utils.InferenceRequest(model_name="many", inputs=inputs,
                                                   requested_output_names=["OUT", "IDX"]).exec(decoupled=True)
                         for _ in range(calls)]
            go = os.path.join(self.folder, "go")
            deadline = time.monotonic() + 120
            while not os.path.exists(go) and time.monotonic() < deadline:
                time.sleep(0.02)
            got = 0
            for responses in iterators:
                for response in responses:
                    if response.has_error():
                        raise pb_utils.TritonModelException(response.error().message())
                    got += len(response.output_tensors()) > 0
            answers.append(pb_utils.InferenceResponse([pb_utils.Tensor("N", np.array([got], np.int32))]))
        return answers
'''


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, Path, list[int]]]:
    repo = tmp_path_factory.mktemp("backpressure_flows")
    write_model(repo, "burst", _burst_config("burst", 2), files={"1/model.py": BURST.encode()})
    write_model(repo, "burst1", _burst_config("burst1", 1), files={"1/model.py": BURST.encode()})
    write_model(repo, "copy", identity_config("copy", [("INPUT0", "UINT8", [-1])]))
    write_model(repo, "ens", _ensemble_config("ens", "burst"))
    write_model(repo, "ens1", _ensemble_config("ens1", "burst1"))
    write_model(repo, "caller", CALLER_CONFIG, files={"1/model.py": CALLER.encode()})
    write_model(repo, "varied", _burst_config("varied", 1), files={"1/model.py": VARIED.encode()})
    write_model(repo, "waiter", _burst_config("waiter", 1), files={"1/model.py": WAITER.encode()})
    write_model(repo, "many", _burst_config("many", 8), files={"1/model.py": BURST.encode()})
    write_model(repo, "fanout", CALLER_CONFIG.replace('"caller"', '"fanout"'), files={"1/model.py": FANOUT.encode()})
    write_model(repo, "dropper", CALLER_CONFIG.replace('"caller"', '"dropper"'), files={"1/model.py": DROPPER.encode()})
    write_model(repo, "varied_caller", CALLER_CONFIG.replace('"caller"', '"varied_caller"'),
                files={"1/model.py": VARIED_CALLER.encode()})
    srv = ServerProcess([repo], ["--model-queue-limit", "0"])
    yield srv, repo, [srv.proc.pid]
    srv.stop()


def _wait_marker(marker: Path, limit_s: float) -> bool:
    deadline = time.monotonic() + limit_s
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    return marker.exists()


def test_an_unread_decoupled_ensemble_holds_its_decoupled_step_back(server) -> None:
    """400 responses of 1 MB through a decoupled ensemble to a client that does not read: the
    step model is held back, the server grows by a few windows; then all 400 arrive in order."""
    srv, repo, pids = server
    count, size = 400, MB
    channel = _channel(srv)
    stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
    _warm(stub, repo, "burst")
    warm = list(stub.ModelStreamInfer(iter([_burst("ens", 2, 8)])))
    assert all(r.error_message == "" for r in warm) and len(warm) == 2, warm
    assert _wait_marker(repo / "burst" / "sent-2", scaled(10))
    (repo / "burst" / "sent-2").unlink()
    before = _reset_peaks(pids)
    done = threading.Event()
    try:
        responses = _open(stub, _burst("ens", count, size), done)
        marker = repo / "burst" / f"sent-{count}"
        _wait_marker(marker, 4.0)  # without back-pressure the model sends all 400 in about 1 s
        held = _peaks(pids)
        growth = [round(after - first) for after, first in zip(held, before, strict=True)]
        print(f"ensemble: peak RSS growth while unread, MB: {growth}")
        assert not marker.exists(), "the ensemble's step sent every response to a client that reads none"
        assert max(growth) < BOUND_MB, f"the server held the unread ensemble responses: {growth} MB"
        _read_burst(responses, count, size)
    finally:
        done.set()
        channel.close()
    growth = [round(after - first) for after, first in zip(_peaks(pids), before, strict=True)]
    print(f"ensemble: peak RSS growth overall, MB: {growth}")
    assert max(growth) < BOUND_MB, growth


def test_a_client_that_gives_up_on_a_held_ensemble_frees_its_step_instance(server) -> None:
    """The ensemble's one-instance decoupled step waits for a client that does not read; the
    client cancels: the step's wait ends (the rest is dropped), and the instance serves the next."""
    srv, repo, _ = server
    give_up_on_a_held_stream(srv, repo, "ens1")
    (repo / "burst1" / "sent-300").unlink()
    (repo / "burst1" / "sent-5").unlink()


def _shmem_mb() -> float:
    """The machine's shared memory in MB: BLS answers travel in memfds, held wherever they wait."""
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("Shmem:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no Shmem in /proc/meminfo")


def _call_caller(srv: ServerProcess, count: int, size: int, take: int, result: list[object],
                 caller: str = "caller") -> None:
    """Ask `caller` (unary) for a BLS stream of `count` x `size` bytes; appends N or the error."""
    channel = _channel(srv)
    try:
        request = raw_request(caller, [("COUNT", "INT32", np.array([count], np.int32)),
                                         ("SIZE", "INT32", np.array([size], np.int32)),
                                         ("TAKE", "INT32", np.array([take], np.int32))])
        answer = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=scaled(120))
        result.append(int(np.frombuffer(answer.raw_output_contents[0], np.int32)[0]))
    except Exception as exc:
        result.append(exc)
    finally:
        channel.close()


def test_a_bls_caller_that_does_not_iterate_holds_the_callee_back(server) -> None:
    """A Python model calls `burst1` with exec(decoupled=True) for 400 x 1 MB and takes 2: the
    callee is held back (it has not sent all 400), neither the server nor the shared memory
    in flight grows by 400 MB, the server answers meanwhile; once the caller iterates, it gets
    all 400 in order."""
    srv, repo, pids = server
    count, size = 400, MB
    channel = _channel(srv)
    _warm(service_pb2_grpc.GRPCInferenceServiceStub(channel), repo, "burst1")
    channel.close()
    go = repo / "caller" / "go"
    go.unlink(missing_ok=True)
    result: list[object] = []
    warm = threading.Thread(target=_call_caller, args=(srv, 2, 8, 0, result))
    warm.start()
    warm.join(scaled(30))
    assert result == [2], result
    assert _wait_marker(repo / "burst1" / "sent-2", scaled(10))
    (repo / "burst1" / "sent-2").unlink()
    result.clear()
    before, shmem = _reset_peaks(pids), _shmem_mb()
    thread = threading.Thread(target=_call_caller, args=(srv, count, size, 2, result), daemon=True)
    try:
        thread.start()
        marker = repo / "burst1" / f"sent-{count}"
        _wait_marker(marker, 4.0)  # without back-pressure the callee sends all 400 in about 1 s
        growth = [round(after - first) for after, first in zip(_peaks(pids), before, strict=True)]
        shm_growth = round(_shmem_mb() - shmem)
        print(f"BLS: peak RSS growth while not iterated, MB: {growth}; shared memory growth, MB: {shm_growth}")
        assert not marker.exists(), "the callee sent every response to a caller that iterates none"
        assert max(growth) < BOUND_MB, f"the server held the caller's answers: {growth} MB"
        assert shm_growth < BOUND_MB, f"the caller's answers wait in {shm_growth} MB of shared memory"
        # The answers waiting are a window, not a full socket the server's loop blocks on (it did).
        channel = _channel(srv)
        try:
            service_pb2_grpc.GRPCInferenceServiceStub(channel).ServerLive(pb.ServerLiveRequest(), timeout=scaled(2))
        finally:
            channel.close()
    finally:
        go.touch()
        thread.join(scaled(60))
    assert result == [count], result
    go.unlink()
    assert _wait_marker(marker, scaled(10))
    marker.unlink()


def test_a_bls_caller_that_lets_go_of_its_iterator_releases_the_callee(server) -> None:
    """The caller takes 2 of 300 responses and drops its iterator: the callee's wait ends (the
    rest is dropped) and its one instance serves the next client."""
    srv, repo, _ = server
    result: list[object] = []
    _call_caller(srv, 300, MB, -2, result)
    assert result == [2], result
    _read_burst_on_new_channel(srv, "burst1", 5, MB, scaled(20))
    assert _wait_marker(repo / "burst1" / "sent-300", scaled(10))
    (repo / "burst1" / "sent-300").unlink()
    (repo / "burst1" / "sent-5").unlink()


def test_a_bls_caller_waiting_for_a_large_answer_returns_credit_first(server) -> None:
    """Answers of 8 bytes and 9 MiB in turn (the window is 8 MiB): each 9 MiB answer fills
    the window, and the caller's credit, reported every 16 answers or 2 MiB taken, always
    opens it again (a window that counted the next answer's size would wait for the small
    answer's credit, which the caller reports only with 15 more); all 6 arrive in order."""
    srv, repo, _ = server
    result: list[object] = []
    _call_caller(srv, 6, 9 * MB, 0, result, "varied_caller")
    assert result == [6], result
    assert _wait_marker(repo / "varied" / "sent-6", scaled(10))
    (repo / "varied" / "sent-6").unlink()


def test_a_bls_caller_that_lets_go_before_any_answer_cancels_the_callee(server) -> None:
    """The caller drops its iterator at once while the callee has sent nothing: the callee's
    request is cancelled then (it sees is_cancelled()), not when it next sends."""
    srv, repo, _ = server
    result: list[object] = []
    _call_caller(srv, 1, 8, 0, result, "dropper")
    assert result == [0], result
    assert (repo / "waiter" / "started").exists()
    assert _wait_marker(repo / "waiter" / "saw-cancel", scaled(10)), \
        f"the callee was not cancelled: {sorted(p.name for p in (repo / 'waiter').iterdir())}"


def test_many_bls_streams_a_caller_does_not_iterate_do_not_block_the_server(server) -> None:
    """One caller starts 8 decoupled calls of 600 small responses and iterates none: their
    windows together (8 x 64 answers) are more than the caller's socket holds. The server
    keeps answering meanwhile (it waits for the socket instead of blocking on it), the
    callees are held back, and once the caller iterates it gets all 4,800."""
    srv, repo, _ = server
    calls, count, size = 8, 600, 1024
    go = repo / "fanout" / "go"
    go.unlink(missing_ok=True)
    result: list[object] = []
    thread = threading.Thread(target=_call_caller, args=(srv, count, size, calls, result, "fanout"), daemon=True)
    try:
        thread.start()
        time.sleep(4.0)  # the callees send their first windows, the caller reads nothing
        channel = _channel(srv)
        try:
            service_pb2_grpc.GRPCInferenceServiceStub(channel).ServerLive(pb.ServerLiveRequest(), timeout=scaled(2))
        finally:
            channel.close()
        assert not (repo / "many" / f"sent-{count}").exists(), "a callee sent everything to a caller that reads none"
    finally:
        go.touch()
        thread.join(scaled(60))
    assert result == [calls * count], result
    go.unlink()
