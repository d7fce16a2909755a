"""The rest of `triton_python_backend_utils` through a real server and tritonclient gRPC:
Logger, custom metrics on /metrics, TritonError codes, response parameters, request flags and
correlation id, set_release_flags (rescheduling), DLPack, instance names, multi-file models with
relative imports, models without inputs, and the config-name bug of issue 11."""

from __future__ import annotations

import json
import re
import subprocess
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from util import PYTHON, ROOT, ServerProcess, client, expect_error, scaled, write_model

HEADER = "import json\nimport numpy as np\nimport triton_python_backend_utils as pb_utils\n\n"

API = HEADER + '''
CODES = {name: getattr(pb_utils.TritonError, name) for name in
         ("UNKNOWN", "INTERNAL", "NOT_FOUND", "INVALID_ARG", "UNAVAILABLE", "UNSUPPORTED", "ALREADY_EXISTS",
          "CANCELLED")}


class TritonPythonModel:
    def initialize(self, args):
        self.instance = args["model_instance_name"]
        pb_utils.Logger.log_info(f"api initialized as {self.instance}")
        labels = {"model": args["model_name"]}
        # The families are kept: as in Triton, a Metric of a deleted MetricFamily is unusable.
        self.families = [pb_utils.MetricFamily("nereid_test_requests", "requests seen", pb_utils.MetricFamily.COUNTER),
                         pb_utils.MetricFamily("nereid_test_last", "last first element", pb_utils.MetricFamily.GAUGE),
                         pb_utils.MetricFamily("nereid_test_sizes", "input sizes", pb_utils.MetricFamily.HISTOGRAM)]
        self.counter = self.families[0].Metric(labels=labels)
        self.gauge = self.families[1].Metric(labels=labels)
        self.hist = self.families[2].Metric(labels=labels, buckets=[1.0, 4.0])

    def execute(self, requests):
        responses = []
        for request in requests:
            arr = pb_utils.get_input_tensor_by_name(request, "INPUT0").as_numpy()
            mode = json.loads(request.parameters()).get("mode", "echo")
            out = arr
            info = {"instance": self.instance, "corr": str(request.correlation_id()), "flags": request.flags(),
                    "params": request.parameters()}
            if mode.startswith("error:"):
                code = mode[6:]
                err = pb_utils.TritonError("error code: " + code, CODES[code]) if code in CODES else \\
                    pb_utils.TritonError("unrecognized error code: " + code)
                responses.append(pb_utils.InferenceResponse(error=err))
                continue
            if mode == "log":
                pb_utils.Logger.log_info("marker-info")
                pb_utils.Logger.log_warn("marker-warn")
                pb_utils.Logger.log_error("marker-error")
                pb_utils.Logger.log_verbose("marker-verbose")
                pb_utils.Logger.log("marker-level-error", pb_utils.LogLevel.ERROR)
            if mode == "metrics":
                self.counter.increment(2)
                self.gauge.set(float(arr[0]))
                for value in (0.5, 3.0, 9.0):
                    self.hist.observe(value)
                refused = []
                for what, call in (("negative", lambda: self.counter.increment(-1)),
                                   ("set", lambda: self.counter.set(1)),
                                   ("observe", lambda: self.gauge.observe(1)),
                                   ("hist_value", lambda: self.hist.value()),
                                   ("kind", lambda: pb_utils.MetricFamily("nereid_test_requests", "x",
                                                                          pb_utils.MetricFamily.GAUGE)),
                                   ("no_buckets", lambda: pb_utils.MetricFamily(
                                       "nereid_test_h2", "x", pb_utils.MetricFamily.HISTOGRAM).Metric())):
                    try:
                        call()
                    except pb_utils.TritonModelException:
                        refused.append(what)
                info["refused"] = refused
                info["counter"] = self.counter.value()
                info["gauge"] = self.gauge.value()
            if mode == "dlpack":
                import torch
                import torch.utils.dlpack
                capsule = torch.utils.dlpack.to_dlpack(torch.from_numpy(np.array(arr)) * 2)
                tensor = pb_utils.Tensor.from_dlpack("OUTPUT0", capsule)
                back = torch.utils.dlpack.from_dlpack(tensor.to_dlpack())
                info["back"] = back.tolist()
                info["is_cpu"] = tensor.is_cpu()
                out = tensor.as_numpy()
            if mode == "reschedule":
                request.set_release_flags(pb_utils.TRITONSERVER_REQUEST_RELEASE_RESCHEDULE)
                responses.append(None)
                continue
            responses.append(pb_utils.InferenceResponse(
                output_tensors=[pb_utils.Tensor("OUTPUT0", out.astype(np.float32))],
                parameters={"info": json.dumps(info), "count": 7, "ok": True}))
        return responses
'''

