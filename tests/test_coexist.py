"""Nereid and tritonclient live in one interpreter: the server speaks through tritonclient's
generated message classes, so there is one `grpc_service.proto` in the descriptor pool and
a request built by one side is read by the other."""

from __future__ import annotations

import asyncio
import subprocess

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.grpc import service_pb2
from tritonclient.grpc._utils import _get_inference_request
from util import PYTHON, ROOT, identity_config, scaled, write_model

import server.protocol.servicer as servicer_module
from server.core.model import Model
from server.protocol.codec import decode_infer_request, encode_infer_response
from server.repository.config import load_model_config
from server.repository.layout import scan_model_dir
from server.repository.manager import RepositoryManager
from server.settings import Settings


def test_one_descriptor_pool() -> None:
    assert servicer_module.pb.ModelInferRequest is service_pb2.ModelInferRequest
    assert servicer_module.pb.DESCRIPTOR is service_pb2.DESCRIPTOR


def test_import_order_does_not_matter() -> None:
    for first, second in (("server.protocol.servicer", "tritonclient.grpc"),
                          ("tritonclient.grpc", "server.protocol.servicer")):
        code = f"import {first}; import {second}; import tritonclient.grpc.aio; print('ok')"
        proc = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, timeout=scaled(60), cwd=ROOT)
        assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


@pytest.fixture
def pair_model(tmp_path) -> Model:
    repo = tmp_path / "repo"
    write_model(repo, "pair", identity_config(
        "pair", [("INPUT0", "FP32", [3]), ("INPUT1", "BYTES", [-1])], max_batch_size=4))
    config = load_model_config(scan_model_dir(repo / "pair"), Settings(model_repositories=(repo,)))
    return Model(config, repo / "pair", 1)


def _tritonclient_request(a: np.ndarray, s: np.ndarray, request_id: str):
    inputs = [grpcclient.InferInput("INPUT0", list(a.shape), "FP32"),
              grpcclient.InferInput("INPUT1", list(s.shape), "BYTES")]
    inputs[0].set_data_from_numpy(a)
    inputs[1].set_data_from_numpy(s)
    outputs = [grpcclient.InferRequestedOutput("OUTPUT1")]
    return _get_inference_request("pair", inputs, "", request_id, outputs, 0, False, False, 0, None, None)


def test_tritonclient_request_decoded_by_nereid(pair_model: Model) -> None:
    a = np.arange(6, dtype=np.float32).reshape(2, 3) * 0.5
    s = np.array([[b"x", b""], [b"\xff", b"yz"]], dtype=np.object_)
    request = _tritonclient_request(a, s, "coexist-1")
    # Through the wire format and back, as the server would receive it.
    request = service_pb2.ModelInferRequest.FromString(request.SerializeToString())
    decoded = decode_infer_request(request, pair_model)
    assert decoded.id == "coexist-1"
    assert decoded.batch_size == 2
    assert decoded.requested_outputs == ("OUTPUT1",)
    np.testing.assert_array_equal(decoded.inputs["INPUT0"], a)
    assert decoded.inputs["INPUT1"].shape == (2, 2)
    assert [bytes(v) for v in decoded.inputs["INPUT1"].ravel()] == [b"x", b"", b"\xff", b"yz"]


def test_nereid_response_parsed_by_tritonclient(pair_model: Model) -> None:
    a = np.array([[1.0, -2.0, 3.5]], dtype=np.float32)
    s = np.array([[b"hello", b"\x00\x01", b""]], dtype=np.object_)
    response = b"".join(encode_infer_response(pair_model, "coexist-2", {"OUTPUT0": a, "OUTPUT1": s}))
    result = grpcclient.InferResult(service_pb2.ModelInferResponse.FromString(response))
    assert result.get_response().id == "coexist-2"
    assert result.get_response().model_version == "1"
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a)
    assert [bytes(v) for v in result.as_numpy("OUTPUT1").ravel()] == [b"hello", b"\x00\x01", b""]


class _Context:
    """What the servicer's ModelInfer uses of a gRPC context: `read` (the request's bytes) and,
    when a request fails, `abort`."""

    def __init__(self, body: bytes) -> None:
        self.body = body

    async def read(self) -> bytes:
        return self.body

    def set_code(self, code):
        raise AssertionError(f"servicer failed the request: {code}")

    def set_details(self, details):
        raise AssertionError(f"servicer failed the request: {details}")

    async def abort(self, code, details):
        raise AssertionError(f"servicer failed the request: {code}: {details}")


def test_servicer_in_process_with_tritonclient_messages(tmp_path) -> None:
    """The real servicer, in this process, answers a tritonclient-built request."""
    repo = tmp_path / "repo"
    write_model(repo, "pair", identity_config(
        "pair", [("INPUT0", "FP32", [3]), ("INPUT1", "BYTES", [-1])], max_batch_size=4))
    manager = RepositoryManager(Settings(model_repositories=(repo,)))
    manager.load_all()
    try:
        servicer = servicer_module.InferenceServicer(manager)
        a = np.array([[0.25, 0.5, 0.75]], dtype=np.float32)
        s = np.array([[b"only"]], dtype=np.object_)
        request = _tritonclient_request(a, s, "coexist-3")

        async def call():
            return await asyncio.wait_for(servicer.ModelInfer(None, _Context(request.SerializeToString())), 10)

        response = service_pb2.ModelInferResponse.FromString(asyncio.run(call()))
        result = grpcclient.InferResult(response)
        assert [o.name for o in response.outputs] == ["OUTPUT1"]
        assert result.get_response().id == "coexist-3"
        assert [bytes(v) for v in result.as_numpy("OUTPUT1").ravel()] == [b"only"]
    finally:
        manager.unload_all(5.0)
