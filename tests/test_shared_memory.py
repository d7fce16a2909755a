"""System shared memory over gRPC, end to end with tritonclient.grpc and
tritonclient.utils.shared_memory: register, infer with inputs and outputs in a region, status,
unregister, Triton's errors, and the safety rules (docs/SHARED_MEMORY.md).

The cases that use the `c` fixture run over gRPC and over HTTP/REST (`transport`:
tritonclient.grpc or tritonclient.http, whose shared-memory API is the same), and the raw
parameter cases over transports.HttpStub: the same contents, bounds errors and messages, and
the HTTP status Triton gives each gRPC code."""

from __future__ import annotations

import base64
import os
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
import tritonclient.utils.shared_memory as shm
from transports import TRANSPORTS, open_stub, transport_client
from tritonclient.grpc import service_pb2 as pb
from tritonclient.utils import serialize_byte_tensor, serialized_byte_size
from util import (
    ServerProcess,
    client,
    cuda_unavailable_reason,
    expect_error,
    expect_rpc_error,
    identity_config,
    scaled,
    shm_key,
    write_model,
)

SLOW_MS = 1500


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    repo = tmp_path_factory.mktemp("shm_repo")
    write_model(repo, "pair", identity_config(
        "pair", [("INPUT0", "FP32", [4]), ("INPUT1", "INT32", [4])], max_batch_size=4))
    write_model(repo, "big", identity_config("big", [("INPUT0", "FP32", [-1])]))
    write_model(repo, "strings", identity_config("strings", [("INPUT0", "BYTES", [-1])]))
    write_model(repo, "slow", identity_config("slow", [("INPUT0", "FP32", [4])], execute_delay_ms=SLOW_MS))
    srv = ServerProcess([repo])
    yield srv
    srv.stop()


@pytest.fixture(params=TRANSPORTS)
def transport(request: pytest.FixtureRequest) -> str:
    return request.param


def lib(cl: Any) -> Any:
    """The tritonclient module `cl` belongs to, for its InferInput / InferRequestedOutput."""
    return httpclient if isinstance(cl, httpclient.InferenceServerClient) else grpcclient


def regions(cl: Any, name: str = "") -> dict[str, tuple[str, int, int]]:
    """The status as {name: (key, offset, byte_size)}: HTTP answers a JSON list, gRPC a map."""
    status = cl.get_system_shared_memory_status(name)
    if isinstance(status, list):
        return {r["name"]: (r["key"], r.get("offset", 0), r["byte_size"]) for r in status}
    return {n: (r.key, r.offset, r.byte_size) for n, r in status.regions.items()}


def out_meta(result: Any, name: str) -> tuple[str, list[int]]:
    out = result.get_output(name)
    if isinstance(out, dict):
        return out["datatype"], list(out["shape"])
    return out.datatype, list(out.shape)


@pytest.fixture
def c(server: ServerProcess, transport: str) -> Iterator[Any]:
    cl = transport_client(server, transport)
    yield cl
    cl.unregister_system_shared_memory()
    cl.close()


