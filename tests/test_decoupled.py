"""Decoupled Python models (`model_transaction_policy { decoupled: true }`) over ModelStreamInfer,
called as Triton's users call them: tritonclient's `start_stream` / `async_stream_infer`.

The models are written the way Triton's python_backend examples write theirs (repeat: responses
from a thread, with delays; square: n responses for n), plus models that send errors
mid-stream, nothing at all, or watch for cancellation, and a default-mode model that answers
through its response sender. Where tritonclient hides what the wire carries (an error
response's `triton_final_response`), the generated stub reads the stream itself.
"""

from __future__ import annotations

import queue
import time
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.grpc import service_pb2_grpc
from util import ServerProcess, client, expect_error, raw_request, scaled, write_model

TIMEOUT = scaled(30)
HEADER = "import json, os, threading, time\nimport numpy as np\nimport triton_python_backend_utils as pb_utils\n\n"

# Triton's repeat example, in short: IN[i] comes back as response i (with IDX i) after DELAY[i] ms,
# sent from a thread after execute returned; then the final flag alone.
REPEAT = HEADER + '''
class TritonPythonModel:
    def initialize(self, args):
        if not pb_utils.using_decoupled_model_transaction_policy(json.loads(args["model_config"])):
            raise pb_utils.TritonModelException("repeat must be decoupled")
        self.threads = []

    def execute(self, requests):
        for request in requests:
            values = pb_utils.get_input_tensor_by_name(request, "IN").as_numpy()
            delays = pb_utils.get_input_tensor_by_name(request, "DELAY").as_numpy()
            thread = threading.Thread(target=self.respond, args=(request.get_response_sender(), values, delays))
            thread.start()
            self.threads.append(thread)
        return None

    def respond(self, sender, values, delays):
        for i, (value, delay) in enumerate(zip(values, delays)):
            time.sleep(delay / 1000.0)
            sender.send(pb_utils.InferenceResponse(output_tensors=[
                pb_utils.Tensor("OUT", np.array([value], np.int32)),
                pb_utils.Tensor("IDX", np.array([i], np.uint32))]))
        sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    def finalize(self):
        for thread in self.threads:
            thread.join()
'''

REPEAT_CONFIG = """name: "repeat"
backend: "python"
max_batch_size: 0
model_transaction_policy { decoupled: true }
input [ { name: "IN" data_type: TYPE_INT32 dims: [ -1 ] }, { name: "DELAY" data_type: TYPE_UINT32 dims: [ -1 ] } ]
output [ { name: "OUT" data_type: TYPE_INT32 dims: [ 1 ] }, { name: "IDX" data_type: TYPE_UINT32 dims: [ 1 ] } ]
instance_group [ { kind: KIND_CPU count: 1 } ]
"""

# Triton's square example: n responses each holding n, sent from execute, the last with the final flag
# (n = 0: the final flag alone).
SQUARE = HEADER + '''
class TritonPythonModel:
    def execute(self, requests):
        for request in requests:
            n = int(pb_utils.get_input_tensor_by_name(request, "IN").as_numpy()[0])
            sender = request.get_response_sender()
            for i in range(n):
                flags = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL if i == n - 1 else 0
                sender.send(pb_utils.InferenceResponse([pb_utils.Tensor("OUT", np.array([n], np.int32))]), flags)
            if n == 0:
                sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        return None
'''

# Each IN value is one response: v >= 0 -> OUT = v; -1 -> an error response (the request goes on);
# -2 -> execute raises; -3 -> execute returns a list (against the decoupled rules). Then the final
# flag alone, or with the last response when the request parameter "final_with_last" is true.
STEPS = HEADER + '''
class TritonPythonModel:
    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            values = pb_utils.get_input_tensor_by_name(request, "IN").as_numpy()
            with_last = json.loads(request.parameters()).get("final_with_last", False)
            for i, v in enumerate(values):
                last = with_last and i == len(values) - 1
                flags = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL if last else 0
                if v == -1:
                    sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError("step -1 failed")), flags)
                elif v == -2:
                    raise ValueError("execute gave up at -2")
                elif v == -3:
                    return [pb_utils.InferenceResponse([])]
                else:
                    sender.send(pb_utils.InferenceResponse([pb_utils.Tensor("OUT", np.array([v], np.int32))]), flags)
            if not with_last:
                sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        return None
'''

