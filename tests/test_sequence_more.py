"""Sequence batching, the second round (docs/SEQUENCES.md): Triton's batch-size rule, cancelled
requests ending their sequence, the backlog `timeout`, null requests left out of statistics,
`model_warmup` on a sequence model, and Triton's `simple_dyna_sequence` example called as its
client (`simple_grpc_aio_sequence_stream_infer_client.py --dyna`) calls it.

Models (all written here, or taken from tests/test_sequence.py):
- seq_stats: the accumulator, direct, 4 slots, for the statistics.
- seq_slow: one slot; an INPUT of 1000 + n sleeps n ms, so a request can wait behind a running one.
- simple_dyna_sequence: a Python twin of Triton's example (oldest, 4 candidates, preferred batch
  2; OUTPUT = INPUT + START, plus CORRID on END); simple_string_dyna_sequence: the accumulator
  with a TYPE_STRING CORRID that adds int(CORRID) at END, as the example's string model does.
- seq_warm: the ONNX simple_sequence twin with a `model_warmup` naming only INPUT (the scheduler
  fills START and READY) and seq_warm_named: one naming START and READY itself, as Triton needs.
"""

from __future__ import annotations

import asyncio
import queue
import time

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aioclient
from test_sequence import SIMPLE_CONFIG, accumulator, int_input, simple_sequence_onnx
from tritonclient.utils import InferenceServerException
from util import ServerProcess, client, require, scaled, write_model

SLOW = '''import time
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        out = []
        for request in requests:
            x = int(pb_utils.get_input_tensor_by_name(request, "INPUT").as_numpy().reshape(-1)[0])
            if x >= 1000:
                time.sleep((x - 1000) / 1000)
            out.append(pb_utils.InferenceResponse(output_tensors=[
                pb_utils.Tensor("OUTPUT", np.array([[x]], np.int32)),
                pb_utils.Tensor("BATCH", np.array([[len(requests)]], np.int32))]))
        return out
'''

DYNA = '''import numpy as np
import triton_python_backend_utils as pb_utils


def value(request, name):
    return pb_utils.get_input_tensor_by_name(request, name).as_numpy().reshape(-1)[0]


class TritonPythonModel:
    """Triton's simple_dyna_sequence: OUTPUT = INPUT + START, plus the correlation id on END."""

    def execute(self, requests):
        out = []
        for request in requests:
            x = int(value(request, "INPUT"))
            result = (x + int(value(request, "START")) + (int(value(request, "CORRID")) if value(request, "END") else 0)
                      if value(request, "READY") else 0)
            out.append(pb_utils.InferenceResponse(output_tensors=[
                pb_utils.Tensor("OUTPUT", np.array([[result]], np.int32))]))
        return out
'''

# Reschedules each request twice (TRITONSERVER_REQUEST_RELEASE_RESCHEDULE), then answers how many
# times it ran and the correlation id it saw.
ITERATIVE = """import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        self.runs = {}

    def execute(self, requests):
        out = []
        for request in requests:
            key = request.request_id()
            self.runs[key] = self.runs.get(key, 0) + 1
            if self.runs[key] < 3:
                request.set_release_flags(pb_utils.TRITONSERVER_REQUEST_RELEASE_RESCHEDULE)
                out.append(None)
                continue
            corrid = int(pb_utils.get_input_tensor_by_name(request, "CORRID").as_numpy().reshape(-1)[0])
            out.append(pb_utils.InferenceResponse(output_tensors=[
                pb_utils.Tensor("OUTPUT", np.array([[self.runs[key], corrid]], np.int32))]))
        return out
"""

ITERATIVE_CONFIG = """name: "seq_iterative"
backend: "python"
max_batch_size: 1
sequence_batching {
  iterative_sequence: true
  max_sequence_idle_microseconds: 3600000000
  control_input [ { name: "CORRID" control [ { kind: CONTROL_SEQUENCE_CORRID data_type: TYPE_UINT64 } ] } ]
}
input [ { name: "INPUT" data_type: TYPE_INT32 dims: [ 1 ] } ]
output [ { name: "OUTPUT" data_type: TYPE_INT32 dims: [ 2 ] } ]
instance_group [ { kind: KIND_CPU count: 1 } ]
"""

