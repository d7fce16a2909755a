"""System shared memory over HTTP (server/http/routes.py, docs/HTTP.md), end to end with
tritonclient.http and tritonclient.utils.shared_memory: register, infer with inputs and outputs
in regions, status, unregister, Triton's errors and JSON shapes; the registry is the one gRPC
uses (a region registered over one transport is seen over the other). CUDA shared memory
routes answer the gRPC RPCs' UNIMPLEMENTED error as 501 where CUDA is not available (with the
reason); tests/test_cuda_shm_gpu.py uses them on a GPU."""

from __future__ import annotations

import json
from collections.abc import Iterator

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
import tritonclient.utils.shared_memory as shm
from test_http import raw
from tritonclient.utils import InferenceServerException
from util import ServerProcess, cuda_unavailable_reason, identity_config, scaled, write_model


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    repo = tmp_path_factory.mktemp("http_shm_repo")
    write_model(repo, "pair", identity_config(
        "pair", [("INPUT0", "FP32", [4]), ("INPUT1", "INT32", [4])], max_batch_size=4))
    srv = ServerProcess([repo])
    yield srv
    srv.stop()


@pytest.fixture
def c(server: ServerProcess) -> Iterator[httpclient.InferenceServerClient]:
    cl = httpclient.InferenceServerClient(server.http_url, network_timeout=scaled(30))
    yield cl
    cl.unregister_system_shared_memory()
    cl.close()


def test_register_infer_status_unregister(c, server, shm_region) -> None:
    a = np.arange(8, dtype=np.float32).reshape(2, 4)
    b = np.arange(8, dtype=np.int32).reshape(2, 4) * 3
    handle_in, key_in = shm_region(64)
    handle_out, key_out = shm_region(64)
    shm.set_shared_memory_region(handle_in, [a, b])  # a at 0, b at 32
    c.register_system_shared_memory("in", key_in, 64)
    c.register_system_shared_memory("out", key_out, 64)
    in0 = httpclient.InferInput("INPUT0", [2, 4], "FP32")
    in0.set_shared_memory("in", 32)
    in1 = httpclient.InferInput("INPUT1", [2, 4], "INT32")
    in1.set_shared_memory("in", 32, offset=32)
    out0 = httpclient.InferRequestedOutput("OUTPUT0")
    out0.set_shared_memory("out", 32)
    out1 = httpclient.InferRequestedOutput("OUTPUT1")
    out1.set_shared_memory("out", 32, offset=32)
    result = c.infer("pair", [in0, in1], outputs=[out0, out1])
    outputs = {o["name"]: o for o in result.get_response()["outputs"]}
    # Triton's answer for an output in shared memory: name, datatype and shape, no data
    assert outputs["OUTPUT0"] == {"name": "OUTPUT0", "datatype": "FP32", "shape": [2, 4]}
    assert outputs["OUTPUT1"] == {"name": "OUTPUT1", "datatype": "INT32", "shape": [2, 4]}
    np.testing.assert_array_equal(shm.get_contents_as_numpy(handle_out, np.float32, [2, 4]), a)
    np.testing.assert_array_equal(shm.get_contents_as_numpy(handle_out, np.int32, [2, 4], offset=32), b)

    status = c.get_system_shared_memory_status()
    assert status == [{"name": "in", "key": key_in, "offset": 0, "byte_size": 64},
                      {"name": "out", "key": key_out, "offset": 0, "byte_size": 64}]
    assert c.get_system_shared_memory_status("out") == [status[1]]
    c.unregister_system_shared_memory("in")
    assert [r["name"] for r in c.get_system_shared_memory_status()] == ["out"]
    with pytest.raises(InferenceServerException, match="in"):
        c.infer("pair", [in0, in1])
    c.unregister_system_shared_memory()
    assert c.get_system_shared_memory_status() == []


def test_mixed_shm_and_json_and_binary(c, shm_region) -> None:
    """An input in a region beside one in the JSON; one output in a region, one as binary."""
    a = np.full((1, 4), 2.5, np.float32)
    b = np.array([[1, 2, 3, 4]], np.int32)
    handle, key = shm_region(16)
    handle_out, key_out = shm_region(16)
    shm.set_shared_memory_region(handle, [a])
    c.register_system_shared_memory("a", key, 16)
    c.register_system_shared_memory("o", key_out, 16)
    in0 = httpclient.InferInput("INPUT0", [1, 4], "FP32")
    in0.set_shared_memory("a", 16)
    in1 = httpclient.InferInput("INPUT1", [1, 4], "INT32")
    in1.set_data_from_numpy(b, binary_data=False)
    out0 = httpclient.InferRequestedOutput("OUTPUT0")
    out0.set_shared_memory("o", 16)
    out1 = httpclient.InferRequestedOutput("OUTPUT1", binary_data=True)
    result = c.infer("pair", [in0, in1], outputs=[out0, out1])
    assert result.get_output("OUTPUT0") == {"name": "OUTPUT0", "datatype": "FP32", "shape": [1, 4]}  # no data
    np.testing.assert_array_equal(shm.get_contents_as_numpy(handle_out, np.float32, [1, 4]), a)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), b)


