"""Overload (issue 9): a bounded queue per model by default, an in-flight cap for the whole
server and per-client rate limits answer quickly instead of growing memory, and full speed
comes back when the load drops."""

from __future__ import annotations

import concurrent.futures
import threading
import time

import grpc
import numpy as np
import pytest
from tritonclient.grpc import service_pb2 as pb
from util import ServerProcess, identity_config, raw_request, scaled, write_model

INFER = "/inference.GRPCInferenceService/ModelInfer"


def _body(model: str) -> bytes:
    return raw_request(model, [("INPUT0", "FP32", np.ones((1, 4), np.float32))]).SerializeToString()


def _call(channel: grpc.Channel, model: str, metadata=None) -> str:
    try:
        channel.unary_unary(INFER)(_body(model), timeout=scaled(30), metadata=metadata)
        return "OK"
    except grpc.RpcError as exc:
        return f"{exc.code().name}: {exc.details()}"


def _burst(server: ServerProcess, model: str, count: int, metadata=None) -> list[str]:
    """`count` requests at once, each on its own connection, connected beforehand and released
    together, so they really arrive together even on a busy machine."""
    channels = [server.channel() for _ in range(count)]
    try:
        for channel in channels:
            grpc.channel_ready_future(channel).result(timeout=scaled(10))
        start = threading.Barrier(count)

        def call(channel: grpc.Channel) -> str:
            start.wait()
            return _call(channel, model, metadata)

        with concurrent.futures.ThreadPoolExecutor(count) as pool:
            return list(pool.map(call, channels))
    finally:
        for channel in channels:
            channel.close()


@pytest.fixture(scope="module")
def slow_server(tmp_path_factory: pytest.TempPathFactory):
    repo = tmp_path_factory.mktemp("overload")
    # One instance that takes 400 ms: everything else waits in the queue.
    write_model(repo, "slow", identity_config("slow", [("INPUT0", "FP32", [4])], max_batch_size=4,
                                              execute_delay_ms=400, instance_count=1))
    write_model(repo, "slow_batched", identity_config(
        "slow_batched", [("INPUT0", "FP32", [4])], max_batch_size=1, execute_delay_ms=400, instance_count=1,
        extra="dynamic_batching { }\n"))
    write_model(repo, "fast", identity_config("fast", [("INPUT0", "FP32", [4])], max_batch_size=4))
    srv = ServerProcess([repo], ["--model-queue-limit", "3", "--max-inflight-requests", "12"])
    yield srv
    srv.stop()


@pytest.mark.parametrize("model", ["slow", "slow_batched"])
def test_default_queue_bound_refuses_the_excess(slow_server: ServerProcess, model: str) -> None:
    """One running, three queued (--model-queue-limit 3); the other four are refused at once."""
    outcomes = _burst(slow_server, model, 8)
    ok = [o for o in outcomes if o == "OK"]
    refused = [o for o in outcomes if o.startswith("UNAVAILABLE: Exceeds maximum queue size")]
    assert len(ok) + len(refused) == 8, outcomes
    # 1 running + 3 queued; one more may slip in if the first finishes before the last arrives,
    # and one fewer fits when the burst fills the queue before the instance has taken the first
    # request out of it (seen once under CI's load with the dynamic batcher). Unbounded, all 8 pass.
    assert 3 <= len(ok) <= 5 and len(refused) >= 3, outcomes
    assert _burst(slow_server, model, 2) == ["OK", "OK"]  # back to normal


def test_inflight_cap_is_resource_exhausted_quickly(tmp_path) -> None:
    """--max-inflight-requests 4 over the whole server (no queue bound): of 8 requests at once to
    a model that takes 400 ms each, 4 are taken and 4 refused at once; then it serves again."""
    write_model(tmp_path, "slow", identity_config("slow", [("INPUT0", "FP32", [4])], max_batch_size=4,
                                                  execute_delay_ms=400, instance_count=1))
    srv = ServerProcess([tmp_path], ["--model-queue-limit", "0", "--max-inflight-requests", "4"])
    try:
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            def timed(channel: grpc.Channel) -> tuple[str, float]:
                started = time.monotonic()
                return _call(channel, "slow"), time.monotonic() - started

            channels = [srv.channel() for _ in range(8)]
            outcomes = list(pool.map(timed, channels))
            for channel in channels:
                channel.close()
        exhausted = [took for o, took in outcomes if o.startswith("RESOURCE_EXHAUSTED")]
        assert sum(o == "OK" for o, _ in outcomes) == 4 and len(exhausted) == 4, outcomes
        assert "--max-inflight-requests" in next(o for o, _ in outcomes if o != "OK")
        assert max(exhausted) < scaled(0.3), outcomes  # refused without waiting for the model
        assert _burst(srv, "slow", 2) == ["OK", "OK"]
    finally:
        srv.stop()


def test_rate_limit_per_client(tmp_path) -> None:
    write_model(tmp_path, "m", identity_config("m", [("INPUT0", "FP32", [4])], max_batch_size=4))
    write_model(tmp_path, "strict", identity_config(
        "strict", [("INPUT0", "FP32", [4])], max_batch_size=4,
        extra='parameters { key: "rate_limit_per_client" value: { string_value: "1:2" } }\n'))
    srv = ServerProcess([tmp_path], ["--rate-limit-per-client", "5:5", "--rate-limit-client-header", "x-client"])
    try:
        with srv.channel() as channel:
            alice = [("x-client", "alice")]
            first = [_call(channel, "m", alice) for _ in range(12)]
            assert first[:5] == ["OK"] * 5, first
            limited = [o for o in first if o != "OK"]
            assert limited and all(o.startswith("RESOURCE_EXHAUSTED: rate limit exceeded: client 'x-client=alice'")
                                   for o in limited), first
            # Another client has its own bucket; so has another model.
            assert _call(channel, "m", [("x-client", "bob")]) == "OK"
            # The model's own limit (1/s, burst 2) is stricter than the server's.
            strict = [_call(channel, "strict", [("x-client", "carol")]) for _ in range(4)]
            assert strict[:2] == ["OK", "OK"] and strict[2].startswith("RESOURCE_EXHAUSTED"), strict
            # Tokens refill: after a second alice may send again.
            time.sleep(1.1)
            assert _call(channel, "m", alice) == "OK"
            # Without the header a client is known by its address.
            anonymous = [_call(channel, "m") for _ in range(8)]
            assert "OK" in anonymous and any("client '" in o for o in anonymous if o != "OK"), anonymous
    finally:
        srv.stop()


def test_rate_limited_requests_on_a_stream_fail_one_by_one(tmp_path) -> None:
    write_model(tmp_path, "m", identity_config("m", [("INPUT0", "FP32", [4])], max_batch_size=4))
    srv = ServerProcess([tmp_path], ["--rate-limit-per-client", "2:2"])
    try:
        with srv.channel() as channel:
            stream = channel.stream_stream("/inference.GRPCInferenceService/ModelStreamInfer")
            answers = [pb.ModelStreamInferResponse.FromString(a)
                       for a in stream(iter([_body("m")] * 5), timeout=scaled(30))]
        errors = [a.error_message for a in answers if a.error_message]
        assert len(answers) == 5 and len(errors) == 3, answers
        assert all("rate limit exceeded" in e for e in errors)
    finally:
        srv.stop()
