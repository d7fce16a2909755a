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
  releases the callee.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

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
)
from tritonclient.grpc import service_pb2_grpc
from util import ServerProcess, identity_config, scaled, write_model


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


class TritonPythonModel:
    def initialize(self, args):
        self.folder = args["model_repository"]

    def execute(self, requests):
        answers = []
        for request in requests:
            count = pb_utils.get_input_tensor_by_name(request, "COUNT")
            size = pb_utils.get_input_tensor_by_name(request, "SIZE")
            take = int(pb_utils.get_input_tensor_by_name(request, "TAKE").as_numpy()[0])
            call = pb_utils.InferenceRequest(model_name="burst1", inputs=[count, size],
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
                if idx != got or len(out) != size or out[0] != got % 251 or out[-1] != (got + size - 1) % 251:
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


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, Path, list[int]]]:
    repo = tmp_path_factory.mktemp("backpressure_flows")
    write_model(repo, "burst", _burst_config("burst", 2), files={"1/model.py": BURST.encode()})
    write_model(repo, "burst1", _burst_config("burst1", 1), files={"1/model.py": BURST.encode()})
    write_model(repo, "copy", identity_config("copy", [("INPUT0", "UINT8", [-1])]))
    write_model(repo, "ens", _ensemble_config("ens", "burst"))
    write_model(repo, "ens1", _ensemble_config("ens1", "burst1"))
    write_model(repo, "caller", CALLER_CONFIG, files={"1/model.py": CALLER.encode()})
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
    size = MB
    channel = _channel(srv)
    stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
    _warm(stub, repo, "burst1")
    done = threading.Event()
    try:
        responses = _open(stub, _burst("ens1", 300, size), done)
        time.sleep(1.0)
        assert not (repo / "burst1" / "sent-300").exists(), "the step model was not held back"
        responses.cancel()  # type: ignore[attr-defined]
    finally:
        done.set()
        channel.close()
    _read_burst_on_new_channel(srv, "burst1", 5, size, scaled(20))
    assert (repo / "burst1" / "sent-300").exists()
    (repo / "burst1" / "sent-300").unlink()
    (repo / "burst1" / "sent-5").unlink()
