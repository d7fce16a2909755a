"""The second round of the Python backend's gaps (issue 11), through a real server and tritonclient
gRPC: custom metric lifetime (a family or metric leaves /metrics when the model drops its last
reference, and with the model when it unloads; a Metric of a deleted family raises Triton's
error), `request.is_cancelled()` in default-mode models, warmup of decoupled models, decoupled
statistics, and a clean stop of the stubs that run `auto_complete_config`."""

from __future__ import annotations

import json
import re
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from util import ServerProcess, client, expect_error, scaled, write_model

HEADER = "import json, os, time\nimport numpy as np\nimport triton_python_backend_utils as pb_utils\n\n"

# Each request names an action in its parameters; the model answers with what happened (INFO).
METRICS = HEADER + '''
class TritonPythonModel:
    def initialize(self, args):
        # Created at load: they must leave /metrics when the model unloads.
        self.kept_family = pb_utils.MetricFamily("nereid_more_kept", "kept while loaded", pb_utils.MetricFamily.GAUGE)
        self.kept = self.kept_family.Metric(labels={"model": args["model_name"]})
        self.kept.set(7)
        self.objects = {}

    def execute(self, requests):
        responses = []
        for request in requests:
            action = json.loads(request.parameters()).get("action", "")
            info = {}
            try:
                if action == "create":
                    self.objects["family"] = pb_utils.MetricFamily("nereid_more_life", "lifetime test",
                                                                   pb_utils.MetricFamily.COUNTER)
                    self.objects["a"] = self.objects["family"].Metric(labels={"which": "a"})
                    self.objects["a2"] = self.objects["family"].Metric(labels={"which": "a"})
                    self.objects["b"] = self.objects["family"].Metric(labels={"which": "b"})
                    self.objects["a"].increment(3)
                    self.objects["b"].increment(5)
                elif action == "del_a":  # one of two references to {which="a"}: it stays
                    del self.objects["a"]
                elif action == "del_a2":  # the last one: {which="a"} goes
                    del self.objects["a2"]
                elif action == "del_family":  # b is still held, but its family is gone
                    del self.objects["family"]
                    errors = []
                    for op in ("increment", "value"):
                        try:
                            getattr(self.objects["b"], op)(*((1,) if op == "increment" else ()))
                        except pb_utils.TritonModelException as exc:
                            errors.append(str(exc))
                    info["errors"] = errors
                elif action == "drop_all":
                    self.objects.clear()
                elif action == "crash":  # no finalizer runs: the server drops what the stub held
                    os._exit(3)
            except Exception as exc:
                info["exception"] = f"{type(exc).__name__}: {exc}"
            responses.append(pb_utils.InferenceResponse(output_tensors=[
                pb_utils.Tensor("INFO", np.array([json.dumps(info).encode()], dtype=np.object_))]))
        return responses
'''

METRICS_CONFIG = """name: "metrics_life"
backend: "python"
max_batch_size: 0
input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ 1 ] } ]
output [ { name: "INFO" data_type: TYPE_STRING dims: [ 1 ] } ]
instance_group [ { kind: KIND_CPU count: 1 } ]
"""

# Runs until the client gives up (or 20 s): says in the log whether it saw is_cancelled() turn true.
CANCEL_WATCH = HEADER + '''
class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            deadline = time.monotonic() + 20
            checks = 0
            while not request.is_cancelled() and time.monotonic() < deadline:
                checks += 1
                time.sleep(0.01)
            pb_utils.Logger.log_info(f"cancel-watch {request.request_id()}: cancelled={request.is_cancelled()} "
                                     f"checks={checks}")
            responses.append(pb_utils.InferenceResponse(output_tensors=[
                pb_utils.Tensor("OUTPUT0", np.array([float(checks)], np.float32))]))
        return responses
'''

CANCEL_WATCH_CONFIG = """name: "cancel_watch"
backend: "python"
max_batch_size: 0
input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ 1 ] } ]
output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 1 ] } ]
instance_group [ { kind: KIND_CPU count: 1 } ]
"""

# A model with auto_complete_config (so the server runs a throwaway stub for it at start).
AUTOCOMPLETE = HEADER + '''
class TritonPythonModel:
    @staticmethod
    def auto_complete_config(config):
        config.add_input({"name": "INPUT0", "data_type": "TYPE_FP32", "dims": [1]})
        config.add_output({"name": "OUTPUT0", "data_type": "TYPE_FP32", "dims": [1]})
        return config

    def execute(self, requests):
        return [pb_utils.InferenceResponse(output_tensors=[
            pb_utils.Tensor("OUTPUT0", pb_utils.get_input_tensor_by_name(r, "INPUT0").as_numpy() + 1)])
            for r in requests]
'''


