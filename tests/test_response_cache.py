"""Triton's response cache (docs/RESPONSE_CACHE.md) through a real server and tritonclient gRPC.

Executions are counted with ModelStatistics (execution_count moves only when the model runs),
so "served from the cache" is observed, not assumed.
"""

from __future__ import annotations

import re
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException
from util import ServerProcess, client, identity_config, python_config, scaled, write_model

CACHE = 'response_cache { enable: true }\n'
SLOW_MS = 300

# Output = input * 2 + the request parameter "offset"; a negative first element fails (after 0.3 s
# when it is below -3).
PY_MODEL = b'''
import json
import time
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            x = pb_utils.get_input_tensor_by_name(request, "INPUT0").as_numpy()
            if x[0] < 0:
                time.sleep(0.3 if x[0] < -3 else 0)  # slow failures overlap with their twins
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError("negative input")))
                continue
            offset = float(json.loads(request.parameters() or "{}").get("offset", 0))
            out = (x * 2 + offset).astype(np.float32)
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("OUTPUT0", out)]))
        return responses
'''


def _repo(tmp_path_factory: pytest.TempPathFactory):
    repo = tmp_path_factory.mktemp("cache_repo")
    write_model(repo, "cached", identity_config("cached", [("INPUT0", "FP32", [-1])], extra=CACHE))
    write_model(repo, "uncached", identity_config("uncached", [("INPUT0", "FP32", [-1])]))
    write_model(repo, "slow", identity_config("slow", [("INPUT0", "FP32", [-1])], execute_delay_ms=SLOW_MS,
                                              instance_count=4, extra=CACHE))
    write_model(repo, "two", identity_config("two", [("INPUT0", "FP32", [-1]), ("INPUT1", "BYTES", [-1])],
                                             extra=CACHE))
    write_model(repo, "grid", identity_config("grid", [("INPUT0", "FP32", [-1, -1])], extra=CACHE))
    write_model(repo, "pycache", python_config("pycache", CACHE), files={"1/model.py": PY_MODEL})
    return repo


@pytest.fixture(scope="module")
def cache_server(tmp_path_factory: pytest.TempPathFactory) -> ServerProcess:
    srv = ServerProcess([_repo(tmp_path_factory)],
                        ["--cache-config", "local,size=1048576"])
    yield srv
    srv.stop()


def stats(srv: ServerProcess, name: str):
    return client(srv).get_inference_statistics(name).model_stats[0]


def fp32(values, name: str = "INPUT0") -> grpcclient.InferInput:
    data = np.asarray(values, dtype=np.float32)
    inp = grpcclient.InferInput(name, list(data.shape), "FP32")
    inp.set_data_from_numpy(data)
    return inp


def infer(srv: ServerProcess, model: str, values, **kwargs) -> np.ndarray:
    return client(srv).infer(model, [fp32(values)], **kwargs).as_numpy("OUTPUT0")


