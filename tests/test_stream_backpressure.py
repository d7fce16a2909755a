"""Back-pressure on ModelStreamInfer: a client that does not read holds its producers back.

A stream's responses not yet handed to grpc are bounded (server/protocol/stream_window.py),
and so are a decoupled request's responses not yet taken from the backend
(server/core/decoupled.py ResponseStream): a client that opens a stream and never reads
costs the server a window of responses, not everything the model or the client produces.
Checked in one process and under `--workers 2` (the link's credit carries the wait from the
frontend to the owner, server/workers/link.py).

Memory is read from /proc (VmHWM, the peak resident size of each server process), so a
burst that came and went between two samples still counts.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc
from util import ServerProcess, identity_config, proc_status_mb, raw_request, scaled, write_model

WORKER_RE = re.compile(r"worker (\d+) \(pid (\d+)\) serving")
MB = 1 << 20
BOUND_MB = 150  # the growth allowed per server process while a stream is not read

# COUNT responses of SIZE bytes (byte j of response i is (i + j) % 251), sent from execute,
# then the final flag; then a file `sent-COUNT` in the model's directory says it is done.
BURST = '''import os
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        self.folder = args["model_repository"]

    def execute(self, requests):
        for request in requests:
            count = int(pb_utils.get_input_tensor_by_name(request, "COUNT").as_numpy()[0])
            size = int(pb_utils.get_input_tensor_by_name(request, "SIZE").as_numpy()[0])
            sender = request.get_response_sender()
            base = (np.arange(size + 251) % 251).astype(np.uint8)
            for i in range(count):
                sender.send(pb_utils.InferenceResponse(output_tensors=[
                    pb_utils.Tensor("OUT", base[i % 251:i % 251 + size]),
                    pb_utils.Tensor("IDX", np.array([i], np.uint32))]))
            sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
            with open(os.path.join(self.folder, f"sent-{count}"), "w") as f:
                f.write(str(count))
        return None
'''


def _burst_config(name: str, count: int) -> str:
    return f"""name: "{name}"
backend: "python"
max_batch_size: 0
model_transaction_policy {{ decoupled: true }}
input [ {{ name: "COUNT" data_type: TYPE_INT32 dims: [ 1 ] }}, {{ name: "SIZE" data_type: TYPE_INT32 dims: [ 1 ] }} ]
output [ {{ name: "OUT" data_type: TYPE_UINT8 dims: [ -1 ] }}, {{ name: "IDX" data_type: TYPE_UINT32 dims: [ 1 ] }} ]
instance_group [ {{ kind: KIND_CPU count: {count} }} ]
"""


@pytest.fixture(scope="module", params=["1", "2"], ids=["one-process", "workers-2"])
def server(request: pytest.FixtureRequest,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, Path, list[int]]]:
    repo = tmp_path_factory.mktemp("backpressure")
    write_model(repo, "burst", _burst_config("burst", 2), files={"1/model.py": BURST.encode()})
    write_model(repo, "burst1", _burst_config("burst1", 1), files={"1/model.py": BURST.encode()})
    write_model(repo, "echo", identity_config("echo", [("IN", "UINT8", [-1])], outputs=["OUT"]))
    srv = ServerProcess([repo], ["--workers", request.param, "--model-queue-limit", "0"])
    pids = [srv.proc.pid]
    if request.param != "1":
        frontends = {int(m.group(1)): int(m.group(2)) for m in map(WORKER_RE.search, srv.log.splitlines()) if m}
        assert len(frontends) == 2, srv.log
        pids += frontends.values()
    yield srv, repo, pids
    srv.stop()


def _channel(srv: ServerProcess) -> grpc.Channel:
    return grpc.insecure_channel(srv.url, options=[
        ("grpc.use_local_subchannel_pool", 1), ("grpc.max_receive_message_length", 64 * MB),
        ("grpc.max_send_message_length", 64 * MB)])


def _peaks(pids: list[int]) -> list[float]:
    return [proc_status_mb(pid, "VmHWM") for pid in pids]


def _reset_peaks(pids: list[int]) -> list[float]:
    """Start each process's peak over from its size now (an earlier test's peak would hide
    this one's growth), and return those sizes."""
    for pid in pids:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to VmRSS (proc(5))
    return _peaks(pids)


def _burst(model: str, count: int, size: int) -> pb.ModelInferRequest:
    return raw_request(model, [("COUNT", "INT32", np.array([count], np.int32)),
                               ("SIZE", "INT32", np.array([size], np.int32))])


def _read_burst(responses: Iterator[pb.ModelStreamInferResponse], count: int, size: int) -> None:
    """Read one burst's `count` responses: each in order, with its contents."""
    got = 0
    for response in responses:
        assert response.error_message == "", response.error_message
        out = response.infer_response
        if not out.raw_output_contents:
            continue  # the final flag
        idx = np.frombuffer(out.raw_output_contents[1], np.uint32)[0]
        assert idx == got, f"response {idx} arrived as number {got}"
        body = out.raw_output_contents[0]
        assert len(body) == size and body[0] == got % 251 and body[-1] == (got + size - 1) % 251
        got += 1
        if got == count:
            return
    raise AssertionError(f"the stream ended after {got} of {count} responses")


