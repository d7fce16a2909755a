"""ModelStatistics: counts and durations move as Triton defines them.

inference_count counts batch items, execution_count backend executions; without a
dynamic batcher every request is one execution. A private server keeps counts exact.
Every test runs over gRPC and over HTTP/REST, with the same counts expected.
"""

from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from transports import TRANSPORTS, open_stub
from tritonclient.grpc import service_pb2 as pb
from util import ServerProcess, client, identity_config, output_array, raw_request, scaled, write_model

DELAY_MS = 5
MS = 1_000_000


@pytest.fixture(scope="module", params=TRANSPORTS)
def transport(request: pytest.FixtureRequest) -> str:
    """Every test runs over gRPC and over HTTP/REST (transports.py), each on its own server so
    the counts stay exact."""
    return request.param


@pytest.fixture(scope="module")
def stats_server(tmp_path_factory, transport: str) -> ServerProcess:
    repo = tmp_path_factory.mktemp("stats_repo")
    write_model(repo, "stats", identity_config("stats", [("INPUT0", "FP32", [2])], max_batch_size=8,
                                               execute_delay_ms=DELAY_MS))
    write_model(repo, "stats_nobatch", identity_config("stats_nobatch", [("INPUT0", "FP32", [-1])],
                                                       execute_delay_ms=DELAY_MS))
    write_model(repo, "stats_queue", identity_config("stats_queue", [("INPUT0", "FP32", [2])], max_batch_size=8,
                                                     execute_delay_ms=DELAY_MS))
    write_model(repo, "stats_idle", identity_config("stats_idle", [("INPUT0", "FP32", [2])]))
    srv = ServerProcess([repo])
    yield srv
    srv.stop()


def all_stats(srv: ServerProcess, transport: str, name: str = "", version: str = ""):
    with open_stub(srv, transport) as stub:
        return stub.ModelStatistics(pb.ModelStatisticsRequest(name=name, version=version), timeout=10)


def model_stats(srv: ServerProcess, transport: str, name: str, version: str = ""):
    response = all_stats(srv, transport, name, version)
    assert len(response.model_stats) == 1, response
    return response.model_stats[0]


def infer(srv: ServerProcess, transport: str, name: str, shape: list[int]) -> None:
    data = np.random.default_rng(sum(shape)).standard_normal(shape).astype(np.float32)
    request = raw_request(name, [("INPUT0", "FP32", data)])
    with open_stub(srv, transport) as stub:
        response = stub.ModelInfer(request, timeout=10)
    np.testing.assert_array_equal(output_array(response, 0), data)


def test_fresh_model_has_zero_statistics(stats_server: ServerProcess, transport: str) -> None:
    stats = model_stats(stats_server, transport, "stats_idle")
    assert stats.name == "stats_idle"
    assert stats.version == "1"
    assert stats.inference_count == 0
    assert stats.execution_count == 0
    assert stats.last_inference == 0
    infer_stats = stats.inference_stats
    for field in ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output"):
        assert getattr(infer_stats, field).count == 0, field
        assert getattr(infer_stats, field).ns == 0, field
    assert len(stats.batch_stats) == 0


