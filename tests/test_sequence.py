"""Sequence batching (`sequence_batching`) through a real server and tritonclient, called the
way Triton's sequence clients call it (simple_grpc_sequence_{stream,sync}_infer_client.py):
sync unary and streaming, integer and string correlation ids, several interleaved sequences.

Models (all written here):
- seq_simple: an ONNX twin of Triton's docs `simple_sequence` (direct, START/READY int32
  controls, OUTPUT = INPUT + START), so the client example's expected values hold verbatim.
- seq_acc: a Python accumulator (direct): START/END/READY int32 and CORRID uint64 controls;
  it adds the correlation id on the END step (as Triton's dyna_sequence model does) and
  reports -1000000 if a sequence ever moves to another batch row.
- seq_oldest: the same accumulator with the oldest strategy, two instances (each a process
  with its own accumulators, so a sequence that moved instance would lose its sum), a
  TYPE_STRING CORRID and a BATCH output telling how many requests ran together.
- seq_idle: one slot and max_sequence_idle_microseconds, for the idle release.
- seq_state: an ONNX model with implicit state (STATE_IN -> STATE_OUT), no controls.
"""

from __future__ import annotations

import queue
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from lifecycle_util import IR_VERSION, OPSET
from tritonclient.utils import InferenceServerException
from util import ServerProcess, client, require, scaled, write_model

VALUES = [11, 7, 5, 3, 2, 0, 1]  # the client examples' values

CONTROLS = """  control_input [
    { name: "START" control [ { kind: CONTROL_SEQUENCE_START int32_false_true: [ 0, 1 ] } ] },
    { name: "END" control [ { kind: CONTROL_SEQUENCE_END int32_false_true: [ 0, 1 ] } ] },
    { name: "READY" control [ { kind: CONTROL_SEQUENCE_READY int32_false_true: [ 0, 1 ] } ] },
    { name: "CORRID" control [ { kind: CONTROL_SEQUENCE_CORRID data_type: %s } ] }
  ]
"""

IO = """input [ { name: "INPUT" data_type: TYPE_INT32 dims: [ 1 ] } ]
output [ { name: "OUTPUT" data_type: TYPE_INT32 dims: [ 1 ] }, { name: "BATCH" data_type: TYPE_INT32 dims: [ 1 ] } ]
"""

ACCUMULATOR = '''import numpy as np
import triton_python_backend_utils as pb_utils


EXPECTED = {"START": ("int32", 0, 1), "END": ("int32", 0, 1), "READY": ("int32", 0, 1)}


def value(request, name):
    return pb_utils.get_input_tensor_by_name(request, name).as_numpy().reshape(-1)[0]


def flag(request, name):
    """The control's truth, or None if its dtype or value is not what the config says."""
    arr = pb_utils.get_input_tensor_by_name(request, name).as_numpy()
    dtype, false, true = EXPECTED[name]
    v = arr.reshape(-1)[0]
    if str(arr.dtype) != dtype or v not in (false, true):
        return None
    return bool(v == true)


class TritonPythonModel:
    def initialize(self, args):
        self.acc = {}
        self.row = {}

    def execute(self, requests):
        responses = []
        for row, request in enumerate(requests):
            ready, start, end = flag(request, "READY"), flag(request, "START"), flag(request, "END")
            if None in (ready, start, end):
                responses.append(pb_utils.InferenceResponse(output_tensors=[
                    pb_utils.Tensor("OUTPUT", np.array([[-777]], np.int32)),
                    pb_utils.Tensor("BATCH", np.array([[len(requests)]], np.int32))]))
                continue
            corrid = value(request, "CORRID")
            key = corrid.decode() if isinstance(corrid, bytes) else int(corrid)
            x = int(value(request, "INPUT"))
            if not ready:
                out = 0
            else:
                if start:
                    self.acc[key] = 0
                    self.row[key] = row
                self.acc[key] = self.acc.get(key, 0) + x
                out = self.acc[key]
                if self.row.get(key, row) != row and DIRECT:
                    out = -1000000
                if end:
                    out += int(key)
                    self.acc.pop(key, None)
                    self.row.pop(key, None)
            responses.append(pb_utils.InferenceResponse(output_tensors=[
                pb_utils.Tensor("OUTPUT", np.array([[out]], np.int32)),
                pb_utils.Tensor("BATCH", np.array([[len(requests)]], np.int32))]))
        return responses
'''