def test_identity_inputs_and_outputs_in_shared_memory(c, shm_region) -> None:
    a = np.arange(8, dtype=np.float32).reshape(2, 4)
    b = np.arange(8, dtype=np.int32).reshape(2, 4) * 3
    handle_in, key_in = shm_region(64)
    handle_out, key_out = shm_region(64)
    shm.set_shared_memory_region(handle_in, [a, b])  # a at 0, b at 32
    c.register_system_shared_memory("in", key_in, 64)
    c.register_system_shared_memory("out", key_out, 64)
    in0 = lib(c).InferInput("INPUT0", [2, 4], "FP32")
    in0.set_shared_memory("in", 32)
    in1 = lib(c).InferInput("INPUT1", [2, 4], "INT32")
    in1.set_shared_memory("in", 32, offset=32)
    out0 = lib(c).InferRequestedOutput("OUTPUT0")
    out0.set_shared_memory("out", 32)
    out1 = lib(c).InferRequestedOutput("OUTPUT1")
    out1.set_shared_memory("out", 32, offset=32)
    result = c.infer("pair", [in0, in1], outputs=[out0, out1])
    assert out_meta(result, "OUTPUT0") == ("FP32", [2, 4])
    assert out_meta(result, "OUTPUT1") == ("INT32", [2, 4])
    response = result.get_response()
    if isinstance(response, dict):  # HTTP: neither JSON data nor a binary part
        for out in response["outputs"]:
            assert "data" not in out and "binary_data_size" not in out.get("parameters", {}), out
    else:  # gRPC: one empty raw entry per output, as Triton sends
        assert [len(r) for r in response.raw_output_contents] == [0, 0]
    np.testing.assert_array_equal(shm.get_contents_as_numpy(handle_out, np.float32, [2, 4]), a)
    np.testing.assert_array_equal(shm.get_contents_as_numpy(handle_out, np.int32, [2, 4], offset=32), b)


def test_mixed_shared_memory_and_raw_inputs_and_outputs(c, shm_region) -> None:
    """An input in shared memory has no raw_input_contents entry; the others keep theirs, in order."""
    a = np.full((1, 4), 2.5, np.float32)
    b = np.array([[1, 2, 3, 4]], np.int32)
    handle, key = shm_region(16)
    shm.set_shared_memory_region(handle, [a])
    c.register_system_shared_memory("a", key, 16)
    in0 = lib(c).InferInput("INPUT0", [1, 4], "FP32")
    in0.set_shared_memory("a", 16)
    in1 = lib(c).InferInput("INPUT1", [1, 4], "INT32")
    in1.set_data_from_numpy(b)
    result = c.infer("pair", [in0, in1])
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), b)


def test_bytes_tensor_through_shared_memory(c, shm_region) -> None:
    data = np.array([b"alpha", b"", b"gamma"], dtype=np.object_)
    serialized = serialize_byte_tensor(data)
    size = serialized_byte_size(serialized)
    handle_in, key_in = shm_region(size)
    handle_out, key_out = shm_region(64)
    shm.set_shared_memory_region(handle_in, [serialized])
    c.register_system_shared_memory("s_in", key_in, size)
    c.register_system_shared_memory("s_out", key_out, 64)
    inp = lib(c).InferInput("INPUT0", [3], "BYTES")
    inp.set_shared_memory("s_in", size)
    out = lib(c).InferRequestedOutput("OUTPUT0")
    out.set_shared_memory("s_out", 64)
    c.infer("strings", [inp], outputs=[out])
    got = shm.get_contents_as_numpy(handle_out, np.object_, [3])
    assert list(got) == list(data)


def test_onnx_model_with_shared_memory(onnx_server: ServerProcess, shm_region) -> None:
    cl = client(onnx_server)
    a = np.arange(16, dtype=np.int32).reshape(1, 16)
    b = np.ones((1, 16), np.int32)
    handle_in, key_in = shm_region(128)
    handle_out, key_out = shm_region(128)
    shm.set_shared_memory_region(handle_in, [a, b])
    name_in, name_out = f"onnx_in_{uuid.uuid4().hex[:6]}", f"onnx_out_{uuid.uuid4().hex[:6]}"
    cl.register_system_shared_memory(name_in, key_in, 128)
    cl.register_system_shared_memory(name_out, key_out, 128)
    try:
        in0, in1 = grpcclient.InferInput("INPUT0", [1, 16], "INT32"), grpcclient.InferInput("INPUT1", [1, 16], "INT32")
        in0.set_shared_memory(name_in, 64)
        in1.set_shared_memory(name_in, 64, offset=64)
        out0, out1 = grpcclient.InferRequestedOutput("OUTPUT0"), grpcclient.InferRequestedOutput("OUTPUT1")
        out0.set_shared_memory(name_out, 64)
        out1.set_shared_memory(name_out, 64, offset=64)
        cl.infer("simple", [in0, in1], outputs=[out0, out1])
        np.testing.assert_array_equal(shm.get_contents_as_numpy(handle_out, np.int32, [1, 16]), a + b)
        np.testing.assert_array_equal(shm.get_contents_as_numpy(handle_out, np.int32, [1, 16], offset=64), a - b)
    finally:
        cl.unregister_system_shared_memory(name_in)
        cl.unregister_system_shared_memory(name_out)


