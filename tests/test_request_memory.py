"""Nothing of a finished request stays in memory (issue 9, defect 2).

In process: the real servicer and models answer requests whose bytes this test owns, with
the garbage collector switched off (so no reference cycle can hide behind a later
collection); afterwards the request's bytes must have exactly the references they had
before, and `gc.get_referrers` must find nothing but this test. Against a server process:
large rejected requests must not raise its resident memory.
"""

from __future__ import annotations

import asyncio
import gc
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from tritonclient.grpc import service_pb2 as pb
from util import ServerProcess, identity_config, proc_status_mb, raw_request, scaled, write_model

from server.protocol.servicer import InferenceServicer
from server.protocol.wire import SPLIT_THRESHOLD
from server.repository.manager import RepositoryManager
from server.settings import Settings

MODELS = {
    "plain": identity_config("plain", [("INPUT0", "FP32", [-1])], max_batch_size=0),
    "one_instance": identity_config("one_instance", [("INPUT0", "FP32", [-1])], max_batch_size=0,
                                    instance_count=1),
    "batched": identity_config("batched", [("INPUT0", "FP32", [-1])], max_batch_size=8,
                               extra="dynamic_batching { }\n"),
    "delayed": identity_config("delayed", [("INPUT0", "FP32", [-1])], max_batch_size=8,
                               extra="dynamic_batching { max_queue_delay_microseconds: 1000 }\n"),
    "slow": identity_config("slow", [("INPUT0", "FP32", [-1])], max_batch_size=0, execute_delay_ms=2),
    # The model answers FP32 where its config promises INT32: every request fails while it runs.
    "failing": identity_config("failing", [("INPUT0", "FP32", [-1])], max_batch_size=0).replace(
        "output [\n  {\n    name: \"OUTPUT0\"\n    data_type: TYPE_FP32", "output [\n  {\n    name: \"OUTPUT0\"\n"
        "    data_type: TYPE_INT32"),
    "failing_batched": identity_config("failing_batched", [("INPUT0", "FP32", [-1])], max_batch_size=8,
                                       extra="dynamic_batching { }\n").replace(
        "output [\n  {\n    name: \"OUTPUT0\"\n    data_type: TYPE_FP32", "output [\n  {\n    name: \"OUTPUT0\"\n"
        "    data_type: TYPE_INT32"),
}
FAILING = ("failing", "failing_batched")


class _Aborted(Exception):
    """What grpcio's `context.abort` raises (grpc.aio.AbortError) in this stand-in."""


class _Context:
    """The parts of a gRPC servicer context that ModelInfer uses."""

    def __init__(self, body: bytes) -> None:
        self.body: bytes | None = body
        self.code = None
        self.details = ""

    async def read(self) -> bytes:
        body, self.body = self.body, None
        assert body is not None
        return body

    def set_code(self, code) -> None:
        self.code = code

    def set_details(self, details: str) -> None:
        self.details = details

    async def abort(self, code, details: str) -> None:
        self.code, self.details = code, details
        raise _Aborted(details)

    def add_done_callback(self, callback) -> None:
        pass


@pytest.fixture(scope="module")
def servicer(tmp_path_factory: pytest.TempPathFactory):
    repo = tmp_path_factory.mktemp("memory_repo")
    for name, config in MODELS.items():
        write_model(repo, name, config)
    manager = RepositoryManager(Settings(model_repositories=(repo,)))
    manager.load_all()
    servicer = InferenceServicer(manager)
    servicer.loaded = True  # what app.py sets once startup loading is done
    yield servicer
    manager.unload_all(5.0)


def _request(model: str, elements: int, mutate=None) -> bytes:
    data = np.arange(elements, dtype=np.float32)
    shape = [elements] if model in ("plain", "one_instance", "slow", "failing") else [1, elements]
    message = raw_request(model, [("INPUT0", "FP32", data.reshape(shape))])
    if mutate is not None:
        mutate(message)
    return message.SerializeToString()