API_CONFIG = """name: "api"
backend: "python"
max_batch_size: 0
input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ -1 ] } ]
output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ -1 ] } ]
instance_group [ { kind: KIND_CPU count: 2 } ]
"""

# Reschedules each request twice (sequence_batching iterative_sequence), then answers how many
# times it ran and the flags it saw on the last run.
RESCHEDULE = HEADER + '''
class TritonPythonModel:
    def initialize(self, args):
        self.runs = {}

    def execute(self, requests):
        responses = []
        for request in requests:
            key = request.request_id()
            self.runs[key] = self.runs.get(key, 0) + 1
            if self.runs[key] < 3:
                request.set_release_flags(pb_utils.TRITONSERVER_REQUEST_RELEASE_RESCHEDULE)
                responses.append(None)
                continue
            out = np.array([self.runs[key], request.flags()], dtype=np.int32)
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("RUNS", out)]))
        return responses
'''

RESCHEDULE_CONFIG = """name: "resched"
backend: "python"
max_batch_size: 0
input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ -1 ] } ]
output [ { name: "RUNS" data_type: TYPE_INT32 dims: [ 2 ] } ]
sequence_batching { iterative_sequence: true }
"""

# No inputs at all; its instance name comes back as an output.
NO_INPUTS = HEADER + '''
class TritonPythonModel:
    def initialize(self, args):
        self.name = args["model_instance_name"]

    def execute(self, requests):
        return [pb_utils.InferenceResponse([pb_utils.Tensor("NAME", np.array([self.name.encode()], dtype=np.object_))])
                for _ in requests]
'''

NO_INPUTS_CONFIG = """name: "no_inputs"
backend: "python"
max_batch_size: 0
output [ { name: "NAME" data_type: TYPE_STRING dims: [ 1 ] } ]
"""

# A model of three files: a relative import and a plain one, as Triton imports `1.model`.
MULTI_FILE = HEADER + '''
from .scale import factor
import offset


class TritonPythonModel:
    def execute(self, requests):
        out = []
        for request in requests:
            arr = pb_utils.get_input_tensor_by_name(request, "INPUT0").as_numpy()
            out.append(pb_utils.InferenceResponse([pb_utils.Tensor("OUTPUT0", arr * factor() + offset.OFFSET)]))
        return out
'''

# Names the model and the backend only: inputs and outputs come from auto_complete_config.
NAMED_ONLY = HEADER + '''
class TritonPythonModel:
    @staticmethod
    def auto_complete_config(config):
        config.add_input({"name": "INPUT0", "data_type": "TYPE_FP32", "dims": [4]})
        config.add_output({"name": "OUTPUT0", "data_type": "TYPE_FP32", "dims": [4]})
        return config

    def execute(self, requests):
        return [pb_utils.InferenceResponse([pb_utils.Tensor(
            "OUTPUT0", pb_utils.get_input_tensor_by_name(r, "INPUT0").as_numpy() + 1)]) for r in requests]
'''


def build_repo(repo: Path) -> Path:
    write_model(repo, "api", API_CONFIG, files={"1/model.py": API.encode()})
    write_model(repo, "resched", RESCHEDULE_CONFIG, files={"1/model.py": RESCHEDULE.encode()})
    write_model(repo, "no_inputs", NO_INPUTS_CONFIG, files={"1/model.py": NO_INPUTS.encode()})
    write_model(repo, "multi_file", API_CONFIG.replace('"api"', '"multi_file"').replace("count: 2", "count: 1"),
                files={"1/model.py": MULTI_FILE.encode(), "1/scale.py": b"def factor():\n    return 3\n",
                       "1/offset.py": b"OFFSET = 1\n"})
    write_model(repo, "named_only", 'name: "named_only"\nbackend: "python"\n',
                files={"1/model.py": NAMED_ONLY.encode()})
    write_model(repo, "named_inputs_only", 'name: "named_inputs_only"\nbackend: "python"\n'
                'input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ 4 ] } ]\n',
                files={"1/model.py": NAMED_ONLY.encode()})
    return repo