def test_status_and_unregister(c, shm_region) -> None:
    _, key1 = shm_region(4096)
    _, key2 = shm_region(8192)
    c.register_system_shared_memory("r1", key1, 64, offset=16)
    c.register_system_shared_memory("r2", key2, 8192)
    assert regions(c) == {"r1": (key1, 16, 64), "r2": (key2, 0, 8192)}
    assert regions(c, "r2") == {"r2": (key2, 0, 8192)}
    c.unregister_system_shared_memory("r1")
    assert set(regions(c)) == {"r2"}
    c.unregister_system_shared_memory("never_registered")  # not an error, as in Triton
    c.unregister_system_shared_memory()  # all
    assert regions(c) == {}
    err = expect_error("NOT_FOUND", c.get_system_shared_memory_status, "r1")
    assert "Unable to find system shared memory region: 'r1'" in err.message()


def test_register_errors(c, shm_region) -> None:
    _, key = shm_region(64)
    c.register_system_shared_memory("dup", key, 64)
    err = expect_error("ALREADY_EXISTS", c.register_system_shared_memory, "dup", key, 64)
    assert "shared memory region 'dup' already in manager" in err.message()
    # beyond the object's real size (a huge byte_size, or offset + byte_size past the end)
    for offset, size in ((0, 1 << 40), (32, 64), (64, 1)):
        err = expect_error("INVALID_ARGUMENT", c.register_system_shared_memory, "big", key, size, offset=offset)
        assert "failed to register shared memory region 'big': invalid args" in err.message()
    err = expect_error("INVALID_ARGUMENT", c.register_system_shared_memory, "zero", key, 0)
    assert "invalid args" in err.message()
    err = expect_error("NOT_FOUND", c.register_system_shared_memory, "missing", shm_key(), 64)
    assert "Unable to open shared memory region" in err.message()
    assert set(regions(c)) == {"dup"}


@pytest.mark.parametrize("key", [
    "/../../etc/passwd", "../etc/passwd", "/a/b", "//x", "/.", "/..", "/", "", "/x\x00y", "/" + "a" * 300,
])
def test_keys_name_posix_shm_objects_only(c, key: str) -> None:
    err = expect_error("INVALID_ARGUMENT", c.register_system_shared_memory, "bad", key, 8)
    assert "Unable to open shared memory region" in err.message()
    assert regions(c) == {}


def test_symlink_in_dev_shm_is_not_followed(c, tmp_path: Path) -> None:
    target = tmp_path / "secret"
    target.write_bytes(b"s" * 4096)
    name = f"nereid_test_link_{uuid.uuid4().hex[:8]}"
    os.symlink(target, f"/dev/shm/{name}")
    try:
        err = expect_error("NOT_FOUND", c.register_system_shared_memory, "link", f"/{name}", 8)
        assert "Unable to open shared memory region" in err.message()
    finally:
        os.unlink(f"/dev/shm/{name}")


def _simple_input(c: Any, region: str, byte_size: int, offset: int = 0, shape=(1, 4)) -> list:
    in0 = lib(c).InferInput("INPUT0", list(shape), "FP32")
    in0.set_shared_memory(region, byte_size, offset=offset)
    in1 = lib(c).InferInput("INPUT1", list(shape), "INT32")
    in1.set_data_from_numpy(np.zeros(shape, np.int32))
    return [in0, in1]