# The fp32 and bool variants of the START/READY controls, with unusual false/true values.
TYPED_CONTROLS = """  control_input [
    { name: "START" control [ { kind: CONTROL_SEQUENCE_START fp32_false_true: [ -1.5, 2.5 ] } ] },
    { name: "END" control [ { kind: CONTROL_SEQUENCE_END int32_false_true: [ 7, 9 ] } ] },
    { name: "READY" control [ { kind: CONTROL_SEQUENCE_READY bool_false_true: [ false, true ] } ] },
    { name: "CORRID" control [ { kind: CONTROL_SEQUENCE_CORRID data_type: %s } ] }
  ]
"""
TYPED_EXPECTED = '{"START": ("float32", -1.5, 2.5), "END": ("int32", 7, 9), "READY": ("bool", False, True)}'


def accumulator(name: str, strategy: str, corrid_type: str, instances: int = 1, max_batch: int = 4,
                idle_us: int = 0, typed: bool = False) -> tuple[str, dict[str, bytes]]:
    controls = (TYPED_CONTROLS if typed else CONTROLS) % corrid_type
    config = (f'name: "{name}"\nbackend: "python"\nmax_batch_size: {max_batch}\n' + IO +
              "sequence_batching {\n" + (f"  max_sequence_idle_microseconds: {idle_us}\n" if idle_us else "") +
              strategy + controls + "}\n" +
              f"instance_group [ {{ kind: KIND_CPU count: {instances} }} ]\n")
    code = ACCUMULATOR.replace("DIRECT", "True" if "oldest" not in strategy else "False")
    if typed:
        code = code.replace('EXPECTED = {"START": ("int32", 0, 1), "END": ("int32", 0, 1), "READY": ("int32", 0, 1)}',
                            "EXPECTED = " + TYPED_EXPECTED)
    return config, {"1/model.py": code.encode()}


def _onnx(nodes, inputs, outputs) -> bytes:  # type: ignore[no-untyped-def]
    from onnx import helper

    graph = helper.make_graph(nodes, "seq", inputs, outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="nereid-tests")
    model.ir_version = IR_VERSION
    return model.SerializeToString()


def simple_sequence_onnx() -> bytes:
    """OUTPUT = INPUT + START (int32 [-1, 1]); READY is an input the graph ignores (but declares)."""
    from onnx import TensorProto, helper

    def tensor(name: str):  # type: ignore[no-untyped-def]
        return helper.make_tensor_value_info(name, TensorProto.INT32, ["b", 1])

    nodes = [helper.make_node("Add", ["INPUT", "START"], ["SUM"]),
             helper.make_node("Mul", ["SUM", "READY"], ["OUTPUT"])]
    return _onnx(nodes, [tensor("INPUT"), tensor("START"), tensor("READY")], [tensor("OUTPUT")])


def state_onnx() -> bytes:
    """OUTPUT = INPUT + STATE_IN; STATE_OUT = OUTPUT (int32 [-1, 1]): a running sum kept by the server."""
    from onnx import TensorProto, helper

    def tensor(name: str):  # type: ignore[no-untyped-def]
        return helper.make_tensor_value_info(name, TensorProto.INT32, ["b", 1])

    nodes = [helper.make_node("Add", ["INPUT", "STATE_IN"], ["OUTPUT"]),
             helper.make_node("Identity", ["OUTPUT"], ["STATE_OUT"])]
    return _onnx(nodes, [tensor("INPUT"), tensor("STATE_IN")], [tensor("OUTPUT"), tensor("STATE_OUT")])