# Decoupled, warmed up: each request gets len(IN) responses from a thread, then the final flag alone.
STREAMER = HEADER + """
import threading


class TritonPythonModel:
    def initialize(self, args):
        self.threads = []

    def execute(self, requests):
        for request in requests:
            values = pb_utils.get_input_tensor_by_name(request, "IN").as_numpy()
            size = json.loads(request.parameters()).get("size", 1)
            thread = threading.Thread(target=self.respond, args=(request.get_response_sender(), values, size))
            thread.start()
            self.threads.append(thread)
        return None

    def respond(self, sender, values, size):
        for i in range(len(values)):
            sender.send(pb_utils.InferenceResponse(output_tensors=[
                pb_utils.Tensor("OUT", np.full([size], values[i], np.float32))]))
        sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        pb_utils.Logger.log_info(f"streamer sent {len(values)} responses")

    def finalize(self):
        for thread in self.threads:
            thread.join()
"""

STREAMER_CONFIG = """name: "streamer"
backend: "python"
max_batch_size: 0
model_transaction_policy { decoupled: true }
input [ { name: "IN" data_type: TYPE_FP32 dims: [ -1 ] } ]
output [ { name: "OUT" data_type: TYPE_FP32 dims: [ -1 ] } ]
instance_group [ { kind: KIND_CPU count: 1 } ]
model_warmup [ { name: "three" batch_size: 0 count: 2
  inputs { key: "IN" value: { data_type: TYPE_FP32 dims: [ 3 ] zero_data: true } } } ]
"""


def build_repo(repo: Path) -> Path:
    write_model(repo, "metrics_life", METRICS_CONFIG, files={"1/model.py": METRICS.encode()})
    write_model(repo, "cancel_watch", CANCEL_WATCH_CONFIG, files={"1/model.py": CANCEL_WATCH.encode()})
    write_model(repo, "streamer", STREAMER_CONFIG, files={"1/model.py": STREAMER.encode()})
    write_model(repo, "autocomplete", 'backend: "python"\n', files={"1/model.py": AUTOCOMPLETE.encode()})
    return repo


@pytest.fixture(scope="module")
def more_server(tmp_path_factory: pytest.TempPathFactory):
    srv = ServerProcess([build_repo(tmp_path_factory.mktemp("pymore"))],
                        ["--model-control-mode", "explicit", "--load-model", "*"])
    yield srv
    srv.stop()


def _scrape(srv: ServerProcess) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{srv.metrics_port}/metrics", timeout=10).read().decode()


def _action(srv: ServerProcess, action: str) -> dict:
    inp = grpcclient.InferInput("INPUT0", [1], "FP32")
    inp.set_data_from_numpy(np.zeros(1, np.float32))
    with client(srv) as c:
        result = c.infer("metrics_life", [inp], parameters={"action": action})
    info = json.loads(result.as_numpy("INFO")[0])
    assert "exception" not in info, info
    return info


def test_autocomplete_stubs_stop_cleanly(more_server: ServerProcess) -> None:
    inp = grpcclient.InferInput("INPUT0", [1], "FP32")
    inp.set_data_from_numpy(np.ones(1, np.float32))
    with client(more_server) as c:
        assert c.infer("autocomplete", [inp]).as_numpy("OUTPUT0").tolist() == [2.0]
    assert "did not stop cleanly" not in more_server.log
    assert "Connection reset" not in more_server.log


def test_metric_lifetime_follows_the_models_references(more_server: ServerProcess) -> None:
    _action(more_server, "create")
    text = _scrape(more_server)
    assert 'nereid_more_life{which="a"} 3' in text and 'nereid_more_life{which="b"} 5' in text
    _action(more_server, "del_a")  # a2 still refers to {which="a"}
    assert 'nereid_more_life{which="a"} 3' in _scrape(more_server)
    _action(more_server, "del_a2")
    text = _scrape(more_server)
    assert 'nereid_more_life{which="a"}' not in text and 'nereid_more_life{which="b"} 5' in text
    info = _action(more_server, "del_family")  # deleting the family deletes its metrics, as in Triton
    message = ("Invalid metric operation as the corresponding 'MetricFamily' has been deleted. The "
               "'MetricFamily' object should be deleted AFTER its corresponding 'Metric' objects have been deleted.")
    assert info["errors"] == [message, message]
    assert "nereid_more_life" not in _scrape(more_server)
    _action(more_server, "create")  # a new family of the same name starts from zero
    assert 'nereid_more_life{which="b"} 5' in _scrape(more_server)
    _action(more_server, "drop_all")
    assert "nereid_more_life" not in _scrape(more_server)


def test_metrics_leave_with_the_model_on_unload(more_server: ServerProcess) -> None:
    assert 'nereid_more_kept{model="metrics_life"} 7' in _scrape(more_server)
    with client(more_server) as c:
        c.unload_model("metrics_life")
        try:
            deadline = scaled(20)
            end = time.monotonic() + deadline
            while "nereid_more_kept" in _scrape(more_server) and time.monotonic() < end:
                time.sleep(0.05)
            assert "nereid_more_kept" not in _scrape(more_server)
        finally:
            c.load_model("metrics_life")
    assert 'nereid_more_kept{model="metrics_life"} 7' in _scrape(more_server)  # back with the model