def test_input_errors(c, shm_region) -> None:
    _, key = shm_region(64)
    c.register_system_shared_memory("r", key, 32, offset=16)  # the region is [16, 48) of the object
    err = expect_error("NOT_FOUND", c.infer, "pair", _simple_input(c, "nope", 16))
    assert "Unable to find shared memory region: 'nope'" in err.message()
    err = expect_error("INVALID_ARGUMENT", c.infer, "pair", _simple_input(c, "r", 12))
    assert "input byte size mismatch for input 'INPUT0' for model 'pair'. Expected 16, got 12" in err.message()
    err = expect_error("INVALID_ARGUMENT", c.infer, "pair", _simple_input(c, "r", 16, offset=32))
    assert "Invalid offset for shared memory region: 'r'" in err.message()
    err = expect_error("INVALID_ARGUMENT", c.infer, "pair", _simple_input(c, "r", 16, offset=24))
    assert "Invalid offset + byte size for shared memory region: 'r'" in err.message()
    err = expect_error("INVALID_ARGUMENT", c.infer, "pair", _simple_input(c, "r", 16, offset=-8))
    assert "Invalid offset for shared memory region: 'r'" in err.message()
    # in bounds: the last 16 bytes of the region
    c.infer("pair", _simple_input(c, "r", 16, offset=16))


def test_output_errors(c, shm_region) -> None:
    _, key = shm_region(64)
    c.register_system_shared_memory("o", key, 64)
    data = [lib(c).InferInput("INPUT0", [1, 4], "FP32"), lib(c).InferInput("INPUT1", [1, 4], "INT32")]
    data[0].set_data_from_numpy(np.zeros((1, 4), np.float32))
    data[1].set_data_from_numpy(np.zeros((1, 4), np.int32))
    small = lib(c).InferRequestedOutput("OUTPUT0")
    small.set_shared_memory("o", 8)
    err = expect_error("INVALID_ARGUMENT", c.infer, "pair", data, outputs=[small])
    assert ("shared memory size specified with the request for output 'OUTPUT0' (8 bytes) should be at least "
            "16 bytes to hold the results") in err.message()
    outside = lib(c).InferRequestedOutput("OUTPUT0")
    outside.set_shared_memory("o", 16, offset=56)
    err = expect_error("INVALID_ARGUMENT", c.infer, "pair", data, outputs=[outside])
    assert "Invalid offset + byte size for shared memory region: 'o'" in err.message()
    missing = lib(c).InferRequestedOutput("OUTPUT0")
    missing.set_shared_memory("gone", 16)
    err = expect_error("NOT_FOUND", c.infer, "pair", data, outputs=[missing])
    assert "Unable to find shared memory region: 'gone'" in err.message()


def test_parameter_errors_raw(server: ServerProcess, c, shm_region, transport: str) -> None:
    _, key = shm_region(64)
    c.register_system_shared_memory("p", key, 64)
    with open_stub(server, transport) as stub:
        _parameter_errors(stub, over_http=transport == "http")


# Worded apart over HTTP on purpose: a byte size or offset without a region is, to the HTTP
# framing, an input without data (as Triton's HTTP server, which reads the region first).
NO_DATA = "unable to find data for input tensor 'INPUT0' for model 'big' in request."


