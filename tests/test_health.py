"""The standard grpc.health.v1 service (grpcio-health-checking's messages and stub), and the
same answers on HTTP's health routes."""

from __future__ import annotations

import queue
import threading
import time

import grpc
import numpy as np
import tritonclient.grpc as grpcclient
from grpc_health.v1 import health_pb2, health_pb2_grpc
from util import ServerProcess, expect_rpc_error, http_request, identity_config, scaled, write_model
from util import health_status as check

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def test_check_server_serving_when_ready(identity_server: ServerProcess) -> None:
    assert check(identity_server, "") == SERVING
    assert check(identity_server, "inference.GRPCInferenceService") == SERVING


def test_check_model_serving(identity_server: ServerProcess, onnx_server: ServerProcess) -> None:
    assert check(identity_server, "id_FP32") == SERVING
    assert check(onnx_server, "simple") == SERVING
    assert check(onnx_server, "add_sub_autocomplete") == SERVING


def test_check_unknown_service_is_not_found(identity_server: ServerProcess) -> None:
    with identity_server.channel() as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        expect_rpc_error(grpc.StatusCode.NOT_FOUND, stub.Check,
                         health_pb2.HealthCheckRequest(service="no_such_model"), timeout=10)


def test_check_failed_models_not_serving(failure_server: ServerProcess) -> None:
    assert check(failure_server, "good") == SERVING
    for name in ("broken_config", "missing_file", "no_version", "name_mismatch", "unknown_backend"):
        assert check(failure_server, name) == NOT_SERVING, name
    # Strict readiness: one failed model makes the server not ready, and "" follows the server.
    assert check(failure_server, "") == NOT_SERVING


class Watcher:
    """Runs a Watch stream on a thread and hands every status over through a queue."""

    def __init__(self, srv: ServerProcess, service: str) -> None:
        self.channel = srv.channel()
        stub = health_pb2_grpc.HealthStub(self.channel)
        self.call = stub.Watch(health_pb2.HealthCheckRequest(service=service), timeout=scaled(30))
        self.statuses: queue.Queue = queue.Queue()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            for response in self.call:
                self.statuses.put(response.status)
        except grpc.RpcError as exc:
            self.statuses.put(exc)

    def next(self, timeout: float = 10.0):
        return self.statuses.get(timeout=scaled(timeout))

    def close(self) -> None:
        self.call.cancel()
        self.thread.join(scaled(5))
        self.channel.close()


def test_watch_streams_not_serving_on_sigterm(tmp_path, server_factory) -> None:
    repo = tmp_path / "repo"
    write_model(repo, "wm", identity_config("wm", [("INPUT0", "FP32", [2])]))
    srv = server_factory(repo, "--exit-timeout-secs", "5")
    server_watch = Watcher(srv, "")
    model_watch = Watcher(srv, "wm")
    try:
        assert server_watch.next() == SERVING
        assert model_watch.next() == SERVING
        srv.terminate()
        assert server_watch.next() == NOT_SERVING
        assert model_watch.next() == NOT_SERVING
    finally:
        server_watch.close()
        model_watch.close()
    # With the watches gone, nothing is in flight: the server exits cleanly.
    assert srv.wait(20) == 0, srv.log


def test_watch_on_failed_model_reports_not_serving(failure_server: ServerProcess) -> None:
    watch = Watcher(failure_server, "missing_file")
    try:
        status = watch.next()
        assert status == NOT_SERVING, status
    finally:
        watch.close()


def test_live_and_ready_service_names(tmp_path, server_factory) -> None:
    """Kubernetes probes: "live" stays SERVING while draining, "ready" follows readiness."""
    repo = tmp_path / "repo"
    write_model(repo, "slowm", identity_config("slowm", [("INPUT0", "FP32", [2])], execute_delay_ms=1500))
    srv = server_factory(repo, "--exit-timeout-secs", "10")
    assert check(srv, "live") == SERVING and check(srv, "ready") == SERVING
    c = grpcclient.InferenceServerClient(srv.url)
    inp = grpcclient.InferInput("INPUT0", [2], "FP32")
    inp.set_data_from_numpy(np.ones(2, np.float32))
    pending = c.async_infer("slowm", [inp], callback=lambda *_: None)
    time.sleep(0.3)
    srv.terminate()
    time.sleep(0.3)
    assert check(srv, "ready") == NOT_SERVING  # draining: out of rotation ...
    assert check(srv, "live") == SERVING  # ... but alive
    del pending
    assert srv.wait(20) == 0


# -- the same answers over HTTP/REST's health routes (Watch is a stream: gRPC only) --

def test_http_health_routes_agree_with_check(identity_server: ServerProcess, onnx_server: ServerProcess,
                                             failure_server: ServerProcess) -> None:
    """SERVING is 200 and NOT_SERVING 400 on /v2/health/ready and /v2/models/NAME/ready, for the
    same servers and models the Check tests use; an unknown model is not ready (400, as Triton)."""
    cases = [(identity_server, ""), (identity_server, "id_FP32"), (onnx_server, "simple"),
             (onnx_server, "add_sub_autocomplete"), (failure_server, "good"), (failure_server, "")]
    cases += [(failure_server, name) for name in
              ("broken_config", "missing_file", "no_version", "name_mismatch", "unknown_backend")]
    for srv, service in cases:
        path = f"/v2/models/{service}/ready" if service else "/v2/health/ready"
        status = http_request(srv.http_port, "GET", path)[0]
        assert status == (200 if check(srv, service) == SERVING else 400), (service, status)
    assert http_request(identity_server.http_port, "GET", "/v2/models/no_such_model/ready")[0] == 400
    assert http_request(failure_server.http_port, "GET", "/v2/health/live")[0] == 200