def _read_burst_on_new_channel(srv: ServerProcess, model: str, count: int, size: int, timeout: float) -> None:
    """Another client (a channel of its own) asks `model` for a burst and reads all of it."""
    channel = _channel(srv)
    try:
        _read_burst(service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer(
            iter([_burst(model, count, size)]), timeout=timeout), count, size)
    finally:
        channel.close()


class _Numbered:
    """`count` requests of `size` bytes to `model`, each carrying its number in its first 8
    bytes; `sent` says how many the client's stream has taken so far."""

    def __init__(self, model: str, count: int, size: int) -> None:
        self.model, self.count, self.size = model, count, size
        self.sent = 0

    def __iter__(self) -> Iterator[pb.ModelInferRequest]:
        data = np.zeros(self.size, np.uint8)
        for i in range(self.count):
            data[:8] = np.frombuffer(np.uint64(i).tobytes(), np.uint8)
            self.sent = i + 1
            yield raw_request(self.model, [("IN", "UINT8", data)], request_id=str(i))

    def until_stalled(self, limit_s: float) -> int:
        """Wait until the client has sent nothing for 1 s (or `limit_s` passed); how many it sent."""
        last, still = -1, time.monotonic()
        deadline = still + limit_s
        while time.monotonic() - still < 1.0 and time.monotonic() < deadline:
            time.sleep(0.1)
            if self.sent != last:
                last, still = self.sent, time.monotonic()
        return last


def _open(stub: service_pb2_grpc.GRPCInferenceServiceStub, request: pb.ModelInferRequest,
          done: threading.Event) -> Iterator[pb.ModelStreamInferResponse]:
    """A stream that sends `request` and stays open (not half-closed) until `done`."""
    def requests() -> Iterator[pb.ModelInferRequest]:
        yield request
        done.wait(scaled(120))
    return stub.ModelStreamInfer(requests())  # type: ignore[no-any-return]


def _warm(stub: service_pb2_grpc.GRPCInferenceServiceStub, repo: Path, model: str) -> None:
    warm = list(stub.ModelStreamInfer(iter([_burst(model, 1, 8)])))
    assert len(warm) == 1 and warm[0].error_message == "", warm
    marker, deadline = repo / model / "sent-1", time.monotonic() + scaled(10)
    while not marker.exists():  # written just after the final flag went out
        assert time.monotonic() < deadline, "the warmup request never finished"
        time.sleep(0.02)
    marker.unlink()


def test_an_unread_decoupled_stream_holds_the_model_back(server) -> None:
    """400 responses of 1 MB to a client that does not read: the model is held back (it has
    not sent them all), the server grows by a window, not 400 MB, and a client of the same
    model's other instance is served meanwhile; then the first client reads all 400, in order."""
    srv, repo, pids = server
    count, size = 400, MB
    channel = _channel(srv)
    stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
    _warm(stub, repo, "burst")
    before = _reset_peaks(pids)  # the model and the path are warm: later growth is the unread stream
    done = threading.Event()
    try:
        responses = _open(stub, _burst("burst", count, size), done)
        marker = repo / "burst" / f"sent-{count}"
        deadline = time.monotonic() + 4.0  # without back-pressure the model sends all 400 in about 1 s
        while not marker.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        held = _peaks(pids)
        growth = [round(after - first) for after, first in zip(held, before, strict=True)]
        print(f"peak RSS growth while unread, MB (owner first): {growth}")
        assert not marker.exists(), "the model sent every response to a client that reads none"
        assert max(growth) < BOUND_MB, f"the server held the unread responses: {growth} MB"
        # The stalled instance is one of two: another client is served by the other one.
        _read_burst_on_new_channel(srv, "burst", 50, size, scaled(30))
        _read_burst(responses, count, size)
    finally:
        done.set()
        channel.close()
    final = _peaks(pids)
    growth = [round(after - first) for after, first in zip(final, before, strict=True)]
    print(f"peak RSS growth overall, MB: {growth}")
    assert max(growth) < BOUND_MB, growth


def test_a_slow_reader_stalls_its_instance_until_it_reads(server) -> None:
    """One instance: a client that does not read holds that instance (documented), so another
    client's request waits; nothing deadlocks: once the first client reads, both finish."""
    srv, repo, _ = server
    size = MB
    channel = _channel(srv)
    stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
    _warm(stub, repo, "burst1")
    done = threading.Event()
    second: list[Exception | None] = []

    def other() -> None:
        try:
            _read_burst_on_new_channel(srv, "burst1", 5, size, scaled(60))
            second.append(None)
        except Exception as exc:
            second.append(exc)

    try:
        responses = _open(stub, _burst("burst1", 100, size), done)
        time.sleep(1.0)
        thread = threading.Thread(target=other, daemon=True)
        thread.start()
        thread.join(1.5)
        assert thread.is_alive() and not (repo / "burst1" / "sent-5").exists(), \
            "the instance held by the unread stream served another request"
        _read_burst(responses, 100, size)
        thread.join(scaled(30))
        assert second == [None], second
    finally:
        done.set()
        channel.close()


