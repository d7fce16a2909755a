"""RPCs Nereid does not implement yet (CUDA shared memory) answer UNIMPLEMENTED with a message
naming the RPC, and the server keeps serving afterwards."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc
from util import ServerProcess, client, expect_error, expect_rpc_error

UNARY = [
    ("CudaSharedMemoryStatus", pb.CudaSharedMemoryStatusRequest()),
    ("CudaSharedMemoryRegister", pb.CudaSharedMemoryRegisterRequest(name="r", raw_handle=b"h", byte_size=64)),
    ("CudaSharedMemoryUnregister", pb.CudaSharedMemoryUnregisterRequest(name="r")),
]


@pytest.fixture(scope="module")
def stub(identity_server: ServerProcess):
    channel = identity_server.channel()
    yield service_pb2_grpc.GRPCInferenceServiceStub(channel)
    channel.close()


@pytest.mark.parametrize("rpc,request_msg", UNARY, ids=[name for name, _ in UNARY])
def test_unary_rpc_is_unimplemented(stub, rpc: str, request_msg) -> None:
    err = expect_rpc_error(grpc.StatusCode.UNIMPLEMENTED, getattr(stub, rpc), request_msg, timeout=10)
    assert rpc in err.details()


def test_tritonclient_unimplemented_calls(identity_server: ServerProcess) -> None:
    c = client(identity_server)
    assert "CudaSharedMemoryStatus" in expect_error(
        "UNIMPLEMENTED", c.get_cuda_shared_memory_status).message()


def test_server_still_serves_after_unimplemented_calls(stub, identity_server: ServerProcess) -> None:
    for rpc, request_msg in UNARY:
        expect_rpc_error(grpc.StatusCode.UNIMPLEMENTED, getattr(stub, rpc), request_msg, timeout=10)
    data = np.array([[1.0, 2.0, 3.0]], dtype=np.float32)
    inp = grpcclient.InferInput("IN", list(data.shape), "FP32")
    inp.set_data_from_numpy(data)
    result = client(identity_server).infer("id_FP32", [inp])
    np.testing.assert_array_equal(result.as_numpy("OUT"), data)
    assert client(identity_server).is_model_ready("id_FP32") is True
