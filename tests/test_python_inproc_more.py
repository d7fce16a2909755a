"""In-process Python models (`nereid_in_process`): custom metrics and `request.is_cancelled()`.

The stub-mode tests of these (test_python_api.py's metrics test, test_python_more.py's metric
lifetime, unload and cancellation tests) run here unchanged against the same models with
`nereid_in_process` in their configs: in the server's process a model's metrics are kept in the
server's own registry and must appear on /metrics and leave it as they do from a stub, and
`is_cancelled()` must see the client give up as a stub's model does.
"""

from __future__ import annotations

import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import test_python_api as api_tests
import test_python_more as more_tests
from test_python_inproc import IN_PROCESS, _children
from util import ServerProcess, client, scaled, write_model

# Holds a MetricFamily in a module global (a reference cycle through the module's dict keeps it
# past the instance): unloading the model must still take it off /metrics, as a stub's exit does.
GLOBAL_HOLDER = more_tests.HEADER + '''
HELD = []


class TritonPythonModel:
    def initialize(self, args):
        family = pb_utils.MetricFamily("nereid_inproc_global", "held by a module global", pb_utils.MetricFamily.COUNTER)
        HELD.append((family, family.Metric(labels={"model": args["model_name"]})))
        HELD[-1][1].increment(4)

    def execute(self, requests):
        return [pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(
            "OUTPUT0", pb_utils.get_input_tensor_by_name(r, "INPUT0").as_numpy())]) for r in requests]
'''


@pytest.fixture(scope="module")
def inproc_more_server(tmp_path_factory: pytest.TempPathFactory):
    repo = tmp_path_factory.mktemp("inproc_more")
    write_model(repo, "api", api_tests.API_CONFIG + IN_PROCESS, files={"1/model.py": api_tests.API.encode()})
    write_model(repo, "metrics_life", more_tests.METRICS_CONFIG + IN_PROCESS,
                files={"1/model.py": more_tests.METRICS.encode()})
    write_model(repo, "cancel_watch", more_tests.CANCEL_WATCH_CONFIG + IN_PROCESS,
                files={"1/model.py": more_tests.CANCEL_WATCH.encode()})
    write_model(repo, "global_holder", more_tests.CANCEL_WATCH_CONFIG.replace('"cancel_watch"', '"global_holder"')
                + IN_PROCESS, files={"1/model.py": GLOBAL_HOLDER.encode()})
    srv = ServerProcess([repo], ["--model-control-mode", "explicit", "--load-model", "*"])
    yield srv
    srv.stop()


def _scrape(srv: ServerProcess) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{srv.metrics_port}/metrics", timeout=10).read().decode()


def _gone(srv: ServerProcess, name: str) -> bool:
    end = time.monotonic() + scaled(10)
    while name in _scrape(srv) and time.monotonic() < end:
        time.sleep(0.05)
    return name not in _scrape(srv)


def test_the_models_run_in_the_server_process(inproc_more_server: ServerProcess) -> None:
    rows = {r.name: r.state for r in client(inproc_more_server).get_model_repository_index().models}
    assert rows == dict.fromkeys(("api", "metrics_life", "cancel_watch", "global_holder"), "READY"), rows
    assert not [c for c in _children(inproc_more_server.proc.pid) if "backends.python_stub" in c]


def test_counter_gauge_histogram_with_labels_on_the_metrics_endpoint(inproc_more_server: ServerProcess) -> None:
    api_tests.test_custom_metrics_on_the_metrics_endpoint(inproc_more_server)


def test_metric_lifetime_follows_the_models_references(inproc_more_server: ServerProcess) -> None:
    more_tests.test_metric_lifetime_follows_the_models_references(inproc_more_server)


def test_metrics_leave_with_the_model_on_unload(inproc_more_server: ServerProcess) -> None:
    more_tests.test_metrics_leave_with_the_model_on_unload(inproc_more_server)


def test_metrics_held_by_module_globals_leave_on_unload(inproc_more_server: ServerProcess) -> None:
    srv = inproc_more_server
    assert 'nereid_inproc_global{model="global_holder"} 4' in _scrape(srv)
    with client(srv) as c:
        c.unload_model("global_holder")
        try:
            assert _gone(srv, "nereid_inproc_global")
        finally:
            c.load_model("global_holder")
    assert 'nereid_inproc_global{model="global_holder"} 4' in _scrape(srv)  # a fresh import starts again


