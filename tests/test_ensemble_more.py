"""Ensembles, second round, through tritonclient over gRPC: decoupled step models (first and
last step; the ensemble streams on ModelStreamInfer and is refused on ModelInfer, as Triton),
steps mixing tensors of different decoupled steps refused at load, `max_inflight_requests`,
classification on an ensemble output, the ensemble's queue time, and `unload_dependents`."""

from __future__ import annotations

import queue
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from util import ServerProcess, client, expect_error, identity_config, scaled, write_model

TIMEOUT = scaled(30)

# A decoupled Python model: IN = n >= 0 -> n responses OUT = 0..n-1, then the final flag alone;
# n < 0 -> one response OUT = 0, then an error response carrying the final flag.
GEN = '''
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        for request in requests:
            n = int(pb_utils.get_input_tensor_by_name(request, "IN").as_numpy()[0])
            sender = request.get_response_sender()
            for i in range(max(n, 1) if n < 0 else n):
                sender.send(pb_utils.InferenceResponse([pb_utils.Tensor("OUT", np.array([i], np.int32))]))
            if n < 0:
                sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(f"gen refuses {n}")),
                            pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
            else:
                sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        return None
'''

GEN_CONFIG = """name: "gen"
backend: "python"
max_batch_size: 0
model_transaction_policy { decoupled: true }
input [ { name: "IN" data_type: TYPE_INT32 dims: [ 1 ] } ]
output [ { name: "OUT" data_type: TYPE_INT32 dims: [ 1 ] } ]
instance_group [ { kind: KIND_CPU count: 1 } ]
"""

SLOW_MS = 300


def step(model: str, inputs: dict[str, str], outputs: dict[str, str]) -> str:
    maps = "".join(f' input_map {{ key: "{k}" value: "{v}" }}' for k, v in inputs.items())
    maps += "".join(f' output_map {{ key: "{k}" value: "{v}" }}' for k, v in outputs.items())
    return f'{{ model_name: "{model}" model_version: -1{maps} }}'


def ensemble(name: str, steps: list[str], dtype: str = "TYPE_INT32", dims: str = "1", scheduling: str = "",
             output_extra: str = "") -> str:
    return (f'name: "{name}"\nplatform: "ensemble"\nmax_batch_size: 0\n'
            f'input [ {{ name: "IN" data_type: {dtype} dims: [ {dims} ] }} ]\n'
            f'output [ {{ name: "OUT" data_type: {dtype} dims: [ {dims} ]{output_extra} }} ]\n'
            f"ensemble_scheduling {{ {scheduling} step [ " + ", ".join(steps) + " ] }\n")


GEN_FIRST = [step("gen", {"IN": "IN"}, {"OUT": "g"}), step("copy", {"INPUT0": "g"}, {"OUTPUT0": "OUT"})]
GEN_LAST = [step("copy", {"INPUT0": "IN"}, {"OUTPUT0": "c"}), step("gen", {"IN": "c"}, {"OUT": "OUT"})]
GEN_SLOW = [step("gen", {"IN": "IN"}, {"OUT": "g"}), step("slow", {"INPUT0": "g"}, {"OUTPUT0": "OUT"})]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    repo = tmp_path_factory.mktemp("ensembles_more")
    write_model(repo, "gen", GEN_CONFIG, files={"1/model.py": GEN.encode()})
    write_model(repo, "copy", identity_config("copy", [("INPUT0", "INT32", [1])]))
    write_model(repo, "copy4", identity_config("copy4", [("INPUT0", "FP32", [4])]))
    write_model(repo, "slow", identity_config("slow", [("INPUT0", "INT32", [1])], execute_delay_ms=SLOW_MS,
                                              instance_count=4))
    write_model(repo, "join", identity_config("join", [("INPUT0", "INT32", [1]), ("INPUT1", "INT32", [1])]))
    write_model(repo, "gen_first", ensemble("gen_first", GEN_FIRST))
    write_model(repo, "gen_last", ensemble("gen_last", GEN_LAST))
    write_model(repo, "nested", ensemble("nested", [step("gen_first", {"IN": "IN"}, {"OUT": "n"}),
                                                    step("gen_last", {"IN": "n"}, {"OUT": "OUT"})]))
    write_model(repo, "gen_limited", ensemble("gen_limited", GEN_SLOW, scheduling="max_inflight_requests: 1"))
    write_model(repo, "gen_unlimited", ensemble("gen_unlimited", GEN_SLOW))
    write_model(repo, "slow_limited", ensemble("slow_limited", [step("slow", {"INPUT0": "IN"}, {"OUTPUT0": "OUT"})],
                                               scheduling="max_inflight_requests: 1"))
    write_model(repo, "mixed", ensemble("mixed", [
        step("gen", {"IN": "IN"}, {"OUT": "g"}),
        step("join", {"INPUT0": "IN", "INPUT1": "g"}, {"OUTPUT0": "OUT"})]))
    write_model(repo, "classes", ensemble("classes", [step("copy4", {"INPUT0": "IN"}, {"OUTPUT0": "OUT"})],
                                          dtype="TYPE_FP32", dims="4", output_extra=' label_filename: "labels.txt"'),
                files={"labels.txt": b"cat\ndog\nbird\nfish\n"})
    write_model(repo, "gen_classes", ensemble("gen_classes", GEN_FIRST, output_extra=' label_filename: "l.txt"'),
                files={"l.txt": b"zero\none\n"})
    srv = ServerProcess([repo])
    yield srv
    srv.stop()