# Sends a response every 20 ms until the client cancels, then writes a marker file (its path is
# the request parameter "marker") and closes the request.
ENDLESS = HEADER + '''
class TritonPythonModel:
    def execute(self, requests):
        for request in requests:
            marker = json.loads(request.parameters())["marker"]
            threading.Thread(target=self.run, args=(request.get_response_sender(), request, marker)).start()
        return None

    def run(self, sender, request, marker):
        i = 0
        deadline = time.monotonic() + 60
        while not sender.is_cancelled() and time.monotonic() < deadline:
            sender.send(pb_utils.InferenceResponse([pb_utils.Tensor("OUT", np.array([i], np.int32))]))
            i += 1
            time.sleep(0.02)
        with open(marker, "w") as f:
            f.write(f"cancelled={sender.is_cancelled()} request={request.is_cancelled()} sent={i}")
        sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
'''

# Default (non-decoupled) mode with the response sender, as Triton allows: IN[0] = 0 -> returned as
# usual; 1 -> sent (with the final flag) before returning None for it; 2 -> sent from a thread
# after execute returned; 3 -> sent twice (the second send raises).
SENDER_DEFAULT = HEADER + '''
class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            v = int(pb_utils.get_input_tensor_by_name(request, "IN").as_numpy()[0])
            response = pb_utils.InferenceResponse([pb_utils.Tensor("OUT", np.array([v * 10], np.int32))])
            if v == 0:
                responses.append(response)
                continue
            sender = request.get_response_sender()
            if v == 1:
                sender.send(response, pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
            elif v == 2:
                def later(sender=sender, response=response):
                    time.sleep(0.2)
                    sender.send(response)
                    sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
                threading.Thread(target=later).start()
            elif v == 3:
                sender.send(response)
                sender.send(response)
            responses.append(None)
        return responses
'''


def _config(name: str, decoupled: bool = True, count: int = 1) -> str:
    policy = "model_transaction_policy { decoupled: true }\n" if decoupled else ""
    return (f'name: "{name}"\nbackend: "python"\nmax_batch_size: 0\n{policy}'
            'input [ { name: "IN" data_type: TYPE_INT32 dims: [ -1 ] } ]\n'
            'output [ { name: "OUT" data_type: TYPE_INT32 dims: [ 1 ] } ]\n'
            f"instance_group [ {{ kind: KIND_CPU count: {count} }} ]\n")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    repo = tmp_path_factory.mktemp("decoupled_repo")
    write_model(repo, "repeat", REPEAT_CONFIG, files={"1/model.py": REPEAT.encode()})
    write_model(repo, "square", _config("square"), files={"1/model.py": SQUARE.encode()})
    write_model(repo, "steps", _config("steps"), files={"1/model.py": STEPS.encode()})
    write_model(repo, "endless", _config("endless"), files={"1/model.py": ENDLESS.encode()})
    write_model(repo, "sender_default", _config("sender_default", decoupled=False),
                files={"1/model.py": SENDER_DEFAULT.encode()})
    srv = ServerProcess([repo])
    yield srv
    srv.stop()


class Stream:
    """tritonclient's stream with the callbacks collected in a queue."""

    def __init__(self, srv: ServerProcess) -> None:
        self.client = client(srv)
        self.events: queue.Queue = queue.Queue()
        self.client.start_stream(callback=partial(self._callback), stream_timeout=TIMEOUT)

    def _callback(self, result, error) -> None:
        self.events.put((result, error))

    def send(self, model: str, inputs: dict[str, np.ndarray], request_id: str = "", **kwargs) -> None:
        self.client.async_stream_infer(model, _inputs(inputs), request_id=request_id, **kwargs)

    def collect(self, n: int) -> list:
        return [self.events.get(timeout=TIMEOUT) for _ in range(n)]

    def until_final(self, finals: int) -> list:
        """Events until `finals` responses marked final have come (errors are collected too)."""
        events = []
        while finals:
            result, error = self.events.get(timeout=TIMEOUT)
            events.append((result, error))
            if result is not None and final_flag(result):
                finals -= 1
        return events

    def quiet(self, seconds: float = 0.5) -> None:
        """Nothing more arrives for a while."""
        time.sleep(scaled(seconds))
        assert self.events.empty(), [_describe(e) for e in list(self.events.queue)]

    def close(self, cancel: bool = False) -> None:
        self.client.stop_stream(cancel_requests=cancel)
        self.client.close()


def _inputs(arrays: dict[str, np.ndarray]) -> list[grpcclient.InferInput]:
    out = []
    for name, arr in arrays.items():
        inp = grpcclient.InferInput(name, list(arr.shape), "INT32" if arr.dtype == np.int32 else "UINT32")
        inp.set_data_from_numpy(arr)
        out.append(inp)
    return out


def final_flag(result) -> bool | None:
    params = result.get_response().parameters
    return params["triton_final_response"].bool_param if "triton_final_response" in params else None