def metric(srv: ServerProcess, name: str, model: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{srv.metrics_port}/metrics", timeout=10).read().decode()
    match = re.search(rf'^{name}{{model="{model}",version="1"}} (\S+)$', text, re.M)
    assert match, f"{name} for {model} not in metrics:\n{text}"
    return float(match.group(1))


def test_hit_returns_identical_outputs_and_counts(cache_server: ServerProcess) -> None:
    values = np.arange(64, dtype=np.float32) / 7
    first = infer(cache_server, "cached", values)
    s = stats(cache_server, "cached")
    assert (s.execution_count, s.inference_stats.cache_miss.count, s.inference_stats.cache_hit.count) == (1, 1, 0)
    for _ in range(3):
        again = infer(cache_server, "cached", values)
        assert again.tobytes() == first.tobytes() and again.dtype == first.dtype and again.shape == first.shape
    s = stats(cache_server, "cached")
    assert s.execution_count == 1  # the model ran once
    assert s.inference_count == 1  # cached requests are not inferences (as Triton)
    i = s.inference_stats
    assert i.cache_hit.count == 3 and i.cache_hit.ns > 0
    assert i.cache_miss.count == 1 and i.cache_miss.ns > 0
    assert i.success.count == 4
    assert i.compute_infer.count == 1  # compute is not recorded for hits
    assert metric(cache_server, "nv_cache_num_hits_per_model", "cached") == 3
    assert metric(cache_server, "nv_cache_num_misses_per_model", "cached") == 1
    assert metric(cache_server, "nv_cache_hit_duration_per_model", "cached") >= 0
    assert metric(cache_server, "nv_cache_miss_duration_per_model", "cached") >= 0


def test_model_without_cache_enabled_always_runs(cache_server: ServerProcess) -> None:
    for _ in range(3):
        infer(cache_server, "uncached", [1.0, 2.0])
    s = stats(cache_server, "uncached")
    assert s.execution_count == 3
    assert s.inference_stats.cache_hit.count == 0 and s.inference_stats.cache_miss.count == 0


def test_different_inputs_miss(cache_server: ServerProcess) -> None:
    base = stats(cache_server, "two")
    runs = base.execution_count

    def call(values, texts, shape=None):
        x = fp32(values)
        data = np.array(texts, dtype=np.object_)
        if shape is not None:
            x = grpcclient.InferInput("INPUT0", shape, "FP32")
            x.set_data_from_numpy(np.asarray(values, dtype=np.float32).reshape(shape))
        t = grpcclient.InferInput("INPUT1", list(data.shape), "BYTES")
        t.set_data_from_numpy(data)
        return client(cache_server).infer("two", [x, t])

    call([1, 2, 3, 4], [b"ab", b"c"])
    call([1, 2, 3, 4], [b"ab", b"c"])  # hit
    call([1, 2, 3, 5], [b"ab", b"c"])  # one value differs
    call([1, 2, 3, 4], [b"a", b"bc"])  # same bytes joined, other elements
    call([1, 2, 3, 4, 0], [b"ab", b"c"])  # another shape
    result = client(cache_server).infer("two", [fp32([1, 2, 3, 4]), _bytes_input([b"ab", b"c"])],
                                        outputs=[grpcclient.InferRequestedOutput("OUTPUT1")])
    assert result.as_numpy("OUTPUT0") is None  # other requested outputs: a miss with its own answer
    s = stats(cache_server, "two")
    assert s.execution_count - runs == 5
    assert s.inference_stats.cache_hit.count - base.inference_stats.cache_hit.count == 1


def test_same_bytes_other_shape_misses(cache_server: ServerProcess) -> None:
    """Triton hashes only the bytes; here the shape is part of the key, so a [1,4] request after
    a [2,2] one with the same bytes gets its own [1,4] answer."""
    data = np.arange(4, dtype=np.float32)
    square = infer(cache_server, "grid", data.reshape(2, 2))
    row = infer(cache_server, "grid", data.reshape(1, 4))
    assert square.shape == (2, 2) and row.shape == (1, 4)
    assert stats(cache_server, "grid").execution_count == 2


def _bytes_input(items) -> grpcclient.InferInput:
    data = np.array(items, dtype=np.object_)
    t = grpcclient.InferInput("INPUT1", list(data.shape), "BYTES")
    t.set_data_from_numpy(data)
    return t


def test_parameters_are_part_of_the_key_and_failures_are_not_cached(cache_server: ServerProcess) -> None:
    x = [1.0, 2.0, 3.0, 4.0]
    a = infer(cache_server, "pycache", x, parameters={"offset": 1})
    b = infer(cache_server, "pycache", x, parameters={"offset": 10})
    np.testing.assert_array_equal(a, np.float32([3, 5, 7, 9]))
    np.testing.assert_array_equal(b, np.float32([12, 14, 16, 18]))
    again = infer(cache_server, "pycache", x, parameters={"offset": 10}, priority=0)
    np.testing.assert_array_equal(again, b)
    s = stats(cache_server, "pycache")
    assert s.execution_count == 2 and s.inference_stats.cache_hit.count == 1
    for _ in range(2):
        with pytest.raises(InferenceServerException, match="negative input"):
            infer(cache_server, "pycache", [-1.0, 0, 0, 0])
    s = stats(cache_server, "pycache")
    assert s.inference_stats.fail.count == 2  # the failed request ran both times: nothing was cached
    assert s.inference_stats.cache_hit.count == 1 and s.inference_stats.cache_miss.count == 2


def test_concurrent_identical_requests_run_once(cache_server: ServerProcess) -> None:
    values = np.random.default_rng(7).standard_normal(256).astype(np.float32)
    before = stats(cache_server, "slow")
    n = 8
    with ThreadPoolExecutor(n) as pool:
        outs = list(pool.map(lambda _: infer(cache_server, "slow", values), range(n)))
    for out in outs:
        assert out.tobytes() == values.tobytes()
    after = stats(cache_server, "slow")
    assert after.execution_count - before.execution_count == 1  # one computation, eight answers
    assert after.inference_stats.cache_hit.count - before.inference_stats.cache_hit.count == n - 1
    assert after.inference_stats.cache_miss.count - before.inference_stats.cache_miss.count == 1


def test_concurrent_identical_failures_are_not_shared(cache_server: ServerProcess) -> None:
    """Waiters on a computation that fails run again themselves: each gets its own error."""
    before = stats(cache_server, "pycache").inference_stats.fail.count
    n = 4

    def call(_: int) -> str:
        try:
            infer(cache_server, "pycache", [-5.0, 1, 1, 1])
        except InferenceServerException as exc:
            return exc.message()
        return "no error"

    with ThreadPoolExecutor(n) as pool:
        messages = list(pool.map(call, range(n)))
    assert all("negative input" in m for m in messages), messages
    assert stats(cache_server, "pycache").inference_stats.fail.count - before == n


def test_hit_vs_miss_latency_printed(cache_server: ServerProcess) -> None:
    """Printed for the docs, not asserted: a miss on `slow` runs the model (SLOW_MS), a hit does not."""
    c = client(cache_server)
    values = np.random.default_rng(11).standard_normal(1024).astype(np.float32)
    start = time.perf_counter()
    c.infer("slow", [fp32(values)])
    miss_ms = (time.perf_counter() - start) * 1000
    hits = []
    for _ in range(20):
        start = time.perf_counter()
        c.infer("slow", [fp32(values)])
        hits.append((time.perf_counter() - start) * 1000)
    print(f"\nresponse cache, 4 KiB FP32 identity with {SLOW_MS} ms delay: miss {miss_ms:.2f} ms, "
          f"hit p50 {np.median(hits):.3f} ms (of 20)")


def test_eviction_by_size(tmp_path_factory: pytest.TempPathFactory) -> None:
    """A 10 KiB cache holds two 4 KiB results: a third evicts the least recently used."""
    repo = tmp_path_factory.mktemp("evict_repo")
    write_model(repo, "cached", identity_config("cached", [("INPUT0", "FP32", [-1])], extra=CACHE))
    srv = ServerProcess([repo], ["--response-cache-byte-size", str(10 * 1024)])
    try:
        a, b, c = (np.full(1024, v, dtype=np.float32) for v in (1, 2, 3))

        def runs() -> int:
            return stats(srv, "cached").execution_count

        infer(srv, "cached", a)
        infer(srv, "cached", b)
        assert runs() == 2
        infer(srv, "cached", a)  # hit; a is now the most recently used
        assert runs() == 2
        infer(srv, "cached", c)  # evicts b
        assert runs() == 3
        infer(srv, "cached", a)
        assert runs() == 3
        infer(srv, "cached", b)  # evicted: runs again
        assert runs() == 4
        too_big = np.zeros(4096, dtype=np.float32)  # 16 KiB: never kept
        infer(srv, "cached", too_big)
        infer(srv, "cached", too_big)
        assert runs() == 6
    finally:
        srv.stop()


def test_decoupled_model_with_cache_is_refused(tmp_path_factory: pytest.TempPathFactory) -> None:
    repo = tmp_path_factory.mktemp("decoupled_cache_repo")
    write_model(repo, "ok", identity_config("ok", [("INPUT0", "FP32", [-1])], extra=CACHE))
    write_model(repo, "dec", python_config("dec", CACHE + "model_transaction_policy { decoupled: true }\n"),
                files={"1/model.py": PY_MODEL})
    srv = ServerProcess([repo], ["--cache-config=local,size=65536", "--strict-readiness", "false"])
    try:
        index = {m.name: m for m in client(srv).get_model_repository_index().models}
        assert index["ok"].state == "READY"
        assert index["dec"].state == "UNAVAILABLE"
        assert "Response Cache does not currently support model dec with 'decoupled'" in index["dec"].reason
    finally:
        srv.stop()


def test_cache_enabled_model_on_a_server_without_cache_runs_uncached(tmp_path_factory: pytest.TempPathFactory) -> None:
    repo = tmp_path_factory.mktemp("nocache_repo")
    write_model(repo, "cached", identity_config("cached", [("INPUT0", "FP32", [-1])], extra=CACHE))
    srv = ServerProcess([repo])
    try:
        for _ in range(2):
            infer(srv, "cached", [1.0])
        s = stats(srv, "cached")
        assert s.execution_count == 2 and s.inference_stats.cache_hit.count == 0
        assert "has no cache" in srv.log
    finally:
        srv.stop()


@pytest.mark.parametrize("args, message", [
    (["--cache-config", "local,size=1024", "--response-cache-byte-size", "1024"], "Incompatible flags"),
    (["--cache-config", "local,size=1024", "--cache-config", "redis,host=x"], "multiple cache configurations"),
    (["--cache-config", "local,sise=1024"], "unknown setting"),
    (["--cache-config", "local"], "option format"),
])
def test_bad_cache_flags_refused(args: list[str], message: str, tmp_path) -> None:
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "server.cli", "--model-repository", str(tmp_path), "--http-port", "0",
                           "--metrics-port", "0", *args],
                          capture_output=True, text=True, timeout=scaled(60))
    assert proc.returncode != 0
    assert message in proc.stderr, proc.stderr