SIMPLE_CONFIG = """name: "seq_simple"
platform: "onnxruntime_onnx"
max_batch_size: 8
sequence_batching {
  control_input [
    { name: "START" control [ { kind: CONTROL_SEQUENCE_START int32_false_true: [ 0, 1 ] } ] },
    { name: "READY" control [ { kind: CONTROL_SEQUENCE_READY int32_false_true: [ 0, 1 ] } ] }
  ]
}
input [ { name: "INPUT" data_type: TYPE_INT32 dims: [ 1 ] } ]
output [ { name: "OUTPUT" data_type: TYPE_INT32 dims: [ 1 ] } ]
instance_group [ { kind: KIND_CPU count: 1 } ]
"""

STATE_CONFIG = """name: "seq_state"
platform: "onnxruntime_onnx"
max_batch_size: 4
sequence_batching {
  %s
  state [ { input_name: "STATE_IN" output_name: "STATE_OUT" data_type: TYPE_INT32 dims: [ 1 ]
            initial_state: { data_type: TYPE_INT32 dims: [ 1 ] zero_data: true name: "zeros" } } ]
}
input [ { name: "INPUT" data_type: TYPE_INT32 dims: [ 1 ] } ]
output [ { name: "OUTPUT" data_type: TYPE_INT32 dims: [ 1 ] } ]
instance_group [ { kind: KIND_CPU count: 1 } ]
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> ServerProcess:
    require("onnx")
    repo = tmp_path_factory.mktemp("seq_repo")
    write_model(repo, "seq_simple", SIMPLE_CONFIG, files={"1/model.onnx": simple_sequence_onnx()})
    for name, strategy, corrid, instances, batch, idle, typed in (
        ("seq_acc", "", "TYPE_UINT64", 1, 4, 0, False),
        ("seq_oldest", "oldest { max_candidate_sequences: 4 max_queue_delay_microseconds: 20000 }\n",
         "TYPE_STRING", 2, 4, 0, False),
        ("seq_idle", "", "TYPE_UINT64", 1, 1, 300_000, False),
        ("seq_typed", "direct { max_queue_delay_microseconds: 5000 minimum_slot_utilization: 0.5 }\n",
         "TYPE_INT64", 1, 2, 0, True),
    ):
        config, files = accumulator(name, strategy, corrid, instances, batch, idle, typed)
        write_model(repo, name, config, files=files)
    write_model(repo, "seq_state", STATE_CONFIG % "", files={"1/model.onnx": state_onnx()})
    write_model(repo, "seq_state_oldest", (STATE_CONFIG % "oldest { max_queue_delay_microseconds: 5000 }")
                .replace('"seq_state"', '"seq_state_oldest"'), files={"1/model.onnx": state_onnx()})
    srv = ServerProcess([repo])
    yield srv
    srv.stop()


def int_input(value: int) -> list[grpcclient.InferInput]:
    data = np.full((1, 1), value, np.int32)
    tensor = grpcclient.InferInput("INPUT", list(data.shape), "INT32")
    tensor.set_data_from_numpy(data)
    return [tensor]


def stream_sequences(srv: ServerProcess, model: str, sequences: dict[int | str, list[int]],
                     output: str = "OUTPUT") -> dict[int | str, list[int]]:
    """Send every sequence interleaved on one stream, as the stream client example does."""
    results: queue.Queue = queue.Queue()
    got: dict[int | str, list[int]] = {sid: [] for sid in sequences}
    with client(srv) as c:
        c.start_stream(callback=lambda result, error: results.put(error or result))
        steps = max(len(v) for v in sequences.values())
        for step in range(steps):
            for sid, values in sequences.items():
                if step < len(values):
                    c.async_stream_infer(model, int_input(values[step]), request_id=f"{sid}_{step}",
                                         outputs=[grpcclient.InferRequestedOutput(output)], sequence_id=sid,
                                         sequence_start=step == 0, sequence_end=step == len(values) - 1)
        total = sum(len(v) for v in sequences.values())
        answers = []
        for _ in range(total):
            item = results.get(timeout=scaled(30))
            if isinstance(item, InferenceServerException):
                raise item
            answers.append(item)
        c.stop_stream()
    ordered = sorted(answers, key=lambda r: int(r.get_response().id.rsplit("_", 1)[1]))
    for result in ordered:
        sid_text = result.get_response().id.rsplit("_", 1)[0]
        sid = next(s for s in sequences if str(s) == sid_text)
        got[sid].append(int(result.as_numpy(output).reshape(-1)[0]))
    return got


def test_simple_sequence_stream_client(server: ServerProcess) -> None:
    """The stream client example against a simple_sequence twin: two integer ids and a uuid string id."""
    string_id = str(uuid.uuid4())
    got = stream_sequences(server, "seq_simple", {1000: [0] + VALUES, 1001: [100] + [-v for v in VALUES],
                                                  string_id: [20] + [-v for v in VALUES]})
    assert got[1000] == [1] + VALUES
    assert got[1001] == [101] + [-v for v in VALUES]
    assert got[string_id] == [21] + [-v for v in VALUES]


def test_simple_sequence_sync_client(server: ServerProcess) -> None:
    """The sync client example: unary calls, two sequences alternating."""
    with client(server) as c:
        out0, out1 = [], []
        for i, value in enumerate([0] + VALUES):
            for sid, v, out in ((1000, value, out0), (1001, 100 if i == 0 else -value, out1)):
                r = c.infer("seq_simple", int_input(v), sequence_id=sid, sequence_start=i == 0,
                            sequence_end=i == len(VALUES))
                out.append(int(r.as_numpy("OUTPUT")[0][0]))
    assert out0 == [1] + VALUES
    assert out1 == [101] + [-v for v in VALUES]


def expected_sums(values: list[int], corrid: int) -> list[int]:
    sums = list(np.cumsum(values))
    sums[-1] += corrid
    return [int(s) for s in sums]


def test_direct_accumulator_interleaved_stream(server: ServerProcess) -> None:
    """Six interleaved sequences on a 4-slot direct model: each keeps its own sum, its row, and
    gets its CORRID (uint64) on the END step; the two beyond the slots wait in the backlog."""
    seqs: dict[int | str, list[int]] = {2000 + i: [i * 10 + 1] + VALUES for i in range(6)}
    got = stream_sequences(server, "seq_acc", seqs)
    for sid, values in seqs.items():
        assert got[sid] == expected_sums(values, int(sid)), sid


def test_direct_accumulator_sync_threads(server: ServerProcess) -> None:
    """Unary calls from several threads at once (as several sync clients would); batches form."""
    errors: list[BaseException] = []
    results: dict[int, list[int]] = {}
    batches: list[int] = []

    def run(sid: int) -> None:
        try:
            with client(server) as c:
                out = []
                for i, v in enumerate(VALUES):
                    r = c.infer("seq_acc", int_input(v), sequence_id=sid, sequence_start=i == 0,
                                sequence_end=i == len(VALUES) - 1)
                    out.append(int(r.as_numpy("OUTPUT")[0][0]))
                    batches.append(int(r.as_numpy("BATCH")[0][0]))
                results[sid] = out
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(3000 + i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(scaled(60))
    assert not errors, errors
    for sid, out in results.items():
        assert out == expected_sums(VALUES, sid)
    assert len(results) == 4


def test_direct_slots_keep_rows_with_null_requests(server: ServerProcess) -> None:
    """Direct: a sequence's requests always sit in its slot's row. With sequence A in slot 0 and
    B in slot 1, a step of B alone runs as a batch of two: a null request (READY false) in
    row 0 and B in row 1 (the model reports -1000000 if a sequence changes rows); A alone runs
    as a batch of one (rows stop at the highest slot with a request)."""
    wanted = [grpcclient.InferRequestedOutput("OUTPUT"), grpcclient.InferRequestedOutput("BATCH")]
    with client(server) as c:
        a = c.infer("seq_acc", int_input(1), sequence_id=3500, sequence_start=True, outputs=wanted)
        b = c.infer("seq_acc", int_input(2), sequence_id=3501, sequence_start=True, outputs=wanted)
        assert int(a.as_numpy("BATCH")[0][0]) == 1 and int(b.as_numpy("BATCH")[0][0]) == 2
        b = c.infer("seq_acc", int_input(3), sequence_id=3501, outputs=wanted)
        assert int(b.as_numpy("OUTPUT")[0][0]) == 5 and int(b.as_numpy("BATCH")[0][0]) == 2
        a = c.infer("seq_acc", int_input(4), sequence_id=3500, sequence_end=True, outputs=wanted)
        assert int(a.as_numpy("OUTPUT")[0][0]) == 5 + 3500 and int(a.as_numpy("BATCH")[0][0]) == 1
        b = c.infer("seq_acc", int_input(5), sequence_id=3501, sequence_end=True, outputs=wanted)
        assert int(b.as_numpy("OUTPUT")[0][0]) == 10 + 3501


def test_oldest_string_ids_two_instances(server: ServerProcess) -> None:
    """Oldest strategy, two instances, string ids and a TYPE_STRING CORRID: every sequence stays on
    its instance (their sums live in that instance's process) and requests of different
    sequences run together."""
    seqs: dict[int | str, list[int]] = {str(4000 + i): [i + 1] + VALUES for i in range(8)}
    got = stream_sequences(server, "seq_oldest", seqs)
    for sid, values in seqs.items():
        assert got[sid] == expected_sums(values, int(sid)), sid
    batches = stream_sequences(server, "seq_oldest", {str(4100 + i): VALUES for i in range(8)}, output="BATCH")
    assert max(max(b) for b in batches.values()) > 1, batches


def test_fp32_and_bool_controls_int64_corrid(server: ServerProcess) -> None:
    """fp32_false_true / bool_false_true / int32 [7, 9] controls arrive with exactly the configured
    dtype and values (the model answers -777 otherwise), CORRID as INT64; direct with a queue
    delay and a minimum slot utilization."""
    seqs: dict[int | str, list[int]] = {8000 + i: [i + 1] + VALUES for i in range(3)}
    got = stream_sequences(server, "seq_typed", seqs)
    for sid, values in seqs.items():
        assert got[sid] == expected_sums(values, int(sid)), sid


def test_missing_correlation_id(server: ServerProcess) -> None:
    with client(server) as c, pytest.raises(InferenceServerException) as info:
        c.infer("seq_acc", int_input(1))
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "inference request to model 'seq_acc' must specify a non-zero or non-empty correlation ID" in str(
        info.value)


def test_unknown_sequence_without_start(server: ServerProcess) -> None:
    with client(server) as c:
        for sid in (987654, "no-such-sequence"):
            with pytest.raises(InferenceServerException) as info:
                c.infer("seq_oldest" if isinstance(sid, str) else "seq_acc", int_input(1), sequence_id=sid)
            assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
            assert f"inference request for sequence {sid} to model" in str(info.value)
            assert "must specify the START flag on the first request of the sequence" in str(info.value)


def test_request_after_end_needs_start(server: ServerProcess) -> None:
    with client(server) as c:
        c.infer("seq_acc", int_input(1), sequence_id=5000, sequence_start=True, sequence_end=True)
        with pytest.raises(InferenceServerException, match="must specify the START flag"):
            c.infer("seq_acc", int_input(1), sequence_id=5000)


def test_idle_sequence_is_released(server: ServerProcess) -> None:
    """seq_idle has one slot and a 0.3 s idle limit: an abandoned sequence holds the slot only
    until it is idle, then a waiting sequence runs, and the abandoned one's next request fails."""
    with client(server) as c:
        began = time.monotonic()  # before the first request: the idle time counts from it at the earliest
        first = c.infer("seq_idle", int_input(5), sequence_id=6000, sequence_start=True)
        assert int(first.as_numpy("OUTPUT")[0][0]) == 5
        # Waits in the backlog until sequence 6000 is released.
        other = c.infer("seq_idle", int_input(7), sequence_id=6001, sequence_start=True, sequence_end=True,
                        client_timeout=scaled(20))
        waited = time.monotonic() - began
        assert int(other.as_numpy("OUTPUT")[0][0]) == 7 + 6001
        assert waited >= 0.25, waited  # it really waited for the idle release (0.3 s)
        with pytest.raises(InferenceServerException) as info:
            c.infer("seq_idle", int_input(1), sequence_id=6000)
        assert "inference request for sequence 6000 to model 'seq_idle' must specify the START flag" in str(
            info.value)


@pytest.mark.parametrize("model", ["seq_state", "seq_state_oldest"])
def test_onnx_implicit_state(server: ServerProcess, model: str) -> None:
    """STATE_OUT of one step is STATE_IN of the next of the same sequence (reset to the
    initial_state at START), with sequences interleaved and batched, including a restart."""
    seqs: dict[int | str, list[int]] = {7000 + i: [i + 1] + VALUES for i in range(3)}
    seqs["text-id"] = [100, 1, 2, 3]
    got = stream_sequences(server, model, seqs)
    for sid, values in seqs.items():
        assert got[sid] == [int(s) for s in np.cumsum(values)], sid
    again = stream_sequences(server, model, {7000: [5, 5]})
    assert again[7000] == [5, 10]  # a new sequence with an id used before starts from initial_state
    with client(server) as c:
        # A second START on a live sequence restarts it in place (Triton warns of the conflict):
        # the state goes back to initial_state.
        sums = [int(c.infer(model, int_input(v), sequence_id=7200, sequence_start=start, sequence_end=end)
                    .as_numpy("OUTPUT")[0][0]) for v, start, end in ((3, True, False), (4, True, False),
                                                                       (1, False, True))]
        assert sums == [3, 4, 5]
        # The state output is the server's, never the client's.
        r = c.infer(model, int_input(3), sequence_id=7100, sequence_start=True, sequence_end=True)
        assert [o.name for o in r.get_response().outputs] == ["OUTPUT"]
        meta = c.get_model_metadata(model)
        assert [i.name for i in meta.inputs] == ["INPUT"] and [o.name for o in meta.outputs] == ["OUTPUT"]


def test_config_reports_idle_default(server: ServerProcess) -> None:
    with client(server) as c:
        config = c.get_model_config("seq_acc").config
    assert config.sequence_batching.max_sequence_idle_microseconds == 1_000_000


def test_bad_sequence_config_fails_load(tmp_path: Path, server_factory) -> None:  # type: ignore[no-untyped-def]
    config, files = accumulator("seq_bad", "", "TYPE_FP32")
    write_model(tmp_path, "seq_bad", config, files=files)
    srv = server_factory(tmp_path)
    with client(srv) as c:
        index = {m.name: m for m in c.get_model_repository_index().models}
    assert index["seq_bad"].state == "UNAVAILABLE"
    assert "CONTROL_SEQUENCE_CORRID needs data_type" in index["seq_bad"].reason



def test_unload_answers_sequences_waiting_for_a_slot(tmp_path: Path, server_factory) -> None:  # type: ignore[no-untyped-def]
    """One slot held by a live sequence, a second sequence waiting in the backlog: unloading the
    model answers the waiting request UNAVAILABLE instead of leaving it hanging."""
    config, files = accumulator("seq_unload", "", "TYPE_UINT64", max_batch=1, idle_us=3_600_000_000)
    write_model(tmp_path, "seq_unload", config, files=files)
    srv = server_factory(tmp_path, "--model-control-mode", "explicit", "--load-model", "seq_unload",
                         "--exit-timeout-secs", "1")
    results: queue.Queue = queue.Queue()
    with client(srv) as c:
        c.infer("seq_unload", int_input(1), sequence_id=1, sequence_start=True)
        c.async_infer("seq_unload", int_input(2), lambda result, error: results.put(error or result),
                      sequence_id=2, sequence_start=True, client_timeout=scaled(30))
        time.sleep(scaled(0.3))
        assert results.empty()  # waiting for the slot
        c.unload_model("seq_unload")
        answer = results.get(timeout=scaled(30))
    assert isinstance(answer, InferenceServerException), answer
    assert answer.status() == "StatusCode.UNAVAILABLE" and "never got a slot" in str(answer)