def test_is_cancelled_sees_the_deadline_and_the_clients_cancel(inproc_more_server: ServerProcess) -> None:
    more_tests.test_is_cancelled_in_a_default_mode_model(inproc_more_server)


def test_is_cancelled_probe_reaches_the_model_in_the_backend(tmp_path: Path) -> None:
    """The backend on its own: the request's `cancelled` probe is what `is_cancelled()` answers,
    False while the client waits, True once it gave up."""
    from backends.base import Device, ModelSpec, Request, TensorSpec
    from backends.python import PythonBackend

    write_model(tmp_path, "probe_cancel", "", files={"1/model.py": (more_tests.HEADER + '''
class TritonPythonModel:
    def execute(self, requests):
        return [pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(
            "OUTPUT0", np.array([float(r.is_cancelled())], np.float32))]) for r in requests]
''').encode()})
    model_dir = tmp_path / "probe_cancel"
    spec = ModelSpec(name="probe_cancel", version=1, model_dir=model_dir, version_dir=model_dir / "1",
                     model_file=model_dir / "1" / "model.py", max_batch_size=0,
                     inputs=(TensorSpec("INPUT0", "FP32", (1,)),), outputs=(TensorSpec("OUTPUT0", "FP32", (1,)),),
                     parameters={"nereid_in_process": "true"}, config_json='{"name": "probe_cancel"}',
                     instance_name="unit")
    backend = PythonBackend.variant(spec)()
    backend.load(spec, Device("CPU", 0))
    try:
        x = {"INPUT0": np.zeros(1, np.float32)}
        outcomes = backend.execute_requests([Request(x, cancelled=lambda: False), Request(x, cancelled=lambda: True),
                                             Request(x)])
        assert [float(o["OUTPUT0"][0]) for o in outcomes] == [0.0, 1.0, 0.0]  # type: ignore[index]
    finally:
        backend.close()


# Makes a family in a module global from an `async def execute` (run on a thread of its own), or,
# with FAIL set, in initialize before raising.
ASYNC_HOLDER = more_tests.HEADER + '''
FAIL = {fail}
HELD = []


class TritonPythonModel:
    def initialize(self, args):
        if FAIL:
            HELD.append(pb_utils.MetricFamily("nereid_unit_failed", "made before failing", pb_utils.MetricFamily.GAUGE))
            raise RuntimeError("no weights")

    async def execute(self, requests):
        family = pb_utils.MetricFamily("nereid_unit_async", "made in async execute", pb_utils.MetricFamily.GAUGE)
        HELD.append((family, family.Metric(labels={{"k": "v"}})))
        HELD[-1][1].set(2)
        return [pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(
            "OUTPUT0", np.zeros(1, np.float32))]) for r in requests]
'''


def test_metrics_of_async_execute_and_of_a_failed_initialize_are_the_instances(tmp_path: Path) -> None:
    """The backend on its own, in this process's registry: what an `async def execute` made
    leaves at close, what a failing initialize made leaves at once."""
    from backends.base import BackendError, Device, ModelSpec, Request, TensorSpec
    from backends.custom_metrics import REGISTRY
    from backends.python import PythonBackend

    def spec_for(name: str, fail: bool) -> ModelSpec:
        write_model(tmp_path, name, "", files={"1/model.py": ASYNC_HOLDER.format(fail=fail).encode()})
        model_dir = tmp_path / name
        return ModelSpec(name=name, version=1, model_dir=model_dir, version_dir=model_dir / "1",
                         model_file=model_dir / "1" / "model.py", max_batch_size=0,
                         inputs=(TensorSpec("INPUT0", "FP32", (1,)),), outputs=(TensorSpec("OUTPUT0", "FP32", (1,)),),
                         parameters={"nereid_in_process": "true"}, config_json=f'{{"name": "{name}"}}',
                         instance_name="unit")

    def families() -> set[str]:
        return {f.name for f in REGISTRY.snapshot()}

    spec = spec_for("async_holder", False)
    backend = PythonBackend.variant(spec)()
    backend.load(spec, Device("CPU", 0))
    try:
        backend.execute_requests([Request({"INPUT0": np.zeros(1, np.float32)})])
        assert "nereid_unit_async" in families()
    finally:
        backend.close()
    assert "nereid_unit_async" not in families()
    spec = spec_for("failed_holder", True)
    with pytest.raises(BackendError, match="no weights"):
        PythonBackend.variant(spec)().load(spec, Device("CPU", 0))
    assert "nereid_unit_failed" not in families()
