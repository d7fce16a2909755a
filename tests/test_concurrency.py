"""64 concurrent requests, each with its own random data, each gets its own correct answer."""

from __future__ import annotations

import asyncio
import queue

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aioclient
from util import ServerProcess, client, scaled

N = 64


def simple_case(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    batch = int(rng.integers(1, 9))
    a = rng.integers(-(2**24), 2**24, size=(batch, 16), dtype=np.int32)
    b = rng.integers(-(2**24), 2**24, size=(batch, 16), dtype=np.int32)
    return a, b


def simple_inputs(a: np.ndarray, b: np.ndarray) -> list[grpcclient.InferInput]:
    inputs = [grpcclient.InferInput("INPUT0", list(a.shape), "INT32"),
              grpcclient.InferInput("INPUT1", list(b.shape), "INT32")]
    inputs[0].set_data_from_numpy(a)
    inputs[1].set_data_from_numpy(b)
    return inputs


def mlp_input(x: np.ndarray) -> list[grpcclient.InferInput]:
    inp = grpcclient.InferInput("INPUT0", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    return [inp]


def test_64_async_infer_simple_sync_client(onnx_server: ServerProcess) -> None:
    rng = np.random.default_rng(1234)
    cases = [simple_case(rng) for _ in range(N)]
    done: queue.Queue = queue.Queue()
    c = client(onnx_server)
    for index, (a, b) in enumerate(cases):
        c.async_infer("simple", simple_inputs(a, b), request_id=str(index),
                      callback=lambda result, error, index=index: done.put((index, result, error)))
    seen = set()
    for _ in range(N):
        index, result, error = done.get(timeout=scaled(60))
        assert error is None, f"request {index}: {error}"
        assert result.get_response().id == str(index)
        a, b = cases[index]
        np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a + b, err_msg=f"request {index}")
        np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), a - b, err_msg=f"request {index}")
        seen.add(index)
    assert seen == set(range(N))
    c.close()


def test_64_concurrent_simple_aio_client(onnx_server: ServerProcess) -> None:
    rng = np.random.default_rng(5678)
    cases = [simple_case(rng) for _ in range(N)]

    async def run() -> list:
        async with aioclient.InferenceServerClient(onnx_server.url) as c:
            return await asyncio.gather(*(
                c.infer("simple", simple_inputs(a, b), request_id=f"aio-{i}") for i, (a, b) in enumerate(cases)
            ))

    results = asyncio.run(asyncio.wait_for(run(), 60))
    assert len(results) == N
    for index, ((a, b), result) in enumerate(zip(cases, results, strict=True)):
        assert result.get_response().id == f"aio-{index}"
        np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a + b, err_msg=f"request {index}")
        np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), a - b, err_msg=f"request {index}")


def _mlp_cases(seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((int(rng.integers(1, 17)), 64)).astype(np.float32) for _ in range(N)]


def test_64_async_infer_mlp_matches_onnxruntime(onnx_server: ServerProcess, mlp_session) -> None:
    cases = _mlp_cases(99)
    done: queue.Queue = queue.Queue()
    c = client(onnx_server)
    for index, x in enumerate(cases):
        c.async_infer("mlp", mlp_input(x), callback=lambda result, error, index=index: done.put((index, result, error)))
    for _ in range(N):
        index, result, error = done.get(timeout=scaled(60))
        assert error is None, f"request {index}: {error}"
        expected = mlp_session.run(["OUTPUT0"], {"INPUT0": cases[index]})[0]
        out = result.as_numpy("OUTPUT0")
        assert out.shape == (cases[index].shape[0], 16)
        np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5, err_msg=f"request {index}")
    c.close()


def test_64_concurrent_mlp_aio_client(onnx_server: ServerProcess, mlp_session) -> None:
    cases = _mlp_cases(77)

    async def run() -> list:
        async with aioclient.InferenceServerClient(onnx_server.url) as c:
            return await asyncio.gather(*(c.infer("mlp", mlp_input(x)) for x in cases))

    results = asyncio.run(asyncio.wait_for(run(), 60))
    for index, (x, result) in enumerate(zip(cases, results, strict=True)):
        expected = mlp_session.run(["OUTPUT0"], {"INPUT0": x})[0]
        np.testing.assert_allclose(result.as_numpy("OUTPUT0"), expected, rtol=1e-4, atol=1e-5,
                                   err_msg=f"request {index}")


def test_64_concurrent_identity_bytes_aio(identity_server: ServerProcess) -> None:
    rng = np.random.default_rng(31)
    cases = []
    for _ in range(N):
        items = [rng.bytes(int(n)) for n in rng.integers(0, 64, size=int(rng.integers(1, 10)))]
        arr = np.empty((1, len(items)), dtype=np.object_)
        arr[0, :] = items
        cases.append(arr)

    async def one(c, arr):
        inp = grpcclient.InferInput("IN", list(arr.shape), "BYTES")
        inp.set_data_from_numpy(arr)
        return await c.infer("id_BYTES", [inp])

    async def run() -> list:
        async with aioclient.InferenceServerClient(identity_server.url) as c:
            return await asyncio.gather(*(one(c, arr) for arr in cases))

    results = asyncio.run(asyncio.wait_for(run(), 60))
    for arr, result in zip(cases, results, strict=True):
        assert [bytes(v) for v in result.as_numpy("OUT").ravel()] == list(arr.ravel())
