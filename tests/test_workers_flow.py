"""Flow control on the `--workers` link: a slow reader holds its producer back, as in one process.

In one process grpc.aio's flow control does this by itself: a streaming handler's `yield`
waits for the client's HTTP/2 window, and a client stream is read only as the handler asks.
Through a frontend, the link must carry that back-pressure (per-call credit, link.py):
- a client that opens a stream and does not read must not make the frontend hold the
  responses a decoupled model produces; once it reads, every response arrives, in order;
- a client that streams requests faster than a slow model takes them must not make the
  server hold them all: the frontend stops reading the client's stream.

Memory is read from /proc (VmHWM, the peak resident size of each process of the server), so
a burst that came and went between two samples still counts.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from test_stream_backpressure import BURST, MB, _burst_config, _channel, _Numbered, _peaks, _read_burst
from test_workers_calls import _pair
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc
from util import ServerProcess, raw_request, scaled, write_model

from server.workers import link
from server.workers.link import frame

WORKER_RE = re.compile(r"worker (\d+) \(pid (\d+)\) serving")
HEADER = "import os, time\nimport numpy as np\nimport triton_python_backend_utils as pb_utils\n\n"

# Takes DELAY_S per request; answers with the first 8 bytes of IN (which carry the request's number).
SLOW = HEADER + '''
class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            data = pb_utils.get_input_tensor_by_name(request, "IN").as_numpy()
            time.sleep(0.004)
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("OUT", data[:8].copy())]))
        return responses
'''

SLOW_CONFIG = """name: "slow"
backend: "python"
max_batch_size: 0
input [ { name: "IN" data_type: TYPE_UINT8 dims: [ -1 ] } ]
output [ { name: "OUT" data_type: TYPE_UINT8 dims: [ -1 ] } ]
instance_group [ { kind: KIND_CPU count: 1 } ]
"""



@pytest.fixture(scope="module")
def flow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, Path]]:
    repo = tmp_path_factory.mktemp("flow")
    write_model(repo, "burst", _burst_config("burst", 1), files={"1/model.py": BURST.encode()})
    write_model(repo, "slow", SLOW_CONFIG, files={"1/model.py": SLOW.encode()})
    # No queue limit: the owner reads a client stream as fast as it can (as one process does)
    # and the stopped-owner test resumes it with 1,500 requests to queue.
    srv = ServerProcess([repo], ["--workers", "2", "--model-queue-limit", "0"])
    yield srv, repo
    srv.stop()


def _pids(srv: ServerProcess) -> list[int]:
    """The owner and every frontend (the latest pid logged for each)."""
    frontends = {int(m.group(1)): int(m.group(2)) for m in map(WORKER_RE.search, srv.log.splitlines()) if m}
    assert len(frontends) == 2, srv.log
    return [srv.proc.pid, *frontends.values()]


def test_a_stream_nobody_reads_does_not_fill_the_frontend(flow_server) -> None:
    """A decoupled model sends 400 responses of 1 MB to a client that does not read: the
    frontends hold a few window's worth, not 400 MB; then the client reads all, in order."""
    srv, repo = flow_server
    count, size = 400, MB
    marker = repo / "burst" / f"sent-{count}"  # the model writes it once it sent them all
    pids = _pids(srv)
    channel = _channel(srv)
    stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
    warm = list(stub.ModelStreamInfer(iter([raw_request("burst", [("COUNT", "INT32", np.array([1], np.int32)),
                                                                   ("SIZE", "INT32", np.array([8], np.int32))])])))
    assert len(warm) == 1 and warm[0].error_message == "", warm
    (repo / "burst" / "sent-1").unlink()
    before = _peaks(pids)  # the model and the path are warm: later growth is the unread stream
    done = threading.Event()

    def requests() -> Iterator[pb.ModelInferRequest]:
        yield raw_request("burst", [("COUNT", "INT32", np.array([count], np.int32)),
                                    ("SIZE", "INT32", np.array([size], np.int32))])
        done.wait(scaled(120))  # keep the stream open until every response is read

    responses = stub.ModelStreamInfer(requests())
    # The owner holds the model back too (test_stream_backpressure.py): it may not finish
    # sending until the client reads, so wait a while rather than for the marker.
    deadline = time.monotonic() + 4.0
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(scaled(2))  # the owner encodes and forwards what the link lets it
    held = _peaks(pids)
    growth = [after - first for after, first in zip(held, before, strict=True)]
    print(f"peak RSS growth while unread, MB: owner {growth[0]:.0f}, frontends {growth[1]:.0f} {growth[2]:.0f}")
    assert max(growth[1:]) < 100, f"a frontend held the unread responses: {growth} MB (owner, frontends)"
    try:
        _read_burst(responses, count, size)
    finally:
        done.set()
        channel.close()
    final = _peaks(pids)
    print(f"peak RSS growth overall, MB: {[round(a - b) for a, b in zip(final, before, strict=True)]}")
    assert max(a - b for a, b in zip(final[1:], before[1:], strict=True)) < 100


