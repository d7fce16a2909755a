"""Graceful shutdown: on SIGTERM readiness goes off at once; requests that still arrive are
served for the lame duck (until none arrives for 1 s, at most --lame-duck-secs); then new
ones are refused while those in flight (running or queued) complete, and the process exits 0."""

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
    # No lame duck: refused at once, as Triton does.
    srv: ServerProcess = server_factory(repo, "--exit-timeout-secs", "20", "--lame-duck-secs", "0")
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


def test_lame_duck_serves_until_requests_stop_arriving(tmp_path, server_factory) -> None:
    """After SIGTERM readiness is off at once, but a client still sending is served, not
    refused; once it stops, the server exits a second later, well before --lame-duck-secs."""
    repo = tmp_path / "repo"
    write_model(repo, "m", identity_config("m", [("INPUT0", "FP32", [2])]))
    lame_duck = scaled(8)
    srv: ServerProcess = server_factory(repo, "--lame-duck-secs", str(lame_duck))
    c, probe = client(srv), client(srv)
    inp = grpcclient.InferInput("INPUT0", [2], "FP32")
    inp.set_data_from_numpy(np.ones(2, np.float32))
    assert probe.is_server_ready()
    srv.terminate()
    signalled = time.monotonic()
    deadline = signalled + scaled(5)
    while probe.is_server_ready():
        assert time.monotonic() < deadline, "readiness stayed on after SIGTERM"
        time.sleep(0.02)
    served = 0
    while time.monotonic() < signalled + 1.5:  # longer than the 1 s of quiet that ends the lame duck
        c.infer("m", [inp], client_timeout=10)  # raises if refused
        served += 1
        time.sleep(0.05)
    stopped_sending = time.monotonic()
    assert served >= 10, served
    assert srv.wait(lame_duck) == 0, srv.log
    assert time.monotonic() - stopped_sending < lame_duck - 1, "the lame duck did not end when requests stopped"
    assert "serving requests that still arrive" in srv.log
    c.close()
    probe.close()


def test_sigterm_on_idle_server_exits_0_quickly(tmp_path, server_factory) -> None:
    repo = tmp_path / "repo"
    write_model(repo, "m", identity_config("m", [("INPUT0", "FP32", [2])]))
    srv: ServerProcess = server_factory(repo, "--lame-duck-secs", "5")  # the default: quiet after 1 s
    assert client(srv).is_server_ready()
    started = time.monotonic()
    srv.terminate()
    assert srv.wait(15) == 0, srv.log
    assert time.monotonic() - started < scaled(10)


def _steady_client(url: str, stop: threading.Event, codes: collections.Counter, lock: threading.Lock) -> None:
    """One client sending back to back until `stop` or the server is gone; counts every outcome."""
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
        if code != "OK":
            refused += 1
            time.sleep(0.01)  # a retrying client backs off a little
    c.close()


def _steady_load(tmp_path, server_factory, lame_duck: str,
                 follow_readiness: bool) -> tuple[collections.Counter, int, int]:
    """16 clients send through a SIGTERM; with `follow_readiness` they stop once ServerReady
    is false (polled every 50 ms), as a balancer checking readiness would. Returns the
    outcomes, the server's exit code, and how many requests were served in the 1.5 s after SIGTERM."""
    repo = tmp_path / "repo"
    write_model(repo, "steady", identity_config("steady", [("INPUT0", "FP32", [4])], max_batch_size=8,
                                                execute_delay_ms=3, instance_count=2,
                                                extra="dynamic_batching { }\n"))
    srv: ServerProcess = server_factory(repo, "--exit-timeout-secs", "20", "--lame-duck-secs", lame_duck)
    codes: collections.Counter = collections.Counter()
    lock = threading.Lock()
    stop = threading.Event()
    threads = [threading.Thread(target=_steady_client, args=(srv.url, stop, codes, lock)) for _ in range(16)]
    for thread in threads:
        thread.start()
    time.sleep(1.5)
    with lock:
        before = codes["OK"]
    assert before > 50, codes
    srv.terminate()
    if follow_readiness:  # as a balancer: probe readiness until the replica is gone
        probe = client(srv)
        while probe.is_server_ready():
            time.sleep(0.05)
        stop.set()

        def keep_probing() -> None:
            while srv.proc.poll() is None:
                try:
                    probe.is_server_ready()
                except InferenceServerException:
                    pass
                time.sleep(0.1)

        threading.Thread(target=keep_probing, daemon=True).start()
    time.sleep(1.5)
    with lock:
        during = codes["OK"] - before
    exit_code = srv.wait(scaled(30))
    time.sleep(0.5)  # clients see the listener gone
    stop.set()
    for thread in threads:
        thread.join(scaled(30))
    print(f"\nshutdown under load ({'following' if follow_readiness else 'ignoring'} readiness): {dict(codes)}")
    assert exit_code == 0, srv.log
    return codes, exit_code, during


def test_sigterm_under_steady_load_loses_nothing(tmp_path, server_factory) -> None:
    """16 clients keep sending through a SIGTERM and stop once readiness is off: every request
    is answered OK (those that arrive after SIGTERM are served by the lame duck), and the
    server exits once they have stopped."""
    started = time.monotonic()
    codes, _, _ = _steady_load(tmp_path, server_factory, "30", follow_readiness=True)
    assert set(codes) == {"OK"}, codes
    # Readiness probes went on until the exit: they do not count as traffic for the lame duck.
    assert time.monotonic() - started < 20, "the lame duck lasted to its limit"


def test_sigterm_under_load_that_ignores_readiness(tmp_path, server_factory) -> None:
    """16 clients that never look at readiness: served through the lame duck (2 s here), then
    the listener closes once those in flight are answered. Each client loses at most the one
    call grpcio held at the close (CANCELLED) and then finds the port closed (UNAVAILABLE);
    nothing else fails."""
    codes, _, during = _steady_load(tmp_path, server_factory, "2", follow_readiness=False)
    assert set(codes) <= {"OK", "StatusCode.UNAVAILABLE", "StatusCode.CANCELLED"}, codes
    assert during > 50, (during, codes)  # served, not refused, in the lame duck
    assert codes["StatusCode.CANCELLED"] <= 16, codes
    assert codes["StatusCode.UNAVAILABLE"] > 0, "the lame duck did not end while clients kept sending"


def test_idle_stream_and_watch_do_not_hold_shutdown(tmp_path, server_factory) -> None:
    """An open, idle ModelStreamInfer stream and a health Watch: SIGTERM still exits at once,
    each ends with UNAVAILABLE, and a stream request in flight at SIGTERM is answered first."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    repo = tmp_path / "repo"
    write_model(repo, "m", identity_config("m", [("INPUT0", "FP32", [2])]))
    write_model(repo, "slow", identity_config("slow", [("INPUT0", "FP32", [2])], execute_delay_ms=800))
    srv: ServerProcess = server_factory(repo, "--exit-timeout-secs", "30", "--lame-duck-secs", "5")
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