def _int_input(value: int) -> list:
    inp = grpcclient.InferInput("IN", [1], "INT32")
    inp.set_data_from_numpy(np.array([value], np.int32))
    return [inp]


def _final(result) -> bool:
    return result.get_response(as_json=True)["parameters"]["triton_final_response"]["bool_param"]


class Stream:
    def __init__(self, srv: ServerProcess) -> None:
        self.client = client(srv)
        self.events: queue.Queue = queue.Queue()
        self.client.start_stream(callback=lambda result, error: self.events.put((result, error)),
                                 stream_timeout=TIMEOUT)

    def until_final(self) -> list:
        """(result, error) pairs up to the one marked final (an error ends it too). Requests are
        sent with `enable_empty_final_response`, or a final flag alone would never show."""
        events = []
        while True:
            result, error = self.events.get(timeout=TIMEOUT)
            events.append((result, error))
            if error is not None or _final(result):
                return events

    def close(self) -> None:
        self.client.stop_stream()


@pytest.fixture()
def stream(server: ServerProcess):
    s = Stream(server)
    yield s
    s.close()


def _values(events: list) -> list[int]:
    return [int(r.as_numpy("OUT")[0]) for r, e in events if e is None and r.as_numpy("OUT") is not None]


@pytest.mark.parametrize("model", ["gen_first", "gen_last"])
def test_decoupled_step_streams_every_response_through_the_ensemble(stream: Stream, model: str) -> None:
    stream.client.async_stream_infer(model, _int_input(3), request_id="r3", enable_empty_final_response=True)
    events = stream.until_final()
    assert [e for _, e in events] == [None] * len(events)
    # gen_last: gen's responses, in order. gen_first: each goes through `copy` on its own; those
    # requests may finish in any order (Triton: "the responses will be in arbitrary order").
    values = _values(events)
    assert (values if model == "gen_last" else sorted(values)) == [0, 1, 2]
    assert all(r.get_response().id == "r3" and r.get_response().model_name == model for r, _ in events)
    finals = [_final(r) for r, _ in events]
    assert finals[-1] and not any(finals[:-1])
    if model == "gen_last":  # the last thing to happen is gen's final flag, alone: so is the ensemble's
        assert len(events) == 4 and events[-1][0].as_numpy("OUT") is None
    # gen_first: the final flag rides on the last response when `copy` answers after gen's final
    # flag (nothing is left in flight), else it comes alone (Triton's rule, both orders possible).


def test_decoupled_ensemble_as_a_step_of_another(stream: Stream) -> None:
    # gen_first answers 0, 1, 2; each goes through gen_last, which answers n times for n.
    stream.client.async_stream_infer("nested", _int_input(3), enable_empty_final_response=True)
    events = stream.until_final()
    assert [e for _, e in events] == [None] * len(events)
    assert sorted(_values(events)) == [0, 0, 1]
    assert client_config_decoupled(stream.client, "nested")


def client_config_decoupled(c, model: str) -> bool:
    return bool(c.get_model_config(model, as_json=True)["config"].get("model_transaction_policy", {}).get(
        "decoupled", False))


def test_decoupled_ensemble_may_answer_zero_times(stream: Stream) -> None:
    stream.client.async_stream_infer("gen_first", _int_input(0), enable_empty_final_response=True)
    events = stream.until_final()
    assert len(events) == 1 and events[0][1] is None and events[0][0].as_numpy("OUT") is None


def test_decoupled_step_error_ends_the_ensemble_request(stream: Stream) -> None:
    # gen is the last step: its response 0 is the ensemble's, then its error ends the request.
    stream.client.async_stream_infer("gen_last", _int_input(-1), request_id="bad")
    events = stream.until_final()
    assert _values(events[:-1]) == [0]
    error = events[-1][1]
    assert error is not None
    assert error.message().startswith("in ensemble 'gen_last', step 1 (model 'gen'): "), error.message()
    assert "gen refuses -1" in error.message(), error.message()
    # The stream goes on.
    stream.client.async_stream_infer("gen_first", _int_input(2), enable_empty_final_response=True)
    assert sorted(_values(stream.until_final())) == [0, 1]


