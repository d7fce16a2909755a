"""SIGTERM while a model is stuck in `execute`: the server still exits (server/exit_guard.py).

Before, shutdown drained for --exit-timeout-secs, unloaded, logged "stopped" and then stayed
alive until the model returned (Python joins the thread-pool worker waiting on the busy stub at
exit) — forever for a hung model. Triton exits after its timeout; so must we, and the busy
Python stub must not outlive the server either.
"""

from __future__ import annotations

import signal
import time

import numpy as np
import tritonclient.grpc as grpcclient
from test_workers import _alive
from util import ServerProcess, scaled

from server.exit_guard import children

SLEEPY = '''
import time
import triton_python_backend_utils as pb_utils

class TritonPythonModel:
    def execute(self, requests):
        time.sleep(120)  # far longer than the test: the server must not wait for it
        return [pb_utils.InferenceResponse([pb_utils.Tensor(
            "OUTPUT0", pb_utils.get_input_tensor_by_name(r, "INPUT0").as_numpy())]) for r in requests]
'''


def _sleepy_repo(root):
    model = root / "sleepy"
    (model / "1").mkdir(parents=True)
    (model / "config.pbtxt").write_text(
        'name: "sleepy"\nbackend: "python"\nmax_batch_size: 0\n'
        'input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ 1 ] } ]\n'
        'output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 1 ] } ]\n')
    (model / "1" / "model.py").write_text(SLEEPY)
    return root


def test_sigterm_with_a_model_stuck_in_execute_still_exits(tmp_path) -> None:
    srv = ServerProcess([_sleepy_repo(tmp_path / "repo")], ["--exit-timeout-secs", "1"])
    try:
        stubs = children(srv.proc.pid)
        assert stubs, "the Python model's stub should be a child of the server"
        client = grpcclient.InferenceServerClient(srv.url)
        tensor = grpcclient.InferInput("INPUT0", [1], "FP32")
        tensor.set_data_from_numpy(np.ones(1, np.float32))
        client.async_infer("sleepy", [tensor], lambda result, error: None)
        time.sleep(1.0)  # the request reaches the stub's execute (it sleeps there for 120 s)
        started = time.monotonic()
        srv.proc.send_signal(signal.SIGTERM)
        code = srv.proc.wait(scaled(40))  # drain 1 s, unload's wait for the busy instance 5 s, exit guard 2 s
        took = time.monotonic() - started
        client.close()
        assert code == 0, srv.log
        assert took < scaled(30), took
        assert "stopped" in srv.log
        assert "still busy in models (nereid-collect_0): abandoned, as are 1 child process(es)" in srv.log, srv.log
        deadline = time.monotonic() + scaled(5)
        while any(_alive(pid) for pid in stubs) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(_alive(pid) for pid in stubs), "the busy stub outlived the server"
    finally:
        srv.stop()
