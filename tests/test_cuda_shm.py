"""CUDA shared memory without a GPU: the availability probe's reasons, the registration checks
that come before any CUDA call, the bounds messages, one namespace shared with system regions,
and the HTTP JSON parsing (server/core/cuda_runtime.py, cuda_shm.py, shm_registry.py,
server/http/settings.py). Nothing here pretends to be a GPU; tests/test_cuda_shm_gpu.py runs the
real thing on one."""

from __future__ import annotations

import base64
import os
import uuid
from collections.abc import Iterator

import pytest
from util import cuda_unavailable_reason

from server.core.cuda_runtime import probe
from server.core.cuda_shm import check_cuda_args
from server.core.shm_bounds import check_bounds
from server.core.shm_registry import CUDA, SYSTEM, SharedMemoryRegistry
from server.errors import AlreadyExists, InvalidInput, RegionNotFound, Unsupported
from server.http.settings import cuda_register_request, cuda_status_json

HANDLE = bytes(range(64))


def test_probe_without_binding_or_library_says_both() -> None:
    reason = probe(bindings=("nereid_no_such_binding.runtime",), libraries=("/nonexistent/libcudart.so.12",))
    assert isinstance(reason, str)
    assert reason == ("no binding installed (cuda-python: nereid_no_such_binding.runtime: No module named "
                      "'nereid_no_such_binding') and no CUDA runtime library found (libcudart; tried "
                      "/nonexistent/libcudart.so.12)")


def test_probe_skips_a_library_without_the_runtime_api() -> None:
    """A shared object that loads but is not libcudart (libc here) is not taken for one."""
    reason = probe(bindings=(), libraries=("libc.so.6",))
    assert isinstance(reason, str) and "no CUDA runtime library found (libcudart; tried libc.so.6)" in reason, reason


@pytest.mark.nogpu
def test_probe_on_this_machine_names_one_reason() -> None:
    """This machine has no GPU: the reason is one of the two, and it names what was tried."""
    reason = cuda_unavailable_reason()
    assert reason.startswith(("no CUDA device (", "no binding installed (cuda-python: ")), reason
    if reason.startswith("no CUDA device"):  # a libcudart or binding loaded: it says which, and CUDA's error
        assert "libcudart through ctypes (" in reason or "cuda-python (" in reason, reason


@pytest.mark.parametrize(("handle", "device", "size", "message"), [
    (HANDLE[:63], 0, 64, "raw_handle must be a cudaIpcMemHandle_t's 64 bytes, got 63"),
    (HANDLE + b"x", 0, 64, "raw_handle must be a cudaIpcMemHandle_t's 64 bytes, got 65"),
    (b"", 0, 64, "got 0"),
    (HANDLE, -1, 64, "device_id -1 must be >= 0"),
    (HANDLE, 0, 0, "byte_size 0 must be > 0"),
])
def test_registration_arguments(handle: bytes, device: int, size: int, message: str) -> None:
    with pytest.raises(InvalidInput) as info:
        check_cuda_args("g", handle, device, size)
    assert str(info.value).startswith("failed to register shared memory region 'g': invalid args (")
    assert message in str(info.value)
    check_cuda_args("g", HANDLE, 0, 64)  # the good one passes


@pytest.mark.parametrize(("offset", "size", "message"), [
    (64, 1, "Invalid offset for shared memory region: 'r'"),
    (-1, 1, "Invalid offset for shared memory region: 'r'"),
    (48, 17, "Invalid offset + byte size for shared memory region: 'r'"),
    (0, 65, "Invalid offset + byte size for shared memory region: 'r'"),
    (0, -1, "Invalid offset + byte size for shared memory region: 'r'"),
])
def test_bounds_messages(offset: int, size: int, message: str) -> None:
    with pytest.raises(InvalidInput) as info:
        check_bounds("r", 64, offset, size)
    assert str(info.value) == message
    check_bounds("r", 64, 48, 16)  # exactly to the end
    check_bounds("r", 64, 0, 64)