def test_counts_and_durations_after_batched_requests(stats_server: ServerProcess, transport: str) -> None:
    batches = [1, 3, 2, 3, 1, 8]
    before_ms = int(time.time() * 1000)
    for batch in batches:
        infer(stats_server, transport, "stats", [batch, 2])
    after_ms = int(time.time() * 1000)
    stats = model_stats(stats_server, transport, "stats")
    n = len(batches)
    assert stats.inference_count == sum(batches)  # batch items
    assert stats.execution_count == n  # one execution per request without a dynamic batcher
    slack_ms = scaled(1000)
    assert before_ms - slack_ms <= stats.last_inference <= after_ms + slack_ms
    s = stats.inference_stats
    assert s.success.count == n
    assert s.fail.count == 0
    for field in ("queue", "compute_input", "compute_infer", "compute_output"):
        assert getattr(s, field).count == n, field
    assert s.compute_infer.ns >= n * DELAY_MS * MS  # each execution sleeps DELAY_MS
    assert s.success.ns >= s.compute_infer.ns
    assert s.success.ns >= s.queue.ns
    by_size = {b.batch_size: b for b in stats.batch_stats}
    assert sorted(by_size) == sorted(set(batches))
    for size, entry in by_size.items():
        count = batches.count(size)
        assert entry.compute_infer.count == count, size
        assert entry.compute_input.count == count, size
        assert entry.compute_output.count == count, size
        assert entry.compute_infer.ns >= count * DELAY_MS * MS, size

    # Counters are cumulative: two more requests move them by exactly that much.
    infer(stats_server, transport, "stats", [4, 2])
    infer(stats_server, transport, "stats", [1, 2])
    later = model_stats(stats_server, transport, "stats")
    assert later.inference_count == sum(batches) + 5
    assert later.execution_count == n + 2
    assert later.inference_stats.success.count == n + 2
    assert later.inference_stats.compute_infer.ns > s.compute_infer.ns
    later_by_size = {b.batch_size: b.compute_infer.count for b in later.batch_stats}
    assert later_by_size[4] == 1
    assert later_by_size[1] == batches.count(1) + 1


def test_non_batching_model_counts_one_item_per_request(stats_server: ServerProcess, transport: str) -> None:
    for length in (1, 5, 9):
        infer(stats_server, transport, "stats_nobatch", [length])
    stats = model_stats(stats_server, transport, "stats_nobatch")
    assert stats.inference_count == 3
    assert stats.execution_count == 3
    assert stats.inference_stats.success.count == 3
    assert [(b.batch_size, b.compute_infer.count) for b in stats.batch_stats] == [(1, 3)]


def test_queue_time_counts_when_requests_wait(stats_server: ServerProcess, transport: str) -> None:
    """Eight concurrent requests on one instance: all but the first wait in the queue."""
    data = np.ones((1, 2), np.float32)
    if transport == "http":
        # Threads, each with its own client: tritonclient.http's `async_infer` goes through its
        # connection pool (`concurrency`, 1 by default), so on one client the requests leave one at
        # a time and never queue; the server serves concurrent connections concurrently (measured
        # in docs/HTTP.md, Conformance).
        def one(_: int) -> np.ndarray:
            c = httpclient.InferenceServerClient(stats_server.http_url, network_timeout=scaled(30))
            inp = httpclient.InferInput("INPUT0", [1, 2], "FP32")
            inp.set_data_from_numpy(data)
            start.wait(timeout=scaled(30))
            try:
                return c.infer("stats_queue", [inp]).as_numpy("OUTPUT0")
            finally:
                c.close()

        start = threading.Barrier(8)
        with ThreadPoolExecutor(8) as pool:
            for out in pool.map(one, range(8)):
                np.testing.assert_array_equal(out, data)
    else:
        results: queue.Queue = queue.Queue()
        g = client(stats_server)
        for _ in range(8):
            inp = grpcclient.InferInput("INPUT0", [1, 2], "FP32")
            inp.set_data_from_numpy(data)
            g.async_infer("stats_queue", [inp], callback=lambda result, error: results.put((result, error)))
        for _ in range(8):
            result, error = results.get(timeout=scaled(30))
            assert error is None, error
            np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), data)
    after = model_stats(stats_server, transport, "stats_queue")
    assert after.inference_stats.success.count == 8
    assert after.execution_count == 8
    queued_ns = after.inference_stats.queue.ns
    assert queued_ns >= 2 * DELAY_MS * MS, queued_ns


def test_statistics_of_all_models_and_by_version(stats_server: ServerProcess, transport: str) -> None:
    everything = all_stats(stats_server, transport)
    assert sorted(s.name for s in everything.model_stats) == ["stats", "stats_idle", "stats_nobatch", "stats_queue"]
    assert model_stats(stats_server, transport, "stats", "1").version == "1"

# (Unknown models and versions: the table of per-model RPC errors in test_metadata.py.)