DYNA_CONFIG = """name: "simple_dyna_sequence"
backend: "python"
max_batch_size: 2
sequence_batching {
  max_sequence_idle_microseconds: 5000000
  oldest { max_candidate_sequences: 4 preferred_batch_size: [ 2 ] }
  control_input [
    { name: "START" control [ { kind: CONTROL_SEQUENCE_START int32_false_true: [ 0, 1 ] } ] },
    { name: "END" control [ { kind: CONTROL_SEQUENCE_END int32_false_true: [ 0, 1 ] } ] },
    { name: "READY" control [ { kind: CONTROL_SEQUENCE_READY int32_false_true: [ 0, 1 ] } ] },
    { name: "CORRID" control [ { kind: CONTROL_SEQUENCE_CORRID data_type: TYPE_UINT64 } ] }
  ]
}
input [ { name: "INPUT" data_type: TYPE_INT32 dims: [ 1 ] } ]
output [ { name: "OUTPUT" data_type: TYPE_INT32 dims: [ 1 ] } ]
instance_group [ { kind: KIND_CPU count: 1 } ]
"""

WARMUP = """model_warmup [ { name: "w" batch_size: 2 inputs { key: "INPUT" value: { data_type: TYPE_INT32 dims: [ 1 ]
  zero_data: true } } %s } ]
"""
NAMED = """inputs { key: "START" value: { data_type: TYPE_INT32 dims: [ 1 ] zero_data: true } }
  inputs { key: "READY" value: { data_type: TYPE_INT32 dims: [ 1 ] zero_data: true } }"""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> ServerProcess:
    require("onnx")
    repo = tmp_path_factory.mktemp("seq_more_repo")
    config, files = accumulator("seq_stats", "", "TYPE_UINT64")
    write_model(repo, "seq_stats", config, files=files)
    config, _ = accumulator("seq_slow", "", "TYPE_UINT64", max_batch=1, idle_us=3_600_000_000)
    write_model(repo, "seq_slow", config, files={"1/model.py": SLOW.encode()})
    write_model(repo, "simple_dyna_sequence", DYNA_CONFIG, files={"1/model.py": DYNA.encode()})
    config, files = accumulator("simple_string_dyna_sequence",
                                "oldest { max_candidate_sequences: 4 preferred_batch_size: [ 2 ] }\n", "TYPE_STRING")
    write_model(repo, "simple_string_dyna_sequence", config, files=files)
    write_model(repo, "seq_iterative", ITERATIVE_CONFIG, files={"1/model.py": ITERATIVE.encode()})
    write_model(repo, "seq_onnx_stats", SIMPLE_CONFIG.replace('"seq_simple"', '"seq_onnx_stats"'),
                files={"1/model.onnx": simple_sequence_onnx()})
    for name, named in (("seq_warm", ""), ("seq_warm_named", NAMED)):
        write_model(repo, name, SIMPLE_CONFIG.replace('"seq_simple"', f'"{name}"') + WARMUP % named,
                    files={"1/model.onnx": simple_sequence_onnx()})
    srv = ServerProcess([repo])
    yield srv
    srv.stop()


def test_batch_size_above_one_is_refused(server: ServerProcess) -> None:
    data = np.zeros((2, 1), np.int32)
    tensor = grpcclient.InferInput("INPUT", [2, 1], "INT32")
    tensor.set_data_from_numpy(data)
    with client(server) as c, pytest.raises(InferenceServerException) as info:
        c.infer("seq_stats", [tensor], sequence_id=1, sequence_start=True)
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "inference request to model 'seq_stats' must specify batch-size 1 due to requirements of sequence " \
           "batcher" in str(info.value)


def test_null_requests_are_not_counted(server: ServerProcess) -> None:
    """Sequence A in slot 0, B in slot 1: each step of B alone runs as a batch of two (a null
    request in row 0). Statistics count 4 real requests and 4 executions, as Triton: the null
    rows are in the executions' batch size but not in inference_count or the success count."""
    with client(server) as c:
        c.infer("seq_stats", int_input(1), sequence_id=11, sequence_start=True)  # batch of 1
        c.infer("seq_stats", int_input(1), sequence_id=12, sequence_start=True)  # [null, B]
        c.infer("seq_stats", int_input(1), sequence_id=12, sequence_end=True)    # [null, B]
        c.infer("seq_stats", int_input(1), sequence_id=11, sequence_end=True)    # batch of 1
        stats = c.get_inference_statistics("seq_stats").model_stats[0]
    assert stats.inference_count == 4
    assert stats.inference_stats.success.count == 4
    assert stats.execution_count == 4
    assert {b.batch_size: b.compute_infer.count for b in stats.batch_stats} == {1: 2, 2: 2}