def test_metrics_of_a_stub_that_died_are_dropped(more_server: ServerProcess) -> None:
    _action(more_server, "create")
    assert 'nereid_more_life{which="b"} 5' in _scrape(more_server)
    inp = grpcclient.InferInput("INPUT0", [1], "FP32")
    inp.set_data_from_numpy(np.zeros(1, np.float32))
    with client(more_server) as c:
        expect_error("INTERNAL", c.infer, "metrics_life", [inp], parameters={"action": "crash"})
    end = time.monotonic() + scaled(20)
    while "nereid_more_life" in _scrape(more_server) and time.monotonic() < end:
        time.sleep(0.05)
    text = _scrape(more_server)
    assert "nereid_more_life" not in text
    assert 'nereid_more_kept{model="metrics_life"} 7' in text  # the new stub's initialize made it again


def test_is_cancelled_in_a_default_mode_model(more_server: ServerProcess) -> None:
    inp = grpcclient.InferInput("INPUT0", [1], "FP32")
    inp.set_data_from_numpy(np.ones(1, np.float32))
    with client(more_server) as c:
        expect_error("DEADLINE_EXCEEDED", c.infer, "cancel_watch", [inp], request_id="deadline-1",
                     client_timeout=0.5)
    line = more_server.wait_for_log(re.compile(r"cancel-watch deadline-1: cancelled=(\w+) checks=(\d+)"),
                                    scaled(15))
    assert line.group(1) == "True" and int(line.group(2)) >= 5
    # cancelled by the client (not a deadline), through the async API
    with client(more_server) as c:
        done: list = []
        ctx = c.async_infer("cancel_watch", [inp], lambda result, error: done.append(error), request_id="cancel-2")
        time.sleep(0.3)
        ctx.cancel()
    line = more_server.wait_for_log(re.compile(r"cancel-watch cancel-2: cancelled=(\w+) checks=(\d+)"), scaled(15))
    assert line.group(1) == "True"


def test_warmup_of_a_decoupled_model_drains_its_responses(more_server: ServerProcess) -> None:
    log = more_server.log
    assert log.count("streamer sent 3 responses") >= 2, log  # count: 2, each drained to its final flag
    assert re.search(r"model 'streamer'.*warmup 'three' ran 2 time\(s\)", log), log
    with client(more_server) as c:
        assert c.is_model_ready("streamer")


def _stream(srv: ServerProcess, model: str, values: np.ndarray, parameters: dict | None = None) -> list:
    """Responses (result, error) of one streamed request, up to its final flag."""
    import queue

    got: queue.Queue = queue.Queue()
    inp = grpcclient.InferInput("IN", list(values.shape), "FP32")
    inp.set_data_from_numpy(values)
    out = []
    with client(srv) as c:
        c.start_stream(lambda result, error: got.put((result, error)))
        try:
            c.async_stream_infer(model, [inp], parameters=parameters, enable_empty_final_response=True)
            while True:
                result, error = got.get(timeout=scaled(30))
                out.append((result, error))
                final = result is not None and result.get_response().parameters["triton_final_response"].bool_param
                if final or error is not None and len(out) > 64:
                    break
        finally:
            c.stop_stream()
    return out


def test_decoupled_response_statistics(more_server: ServerProcess) -> None:
    with client(more_server) as c:
        before = c.get_inference_statistics("streamer").model_stats[0]
    for values in (np.array([1, 2, 3], np.float32), np.array([4, 5], np.float32)):
        responses = _stream(more_server, "streamer", values)
        assert [r.as_numpy("OUT").tolist() for r, _ in responses[:-1]] == [[v] for v in values.tolist()]
    with client(more_server) as c:
        stats = c.get_inference_statistics("streamer").model_stats[0]
    assert stats.inference_stats.success.count - before.inference_stats.success.count == 2
    assert stats.inference_stats.fail.count == before.inference_stats.fail.count
    rs = stats.response_stats
    assert sorted(rs) == ["0", "1", "2", "3"]
    # responses 0 and 1: both requests sent one; 2: the first sent its third, the second its final flag
    for key, success, empty in (("0", 2, 0), ("1", 2, 0), ("2", 1, 1), ("3", 0, 1)):
        entry = rs[key]
        assert (entry.success.count, entry.empty_response.count, entry.fail.count) == (success, empty, 0), key
        assert entry.compute_infer.count == success + empty and entry.compute_output.count == success, key
        assert entry.success.ns >= entry.compute_output.ns, key
        if success:
            assert entry.success.ns > 0, key
    assert rs["0"].compute_infer.ns > 0  # from the request's start to the first response
