"""A Python model measured cheap is waited for on the event loop (bounded). If its stub dies
during that wait, the restart (a new process plus the model's initialize(), slow here on
purpose) must happen off the loop: other models keep answering meanwhile.

The budget is raised (`--inline-compute-us 2000`) so the bounded wait is taken every time;
before the fix, 8 crashes in 10 stalled every other model for the whole restart."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient
from util import ServerProcess, client, identity_config, write_model

SLOW_INIT = '''
import os, time
import triton_python_backend_utils as pb_utils

class TritonPythonModel:
    def initialize(self, args):
        time.sleep(1.0)

    def execute(self, requests):
        out = []
        for r in requests:
            a = pb_utils.get_input_tensor_by_name(r, "INPUT0").as_numpy()
            if a.reshape(-1)[0] == -3:
                os._exit(7)
            out.append(pb_utils.InferenceResponse([pb_utils.Tensor("OUTPUT0", a)]))
        return out
'''

CONFIG = """name: "py_slow_init"
backend: "python"
max_batch_size: 8
input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ 2 ] } ]
output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 2 ] } ]
instance_group [ { kind: KIND_CPU count: 1 } ]
"""


def _input(arr: np.ndarray) -> grpcclient.InferInput:
    inp = grpcclient.InferInput("INPUT0", list(arr.shape), "FP32")
    inp.set_data_from_numpy(arr)
    return inp


def test_stub_dying_in_the_bounded_wait_restarts_off_the_loop(tmp_path: Path) -> None:
    write_model(tmp_path, "py_slow_init", CONFIG, files={"1/model.py": SLOW_INIT.encode()})
    write_model(tmp_path, "idn", identity_config("idn", [("INPUT0", "FP32", [2])]))
    server = ServerProcess([tmp_path], extra_args=["--inline-compute-us", "2000"])
    try:
        c = client(server)
        worst: list[float] = []
        for _ in range(3):
            for _ in range(30):  # measured cheap again after each restart
                c.infer("py_slow_init", [_input(np.ones((1, 2), np.float32))])
            stop = threading.Event()
            latencies: list[float] = []

            def other(stop: threading.Event = stop, latencies: list[float] = latencies) -> None:
                oc = client(server)
                while not stop.is_set():
                    started = time.monotonic()
                    oc.infer("idn", [_input(np.ones((2,), np.float32))])
                    latencies.append(time.monotonic() - started)

            thread = threading.Thread(target=other)
            thread.start()
            time.sleep(0.2)
            err = None
            try:
                c.infer("py_slow_init", [_input(np.full((1, 2), -3, np.float32))])
            except Exception as exc:  # the crash fails its own request
                err = str(exc)
            time.sleep(0.3)
            stop.set()
            thread.join(10)
            assert err is not None and "exited with code 7" in err, err
            worst.append(max(latencies))
            time.sleep(1.2)  # the restart finishes off the loop
        assert max(worst) < 0.5, f"another model stalled {max(worst):.2f}s while the stub restarted: {worst}"
    finally:
        server.stop()
