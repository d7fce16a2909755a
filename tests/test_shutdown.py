"""Graceful shutdown: on SIGTERM, requests already in flight (running or queued) complete,
new ones are refused, and the process exits 0."""

from __future__ import annotations

import collections
import queue
import threading
import time

import grpc
import numpy as np
import pytest
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


def _steady_client(url: str, stop: threading.Event, codes: collections.Counter, lock: threading.Lock) -> None:
    """One client sending back to back until the server is gone; counts every outcome."""
    c = grpcclient.InferenceServerClient(url)
    inp = grpcclient.InferInput("INPUT0", [1, 4], "FP32")
    inp.set_data_from_numpy(np.ones((1, 4), np.float32))
    refused = 0
    while not stop.is_set() and refused < 20:  # a load balancer would send elsewhere by now
        try:
            c.infer("steady", [inp], client_timeout=30)
            code = "OK"
        except InferenceServerException as exc:
            code = exc.status() or "None"
        with lock:
            codes[code] += 1
        if code == "StatusCode.UNAVAILABLE":
            refused += 1
            time.sleep(0.01)  # a retrying client backs off a little
    c.close()


def test_sigterm_under_steady_load_loses_nothing(tmp_path, server_factory) -> None:
    """16 clients keep sending through a SIGTERM: every request ends OK (received before the
    drain) or UNAVAILABLE (refused, retryable); none CANCELLED, none failed otherwise. Each
    client gives up on this server after 20 refusals, as a load balancer would."""
    repo = tmp_path / "repo"
    write_model(repo, "steady", identity_config("steady", [("INPUT0", "FP32", [4])], max_batch_size=8,
                                                execute_delay_ms=3, instance_count=2,
                                                extra="dynamic_batching { }\n"))
    srv: ServerProcess = server_factory(repo, "--exit-timeout-secs", "20")
    codes: collections.Counter = collections.Counter()
    lock = threading.Lock()
    stop = threading.Event()
    threads = [threading.Thread(target=_steady_client, args=(srv.url, stop, codes, lock)) for _ in range(16)]
    for thread in threads:
        thread.start()
    time.sleep(1.5)
    with lock:
        before = codes["OK"]
    srv.terminate()
    exit_code = srv.wait(scaled(30))
    time.sleep(0.5)  # clients see the listener gone
    stop.set()
    for thread in threads:
        thread.join(scaled(30))
    print(f"\nshutdown under load: {dict(codes)}")
    assert before > 50, codes
    assert exit_code == 0, srv.log
    assert set(codes) <= {"OK", "StatusCode.UNAVAILABLE"}, codes


def test_idle_stream_and_watch_do_not_hold_shutdown(tmp_path, server_factory) -> None:
    """An open, idle ModelStreamInfer stream and a health Watch: SIGTERM still exits at once,
    each ends with UNAVAILABLE, and a stream request in flight at SIGTERM is answered first."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    repo = tmp_path / "repo"
    write_model(repo, "m", identity_config("m", [("INPUT0", "FP32", [2])]))
    write_model(repo, "slow", identity_config("slow", [("INPUT0", "FP32", [2])], execute_delay_ms=800))
    srv: ServerProcess = server_factory(repo, "--exit-timeout-secs", "30")
    idle_results: queue.Queue = queue.Queue()
    busy_results: queue.Queue = queue.Queue()
    idle = grpcclient.InferenceServerClient(srv.url)
    idle.start_stream(callback=lambda result, error: idle_results.put((result, error)))
    busy = grpcclient.InferenceServerClient(srv.url)
    busy.start_stream(callback=lambda result, error: busy_results.put((result, error)))
    inp = grpcclient.InferInput("INPUT0", [2], "FP32")
    inp.set_data_from_numpy(np.ones(2, np.float32))
    idle.async_stream_infer("m", [inp], request_id="warm")
    assert idle_results.get(timeout=scaled(10))[1] is None
    channel = srv.channel()
    watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""))
    assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
    busy.async_stream_infer("slow", [inp], request_id="in-flight")
    time.sleep(0.3)
    started = time.monotonic()
    srv.terminate()
    assert srv.wait(scaled(10)) == 0, srv.log
    assert time.monotonic() - started < scaled(5), "open streams held the shutdown"
    result, error = busy_results.get(timeout=scaled(5))
    assert error is None and result.get_response().id == "in-flight", error
    for results in (busy_results, idle_results):
        _, error = results.get(timeout=scaled(5))
        assert error is not None and error.status() == "StatusCode.UNAVAILABLE", error
    statuses = []
    with pytest.raises(grpc.RpcError) as info:
        for response in watch:
            statuses.append(response.status)
    assert statuses == [health_pb2.HealthCheckResponse.NOT_SERVING]
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    channel.close()
    idle.close()
    busy.close()
