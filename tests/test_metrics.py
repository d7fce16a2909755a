"""Prometheus metrics (issue 10): Triton's families and labels after known traffic, the queue depth
while requests wait, histograms and summaries, machine metrics, Nereid's own, and the flags."""

from __future__ import annotations

import concurrent.futures
import socket
import subprocess
import urllib.error
import urllib.request

import grpc
import numpy as np
import pytest
from lifecycle_util import wait_until
from prometheus_client.parser import text_string_to_metric_families
from util import PYTHON, ROOT, ServerProcess, identity_config, raw_request, scaled, write_model

from server.metrics.config import parse_metrics_config
from server.metrics.exposition import Family, render

INFER = "/inference.GRPCInferenceService/ModelInfer"

# Identity answers FP32 where the config promises INT32: every execution fails (BACKEND).
FAILING = identity_config("failing", [("INPUT0", "FP32", [4])], max_batch_size=4).replace(
    'name: "OUTPUT0"\n    data_type: TYPE_FP32', 'name: "OUTPUT0"\n    data_type: TYPE_INT32')


def scrape(srv: ServerProcess) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the endpoint, keyed by (name as written, sorted labels); the text must parse."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{srv.metrics_port}/metrics", timeout=10).read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            name = sample.name
            # prometheus_client's parser calls a counter's samples X_total; keep Triton's names as written
            if family.type == "counter" and name.endswith("_total") and f"\n{name[:-6]}{{" in text:
                name = name[:-6]
            samples[(name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def _body(model: str, rows: int = 1, request_id: str = "") -> bytes:
    data = np.ones((rows, 4), np.float32)
    return raw_request(model, [("INPUT0", "FP32", data)], request_id=request_id).SerializeToString()


def _call(channel: grpc.Channel, body: bytes, timeout: float = 30.0) -> str:
    try:
        channel.unary_unary(INFER)(body, timeout=timeout)
        return "OK"
    except grpc.RpcError as exc:
        return exc.code().name


@pytest.fixture(scope="module")
def metrics_server(tmp_path_factory: pytest.TempPathFactory):
    repo = tmp_path_factory.mktemp("metrics")
    write_model(repo, "plain", identity_config("plain", [("INPUT0", "FP32", [4])], max_batch_size=8))
    write_model(repo, "batched", identity_config(
        "batched", [("INPUT0", "FP32", [4])], max_batch_size=8, execute_delay_ms=20, instance_count=1,
        extra="dynamic_batching { max_queue_delay_microseconds: 50000 }\n"))
    write_model(repo, "slow", identity_config(
        "slow", [("INPUT0", "FP32", [4])], max_batch_size=1, execute_delay_ms=1500, instance_count=1,
        extra="dynamic_batching { default_queue_policy { max_queue_size: 2 } }\n"))
    write_model(repo, "failing", FAILING)
    write_model(repo, "broken", "not a config")
    srv = ServerProcess([repo], ["--metrics-config", "histogram_latencies=true", "--metrics-config",
                                 "summary_latencies=true", "--metrics-interval-ms", "200", "--strict-readiness",
                                 "false"])
    yield srv
    srv.stop()


def test_counters_after_known_traffic(metrics_server: ServerProcess) -> None:
    with metrics_server.channel() as channel:
        for rows in (1, 2, 3):
            assert _call(channel, _body("plain", rows)) == "OK"
        # Four requests at once to a batching model with a 50 ms window: fewer executions than requests.
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            assert list(pool.map(lambda _: _call(channel, _body("batched")), range(4))) == ["OK"] * 4
        assert _call(channel, _body("failing")) == "INTERNAL"
    samples = scrape(metrics_server)
    plain = {"model": "plain", "version": "1"}
    assert value(samples, "nv_inference_request_success", **plain) == 3
    assert value(samples, "nv_inference_count", **plain) == 6  # batch items
    assert value(samples, "nv_inference_exec_count", **plain) == 3
    for name in ("nv_inference_request_duration_us", "nv_inference_compute_infer_duration_us"):
        assert value(samples, name, **plain) > 0
    assert value(samples, "nv_inference_queue_duration_us", **plain) >= 0
    batched = {"model": "batched", "version": "1"}
    assert value(samples, "nv_inference_request_success", **batched) == 4
    assert value(samples, "nv_inference_exec_count", **batched) < 4
    failing = {"model": "failing", "version": "1"}
    assert value(samples, "nv_inference_request_failure", reason="BACKEND", **failing) == 1
    assert value(samples, "nv_inference_request_success", **failing) == 0
    # The histogram (Triton's first-response family) and the summaries count the same requests.
    assert value(samples, "nv_inference_first_response_histogram_ms_count", **plain) == 3
    assert value(samples, "nv_inference_first_response_histogram_ms_bucket", le="+Inf", **plain) == 3
    buckets = sorted((float(dict(labels)["le"]), v) for (name, labels), v in samples.items()
                     if name == "nv_inference_first_response_histogram_ms_bucket" and dict(labels)["model"] == "plain")
    assert [v for _, v in buckets] == sorted(v for _, v in buckets), "buckets must be cumulative"
    assert value(samples, "nv_inference_request_summary_us_count", **plain) == 3
    assert value(samples, "nv_inference_request_summary_us", quantile="0.99", **plain) > 0
    assert value(samples, "nv_inference_compute_infer_summary_us_count", **plain) == 3


def test_queue_depth_while_requests_wait_and_rejections(metrics_server: ServerProcess) -> None:
    """One 1.5 s instance and a queue of 2: with one running and two more sent the gauge shows
    the two waiting (for 1.5 s: long enough to scrape on a busy machine), a fourth is REJECTED,
    and a client that gives up is CANCELED. Channels connect before anything is sent (a
    connection made by the first call can take longer than the instance's 1.5 s). The first
    call is running before the next two are sent: sent together, all three could reach the
    queue before the instance took the first out of it, and the third was then refused as
    over the queue's bound (correct, and seen once in CI: the depth never showed 2)."""
    channels = [metrics_server.channel() for _ in range(5)]
    for channel in channels:
        grpc.channel_ready_future(channel).result(timeout=scaled(10))
    try:
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            futures = [pool.submit(_call, channels[0], _body("slow"))]

            def first_runs() -> bool:  # received, answered by nobody yet, and not waiting in the queue
                samples = scrape(metrics_server)
                return (value(samples, "nereid_inflight_requests") >= 1
                        and value(samples, "nv_inference_pending_request_count", model="slow", version="1") == 0)

            wait_until(lambda: first_runs() and first_runs(), timeout=scaled(5), what="the first call running")
            futures += [pool.submit(_call, ch, _body("slow")) for ch in channels[1:3]]
            # One runs, two wait (the queue holds 2); the gauge shows the two.
            depths: list[float] = []

            def depth_is_two() -> bool:
                depths.append(value(scrape(metrics_server), "nv_inference_pending_request_count", model="slow",
                                    version="1"))
                return depths[-1] == 2

            wait_until(depth_is_two, timeout=scaled(3),
                       what=lambda: f"a queue depth of 2 (seen {depths}, calls {[f.done() for f in futures]})")
            futures.append(pool.submit(_call, channels[3], _body("slow")))  # the queue is full: refused
            cancelled = pool.submit(_call, channels[4], _body("slow"), 0.1)
            outcomes = sorted(f.result() for f in futures) + [cancelled.result()]
        assert outcomes.count("UNAVAILABLE") >= 1 and outcomes[-1] in ("DEADLINE_EXCEEDED", "UNAVAILABLE")
        slow = {"model": "slow", "version": "1"}

        def counts() -> tuple[float, float]:
            samples = scrape(metrics_server)
            return (value(samples, "nv_inference_request_failure", reason="REJECTED", **slow),
                    value(samples, "nv_inference_request_failure", reason="CANCELED", **slow))

        wait_until(lambda: counts()[0] >= 1, timeout=scaled(5), what="REJECTED counted")
        if outcomes[-1] == "DEADLINE_EXCEEDED":
            wait_until(lambda: counts()[1] == 1, timeout=scaled(5), what="CANCELED counted")
        assert value(scrape(metrics_server), "nv_inference_pending_request_count", **slow) == 0
    finally:
        for channel in channels:
            channel.close()


def test_machine_and_nereid_metrics(metrics_server: ServerProcess) -> None:
    with metrics_server.channel() as channel:
        assert _call(channel, _body("no_such_model")) == "NOT_FOUND"
        assert _call(channel, b"\xff") == "INVALID_ARGUMENT"
        assert _call(channel, _body("plain", rows=99)) == "INVALID_ARGUMENT"
    samples = scrape(metrics_server)
    assert 0.0 <= value(samples, "nv_cpu_utilization") <= 1.0
    assert value(samples, "nv_cpu_memory_total_bytes") > value(samples, "nv_cpu_memory_used_bytes") > 0
    assert value(samples, "nereid_inflight_requests") >= 0
    # Requests for unknown models are labelled model="": a client cannot grow the label set.
    assert value(samples, "nereid_rejected_requests_total", model="", reason="NOT_FOUND") >= 1
    assert value(samples, "nereid_rejected_requests_total", model="", reason="INVALID_ARGUMENT") >= 1
    assert value(samples, "nereid_rejected_requests_total", model="plain", reason="INVALID_ARGUMENT") >= 1
    assert not any(dict(labels).get("model") == "no_such_model" for _, labels in samples)
    assert value(samples, "nereid_model_state", model="plain", version="1", state="READY") == 1
    assert value(samples, "nereid_model_load_failures_total", model="broken") >= 1
    assert value(samples, "process_resident_memory_bytes") > 0


def test_metrics_off_and_port_in_use(tmp_path) -> None:
    write_model(tmp_path, "m", identity_config("m", [("INPUT0", "FP32", [4])]))
    srv = ServerProcess([tmp_path], ["--allow-metrics", "false"])
    try:
        assert srv.metrics_port == 0 and "Metrics Service" not in srv.log
    finally:
        srv.stop()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            [PYTHON, "-m", "server.cli", "serve", "--model-repository", str(tmp_path), "--grpc-address", "127.0.0.1",
             "--grpc-port", "0", "--metrics-address", "127.0.0.1", "--metrics-port", str(port),
             "--http-port", "0"],
            cwd=ROOT, capture_output=True, text=True, timeout=scaled(60))
    assert done.returncode == 1, done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        f"nereid: could not bind the metrics endpoint 127.0.0.1:{port}: address already in use")
    with pytest.raises(urllib.error.HTTPError):
        srv2 = ServerProcess([tmp_path])
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{srv2.metrics_port}/other", timeout=10)
        finally:
            srv2.stop()


def test_metrics_config_parsing_and_label_escaping() -> None:
    config = parse_metrics_config(["summary_latencies=true", 'summary_quantiles="0.5:0.05,0.99:0.001"',
                                   "histogram_buckets_ms=1,10,100", "counter_latencies=false"])
    assert config.summary_latencies and not config.counter_latencies and config.per_request
    assert config.quantiles == (0.5, 0.99) and config.buckets_ms == (1.0, 10.0, 100.0)
    for bad in ("nope=1", "summary_latencies=maybe", "summary_quantiles=2", "histogram_buckets_ms=-1", "novalue"):
        with pytest.raises(ValueError):
            parse_metrics_config([bad])
    family = Family("nv_inference_count", "help", "counter")
    family.sample((("model", 'we"ird\\name\n'), ("version", "1")), 3)
    parsed = list(text_string_to_metric_families(render([family])))
    assert parsed[0].samples[0].labels["model"] == 'we"ird\\name\n'