def test_decoupled_ensemble_is_decoupled_and_refused_on_model_infer(server: ServerProcess) -> None:
    c = client(server)
    config = c.get_model_config("gen_first", as_json=True)["config"]
    assert config["model_transaction_policy"]["decoupled"] is True
    assert not c.get_model_config("classes", as_json=True)["config"].get("model_transaction_policy", {}).get(
        "decoupled", False)
    error = expect_error("UNIMPLEMENTED", c.infer, "gen_first", _int_input(2))
    assert "doesn't support models with decoupled transaction policy" in error.message()


def test_step_mixing_decoupled_lineages_is_refused_at_load(server: ServerProcess) -> None:
    rows = {r["name"]: r for r in client(server).get_model_repository_index(as_json=True)["models"]}
    assert rows["mixed"]["state"] == "UNAVAILABLE"
    assert ("in ensemble mixed, step of model 'join' receives inputs originated from different decoupled models"
            in rows["mixed"]["reason"]), rows["mixed"]["reason"]


def _elapsed_stream(srv: ServerProcess, model: str, n: int) -> tuple[float, list[int]]:
    s = Stream(srv)
    try:
        started = time.perf_counter()
        s.client.async_stream_infer(model, _int_input(n), enable_empty_final_response=True)
        events = s.until_final()
        return time.perf_counter() - started, _values(events)
    finally:
        s.close()


def test_max_inflight_requests_bounds_a_step_fed_by_a_decoupled_one(server: ServerProcess) -> None:
    # 4 responses of gen, each one request to `slow` (4 instances, 300 ms each).
    _elapsed_stream(server, "gen_unlimited", 4)  # warm
    unlimited, values = _elapsed_stream(server, "gen_unlimited", 4)
    assert sorted(values) == [0, 1, 2, 3]
    limited, values = _elapsed_stream(server, "gen_limited", 4)
    assert values == [0, 1, 2, 3]  # one at a time: in order
    assert limited >= 4 * SLOW_MS / 1000 * 0.95, f"max_inflight_requests 1 let the steps overlap ({limited:.2f} s)"
    assert unlimited < limited - 2 * SLOW_MS / 1000, f"unlimited {unlimited:.2f} s, limited {limited:.2f} s"