def test_null_requests_are_not_counted_onnx(server: ServerProcess) -> None:
    """The same through a batching backend (ONNX Runtime, one concatenated batch)."""
    with client(server) as c:
        c.infer("seq_onnx_stats", int_input(1), sequence_id=13, sequence_start=True)
        c.infer("seq_onnx_stats", int_input(1), sequence_id=14, sequence_start=True, sequence_end=True)
        c.infer("seq_onnx_stats", int_input(1), sequence_id=13, sequence_end=True)
        stats = c.get_inference_statistics("seq_onnx_stats").model_stats[0]
    assert stats.inference_count == 3
    assert stats.inference_stats.success.count == 3
    assert stats.execution_count == 3
    assert {b.batch_size: b.compute_infer.count for b in stats.batch_stats} == {1: 2, 2: 1}


def test_cancelled_request_ends_its_sequence_and_frees_the_slot(server: ServerProcess) -> None:
    """seq_slow has one slot and an idle limit of an hour. A holds the slot; B waits for it. A's
    step that waits behind A's running step is cancelled (its deadline passes): A ends then, B
    gets the slot at once (not after the idle limit), and A needs a new START."""
    results: queue.Queue = queue.Queue()
    with client(server) as c:
        c.infer("seq_slow", int_input(1), sequence_id=21, sequence_start=True)
        def answer(name: str):  # type: ignore[no-untyped-def]
            return lambda result, error: results.put((name, error or result))

        c.async_infer("seq_slow", int_input(2), answer("B"), sequence_id=22, sequence_start=True, sequence_end=True,
                      client_timeout=scaled(30))
        c.async_infer("seq_slow", int_input(1800), answer("A-slow"), sequence_id=21)
        time.sleep(0.2)  # A's slow step is running
        with pytest.raises(InferenceServerException) as info:
            c.infer("seq_slow", int_input(3), sequence_id=21, client_timeout=0.3)
        assert info.value.status() == "StatusCode.DEADLINE_EXCEEDED"
        got = dict(results.get(timeout=scaled(20)) for _ in range(2))
        assert int(got["A-slow"].as_numpy("OUTPUT")[0][0]) == 1800
        assert int(got["B"].as_numpy("OUTPUT")[0][0]) == 2
        with pytest.raises(InferenceServerException, match="must specify the START flag"):
            c.infer("seq_slow", int_input(4), sequence_id=21)


def test_cancelled_backlog_sequence_is_dropped(server: ServerProcess) -> None:
    """A sequence cancelled while it waits in the backlog never takes a slot: its id needs a new
    START, and the next waiting sequence gets the slot when it frees."""
    with client(server) as c:
        c.infer("seq_slow", int_input(1), sequence_id=31, sequence_start=True)
        with pytest.raises(InferenceServerException) as info:
            c.infer("seq_slow", int_input(1), sequence_id=32, sequence_start=True, client_timeout=0.3)
        assert info.value.status() == "StatusCode.DEADLINE_EXCEEDED"
        time.sleep(0.1)
        with pytest.raises(InferenceServerException, match="must specify the START flag"):
            c.infer("seq_slow", int_input(1), sequence_id=32, client_timeout=scaled(5))
        c.infer("seq_slow", int_input(1), sequence_id=31, sequence_end=True)
        r = c.infer("seq_slow", int_input(5), sequence_id=33, sequence_start=True, sequence_end=True,
                    client_timeout=scaled(10))
        assert int(r.as_numpy("OUTPUT")[0][0]) == 5


def test_backlog_timeout_rejects_the_sequence(server: ServerProcess) -> None:
    """A request's `timeout` (microseconds) bounds its sequence's wait for a slot: past it, Triton
    answers UNAVAILABLE 'timeout of the corresponding sequence has been expired'."""
    with client(server) as c:
        c.infer("seq_slow", int_input(1), sequence_id=41, sequence_start=True)
        began = time.monotonic()
        with pytest.raises(InferenceServerException) as info:
            c.infer("seq_slow", int_input(1), sequence_id=42, sequence_start=True, timeout=200_000,
                    client_timeout=scaled(20))
        assert time.monotonic() - began >= 0.15
        assert info.value.status() == "StatusCode.UNAVAILABLE"
        assert "timeout of the corresponding sequence has been expired" in str(info.value)
        with pytest.raises(InferenceServerException, match="must specify the START flag"):
            c.infer("seq_slow", int_input(1), sequence_id=42)
        c.infer("seq_slow", int_input(1), sequence_id=41, sequence_end=True)
        stats = c.get_inference_statistics("seq_slow").model_stats[0]
    assert stats.inference_stats.fail.count >= 1


