"""The dynamic batcher through the real gRPC path (tritonclient): correctness under concurrency,
batches in ModelStatistics, queue full, queue timeouts, priorities, cancellation, shapes.

One private server holds a model per test, so statistics and queues never mix. The identity
backend's `execute_delay_ms` keeps an instance busy so later requests really wait in the queue.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aioclient
from tritonclient.utils import InferenceServerException
from util import MODEL_REPOSITORY, ServerProcess, client, identity_config, scaled, write_model

MAX_BATCH = 16
DELAY_US = 200_000


def batching(body: str = "") -> str:
    return f"dynamic_batching {{ {body} }}\n"


def model_defs() -> dict[str, str]:
    pair = [("INPUT0", "FP32", [8]), ("INPUT1", "INT32", [3])]
    single = [("INPUT0", "FP32", [4])]
    return {
        "db_many": identity_config("db_many", pair, MAX_BATCH, execute_delay_ms=20, instance_count=2,
                                   extra=batching()),
        "db_full": identity_config("db_full", single, 4, execute_delay_ms=200, instance_count=1,
                                   extra=batching("default_queue_policy { max_queue_size: 2 }")),
        "db_timeout": identity_config("db_timeout", single, 4, execute_delay_ms=300, instance_count=1, extra=batching(
            "default_queue_policy { timeout_action: REJECT default_timeout_microseconds: 50000 }")),
        "db_override": identity_config("db_override", single, 4, execute_delay_ms=300, instance_count=1,
                                       extra=batching(
            "default_queue_policy { timeout_action: REJECT default_timeout_microseconds: 10000000 "
            "allow_timeout_override: true }")),
        "db_no_override": identity_config("db_no_override", single, 4, execute_delay_ms=300, instance_count=1,
                                          extra=batching("default_queue_policy { timeout_action: REJECT }")),
        "db_prio": identity_config("db_prio", single, 1, execute_delay_ms=150, instance_count=1,
                                   extra=batching("priority_levels: 2 default_priority_level: 2")),
        "db_cancel": identity_config("db_cancel", single, 8, execute_delay_ms=300, instance_count=1,
                                     extra=batching()),
        # Four instances, so one is always free: only the queue delay can put requests together.
        "db_delay": identity_config("db_delay", single, 8, execute_delay_ms=10, instance_count=4,
                                    extra=batching(f"max_queue_delay_microseconds: {DELAY_US}")),
        "db_ragged": identity_config("db_ragged", [("INPUT0", "FP32", [-1])], 8, execute_delay_ms=10,
                                     instance_count=1, extra=batching("max_queue_delay_microseconds: 20000")),
    }


MLP_BATCHED = ("dynamic_batching { max_queue_delay_microseconds: 2000 }\n"
               "instance_group [ { kind: KIND_CPU count: 2 } ]\n")


def add_batched_mlp(repo: Path) -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    shutil.copytree(MODEL_REPOSITORY / "mlp", repo / "mlp")
    config = repo / "mlp" / "config.pbtxt"
    config.write_text(config.read_text() + MLP_BATCHED)
    return True


@pytest.fixture(scope="module")
def db_server(tmp_path_factory: pytest.TempPathFactory):
    repo = tmp_path_factory.mktemp("dynamic_batching_repo")
    for name, config in model_defs().items():
        write_model(repo, name, config)
    add_batched_mlp(repo)
    srv = ServerProcess([repo])
    yield srv
    srv.stop()


# --------------------------------------------------------------------------- helpers


def fp32_input(data: np.ndarray, name: str = "INPUT0") -> grpcclient.InferInput:
    inp = grpcclient.InferInput(name, list(data.shape), "FP32")
    inp.set_data_from_numpy(data)
    return inp


def model_stats(srv: ServerProcess, name: str):
    c = client(srv)
    try:
        return c.get_inference_statistics(name).model_stats[0]
    finally:
        c.close()


def check_batch_stats(stats) -> dict[int, int]:
    """batch_stats agree with the totals; returns {batch size: executions}."""
    executions = {b.batch_size: b.compute_infer.count for b in stats.batch_stats}
    assert sum(executions.values()) == stats.execution_count, stats
    assert sum(size * n for size, n in executions.items()) == stats.inference_count, stats
    return executions


async def infer_outcome(c: aioclient.InferenceServerClient, model: str, data: np.ndarray, **kwargs):
    """(result, None) or (None, InferenceServerException)."""
    try:
        return await c.infer(model, [fp32_input(data)], **kwargs), None
    except InferenceServerException as exc:
        return None, exc


def concurrent_outcomes(srv: ServerProcess, model: str, cases: list[np.ndarray]) -> list:
    """Send every case at once from one aio client: [(result, None) or (None, exception)], in order."""
    async def main() -> list:
        c = aioclient.InferenceServerClient(srv.url)
        try:
            return await asyncio.gather(*(infer_outcome(c, model, x, client_timeout=scaled(30)) for x in cases))
        finally:
            await c.close()

    return asyncio.run(main())


def status(exc: InferenceServerException) -> str:
    return str(exc.status()).replace("StatusCode.", "")


# --------------------------------------------------------------------------- correctness under concurrency


def test_concurrent_mixed_batch_sizes_identity(db_server: ServerProcess) -> None:
    n = 200
    rng = np.random.default_rng(42)
    sizes = rng.integers(1, 5, size=n)
    cases = [(rng.standard_normal((int(b), 8)).astype(np.float32),
              rng.integers(-(2**31), 2**31 - 1, size=(int(b), 3), dtype=np.int32)) for b in sizes]

    async def one(c: aioclient.InferenceServerClient, index: int) -> None:
        a, b = cases[index]
        second = grpcclient.InferInput("INPUT1", list(b.shape), "INT32")
        second.set_data_from_numpy(b)
        result = await c.infer("db_many", [fp32_input(a), second], request_id=f"r{index}", client_timeout=30)
        assert result.get_response().id == f"r{index}"
        np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a, err_msg=f"request {index}")
        np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), b, err_msg=f"request {index}")

    async def main() -> None:
        c = aioclient.InferenceServerClient(db_server.url)
        try:
            await asyncio.gather(*(one(c, i) for i in range(n)))
        finally:
            await c.close()

    asyncio.run(main())
    stats = model_stats(db_server, "db_many")
    assert stats.inference_count == int(sizes.sum())
    assert stats.inference_stats.success.count == n
    assert stats.execution_count < n, "no batches formed"
    executions = check_batch_stats(stats)
    assert max(executions) > 1, executions
    assert max(executions) <= MAX_BATCH


def test_concurrent_mlp_matches_onnxruntime_per_request(db_server: ServerProcess, mlp_session) -> None:
    n = 200
    rng = np.random.default_rng(7)
    inputs = [rng.standard_normal((int(b), 64)).astype(np.float32) for b in rng.integers(1, 5, size=n)]

    async def main() -> list:
        c = aioclient.InferenceServerClient(db_server.url)
        try:
            return await asyncio.gather(*(c.infer("mlp", [fp32_input(x)], client_timeout=30) for x in inputs))
        finally:
            await c.close()

    results = asyncio.run(main())
    for index, (x, result) in enumerate(zip(inputs, results, strict=True)):
        expected = mlp_session.run(None, {"INPUT0": x})[0]
        np.testing.assert_allclose(result.as_numpy("OUTPUT0"), expected, rtol=0, atol=1e-5,
                                   err_msg=f"request {index} (batch {x.shape[0]})")
    stats = model_stats(db_server, "mlp")
    assert stats.inference_count == sum(x.shape[0] for x in inputs)
    assert stats.execution_count < n
    executions = check_batch_stats(stats)
    assert max(executions) > 1, executions


def test_different_non_batch_dims_are_never_merged(db_server: ServerProcess) -> None:
    """Requests of lengths 3, 5 and 7 arrive together; merging two lengths would fail the
    concatenation, so every answer being right (and no failures) shows they never merged."""
    n = 60
    rng = np.random.default_rng(3)
    cases = [rng.standard_normal((int(rng.integers(1, 3)), int(rng.choice([3, 5, 7])))).astype(np.float32)
             for _ in range(n)]

    outcomes = concurrent_outcomes(db_server, "db_ragged", cases)
    for index, (x, (result, error)) in enumerate(zip(cases, outcomes, strict=True)):
        assert error is None, f"request {index} {list(x.shape)}: {error}"
        np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), x, err_msg=f"request {index}")
    stats = model_stats(db_server, "db_ragged")
    assert stats.inference_stats.fail.count == 0
    assert stats.inference_count == sum(x.shape[0] for x in cases)
    executions = check_batch_stats(stats)
    assert stats.execution_count >= 3  # at least one execution per length
    assert max(executions) > 1, executions  # equal lengths did batch


def test_queue_delay_forms_batches_at_low_concurrency(db_server: ServerProcess) -> None:
    """Four clients, each sending its requests one after another, started 20 ms apart, to a model
    with four instances (one always free) and a 200 ms max_queue_delay: without the delay every
    request would run alone as it arrives (10 ms of work, 20 ms apart); with it, requests wait for
    each other and run together, as ModelStatistics shows."""
    clients, rounds = 4, 3
    rng = np.random.default_rng(17)
    cases = {(i, r): rng.standard_normal((1, 4)).astype(np.float32) for i in range(clients) for r in range(rounds)}

    async def one_client(index: int) -> None:
        await asyncio.sleep(0.02 * index)
        c = aioclient.InferenceServerClient(db_server.url)
        try:
            for r in range(rounds):
                data = cases[(index, r)]
                result = await c.infer("db_delay", [fp32_input(data)], client_timeout=scaled(30))
                np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), data, err_msg=f"client {index} round {r}")
        finally:
            await c.close()

    async def main() -> None:
        await asyncio.gather(*(one_client(i) for i in range(clients)))

    asyncio.run(main())
    stats = model_stats(db_server, "db_delay")
    assert stats.inference_stats.success.count == clients * rounds
    assert stats.inference_count == clients * rounds
    executions = check_batch_stats(stats)
    assert stats.execution_count < stats.inference_count, executions
    assert max(executions) > 1, f"no batch formed within the queue delay: {executions}"


# --------------------------------------------------------------------------- queue policies


def test_queue_full_rejects_with_unavailable(db_server: ServerProcess) -> None:
    n = 10
    rng = np.random.default_rng(11)
    cases = [rng.standard_normal((1, 4)).astype(np.float32) for _ in range(n)]

    outcomes = concurrent_outcomes(db_server, "db_full", cases)
    ok = [i for i, (result, _) in enumerate(outcomes) if result is not None]
    rejected = [error for _, error in outcomes if error is not None]
    assert rejected, "no request was rejected with max_queue_size 2"
    for error in rejected:
        assert status(error) == "UNAVAILABLE", error
        assert "Exceeds maximum queue size" in error.message(), error
    assert len(ok) >= 2
    for i in ok:
        np.testing.assert_array_equal(outcomes[i][0].as_numpy("OUTPUT0"), cases[i])


async def blocked_then(srv: ServerProcess, model: str, followers: list[dict], gap: float = 0.05) -> list:
    """Start one request that occupies the model's only instance, then (after `gap`) the
    followers, which therefore wait in the queue. Returns [blocker outcome, *follower outcomes]."""
    c = aioclient.InferenceServerClient(srv.url)
    rng = np.random.default_rng(0)
    try:
        blocker = asyncio.create_task(infer_outcome(c, model, rng.standard_normal((1, 4)).astype(np.float32),
                                                    client_timeout=30))
        await asyncio.sleep(gap)
        rest = asyncio.gather(*(infer_outcome(c, model, rng.standard_normal((1, 4)).astype(np.float32), **kwargs)
                                for kwargs in followers))
        return [await blocker, *await rest]
    finally:
        await c.close()


def test_default_queue_timeout_reject(db_server: ServerProcess) -> None:
    (blocker, _), (result, error) = asyncio.run(blocked_then(db_server, "db_timeout", [{"client_timeout": 30}]))
    assert blocker is not None
    assert result is None and error is not None
    assert status(error) == "UNAVAILABLE", error
    assert "Request timeout expired" in error.message()


def test_request_timeout_parameter_overrides_when_allowed(db_server: ServerProcess) -> None:
    outcomes = asyncio.run(blocked_then(db_server, "db_override", [
        {"timeout": 50_000, "client_timeout": 30},  # 50 ms < the 10 s default: applies
        {"client_timeout": 30},  # the default (10 s) is long enough
        {"timeout": 60_000_000, "client_timeout": 30},  # longer than the default: default stays
    ]))
    (blocker, _), (short, short_error), (plain, plain_error), (long, long_error) = outcomes
    assert blocker is not None
    assert short is None and short_error is not None
    assert status(short_error) == "UNAVAILABLE", short_error
    assert "Request timeout expired" in short_error.message()
    assert plain_error is None and plain is not None
    assert long_error is None and long is not None


def test_request_timeout_parameter_ignored_without_allow_timeout_override(db_server: ServerProcess) -> None:
    (blocker, _), (result, error) = asyncio.run(blocked_then(
        db_server, "db_no_override", [{"timeout": 50_000, "client_timeout": 30}]))
    assert blocker is not None
    assert error is None, error  # waited ~250 ms in the queue, but the override is not allowed


# --------------------------------------------------------------------------- priorities


def test_high_priority_request_overtakes_queued_low_priority_ones(db_server: ServerProcess) -> None:
    finished: list[str] = []

    async def tagged(c: aioclient.InferenceServerClient, tag: str, priority: int) -> None:
        data = np.full((1, 4), len(finished), np.float32)
        result = await c.infer("db_prio", [fp32_input(data)], priority=priority, request_id=tag, client_timeout=30)
        assert result.get_response().id == tag
        finished.append(tag)

    async def main() -> None:
        c = aioclient.InferenceServerClient(db_server.url)
        try:
            tasks = [asyncio.create_task(tagged(c, "blocker", 0))]
            await asyncio.sleep(0.04)  # the blocker runs (150 ms); everything below queues
            for tag in ("low1", "low2", "low3"):
                tasks.append(asyncio.create_task(tagged(c, tag, 2)))
                await asyncio.sleep(0.01)
            tasks.append(asyncio.create_task(tagged(c, "high", 1)))
            await asyncio.gather(*tasks)
        finally:
            await c.close()

    started = time.monotonic()
    asyncio.run(main())
    assert time.monotonic() - started < scaled(10)
    assert finished == ["blocker", "high", "low1", "low2", "low3"]


def test_priority_out_of_range_is_invalid_argument(db_server: ServerProcess) -> None:
    c = client(db_server)
    try:
        with pytest.raises(InferenceServerException) as info:
            c.infer("db_prio", [fp32_input(np.zeros((1, 4), np.float32))], priority=3, client_timeout=30)
    finally:
        c.close()
    assert status(info.value) == "INVALID_ARGUMENT", info.value
    assert "priority" in info.value.message()


# --------------------------------------------------------------------------- cancellation


def test_request_whose_client_deadline_passed_in_the_queue_never_runs(db_server: ServerProcess) -> None:
    async def main() -> list:
        c = aioclient.InferenceServerClient(db_server.url)
        rng = np.random.default_rng(5)
        try:
            blocker = asyncio.create_task(infer_outcome(
                c, "db_cancel", rng.standard_normal((1, 4)).astype(np.float32), client_timeout=30))
            await asyncio.sleep(0.05)
            # queued behind the 300 ms blocker; its client gives up after 100 ms
            victim = await infer_outcome(c, "db_cancel", rng.standard_normal((2, 4)).astype(np.float32),
                                         client_timeout=0.1)
            first = await blocker
            # the instance is free again: it must skip the abandoned request
            after = await infer_outcome(c, "db_cancel", rng.standard_normal((1, 4)).astype(np.float32),
                                        client_timeout=30)
            return [first, victim, after]
        finally:
            await c.close()

    (first, first_error), (victim, victim_error), (after, after_error) = asyncio.run(main())
    assert first_error is None and after_error is None
    assert victim is None and status(victim_error) == "DEADLINE_EXCEEDED", victim_error
    stats = model_stats(db_server, "db_cancel")
    # blocker (1 item) + the later request (1 item); the abandoned one (2 items) never reached the model
    assert stats.inference_count == 2, stats
    assert stats.execution_count == 2, stats
    check_batch_stats(stats)