def _parameter_errors(stub: Any, over_http: bool) -> None:
    def request(**params) -> pb.ModelInferRequest:
        msg = pb.ModelInferRequest(model_name="big")
        tensor = msg.inputs.add(name="INPUT0", datatype="FP32", shape=[4])
        for name, (kind, value) in params.items():
            setattr(tensor.parameters[name], kind, value)
        return msg

    cases = [
        (dict(shared_memory_region=("int64_param", 1), shared_memory_byte_size=("int64_param", 16)),
         "invalid value type for 'shared_memory_region' parameter for tensor 'INPUT0', expected string_param."),
        (dict(shared_memory_region=("string_param", "p")),
         "'shared_memory_byte_size' must be specified along with 'shared_memory_region' parameter for tensor"),
        (dict(shared_memory_byte_size=("int64_param", 16)), NO_DATA if over_http else
         "'shared_memory_byte_size' can not be specified without 'shared_memory_region' parameter"),
        (dict(shared_memory_offset=("int64_param", 0)), NO_DATA if over_http else
         "'shared_memory_offset' can not be specified without 'shared_memory_region' parameter"),
        (dict(shared_memory_region=("string_param", "p"), shared_memory_byte_size=("string_param", "16")),
         "invalid value type for 'shared_memory_byte_size' parameter for tensor 'INPUT0', expected int64_param."),
    ]
    for params, fragment in cases:
        err = expect_rpc_error(grpc.StatusCode.INVALID_ARGUMENT, stub.ModelInfer, request(**params), timeout=10)
        assert fragment in err.details(), err.details()
    msg = request(shared_memory_region=("string_param", "p"), shared_memory_byte_size=("int64_param", 16))
    msg.inputs[0].contents.fp32_contents.extend([1, 2, 3, 4])
    err = expect_rpc_error(grpc.StatusCode.INVALID_ARGUMENT, stub.ModelInfer, msg, timeout=10)
    field = "data" if over_http else "content"  # the contents travel as JSON `data` over HTTP
    assert f"unexpected '{field}' provided when using shared memory for input tensor 'INPUT0'" in err.details()
    msg = request(shared_memory_region=("string_param", "p"), shared_memory_byte_size=("int64_param", 16))
    msg.raw_input_contents.append(b"\0" * 16)  # one raw entry too many: the only input is in shared memory
    err = expect_rpc_error(grpc.StatusCode.INVALID_ARGUMENT, stub.ModelInfer, msg, timeout=10)
    if over_http:  # the raw entry is the input's binary part: named as HTTP names it, not raw_input_contents
        assert ("unexpected 'binary_data_size' provided when using shared memory for input tensor 'INPUT0'"
                in err.details()), err.details()
    else:
        assert "entries in raw_input_contents" in err.details()
    msg = pb.ModelInferRequest(model_name="big")
    msg.inputs.add(name="INPUT0", datatype="FP32", shape=[4])
    msg.raw_input_contents.append(b"\0" * 16)
    out = msg.outputs.add(name="OUTPUT0")
    out.parameters["shared_memory_region"].string_param = "p"
    out.parameters["shared_memory_byte_size"].int64_param = 16
    out.parameters["classification"].int64_param = 1
    err = expect_rpc_error(grpc.StatusCode.INVALID_ARGUMENT, stub.ModelInfer, msg, timeout=10)
    assert "output can't set both 'shared_memory_region' and 'classification'" in err.details()


