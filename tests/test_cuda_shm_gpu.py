"""CUDA shared memory end to end on a real GPU, with tritonclient.utils.cuda_shared_memory over
gRPC and HTTP: register a region the client allocated (cudaMalloc + cudaIpcGetMemHandle), infer
with inputs and outputs in CUDA regions, status, unregister, and Triton's errors (bounds,
duplicate names, bad handles, the other kind's status).

Marked `gpu`: they skip with the reason where no CUDA device exists, and run on the GPU machine
through scripts/gpu_check (which installs cuda-python, needed by tritonclient's module). On a GPU
machine a missing cuda-python fails them loudly rather than skipping.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException
from util import ServerProcess, expect_error, identity_config, scaled, write_model

from server.core.placement import visible_gpus

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not visible_gpus(), reason="no CUDA device on this machine")]

A = np.arange(8, dtype=np.float32).reshape(2, 4)
B = np.arange(8, dtype=np.int32).reshape(2, 4) * 3


def _cudashm() -> Any:
    import tritonclient.utils.cuda_shared_memory as cudashm  # needs cuda-python: fails loudly without

    return cudashm


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    repo = tmp_path_factory.mktemp("cuda_shm_repo")
    write_model(repo, "pair", identity_config(
        "pair", [("INPUT0", "FP32", [4]), ("INPUT1", "INT32", [4])], max_batch_size=4))
    srv = ServerProcess([repo])
    yield srv
    srv.stop()


@pytest.fixture
def regions() -> Iterator[list[Any]]:
    """Device regions the test allocates (64 bytes each on device 0); freed afterwards."""
    made: list[Any] = []
    yield made
    for handle in made:
        _cudashm().destroy_shared_memory_region(handle)


def _region(made: list[Any], name: str, size: int = 64) -> Any:
    handle = _cudashm().create_shared_memory_region(name, size, 0)
    made.append(handle)
    return handle


def _contents(handle: Any) -> tuple[np.ndarray, np.ndarray]:
    raw = _cudashm().get_contents_as_numpy(handle, np.uint8, [64])
    return raw[:32].view(np.float32).reshape(2, 4), raw[32:].view(np.int32).reshape(2, 4)


def _requests(module: Any) -> tuple[list[Any], list[Any]]:
    in0 = module.InferInput("INPUT0", [2, 4], "FP32")
    in0.set_shared_memory("in", 32)
    in1 = module.InferInput("INPUT1", [2, 4], "INT32")
    in1.set_shared_memory("in", 32, offset=32)
    out0 = module.InferRequestedOutput("OUTPUT0")
    out0.set_shared_memory("out", 32)
    out1 = module.InferRequestedOutput("OUTPUT1")
    out1.set_shared_memory("out", 32, offset=32)
    return [in0, in1], [out0, out1]


def test_available_and_announced(server: ServerProcess) -> None:
    assert server.log.count("CUDA shared memory available through") == 1, server.log
    with grpcclient.InferenceServerClient(server.url) as c:
        assert "cuda_shared_memory" in c.get_server_metadata().extensions


def test_grpc_register_infer_status_unregister(server: ServerProcess, regions: list[Any]) -> None:
    cudashm = _cudashm()
    h_in, h_out = _region(regions, "in"), _region(regions, "out")
    cudashm.set_shared_memory_region(h_in, [A, B])  # A at 0, B at 32
    with grpcclient.InferenceServerClient(server.url) as c:
        c.register_cuda_shared_memory("in", cudashm.get_raw_handle(h_in), 0, 64)
        c.register_cuda_shared_memory("out", cudashm.get_raw_handle(h_out), 0, 64)
        try:
            inputs, outputs = _requests(grpcclient)
            result = c.infer("pair", inputs, outputs=outputs)
            out = result.get_output("OUTPUT0")
            assert out.datatype == "FP32" and list(out.shape) == [2, 4]
            got_a, got_b = _contents(h_out)
            np.testing.assert_array_equal(got_a, A)
            np.testing.assert_array_equal(got_b, B)

            status = c.get_cuda_shared_memory_status()
            assert {n: (r.device_id, r.byte_size) for n, r in status.regions.items()} == {"in": (0, 64), "out": (0, 64)}
            assert list(c.get_cuda_shared_memory_status("out").regions) == ["out"]
            err = expect_error("NOT_FOUND", c.get_system_shared_memory_status, "out")
            assert "registered as CUDA shared memory, not system shared memory" in err.message()
            c.unregister_system_shared_memory("out")  # the other kind's unregister leaves it alone
            assert "out" in c.get_cuda_shared_memory_status().regions

            c.unregister_cuda_shared_memory("in")
            assert list(c.get_cuda_shared_memory_status().regions) == ["out"]
            err = expect_error("NOT_FOUND", c.infer, "pair", inputs)
            assert "Unable to find shared memory region: 'in'" in err.message()
        finally:
            c.unregister_cuda_shared_memory()
        assert not c.get_cuda_shared_memory_status().regions


def test_grpc_errors(server: ServerProcess, regions: list[Any]) -> None:
    cudashm = _cudashm()
    h = _region(regions, "r")
    cudashm.set_shared_memory_region(h, [A, B])
    with grpcclient.InferenceServerClient(server.url) as c:
        handle = cudashm.get_raw_handle(h)
        err = expect_error("INVALID_ARGUMENT", c.register_cuda_shared_memory, "huge", handle, 0, 1 << 30)
        assert "failed to register shared memory region 'huge'" in err.message()
        err = expect_error("INVALID_ARGUMENT", c.register_cuda_shared_memory, "short", b"aGFuZGxl", 0, 64)
        assert "raw_handle must be a cudaIpcMemHandle_t's 64 bytes, got 6" in err.message()
        c.register_cuda_shared_memory("r", handle, 0, 64)
        try:
            err = expect_error("ALREADY_EXISTS", c.register_cuda_shared_memory, "r", handle, 0, 64)
            assert "shared memory region 'r' already in manager" in err.message()
            for offset, size, message in ((64, 32, "Invalid offset for shared memory region: 'r'"),
                                          (48, 32, "Invalid offset + byte size for shared memory region: 'r'")):
                inp = grpcclient.InferInput("INPUT0", [2, 4], "FP32")
                inp.set_shared_memory("r", size, offset=offset)
                other = grpcclient.InferInput("INPUT1", [2, 4], "INT32")
                other.set_data_from_numpy(B)
                err = expect_error("INVALID_ARGUMENT", c.infer, "pair", [inp, other])
                assert message in err.message()
            inp = grpcclient.InferInput("INPUT0", [2, 4], "FP32")
            inp.set_data_from_numpy(A)
            other = grpcclient.InferInput("INPUT1", [2, 4], "INT32")
            other.set_data_from_numpy(B)
            out = grpcclient.InferRequestedOutput("OUTPUT0")
            out.set_shared_memory("r", 16)  # 32 bytes of results do not fit in 16
            err = expect_error("INVALID_ARGUMENT", c.infer, "pair", [inp, other], outputs=[out])
            assert "should be at least 32 bytes to hold the results" in err.message()
        finally:
            c.unregister_cuda_shared_memory()


def test_http_register_infer_status_unregister(server: ServerProcess, regions: list[Any]) -> None:
    cudashm = _cudashm()
    h_in, h_out = _region(regions, "in"), _region(regions, "out")
    cudashm.set_shared_memory_region(h_in, [A, B])
    c = httpclient.InferenceServerClient(server.http_url, network_timeout=scaled(30))
    try:
        c.register_cuda_shared_memory("in", cudashm.get_raw_handle(h_in), 0, 64)
        c.register_cuda_shared_memory("out", cudashm.get_raw_handle(h_out), 0, 64)
        inputs, outputs = _requests(httpclient)
        result = c.infer("pair", inputs, outputs=outputs)
        shapes = {o["name"]: o for o in result.get_response()["outputs"]}
        assert shapes["OUTPUT1"] == {"name": "OUTPUT1", "datatype": "INT32", "shape": [2, 4]}
        got_a, got_b = _contents(h_out)
        np.testing.assert_array_equal(got_a, A)
        np.testing.assert_array_equal(got_b, B)
        assert c.get_cuda_shared_memory_status() == [{"name": "in", "device_id": 0, "byte_size": 64},
                                                     {"name": "out", "device_id": 0, "byte_size": 64}]
        with pytest.raises(InferenceServerException, match="already in manager"):
            c.register_cuda_shared_memory("in", cudashm.get_raw_handle(h_in), 0, 64)
        bad = httpclient.InferInput("INPUT0", [2, 4], "FP32")
        bad.set_shared_memory("in", 32, offset=48)
        with pytest.raises(InferenceServerException, match="Invalid offset \\+ byte size"):
            c.infer("pair", [bad, inputs[1]])
        c.unregister_cuda_shared_memory("in")
        assert [r["name"] for r in c.get_cuda_shared_memory_status()] == ["out"]
    finally:
        c.unregister_cuda_shared_memory()
        c.close()