def _describe(event) -> str:
    result, error = event
    if error is not None:
        return f"error: {error}"
    return f"{result.get_response().id}: {result.as_numpy('OUT')} final={final_flag(result)}"


def ints(*values: int) -> np.ndarray:
    return np.array(values, dtype=np.int32)


def test_repeat_sends_one_response_per_value_from_a_thread_with_delays(server: ServerProcess) -> None:
    stream = Stream(server)
    try:
        started = time.monotonic()
        stream.send("repeat", {"IN": ints(4, 2, 0, 1), "DELAY": np.array([300, 10, 10, 10], np.uint32)}, "r1")
        first = stream.collect(1)[0]
        # The first response arrives on its own, well before the others exist.
        assert first[1] is None and first[0].as_numpy("OUT").tolist() == [4]
        assert time.monotonic() - started >= 0.25
        events = [first] + stream.collect(3)
        assert [e[1] for e in events] == [None] * 4
        assert [int(e[0].as_numpy("OUT")[0]) for e in events] == [4, 2, 0, 1]
        assert [int(e[0].as_numpy("IDX")[0]) for e in events] == [0, 1, 2, 3]
        assert {e[0].get_response().id for e in events} == {"r1"}
        assert [final_flag(e[0]) for e in events] == [False] * 4
        stream.quiet()  # the final flag alone is not sent: the client did not ask for it
    finally:
        stream.close()


def test_empty_final_response_only_when_the_client_asks(server: ServerProcess) -> None:
    stream = Stream(server)
    try:
        stream.send("repeat", {"IN": ints(7, 8), "DELAY": np.array([0, 0], np.uint32)}, "asked",
                    enable_empty_final_response=True)
        events = stream.collect(3)
        assert [e[1] for e in events] == [None] * 3, [_describe(e) for e in events]
        assert [final_flag(e[0]) for e in events] == [False, False, True]
        last = events[2][0].get_response()
        assert last.id == "asked" and last.model_name == "repeat" and not last.outputs
        assert not last.raw_output_contents
        stream.quiet()
    finally:
        stream.close()


def test_square_sends_n_responses_the_last_marked_final(server: ServerProcess) -> None:
    stream = Stream(server)
    try:
        stream.send("square", {"IN": ints(3)}, "sq3", enable_empty_final_response=True)
        events = stream.collect(3)
        assert [int(e[0].as_numpy("OUT")[0]) for e in events] == [3, 3, 3]
        assert [final_flag(e[0]) for e in events] == [False, False, True]
        stream.quiet()  # the final flag came with the last response: no empty one after it
    finally:
        stream.close()


def test_zero_responses_then_the_final_flag(server: ServerProcess) -> None:
    stream = Stream(server)
    try:
        stream.send("square", {"IN": ints(0)}, "none")
        stream.quiet()  # nothing at all without the empty final response
        stream.send("square", {"IN": ints(0)}, "none-asked", enable_empty_final_response=True)
        (result, error), = stream.collect(1)
        assert error is None and final_flag(result) is True
        assert result.get_response().id == "none-asked" and not result.get_response().outputs
        stream.quiet()
    finally:
        stream.close()


def test_error_response_mid_stream_keeps_the_request_and_the_stream_going(server: ServerProcess) -> None:
    stream = Stream(server)
    try:
        stream.send("steps", {"IN": ints(1, -1, 2)}, "mid", enable_empty_final_response=True)
        events = stream.collect(4)
        assert events[0][1] is None and events[0][0].as_numpy("OUT").tolist() == [1]
        assert events[1][0] is None and "step -1 failed" in events[1][1].message()
        assert events[2][1] is None and events[2][0].as_numpy("OUT").tolist() == [2]
        assert final_flag(events[3][0]) is True
        stream.send("square", {"IN": ints(1)}, "after")  # the stream is still open
        (result, error), = stream.collect(1)
        assert error is None and result.get_response().id == "after"
    finally:
        stream.close()


def _raw(srv: ServerProcess, requests: list) -> list:
    with srv.channel() as channel:
        return list(service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer(iter(requests),
                                                                                       timeout=TIMEOUT))


def _raw_request(model: str, values: np.ndarray, request_id: str, **parameters: bool):
    request = raw_request(model, [("IN", "INT32", values)], request_id=request_id)
    for key, value in parameters.items():
        request.parameters[key].bool_param = value
    return request