@pytest.fixture(scope="module")
def api_server(tmp_path_factory: pytest.TempPathFactory):
    srv = ServerProcess([build_repo(tmp_path_factory.mktemp("pyapi"))], ["--log-verbose", "1"])
    yield srv
    srv.stop()


def _infer(srv: ServerProcess, model: str, data: np.ndarray, **kwargs):
    inp = grpcclient.InferInput("INPUT0", list(data.shape), "FP32")
    inp.set_data_from_numpy(data)
    with client(srv) as c:
        return c.infer(model, [inp], **kwargs)


def _params(result) -> dict:
    out = {}
    for key, param in result.get_response().parameters.items():
        out[key] = getattr(param, param.WhichOneof("parameter_choice"))
    return out


def test_config_naming_the_model_without_outputs_loads(api_server: ServerProcess) -> None:
    """Issue 11's bug: `name` in config.pbtxt and no outputs failed with 'multiple "name" fields'."""
    x = np.arange(4, dtype=np.float32)
    for model in ("named_only", "named_inputs_only"):
        np.testing.assert_array_equal(_infer(api_server, model, x).as_numpy("OUTPUT0"), x + 1)
    assert "multiple \"name\" fields" not in api_server.log


def test_validate_no_load_accepts_the_shipped_repository(tmp_path: Path) -> None:
    for repo in (ROOT / "model_repository", build_repo(tmp_path / "repo")):
        proc = subprocess.run([PYTHON, "-m", "server.cli", "validate", "--no-load", str(repo)], cwd=ROOT,
                              capture_output=True, text=True, timeout=scaled(120))
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert proc.stdout.strip().splitlines()[-1].endswith("0 error(s), 0 warning(s)"), proc.stdout


# (TritonError code, gRPC status) as Triton's L0_backend_python error_code test expects them.
ERROR_CODES = [("UNKNOWN", "UNKNOWN"), ("INTERNAL", "INTERNAL"), ("NOT_FOUND", "NOT_FOUND"),
               ("INVALID_ARG", "INVALID_ARGUMENT"), ("UNAVAILABLE", "UNAVAILABLE"),
               ("UNSUPPORTED", "UNIMPLEMENTED"), ("ALREADY_EXISTS", "ALREADY_EXISTS"),
               ("CANCELLED", "CANCELLED"), ("(default)", "INTERNAL")]


@pytest.mark.parametrize(("code", "status"), ERROR_CODES)
def test_triton_error_codes_map_to_grpc_status_unprefixed(api_server: ServerProcess, code: str, status: str) -> None:
    exc = expect_error(status, _infer, api_server, "api", np.ones(2, np.float32), parameters={"mode": f"error:{code}"})
    expected = f"error code: {code}" if code != "(default)" else "unrecognized error code: (default)"
    assert exc.message() == expected


def test_response_parameters_flags_correlation_id(api_server: ServerProcess) -> None:
    result = _infer(api_server, "api", np.ones(2, np.float32), parameters={"mode": "echo", "k": 5},
                    sequence_id=42, sequence_start=True)
    params = _params(result)
    assert params["count"] == 7 and params["ok"] is True
    info = json.loads(params["info"])
    assert info["corr"] == "42" and info["flags"] == 1  # TRITONSERVER_REQUEST_FLAG_SEQUENCE_START
    assert json.loads(info["params"]) == {"mode": "echo", "k": 5}  # the sequence keys are not parameters
    info = json.loads(_params(_infer(api_server, "api", np.ones(2, np.float32), sequence_id="s-1",
                                     sequence_end=True))["info"])
    assert (info["corr"], info["flags"]) == ("s-1", 2)
    plain = json.loads(_params(_infer(api_server, "api", np.ones(2, np.float32)))["info"])
    assert (plain["corr"], plain["flags"]) == ("0", 0)