def test_max_inflight_requests_is_shared_by_all_requests_of_the_ensemble(server: ServerProcess) -> None:
    c = client(server)
    errors: list = []

    def one(i: int) -> None:
        try:
            result = c.infer("slow_limited", _int_input(i))
            assert int(result.as_numpy("OUT")[0]) == i
        except Exception as exc:  # reported below
            errors.append(exc)

    one(0)  # warm
    started = time.perf_counter()
    threads = [threading.Thread(target=one, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    assert not errors, errors
    # `slow` has 4 instances; the ensemble lets one request at a time reach it.
    assert elapsed >= 3 * SLOW_MS / 1000 * 0.95, f"3 requests took {elapsed:.2f} s: they overlapped"


def test_classification_of_an_ensemble_output_uses_its_labels(server: ServerProcess) -> None:
    c = client(server)
    inp = grpcclient.InferInput("IN", [4], "FP32")
    inp.set_data_from_numpy(np.array([0.5, 3.0, 1.0, 2.0], np.float32))
    result = c.infer("classes", [inp], outputs=[grpcclient.InferRequestedOutput("OUT", class_count=2)])
    assert result.as_numpy("OUT").tolist() == [b"3.000000:1:dog", b"2.000000:3:fish"]
    plain = c.infer("classes", [inp])
    np.testing.assert_array_equal(plain.as_numpy("OUT"), [0.5, 3.0, 1.0, 2.0])


def test_classification_on_a_decoupled_ensemble_response(stream: Stream) -> None:
    stream.client.async_stream_infer("gen_classes", _int_input(2), enable_empty_final_response=True,
                                     outputs=[grpcclient.InferRequestedOutput("OUT", class_count=1)])
    events = stream.until_final()
    assert sorted(r.as_numpy("OUT").tolist() for r, e in events if e is None and r.as_numpy("OUT") is not None) == [
        [b"0:0:zero"], [b"1:0:zero"]]


def _stats(c, model: str) -> dict:
    return c.get_inference_statistics(model, as_json=True)["model_stats"][0]["inference_stats"]


def test_ensemble_queue_time_is_its_own_scheduling(server: ServerProcess) -> None:
    c = client(server)
    before = _stats(c, "classes")
    inp = grpcclient.InferInput("IN", [4], "FP32")
    inp.set_data_from_numpy(np.ones(4, np.float32))
    for _ in range(5):
        c.infer("classes", [inp])
    after = _stats(c, "classes")

    def delta(kind: str, field: str) -> int:
        return int(after[kind].get(field, 0)) - int(before[kind].get(field, 0))

    assert delta("queue", "count") == delta("success", "count") == 5
    # Triton: queue start (the ensemble scheduler's Enqueue) to compute start (the request's
    # context made, steps about to be sent): more than nothing, far less than the request.
    assert 0 < delta("queue", "ns") < delta("success", "ns") / 2


def test_decoupled_ensemble_counts_once_per_request(server: ServerProcess) -> None:
    c = client(server)
    before = int(_stats(c, "gen_last")["success"].get("count", 0))
    _elapsed_stream(server, "gen_last", 3)
    assert int(_stats(c, "gen_last")["success"]["count"]) == before + 1


# -- unload_dependents (explicit mode) --

def _ready(c, name: str) -> bool:
    return bool(c.is_model_ready(name))


@pytest.fixture()
def explicit(tmp_path: Path):
    repo = tmp_path / "repo"
    for name in ("a", "b", "c"):
        write_model(repo, name, identity_config(name, [("INPUT0", "INT32", [1])]))
    write_model(repo, "ab", ensemble("ab", [step("a", {"INPUT0": "IN"}, {"OUTPUT0": "x"}),
                                            step("b", {"INPUT0": "x"}, {"OUTPUT0": "OUT"})]))
    write_model(repo, "bc", ensemble("bc", [step("b", {"INPUT0": "IN"}, {"OUTPUT0": "x"}),
                                            step("c", {"INPUT0": "x"}, {"OUTPUT0": "OUT"})]))
    write_model(repo, "outer", ensemble("outer", [step("ab", {"IN": "IN"}, {"OUT": "x"}),
                                                  step("c", {"INPUT0": "x"}, {"OUTPUT0": "OUT"})]))
    srv = ServerProcess([repo], ["--model-control-mode", "explicit"])
    yield srv
    srv.stop()


def test_unload_dependents_unloads_the_steps_loaded_for_the_ensemble(explicit: ServerProcess) -> None:
    c = client(explicit)
    c.load_model("a")  # by name: stays
    c.load_model("ab")  # brings b
    assert all(_ready(c, m) for m in ("a", "b", "ab"))
    c.unload_model("ab", unload_dependents=True)
    assert not _ready(c, "ab")
    assert not _ready(c, "b")  # loaded only for ab
    assert _ready(c, "a")  # loaded by name


def test_unload_dependents_keeps_a_step_another_ensemble_uses(explicit: ServerProcess) -> None:
    c = client(explicit)
    c.load_model("ab")
    c.load_model("bc")
    c.unload_model("ab", unload_dependents=True)
    assert not _ready(c, "a")
    assert _ready(c, "b") and _ready(c, "c") and _ready(c, "bc")  # bc still needs b
    c.unload_model("bc", unload_dependents=True)
    assert not _ready(c, "b") and not _ready(c, "c")


def test_unload_dependents_goes_down_nested_ensembles(explicit: ServerProcess) -> None:
    c = client(explicit)
    c.load_model("outer")  # brings ab (and its a, b) and c
    assert all(_ready(c, m) for m in ("outer", "ab", "a", "b", "c"))
    c.unload_model("outer")  # without the flag: everything it brought stays
    assert all(_ready(c, m) for m in ("ab", "a", "b", "c"))
    c.load_model("outer")
    c.unload_model("outer", unload_dependents=True)
    assert not any(_ready(c, m) for m in ("outer", "ab", "a", "b", "c"))



def test_loading_a_loaded_decoupled_ensemble_again_keeps_it(tmp_path: Path) -> None:
    """Its config (decoupled: true, set at load) differs from the one on disk; a load of the
    unchanged model must not take that for a change and load it anew (which resets its statistics)."""
    repo = tmp_path / "repo"
    write_model(repo, "gen", GEN_CONFIG, files={"1/model.py": GEN.encode()})
    write_model(repo, "copy", identity_config("copy", [("INPUT0", "INT32", [1])]))
    write_model(repo, "gen_first", ensemble("gen_first", GEN_FIRST))
    srv = ServerProcess([repo], ["--model-control-mode", "explicit", "--load-model", "gen_first"])
    try:
        _elapsed_stream(srv, "gen_first", 2)
        c = client(srv)
        c.load_model("gen_first")
        assert c.is_model_ready("gen_first")
        assert int(_stats(c, "gen_first")["success"].get("count", 0)) == 1
    finally:
        srv.stop()