def test_one_registry_for_grpc_and_http(c, server, shm_region) -> None:
    _, key = shm_region(32)
    g = grpcclient.InferenceServerClient(server.url)
    try:
        g.register_system_shared_memory("from_grpc", key, 24, offset=8)
        assert c.get_system_shared_memory_status("from_grpc") == [
            {"name": "from_grpc", "key": key, "offset": 8, "byte_size": 24}]
        c.unregister_system_shared_memory("from_grpc")
        assert not g.get_system_shared_memory_status(as_json=True).get("regions")
    finally:
        g.close()


def test_errors(c, server, shm_region) -> None:
    handle, key = shm_region(16)
    c.register_system_shared_memory("r", key, 16)
    with pytest.raises(InferenceServerException, match="already"):
        c.register_system_shared_memory("r", key, 16)
    with pytest.raises(InferenceServerException):
        c.register_system_shared_memory("too_big", key, 17)
    # bounds: a tensor larger than the region
    inp = httpclient.InferInput("INPUT0", [2, 4], "FP32")
    inp.set_shared_memory("r", 32)
    in1 = httpclient.InferInput("INPUT1", [2, 4], "INT32")
    in1.set_data_from_numpy(np.zeros((2, 4), np.int32))
    with pytest.raises(InferenceServerException, match="Invalid offset \\+ byte size"):
        c.infer("pair", [inp, in1])
    # raw JSON: Triton's messages and codes
    path = "/v2/systemsharedmemory/region/x/register"
    status, _, body = raw(server, "POST", path, json.dumps({"byte_size": 4}).encode())
    assert status == 400 and json.loads(body) == {"error": "Shared memory register request has no 'key' field"}
    status, _, body = raw(server, "POST", path, json.dumps({"key": key}).encode())
    assert status == 400 and json.loads(body) == {"error": "Shared memory register request has no 'byte_size' field"}
    status, _, body = raw(server, "POST", path, json.dumps({"key": key, "byte_size": -1}).encode())
    assert status == 400 and "byte_size" in json.loads(body)["error"]
    status, _, body = raw(server, "POST", "/v2/systemsharedmemory/region/x/register",
                          json.dumps({"key": "/../etc/passwd", "byte_size": 4}).encode())
    assert status == 400 and "POSIX shared memory object" in json.loads(body)["error"]
    status, _, body = raw(server, "GET", "/v2/systemsharedmemory/region/nope/status")
    assert status == 404 and "nope" in json.loads(body)["error"]
    assert raw(server, "GET", "/v2/systemsharedmemory/region/r/register")[0] == 405
    assert raw(server, "POST", "/v2/systemsharedmemory/status")[0] == 405
    status, _, body = raw(server, "GET", "/v2/systemsharedmemory/region/r/status")
    assert status == 200 and json.loads(body) == [{"name": "r", "key": key, "offset": 0, "byte_size": 16}]


@pytest.mark.nogpu
def test_cuda_shared_memory_routes_are_unimplemented(c, server) -> None:
    reason = cuda_unavailable_reason()
    for method, path in (("GET", "/v2/cudasharedmemory/status"),
                         ("GET", "/v2/cudasharedmemory/region/g/status"),
                         ("POST", "/v2/cudasharedmemory/region/g/register"),
                         ("POST", "/v2/cudasharedmemory/unregister")):
        status, _, body = raw(server, method, path, b"{}" if method == "POST" else None)
        assert status == 501, (path, status, body)
        assert "CUDA shared memory is not supported" in json.loads(body)["error"]
        assert f"on this machine: {reason};" in json.loads(body)["error"]
    # Through tritonclient.http: 501 (Triton's status for UNSUPPORTED) and the reason, per call.
    for call, args, rpc in ((c.get_cuda_shared_memory_status, (), "CudaSharedMemoryStatus"),
                            (c.unregister_cuda_shared_memory, (), "CudaSharedMemoryUnregister"),
                            (c.register_cuda_shared_memory, ("g", b"aGFuZGxl", 0, 64), "CudaSharedMemoryRegister")):
        with pytest.raises(InferenceServerException) as info:
            call(*args)
        assert info.value.status() == "501", (rpc, info.value.status())
        assert info.value.message().startswith(f"{rpc}: CUDA shared memory is not supported"), info.value.message()
        assert f"on this machine: {reason};" in info.value.message()