def test_instance_names_follow_triton(api_server: ServerProcess) -> None:
    names = set()
    for _ in range(30):
        names.add(json.loads(_params(_infer(api_server, "api", np.ones(1, np.float32)))["info"])["instance"])
        if len(names) == 2:
            break
    assert names <= {"api_0_0", "api_0_1"} and names, names
    with client(api_server) as c:
        assert c.infer("no_inputs", []).as_numpy("NAME").tolist() == [b"no_inputs_0"]


def test_multi_file_model_relative_and_plain_imports(api_server: ServerProcess) -> None:
    x = np.arange(3, dtype=np.float32)
    np.testing.assert_array_equal(_infer(api_server, "multi_file", x).as_numpy("OUTPUT0"), x * 3 + 1)


def test_logger_reaches_the_server_log(api_server: ServerProcess) -> None:
    api_server.wait_for_log(re.compile(r"model 'api' \(model\.py:\d+\): api initialized as api_0_[01]"), scaled(10))
    _infer(api_server, "api", np.ones(1, np.float32), parameters={"mode": "log"})
    for letter, marker in (("I", "marker-info"), ("W", "marker-warn"), ("E", "marker-error"),
                           ("I", "marker-verbose"), ("E", "marker-level-error")):
        line = api_server.wait_for_log(re.compile(rf"^{letter}\S+ .*model 'api' \(model\.py:\d+\): {marker}$",
                                                  re.M), scaled(10))
        assert "nereid.python" in line.group(0)


def _scrape(srv: ServerProcess) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{srv.metrics_port}/metrics", timeout=10).read().decode()


def test_custom_metrics_on_the_metrics_endpoint(api_server: ServerProcess) -> None:
    text = _scrape(api_server)
    assert '# TYPE nereid_test_requests counter' in text
    assert 'nereid_test_sizes_bucket{model="api",le="+Inf"} ' in text
    before = float(re.search(r'^nereid_test_requests\{model="api"\} (\S+)$', text, re.M).group(1))
    info = json.loads(_params(_infer(api_server, "api", np.array([6.5], np.float32),
                                     parameters={"mode": "metrics"}))["info"])
    assert info["refused"] == ["negative", "set", "observe", "hist_value", "kind", "no_buckets"]
    assert info["counter"] == before + 2 and info["gauge"] == 6.5
    text = _scrape(api_server)
    assert f'nereid_test_requests{{model="api"}} {int(before + 2)}' in text
    assert 'nereid_test_last{model="api"} 6.5' in text
    assert "# HELP nereid_test_sizes input sizes" in text and "# TYPE nereid_test_sizes histogram" in text
    count = int(re.search(r'^nereid_test_sizes_count\{model="api"\} (\d+)$', text, re.M).group(1))
    assert count >= 3 and count % 3 == 0
    n = count // 3
    assert f'nereid_test_sizes_bucket{{model="api",le="1"}} {n}' in text
    assert f'nereid_test_sizes_bucket{{model="api",le="4"}} {2 * n}' in text
    assert f'nereid_test_sizes_bucket{{model="api",le="+Inf"}} {3 * n}' in text
    assert f'nereid_test_sizes_sum{{model="api"}} {12.5 * n:g}' in text


def test_dlpack_capsule_round_trip(api_server: ServerProcess) -> None:
    x = np.array([1, 2, 3], np.float32)
    result = _infer(api_server, "api", x, parameters={"mode": "dlpack"})
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), x * 2)
    info = json.loads(_params(result)["info"])
    assert info["back"] == [2.0, 4.0, 6.0] and info["is_cpu"] is True


def test_reschedule_runs_the_request_again(api_server: ServerProcess) -> None:
    with client(api_server) as c:
        inp = grpcclient.InferInput("INPUT0", [1], "FP32")
        inp.set_data_from_numpy(np.ones(1, np.float32))
        runs = c.infer("resched", [inp], request_id="r1", sequence_id=9, sequence_start=True).as_numpy("RUNS")
    assert runs.tolist() == [3, 0]  # ran three times; rescheduled runs have their flags cleared
    exc = expect_error("INTERNAL", _infer, api_server, "api", np.ones(1, np.float32),
                       parameters={"mode": "reschedule"})
    assert "Request is released with TRITONSERVER_REQUEST_RELEASE_RESCHEDULE" in exc.message()
    assert "iterative_sequence" in exc.message()