def test_a_client_stream_the_owner_does_not_read_is_held_back_in_the_client(flow_server) -> None:
    """1,500 requests of 256 KiB (375 MiB) streamed as fast as the client can while the owner
    reads nothing (SIGSTOPped: the extreme of a slow model path): the frontend forwards a
    window's worth and stops reading the client's stream, so neither it nor its link buffer
    holds the rest (HTTP/2 holds the client); once the owner runs again, every request is
    answered, in order, by a model that takes 4 ms each."""
    srv, _ = flow_server
    count, size = 1500, 256 * 1024
    pids = _pids(srv)
    channel = _channel(srv)
    stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
    warm = list(stub.ModelStreamInfer(iter([raw_request("slow", [("IN", "UINT8", np.zeros(16, np.uint8))])])))
    assert len(warm) == 1 and warm[0].error_message == "", warm
    before = _peaks(pids)
    requests = _Numbered("slow", count, size)

    answers: list[int] = []
    errors: list[str] = []

    def read() -> None:
        try:
            for response in stub.ModelStreamInfer(iter(requests), timeout=scaled(180)):
                if response.error_message:
                    errors.append(response.error_message)
                else:
                    answers.append(int(np.frombuffer(response.infer_response.raw_output_contents[0], np.uint64)[0]))
        except grpc.RpcError as exc:
            errors.append(repr(exc))

    os.kill(srv.proc.pid, signal.SIGSTOP)
    reader = threading.Thread(target=read, daemon=True)
    try:
        reader.start()
        last = requests.until_stalled(4.0)  # the client stops sending, or sends everything
        held = _peaks(pids[1:])
    finally:
        os.kill(srv.proc.pid, signal.SIGCONT)
    growth = [after - first for after, first in zip(held, before[1:], strict=True)]
    print(f"sent while the owner was stopped: {last} of {count}; frontends' peak RSS growth, MB: {growth}")
    assert last < count, "the client sent everything while nothing was read"
    assert max(growth) < 100, f"a frontend held the client's stream: {growth} MB"
    reader.join(scaled(120))
    channel.close()
    assert not reader.is_alive() and errors == [], errors
    assert answers == list(range(count))


# -- the owner's end of the credit, over a real socket pair (no server) --

_META = ("ipv4:127.0.0.1:1", (), None, None)


async def _settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)
    await asyncio.sleep(0.1)


def test_the_owner_sends_a_window_of_responses_then_waits_for_credit() -> None:
    async def many(request: bytes, context: Any) -> Any:
        for i in range(200):
            yield b"%09d" % i  # 9 bytes each

    async def run() -> None:
        owner, peer, got = await _pair([grpc.unary_stream_rpc_method_handler(many)])
        peer.send(frame(link.CALL, 1, link.call_payload(0, _META), b"x"))
        await _settle()
        sends = [p for k, _, p in got if k == link.SEND]
        assert len(sends) == link.WINDOW_MESSAGES  # the frontend took none: the stream waits
        peer.send(frame(link.CREDIT_SENDS, 1, link.CREDIT_HEAD.pack(32, 32 * 9)))
        await _settle()
        assert sum(k == link.SEND for k, _, _ in got) == link.WINDOW_MESSAGES + 32
        peer.send(frame(link.CREDIT_SENDS, 1, link.CREDIT_HEAD.pack(10_000, 10_000 * 9)))
        await _settle()
        sends = [p for k, _, p in got if k == link.SEND]
        assert sends == [b"%09d" % i for i in range(200)] and got[-1][0] == link.STATUS
        assert owner._windows == {} and owner._tasks == {}
        assert peer.transport is not None
        peer.transport.close()

    asyncio.run(run())


def test_the_owner_credits_a_client_stream_as_its_handler_reads_not_as_it_arrives() -> None:
    permits: asyncio.Queue[int] = asyncio.Queue()

    async def reader(requests: Any, context: Any) -> Any:
        taken = 0
        while True:
            taken += await permits.get()
            while taken > 0:
                if (await context.read()) is grpc.aio.EOF:
                    yield b"done"
                    return
                taken -= 1

    async def run() -> None:
        owner, peer, got = await _pair([grpc.stream_stream_rpc_method_handler(reader)])
        parts: list[Any] = frame(link.OPEN, 1, link.call_payload(0, _META))
        for _ in range(100):
            parts += frame(link.MESSAGE, 1, b"m" * 10)
        peer.send(parts)
        await _settle()
        assert got == []  # arrived, none read: no credit
        permits.put_nowait(40)
        await _settle()
        credits = [link.CREDIT_HEAD.unpack(p) for k, _, p in got if k == link.CREDIT_MESSAGES]
        assert credits == [(link.WINDOW_MESSAGES // 2, 10 * link.WINDOW_MESSAGES // 2)]
        peer.send(frame(link.HALF_CLOSE, 1))
        permits.put_nowait(1000)
        await _settle()
        assert sum(link.CREDIT_HEAD.unpack(p)[0] for k, _, p in got if k == link.CREDIT_MESSAGES) == 96
        assert [k for k, _, _ in got][-2:] == [link.SEND, link.STATUS]
        assert peer.transport is not None
        peer.transport.close()

    asyncio.run(run())