def test_unregister_during_inflight_request(c, shm_region, server: ServerProcess, transport: str) -> None:
    """The region leaves the registry at once; the request in flight still reads and writes it."""
    data = np.array([1.5, 2.5, 3.5, 4.5], np.float32)
    handle, key = shm_region(32)
    shm.set_shared_memory_region(handle, [data])
    c.register_system_shared_memory("busy", key, 32)
    inp = lib(c).InferInput("INPUT0", [4], "FP32")
    inp.set_shared_memory("busy", 16)
    out = lib(c).InferRequestedOutput("OUTPUT0")
    out.set_shared_memory("busy", 16, offset=16)
    outcome: dict = {}

    def run() -> None:
        try:
            if transport == "http":  # its own client: tritonclient.http's is not shared across threads
                outcome["result"] = transport_client(server, transport).infer("slow", [inp], outputs=[out])
            else:
                outcome["result"] = c.infer("slow", [inp], outputs=[out], client_timeout=scaled(30))
        except Exception as exc:  # reported below
            outcome["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    time.sleep(SLOW_MS / 3000)  # the request is in the model now
    c.unregister_system_shared_memory("busy")
    assert regions(c) == {}
    thread.join(scaled(30))
    assert "error" not in outcome, outcome.get("error")
    np.testing.assert_array_equal(shm.get_contents_as_numpy(handle, np.float32, [4], offset=16), data)
    err = expect_error("NOT_FOUND", c.infer, "slow", [inp], outputs=[out])
    assert "Unable to find shared memory region: 'busy'" in err.message()


def test_shrunk_object_is_refused_not_crashed(c, shm_region, server: ServerProcess) -> None:
    """A client that truncates the object after registering gets an error; the server lives on."""
    handle, key = shm_region(8192)
    c.register_system_shared_memory("shrink", key, 16, offset=4096)
    os.truncate(f"/dev/shm/{key[1:]}", 16)
    inp = lib(c).InferInput("INPUT0", [4], "FP32")
    inp.set_shared_memory("shrink", 16)
    err = expect_error("INVALID_ARGUMENT", c.infer, "big", [inp])
    assert "re-register the region" in err.message()
    assert c.is_server_live()


@pytest.mark.nogpu
def test_cuda_shared_memory_is_unimplemented_with_a_reason(c, server: ServerProcess, transport: str) -> None:
    """Where CUDA cannot work (this machine: see the probe's reason), the three RPCs answer
    UNIMPLEMENTED with that reason, decided once at startup and logged once."""
    reason = cuda_unavailable_reason()
    for call, args in ((c.get_cuda_shared_memory_status, ()), (c.unregister_cuda_shared_memory, ()),
                       (c.register_cuda_shared_memory, ("g", _handle(transport), 0, 64))):
        err = expect_error("UNIMPLEMENTED", call, *args)
        assert "CUDA shared memory is not supported" in err.message()
        assert "system shared memory" in err.message()
        assert f"on this machine: {reason};" in err.message(), (reason, err.message())
    assert server.log.count(f"CUDA shared memory unavailable: {reason}") == 1, server.log


def _handle(transport: str) -> bytes | str:
    """A CUDA IPC handle as each client takes it: gRPC's bytes, or HTTP's base64 text for `{"b64": ...}`."""
    handle = base64.b64encode(b"handle")
    return handle.decode() if transport == "http" else handle


@pytest.mark.nogpu
def test_server_metadata_announces_system_shared_memory(c) -> None:
    cuda_unavailable_reason()
    meta = c.get_server_metadata()
    extensions = list(meta["extensions"] if isinstance(meta, dict) else meta.extensions)
    assert "system_shared_memory" in extensions and "cuda_shared_memory" not in extensions


def test_16mib_input_through_shared_memory_vs_in_the_message(c, shm_region) -> None:
    """Not a timed assertion: prints both so the difference can be read in the test log."""
    data = np.random.default_rng(0).random(4 * 1024 * 1024, dtype=np.float32)  # 16 MiB
    size = data.nbytes
    handle_in, key_in = shm_region(size)
    handle_out, key_out = shm_region(size)
    shm.set_shared_memory_region(handle_in, [data])
    c.register_system_shared_memory("big_in", key_in, size)
    c.register_system_shared_memory("big_out", key_out, size)
    shm_in = lib(c).InferInput("INPUT0", [data.size], "FP32")
    shm_in.set_shared_memory("big_in", size)
    shm_out = lib(c).InferRequestedOutput("OUTPUT0")
    shm_out.set_shared_memory("big_out", size)
    msg_in = lib(c).InferInput("INPUT0", [data.size], "FP32")
    msg_in.set_data_from_numpy(data)

    def best(fn, rounds: int = 5) -> float:
        times = []
        for _ in range(rounds):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return min(times)

    t_shm = best(lambda: c.infer("big", [shm_in], outputs=[shm_out]))
    np.testing.assert_array_equal(shm.get_contents_as_numpy(handle_out, np.float32, [data.size]), data)
    t_msg = best(lambda: c.infer("big", [msg_in]).as_numpy("OUTPUT0"))
    np.testing.assert_array_equal(c.infer("big", [msg_in]).as_numpy("OUTPUT0"), data)
    print(f"\n16 MiB FP32 identity round trip (best of 5): shared memory in+out {t_shm * 1000:.2f} ms, "
          f"in the message {t_msg * 1000:.2f} ms")
