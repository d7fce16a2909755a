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
from test_python_backend import LEAN, LEAN_CONFIG
from util import ServerProcess, client, identity_config, scaled, write_model

# The cheap echo model of test_python_backend.py, with an initialize() that takes a second.
SLOW_INIT = LEAN.replace("class TritonPythonModel:\n", "class TritonPythonModel:\n"
                         "    def initialize(self, args):\n        time.sleep(1.0)\n\n", 1)
assert "time.sleep(1.0)" in SLOW_INIT

CONFIG = LEAN_CONFIG.replace('"py_lean"', '"py_slow_init"')


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
            thread.join(scaled(10))
            assert err is not None and "exited with code 7" in err, err
            worst.append(max(latencies))
            time.sleep(1.2)  # the restart finishes off the loop
        assert max(worst) < scaled(0.5), f"another model stalled {max(worst):.2f}s while the stub restarted: {worst}"
    finally:
        server.stop()
