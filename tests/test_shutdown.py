"""Graceful shutdown: on SIGTERM, requests already in flight (running or queued) complete,
new ones are refused, and the process exits 0."""

from __future__ import annotations

import queue
import time

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException
from util import ServerProcess, client, identity_config, scaled, write_model

DELAY_MS = 1000


def _send(c: grpcclient.InferenceServerClient, data: np.ndarray, done: queue.Queue, index: int) -> None:
    inp = grpcclient.InferInput("INPUT0", list(data.shape), "FP32")
    inp.set_data_from_numpy(data)
    c.async_infer("slow", [inp], request_id=str(index), client_timeout=30,
                  callback=lambda result, error: done.put((index, result, error)))


def test_sigterm_drains_in_flight_requests_and_exits_0(tmp_path, server_factory) -> None:
    repo = tmp_path / "repo"
    write_model(repo, "slow", identity_config("slow", [("INPUT0", "FP32", [-1])], execute_delay_ms=DELAY_MS,
                                              instance_count=2))
    srv: ServerProcess = server_factory(repo, "--exit-timeout-secs", "20")
    c = client(srv)
    assert c.is_server_ready()
    rng = np.random.default_rng(3)
    payloads = [rng.standard_normal(int(n)).astype(np.float32) for n in (3, 5, 7, 11)]
    done: queue.Queue = queue.Queue()
    # Two instances: two requests run at once, two wait in the queue.
    for index, data in enumerate(payloads):
        _send(c, data, done, index)
    time.sleep(0.4)  # let them all reach the server; the first two are now executing
    assert done.empty(), "requests finished before SIGTERM; the test cannot check draining"
    signalled = time.monotonic()
    srv.terminate()

    # A request sent after SIGTERM is refused (the in-flight ones are still running).
    time.sleep(0.3)
    refused = grpcclient.InferInput("INPUT0", [1], "FP32")
    refused.set_data_from_numpy(np.zeros(1, np.float32))
    try:
        client(srv).infer("slow", [refused], client_timeout=10)
    except InferenceServerException as exc:
        assert exc.status() == "StatusCode.UNAVAILABLE", (exc.status(), exc.message())
    else:
        raise AssertionError("a request sent after SIGTERM was served")

    results = {}
    for _ in payloads:
        index, result, error = done.get(timeout=scaled(30))
        assert error is None, f"in-flight request {index} failed during shutdown: {error}"
        results[index] = result
    for index, data in enumerate(payloads):
        assert results[index].get_response().id == str(index)
        np.testing.assert_array_equal(results[index].as_numpy("OUTPUT0"), data)
    c.close()

    assert srv.wait(20) == 0, srv.log
    # The queued pair ran after the running pair: the exit waited for both rounds.
    assert time.monotonic() - signalled >= 1.0
    assert "stopped" in srv.log


def test_sigterm_on_idle_server_exits_0_quickly(tmp_path, server_factory) -> None:
    repo = tmp_path / "repo"
    write_model(repo, "m", identity_config("m", [("INPUT0", "FP32", [2])]))
    srv: ServerProcess = server_factory(repo)
    assert client(srv).is_server_ready()
    started = time.monotonic()
    srv.terminate()
    assert srv.wait(15) == 0, srv.log
    assert time.monotonic() - started < scaled(10)