def test_a_stream_of_requests_whose_answers_are_not_read_stops_being_read(server) -> None:
    """1,500 requests of 256 KiB (375 MiB) streamed as fast as the client can, no answer read:
    the server stops reading the stream once a window of answers waits (HTTP/2 holds the
    client), so it holds neither the requests nor the answers; then every answer arrives."""
    srv, _, pids = server
    count, size = 1500, 256 * 1024
    channel = _channel(srv)
    stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
    warm = list(stub.ModelStreamInfer(iter([raw_request("echo", [("IN", "UINT8", np.zeros(16, np.uint8))])])))
    assert len(warm) == 1 and warm[0].error_message == "", warm
    before = _reset_peaks(pids)
    requests = _Numbered("echo", count, size)

    try:
        responses = stub.ModelStreamInfer(iter(requests), timeout=scaled(180))
        last = requests.until_stalled(6.0)  # the client stops sending, or sends everything
        held = _peaks(pids)
        growth = [round(after - first) for after, first in zip(held, before, strict=True)]
        print(f"sent while nothing was read: {last} of {count}; peak RSS growth, MB (owner first): {growth}")
        assert last < count, "the client sent everything while no answer was read"
        assert max(growth) < BOUND_MB, f"the server held the unread stream: {growth} MB"
        answers = []
        for response in responses:
            assert response.error_message == "", response.error_message
            out = response.infer_response
            number = int(np.frombuffer(out.raw_output_contents[0][:8], np.uint64)[0])
            assert out.id == str(number) and len(out.raw_output_contents[0]) == size
            answers.append(number)
        assert sorted(answers) == list(range(count))
    finally:
        channel.close()


def give_up_on_a_held_stream(srv: ServerProcess, repo: Path, model: str) -> None:
    """Ask `model` for 300 x 1 MB and read none: the one-instance decoupled `burst1` (the model
    itself, or an ensemble's step) must be held back; cancel: its wait ends at once (what it
    sends after is dropped), and it serves the next client (5 answers read on a new channel)."""
    channel = _channel(srv)
    stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
    _warm(stub, repo, "burst1")
    done = threading.Event()
    try:
        responses = _open(stub, _burst(model, 300, MB), done)
        time.sleep(1.0)
        assert not (repo / "burst1" / "sent-300").exists(), f"{model}: burst1 was not held back"
        responses.cancel()  # type: ignore[attr-defined]
    finally:
        done.set()
        channel.close()
    _read_burst_on_new_channel(srv, "burst1", 5, MB, scaled(20))
    assert (repo / "burst1" / "sent-300").exists()


def test_a_client_that_gives_up_while_the_model_waits_frees_the_instance(server) -> None:
    """The model waits for a client that does not read; the client cancels: the wait ends at
    once (what the model sends after is dropped), and the one instance serves the next client."""
    srv, repo, _ = server
    give_up_on_a_held_stream(srv, repo, "burst1")


def test_sigterm_answers_more_than_a_window_of_requests_a_stream_has_sent(tmp_path, server_factory) -> None:
    """SIGTERM while a stream's 150 requests run in one batch: their answers (more than a
    window) all reach the client, then the stream ends UNAVAILABLE and the server exits 0. The
    writer keeps draining while it waits for the requests (waiting for them first, it would
    stall on answers waiting for room)."""
    count = 150
    write_model(tmp_path, "batched", identity_config("batched", [("IN", "INT32", [1])], max_batch_size=256,
                                                     execute_delay_ms=1000) + "dynamic_batching { }\n")
    srv = server_factory(tmp_path, "--model-queue-limit", "0", "--exit-timeout-secs", "30")
    channel = _channel(srv)
    stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
    done = threading.Event()

    def requests() -> Iterator[pb.ModelInferRequest]:
        for i in range(count):
            yield raw_request("batched", [("IN", "INT32", np.array([[i]], np.int32))], request_id=str(i))
        done.wait(scaled(60))  # the stream stays open: the server ends it

    answers: list[int] = []
    try:
        responses = stub.ModelStreamInfer(requests(), timeout=scaled(60))
        time.sleep(0.5)  # all read, the batch runs
        srv.terminate()
        with pytest.raises(grpc.RpcError) as ended:
            for response in responses:
                assert response.error_message == "", response.error_message
                answers.append(int(np.frombuffer(response.infer_response.raw_output_contents[0], np.int32)[0]))
        assert ended.value.code() == grpc.StatusCode.UNAVAILABLE, ended.value
        assert sorted(answers) == list(range(count))
        assert srv.wait(30) == 0
    finally:
        done.set()
        channel.close()