@pytest.mark.parametrize("model", ["seq_warm", "seq_warm_named"])
def test_warmup_on_a_sequence_model(server: ServerProcess, model: str) -> None:
    """The warmup sample names only INPUT (the control inputs are filled) or, as Triton needs,
    START and READY too; either way the model loads and serves its sequences."""
    with client(server) as c:
        assert c.is_model_ready(model)
        out = [int(c.infer(model, int_input(v), sequence_id=51, sequence_start=i == 0, sequence_end=i == 2)
                   .as_numpy("OUTPUT")[0][0]) for i, v in enumerate((0, 5, 6))]
    assert out == [1, 5, 6]


async def _dyna_client(url: str, values: list[int]) -> dict[str, list[int]]:
    """Triton's simple_grpc_aio_sequence_stream_infer_client.py --dyna, in essence: one stream,
    two integer sequences and a string one sent back to back, answers sorted by request id."""
    int0, int1, string0 = 1000, 1001, "1002"

    def steps(model: str, sid: int | str, seq: list[int]):  # type: ignore[no-untyped-def]
        for count, v in enumerate(seq, 1):
            tensor = aioclient.InferInput("INPUT", [1, 1], "INT32")
            tensor.set_data_from_numpy(np.full((1, 1), v, np.int32))
            yield {"model_name": model, "inputs": [tensor], "outputs": [aioclient.InferRequestedOutput("OUTPUT")],
                   "request_id": f"{sid}_{count}", "sequence_id": sid, "sequence_start": count == 1,
                   "sequence_end": count == len(seq)}

    async def requests():  # type: ignore[no-untyped-def]
        for request in steps("simple_dyna_sequence", int0, [0] + values):
            yield request
        for request in steps("simple_dyna_sequence", int1, [100] + [-v for v in values]):
            yield request
        for request in steps("simple_string_dyna_sequence", string0, [20] + [-v for v in values]):
            yield request

    got: dict[str, list[int]] = {str(int0): [], str(int1): [], string0: []}
    async with aioclient.InferenceServerClient(url) as c:
        async for result, error in c.stream_infer(inputs_iterator=requests()):
            if error:
                raise error
            sid = result.get_response().id.split("_")[0]
            got[sid].append(int(result.as_numpy("OUTPUT")[0][0]))
            if sum(len(v) for v in got.values()) == 3 * (len(values) + 1):
                break
    return got


def test_simple_dyna_sequence_client(server: ServerProcess) -> None:
    values = [11, 7, 5, 3, 2, 0, 1]
    got = asyncio.run(_dyna_client(server.url, values))
    int0 = [1] + values[:-1] + [values[-1] + 1000]
    int1 = [101] + [-v for v in values[:-1]] + [-values[-1] + 1001]
    sums = list(np.cumsum([20] + [-v for v in values]))
    sums[-1] += 1002
    assert got["1000"] == int0
    assert got["1001"] == int1
    assert got["1002"] == [int(s) for s in sums]


def test_iterative_sequence_without_sequence_id(server: ServerProcess) -> None:
    """iterative_sequence, as Triton's L0_iterative_sequence calls it: requests with no sequence id
    (and no START) each become a sequence of their own with a fresh correlation id, run until the
    model stops rescheduling them, and then free their slot: with one slot and an idle limit of
    an hour, three such requests all complete."""
    results: queue.Queue = queue.Queue()
    with client(server) as c:
        for i in range(3):
            c.async_infer("seq_iterative", int_input(i), lambda result, error: results.put(error or result),
                          request_id=f"it{i}", client_timeout=scaled(20))
        answers = [results.get(timeout=scaled(30)) for _ in range(3)]
    for answer in answers:
        assert not isinstance(answer, InferenceServerException), answer
    rows = sorted(tuple(int(v) for v in a.as_numpy("OUTPUT")[0]) for a in answers)
    assert [runs for runs, _ in rows] == [3, 3, 3]
    assert len({corrid for _, corrid in rows}) == 3 and all(corrid > 0 for _, corrid in rows)


def test_no_slot_is_left_stuck(server: ServerProcess) -> None:
    """After the cancellations and timeouts above, seq_slow's only slot is free again."""
    with client(server) as c:
        r = c.infer("seq_slow", int_input(9), sequence_id=61, sequence_start=True, sequence_end=True,
                    client_timeout=scaled(5))
    assert int(r.as_numpy("OUTPUT")[0][0]) == 9