def _short(message) -> None:
    message.raw_input_contents[0] = message.raw_input_contents[0][:-4]


def _bad_shape(message) -> None:
    message.inputs[0].shape.append(2)


def _bad_dtype(message) -> None:
    message.inputs[0].datatype = "INT32"


def _twice(message) -> None:
    message.inputs.add().CopyFrom(message.inputs[0])
    message.raw_input_contents.append(message.raw_input_contents[0])


def _unknown_model(message) -> None:
    message.model_name = "nope"


def _bad_param(message) -> None:
    message.parameters["priority"].string_param = "high"


CASES = [
    ("ok", None, None),
    ("byte_count", _short, "input byte size mismatch"),
    ("shape", _bad_shape, "unexpected shape"),
    ("datatype", _bad_dtype, "data-type is 'INT32'"),
    ("duplicate", _twice, "expected 1 inputs but got 2"),
    ("unknown_model", _unknown_model, "unknown model"),
    ("parameter", _bad_param, "'priority' parameter"),
]


@pytest.mark.parametrize("model", sorted(MODELS))
@pytest.mark.parametrize("elements", [16, SPLIT_THRESHOLD])  # protobuf's parser, then the zero-copy split
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_finished_request_leaves_no_reference(servicer: InferenceServicer, model: str, elements: int, case) -> None:
    _, mutate, error = case
    if model in FAILING and error is None:
        error = "INT32"  # fails while running: the error's traceback passes through the request's frames
    body = _request(model, elements, mutate)
    before = sys.getrefcount(body)
    enabled = gc.isenabled()
    gc.disable()
    try:
        context = _Context(body)
        try:
            answer = asyncio.run(asyncio.wait_for(servicer.ModelInfer(None, context), scaled(10)))
        except _Aborted:
            answer = None
        if error is None:
            assert context.code is None, context.details
            response = pb.ModelInferResponse.FromString(answer)
            assert len(response.raw_output_contents[0]) == elements * 4
        else:
            assert answer is None and error in context.details, context.details
        del answer, context
        # An instance thread hands the outcome back just before it lets go of the batch.
        deadline = time.monotonic() + scaled(2)
        while sys.getrefcount(body) != before and time.monotonic() < deadline:
            time.sleep(0.01)
        holders = [type(r).__name__ for r in gc.get_referrers(body) if r is not sys._getframe()]
        assert sys.getrefcount(body) == before, f"request still referenced; tracked holders: {holders}"
        assert holders == [], holders
    finally:
        if enabled:
            gc.enable()


def test_large_rejected_requests_do_not_raise_resident_memory(tmp_path: Path) -> None:
    """Five rejected 64 MB requests, then a good one: the server's RSS ends near where it began
    (it grew by about 1.1 GB for five 100 MB requests when rejections kept their frames)."""
    write_model(tmp_path, "big", identity_config("big", [("INPUT0", "UINT8", [-1])]))
    server = ServerProcess([tmp_path])
    try:
        size = 64 * 1024 * 1024
        data = np.zeros(size, np.uint8)
        good = raw_request("big", [("INPUT0", "UINT8", data)])
        bad = raw_request("big", [("INPUT0", "UINT8", data)])
        bad.inputs[0].shape[:] = [size + 1]
        bad_body, good_body = bad.SerializeToString(), good.SerializeToString()
        del data, good, bad
        with server.channel() as channel:
            infer = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
            start = proc_status_mb(server.proc.pid)
            for _ in range(5):
                with pytest.raises(Exception) as info:
                    infer(bad_body, timeout=scaled(60))
                assert "input byte size mismatch" in info.value.details()
            assert len(infer(good_body, timeout=scaled(60))) > size
            time.sleep(1.0)  # the trim after a large response runs just after it is sent
            grown = proc_status_mb(server.proc.pid) - start
        assert grown < 48, f"RSS grew by {grown:.0f} MB after 5 rejected and 1 good 64 MB request"
    finally:
        server.stop()