def test_wire_final_flags_on_errors_and_responses(server: ServerProcess) -> None:
    """What tritonclient does not show: an error response carries the request's id and its
    triton_final_response; a final error closes the request."""
    responses = _raw(server, [_raw_request("steps", ints(5, -1), "w", final_with_last=True)])
    assert len(responses) == 2
    assert responses[0].error_message == "" and responses[0].infer_response.id == "w"
    assert responses[0].infer_response.parameters["triton_final_response"].bool_param is False
    assert "step -1 failed" in responses[1].error_message
    assert responses[1].infer_response.id == "w" and responses[1].infer_response.model_name == "steps"
    assert responses[1].infer_response.parameters["triton_final_response"].bool_param is True


def test_execute_raising_closes_each_open_request_with_the_error(server: ServerProcess) -> None:
    responses = _raw(server, [_raw_request("steps", ints(3, -2, 4), "boom")])
    assert len(responses) == 2, responses
    assert responses[0].error_message == ""
    assert "execute gave up at -2" in responses[1].error_message
    assert responses[1].infer_response.parameters["triton_final_response"].bool_param is True


def test_execute_must_return_none(server: ServerProcess) -> None:
    responses = _raw(server, [_raw_request("steps", ints(-3), "ret")])
    assert len(responses) == 1
    assert "Python model 'steps' is using the decoupled mode and the execute function must return None." \
        in responses[0].error_message


def test_non_decoupled_stream_responses_are_marked_final(server: ServerProcess) -> None:
    responses = _raw(server, [_raw_request("sender_default", ints(0), "nd")])
    assert len(responses) == 1 and responses[0].error_message == ""
    assert responses[0].infer_response.parameters["triton_final_response"].bool_param is True


def test_unary_infer_on_a_decoupled_model_is_refused(server: ServerProcess) -> None:
    with client(server) as c:
        error = expect_error("UNIMPLEMENTED", c.infer, "square", _inputs({"IN": ints(2)}))
    assert error.message() == "ModelInfer RPC doesn't support models with decoupled transaction policy"


def test_response_sender_in_a_non_decoupled_model(server: ServerProcess) -> None:
    with client(server) as c:
        # 3: the second send raises (one response only), and the first one stands, as in Triton.
        for v in (0, 1, 2, 3):
            result = c.infer("sender_default", _inputs({"IN": ints(v)}))
            assert result.as_numpy("OUT").tolist() == [v * 10]
    stream = Stream(server)
    try:
        for v in (2, 1, 0):
            stream.send("sender_default", {"IN": ints(v)}, f"d{v}")
        events = stream.collect(3)
        assert sorted((e[0].get_response().id, int(e[0].as_numpy("OUT")[0])) for e in events) == [
            ("d0", 0), ("d1", 10), ("d2", 20)]
        stream.quiet()
    finally:
        stream.close()


def test_concurrent_streams_interleave_and_each_request_keeps_its_order(server: ServerProcess) -> None:
    streams = [Stream(server) for _ in range(3)]
    try:
        for s, stream in enumerate(streams):
            for r in range(2):  # two requests per stream, their responses interleaved in time
                values = ints(*(100 * s + 10 * r + i for i in range(5)))
                delays = np.full(5, 30 + 7 * r + 3 * s, np.uint32)
                stream.send("repeat", {"IN": values, "DELAY": delays}, f"s{s}r{r}", enable_empty_final_response=True)
        for s, stream in enumerate(streams):
            events = stream.until_final(2)
            assert all(e[1] is None for e in events)
            by_request: dict[str, list[int]] = {}
            order = []
            for result, _ in events:
                rid = result.get_response().id
                if result.get_response().outputs:
                    by_request.setdefault(rid, []).append(int(result.as_numpy("OUT")[0]))
                    order.append(rid)
            assert by_request == {f"s{s}r{r}": [100 * s + 10 * r + i for i in range(5)] for r in range(2)}
            assert order != sorted(order), f"responses of stream {s} did not interleave: {order}"
            stream.quiet(0.2)
    finally:
        for stream in streams:
            stream.close()


def test_cancelling_the_stream_reaches_the_model(server: ServerProcess, tmp_path: Path) -> None:
    marker = tmp_path / "cancelled.txt"
    stream = Stream(server)
    stream.send("endless", {"IN": ints(0)}, "forever", parameters={"marker": str(marker)})
    events = stream.collect(3)
    assert all(e[1] is None for e in events)
    stream.close(cancel=True)
    deadline = time.monotonic() + scaled(10)
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert marker.exists(), "the model never saw the cancellation"
    text = marker.read_text()
    assert text.startswith("cancelled=True request=True"), text
    # The instance is free again and the model still serves.
    stream = Stream(server)
    try:
        stream.send("square", {"IN": ints(2)}, "again")
        assert [e[1] for e in stream.collect(2)] == [None, None]
    finally:
        stream.close()