def test_registry_without_cuda_refuses_with_the_reason() -> None:
    registry = SharedMemoryRegistry(cuda="no CUDA device (test)")
    assert not registry.cuda_available
    with pytest.raises(Unsupported, match=r"not available on this server: no CUDA device \(test\)"):
        registry.register_cuda("g", HANDLE, 0, 64)
    assert len(registry) == 0


@pytest.fixture
def system_region() -> Iterator[tuple[SharedMemoryRegistry, str]]:
    key = f"nereid_cuda_unit_{uuid.uuid4().hex}"
    with open(f"/dev/shm/{key}", "wb") as f:
        f.write(bytes(64))
    registry = SharedMemoryRegistry(cuda="no CUDA device (test)")
    registry.register("sys", "/" + key, 0, 64)
    yield registry, key
    registry.unregister()
    os.unlink(f"/dev/shm/{key}")


def test_one_namespace_two_kinds(system_region: tuple[SharedMemoryRegistry, str]) -> None:
    """As Triton's manager: a CUDA status or unregister of a system region's name does not see
    it as a CUDA region, and says which kind it is."""
    registry, _ = system_region
    assert registry.status("", CUDA) == []
    assert [r.name for r in registry.status("", SYSTEM)] == ["sys"]
    with pytest.raises(RegionNotFound, match="The region named 'sys' is registered as system shared memory, "
                                             "not CUDA shared memory"):
        registry.status("sys", CUDA)
    with pytest.raises(RegionNotFound, match="Unable to find cuda shared memory region: 'nope'"):
        registry.status("nope", CUDA)
    with pytest.raises(RegionNotFound, match="Unable to find system shared memory region: 'nope'"):
        registry.status("nope", SYSTEM)
    registry.unregister("sys", CUDA)
    registry.unregister("", CUDA)
    assert len(registry) == 1
    with pytest.raises(AlreadyExists):
        registry.register("sys", "/x", 0, 8)
    registry.unregister("sys", SYSTEM)
    assert len(registry) == 0


def test_http_register_json() -> None:
    b64 = base64.b64encode(HANDLE).decode()
    message = cuda_register_request("g", {"raw_handle": {"b64": b64}, "device_id": 1, "byte_size": 64})
    assert (message.name, message.raw_handle, message.device_id, message.byte_size) == ("g", HANDLE, 1, 64)
    for doc, text in (({"device_id": 0, "byte_size": 64}, "no 'raw_handle' field"),
                      ({"raw_handle": {"b64": b64}, "byte_size": 64}, "no 'device_id' field"),
                      ({"raw_handle": {"b64": b64}, "device_id": 0}, "no 'byte_size' field"),
                      ({"raw_handle": b64, "device_id": 0, "byte_size": 64}, "'raw_handle' must be {\"b64\""),
                      ({"raw_handle": {"b64": "!!"}, "device_id": 0, "byte_size": 64}, "not valid base64"),
                      ({"raw_handle": {"b64": b64}, "device_id": -1, "byte_size": 64}, "'device_id' must be an "
                                                                                        "unsigned integer")):
        with pytest.raises(InvalidInput) as info:
            cuda_register_request("g", doc)
        assert text in str(info.value), (text, str(info.value))
    with pytest.raises(InvalidInput, match="'region name' is necessary"):
        cuda_register_request("", {})


def test_http_status_json() -> None:
    from tritonclient.grpc import service_pb2 as pb

    response = pb.CudaSharedMemoryStatusResponse()
    for name in ("b", "a"):
        entry = response.regions[name]
        entry.name, entry.device_id, entry.byte_size = name, 0, 64
    assert cuda_status_json(response) == [{"name": "a", "device_id": 0, "byte_size": 64},
                                          {"name": "b", "device_id": 0, "byte_size": 64}]
