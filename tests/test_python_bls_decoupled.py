"""BLS together with decoupled models, as Triton's python_backend documents it ("Using BLS with
decoupled models", examples/bls_decoupled, the decoupled examples):

- a model calling a decoupled target with `exec(decoupled=True)` / `async_exec(decoupled=True)`
  and gathering every response it sends (the last one may be the final flag alone: an empty
  response), and the error for `exec()` without `decoupled=True`;
- BLS from threads other than the one running `execute`: several threads of a default-mode
  model at once, and a decoupled model's sender thread, streaming over tritonclient's gRPC stream;
- `async def execute` in a decoupled model: run in the background as Triton runs it, so one
  instance works on several requests at once.

Every model is written for the test, Triton-style, importing `triton_python_backend_utils`.
"""

from __future__ import annotations

import json
import queue
import time
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from util import ServerProcess, client, identity_config, scaled, write_model

TIMEOUT = scaled(30)
HEADER = ("import asyncio, json, threading, time\nimport numpy as np\n"
          "import triton_python_backend_utils as pb_utils\n\n")

# Decoupled targets. repeat: IN[i] comes back as response i (OUT, IDX) from a thread, then the final
# flag alone (an empty final response). repeat_last: the final flag rides on the last response.
# square: IN = [n] -> n responses of n, then the final flag alone (Triton's square example).
# faulty: a response, an error response, a response, then the final flag.
REPEAT = HEADER + '''
FINAL_WITH_LAST = {final_with_last}

class TritonPythonModel:
    def execute(self, requests):
        for request in requests:
            values = pb_utils.get_input_tensor_by_name(request, "IN").as_numpy()
            threading.Thread(target=self.respond, args=(request.get_response_sender(), values)).start()
        return None

    def respond(self, sender, values):
        for i, value in enumerate(values):
            time.sleep(0.01)
            last = FINAL_WITH_LAST and i == len(values) - 1
            sender.send(pb_utils.InferenceResponse(output_tensors=[
                pb_utils.Tensor("OUT", np.array([value], np.int32)),
                pb_utils.Tensor("IDX", np.array([i], np.uint32))]),
                flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL if last else 0)
        if not (FINAL_WITH_LAST and len(values)):
            sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
'''

SQUARE = HEADER + '''
class TritonPythonModel:
    def execute(self, requests):
        for request in requests:
            n = int(pb_utils.get_input_tensor_by_name(request, "IN").as_numpy()[0])
            sender = request.get_response_sender()
            for _ in range(n):
                sender.send(pb_utils.InferenceResponse([pb_utils.Tensor("OUT", np.array([n], np.int32))]))
            sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        return None
'''

FAULTY = HEADER + '''
class TritonPythonModel:
    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            sender.send(pb_utils.InferenceResponse([pb_utils.Tensor("OUT", np.array([1], np.int32))]))
            sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(
                "halfway trouble", pb_utils.TritonError.INVALID_ARG)))
            sender.send(pb_utils.InferenceResponse([pb_utils.Tensor("OUT", np.array([3], np.int32))]))
            sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        return None
'''

# Callers (default mode). They report what they saw as JSON in RESULT; the request's parameters
# say what to do: `target`, `mode`.
COMMON = HEADER + '''
def seen(response):
    """One BLS response as JSON: its outputs (name -> list) or its error."""
    if response.has_error():
        return {"error": response.error().message(), "code": response.error().code()}
    return {"outputs": {t.name(): t.as_numpy().tolist() for t in response.output_tensors()}}

def call(target, values, outputs=("OUT",)):
    return pb_utils.InferenceRequest(model_name=target, requested_output_names=list(outputs),
                                     inputs=[pb_utils.Tensor("IN", np.array(values, np.int32))])

def answer(result):
    return pb_utils.InferenceResponse([pb_utils.Tensor("RESULT", np.array([json.dumps(result)], dtype=object))])
'''

SYNC_CALLER = COMMON + '''
class TritonPythonModel:
    def execute(self, requests):
        return [answer(self.run(r)) for r in requests]

    def run(self, request):
        params = json.loads(request.parameters())
        target, mode = params.get("target", "repeat"), params["mode"]
        values = pb_utils.get_input_tensor_by_name(request, "IN").as_numpy().tolist()
        if mode == "iterate":
            outputs = ("OUT", "IDX") if target.startswith("repeat") else ("OUT",)
            responses = call(target, values, outputs).exec(decoupled=True)
            first = [seen(r) for r in responses]
            again = [seen(r) for r in responses]  # a new loop goes over them again, as Triton's iterator
            return {"responses": first, "again": again}
        if mode == "plain":
            return seen(call(target, values).exec())
        if mode == "stream_exec":
            try:
                call(target, values).stream_exec()
            except pb_utils.TritonModelException as exc:
                return {"raised": exc.message()}
            return {"raised": None}
        if mode == "partial":  # read one response, drop the iterator, then call again
            first = next(iter(call(target, values).exec(decoupled=True)))
            rest = [seen(r) for r in call(target, values).exec(decoupled=True)]
            return {"first": seen(first), "rest": rest}
        if mode == "threads":  # many threads of execute call at once, blocking and iterating
            results = {}
            def work(i):
                total = 0
                for r in call(target, [i, 10 * i, 100 * i]).exec(decoupled=True):
                    if r.has_error():
                        raise RuntimeError(r.error().message())
                    if r.output_tensors():
                        total += int(pb_utils.get_output_tensor_by_name(r, "OUT").as_numpy()[0])
                plain = call("id_int32", [i]).exec()
                results[i] = [total, int(pb_utils.get_output_tensor_by_name(plain, "OUT").as_numpy()[0])]
            threads = [threading.Thread(target=work, args=(i,)) for i in range(1, 9)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            return {"results": results, "main": seen(call("id_int32", [7]).exec())}
        raise ValueError(mode)
'''

ASYNC_CALLER = COMMON + '''
class TritonPythonModel:
    async def execute(self, requests):
        return [answer(await self.run(r)) for r in requests]

    async def run(self, request):
        params = json.loads(request.parameters())
        target, mode = params.get("target", "repeat"), params["mode"]
        values = pb_utils.get_input_tensor_by_name(request, "IN").as_numpy().tolist()
        if mode == "gather":  # Triton's bls_decoupled async example: two calls, awaited together
            iterators = await asyncio.gather(call(target, values).async_exec(decoupled=True),
                                             call(target, values).async_exec(decoupled=True))
            return {"calls": [[seen(r) for r in it] for it in iterators]}
        if mode == "async_for":
            it = await call(target, values).async_exec(decoupled=True)
            return {"responses": [seen(r) async for r in it]}
        if mode == "plain":
            return seen(await call(target, values).async_exec())
        raise ValueError(mode)
'''

# Decoupled callers, streamed to the client.
# bls_stream (Triton's bls_decoupled idea): execute hands each request to a sender thread, which for
# every IN value v calls square (decoupled: v responses of v) and the identity model, and sends one
# response with their sum, then the final flag.
BLS_STREAM = HEADER + '''
class TritonPythonModel:
    def execute(self, requests):
        for request in requests:
            values = pb_utils.get_input_tensor_by_name(request, "IN").as_numpy().tolist()
            threading.Thread(target=self.respond, args=(request.get_response_sender(), values)).start()
        return None

    def respond(self, sender, values):
        try:
            for v in values:
                total = 0
                request = pb_utils.InferenceRequest(model_name="square", requested_output_names=["OUT"],
                                                    inputs=[pb_utils.Tensor("IN", np.array([v], np.int32))])
                for r in request.exec(decoupled=True):
                    if r.has_error():
                        raise pb_utils.TritonModelException(r.error().message())
                    if r.output_tensors():
                        total += int(pb_utils.get_output_tensor_by_name(r, "OUT").as_numpy()[0])
                plain = pb_utils.InferenceRequest(model_name="id_int32", requested_output_names=["OUT"],
                                                  inputs=[pb_utils.Tensor("IN", np.array([v], np.int32))]).exec()
                total += int(pb_utils.get_output_tensor_by_name(plain, "OUT").as_numpy()[0])
                sender.send(pb_utils.InferenceResponse([pb_utils.Tensor("OUT", np.array([total], np.int32))]))
        except Exception as exc:
            sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc))))
        sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
'''

# async def execute in a decoupled model: sleeps (so requests overlap), awaits a decoupled BLS call to
# repeat and streams each value back doubled; IN = [-1] raises after the first response.
ASYNC_DECOUPLED = HEADER + '''
class TritonPythonModel:
    async def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            values = pb_utils.get_input_tensor_by_name(request, "IN").as_numpy().tolist()
            await asyncio.sleep(0.5)
            if values == [-1]:
                sender.send(pb_utils.InferenceResponse([pb_utils.Tensor("OUT", np.array([-1], np.int32))]))
                raise pb_utils.TritonModelException("async execute gave up")
            bls = pb_utils.InferenceRequest(model_name="repeat", requested_output_names=["OUT"],
                                            inputs=[pb_utils.Tensor("IN", np.array(values, np.int32))])
            async for r in await bls.async_exec(decoupled=True):
                if r.output_tensors():
                    out = pb_utils.get_output_tensor_by_name(r, "OUT").as_numpy()
                    sender.send(pb_utils.InferenceResponse([pb_utils.Tensor("OUT", out * 2)]))
            sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        return None
'''


def _config(name: str, outputs: str, decoupled: bool, count: int = 1) -> str:
    policy = "model_transaction_policy { decoupled: true }\n" if decoupled else ""
    return (f'name: "{name}"\nbackend: "python"\nmax_batch_size: 0\n{policy}'
            'input [ { name: "IN" data_type: TYPE_INT32 dims: [ -1 ] } ]\n'
            f"output [ {outputs} ]\n"
            f"instance_group [ {{ kind: KIND_CPU count: {count} }} ]\n")


OUT = '{ name: "OUT" data_type: TYPE_INT32 dims: [ 1 ] }'
OUT_IDX = OUT + ', { name: "IDX" data_type: TYPE_UINT32 dims: [ 1 ] }'
RESULT = '{ name: "RESULT" data_type: TYPE_STRING dims: [ 1 ] }'


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    repo: Path = tmp_path_factory.mktemp("bls_decoupled_repo")
    models = {
        "repeat": (REPEAT.format(final_with_last=False), OUT_IDX, True),
        "repeat_last": (REPEAT.format(final_with_last=True), OUT_IDX, True),
        "square": (SQUARE, OUT, True),
        "faulty": (FAULTY, OUT, True),
        "caller": (SYNC_CALLER, RESULT, False),
        "async_caller": (ASYNC_CALLER, RESULT, False),
        "bls_stream": (BLS_STREAM, OUT, True),
        "async_decoupled": (ASYNC_DECOUPLED, OUT, True),
    }
    for name, (source, outputs, decoupled) in models.items():
        write_model(repo, name, _config(name, outputs, decoupled), files={"1/model.py": source.encode()})
    write_model(repo, "id_int32", identity_config("id_int32", [("IN", "INT32", [-1])], outputs=["OUT"]))
    srv = ServerProcess([repo])
    yield srv
    srv.stop()


def ask(srv: ServerProcess, model: str, values: list[int], **params: str) -> dict:
    inp = grpcclient.InferInput("IN", [len(values)], "INT32")
    inp.set_data_from_numpy(np.array(values, dtype=np.int32))
    result = client(srv).infer(model, [inp], parameters=params, client_timeout=TIMEOUT)
    return json.loads(result.as_numpy("RESULT")[0])


def out(value: int, idx: int | None = None) -> dict:
    outputs: dict = {"OUT": [value]}
    if idx is not None:
        outputs["IDX"] = [idx]
    return {"outputs": outputs}


EMPTY = {"outputs": {}}
DECOUPLED_ERROR = ("Model repeat - Error when running inference: Model repeat is using the decoupled. The current "
                   "BLS request call doesn't support models using the decoupled transaction policy. Please use "
                   "'decoupled=True' argument to the 'exec' or 'async_exec' calls for decoupled models.'")


def test_exec_decoupled_yields_every_response_then_the_empty_final_one(server: ServerProcess) -> None:
    seen = ask(server, "caller", [5, 6, 7], mode="iterate")
    expected = [out(5, 0), out(6, 1), out(7, 2), EMPTY]
    assert seen["responses"] == expected
    assert seen["again"] == expected  # a second loop replays them, as Triton's ResponseIterator


def test_final_flag_on_the_last_response_ends_the_iteration_there(server: ServerProcess) -> None:
    seen = ask(server, "caller", [5, 6], target="repeat_last", mode="iterate")
    assert seen["responses"] == [out(5, 0), out(6, 1)]


def test_zero_responses_yield_only_the_empty_final_one(server: ServerProcess) -> None:
    assert ask(server, "caller", [0], target="square", mode="iterate")["responses"] == [EMPTY]
    assert ask(server, "caller", [3], target="square", mode="iterate")["responses"] == [out(3)] * 3 + [EMPTY]


def test_error_responses_of_the_target_come_through_and_the_stream_goes_on(server: ServerProcess) -> None:
    seen = ask(server, "caller", [1], target="faulty", mode="iterate")["responses"]
    assert seen == [out(1), {"error": "halfway trouble", "code": 3}, out(3), EMPTY]


def test_exec_without_decoupled_on_a_decoupled_target_is_tritons_error(server: ServerProcess) -> None:
    assert ask(server, "caller", [1], mode="plain") == {"error": DECOUPLED_ERROR, "code": 1}
    assert ask(server, "async_caller", [1], mode="plain") == {"error": DECOUPLED_ERROR, "code": 1}


def test_stream_exec_is_not_tritons_api(server: ServerProcess) -> None:
    raised = ask(server, "caller", [1], mode="stream_exec")["raised"]
    assert "exec(decoupled=True)" in raised


def test_an_iterator_dropped_half_read_does_not_disturb_the_next_call(server: ServerProcess) -> None:
    seen = ask(server, "caller", [4, 5], mode="partial")
    assert seen["first"] == out(4)
    assert seen["rest"] == [out(4), out(5), EMPTY]


def test_async_exec_decoupled_gathered_as_in_tritons_example(server: ServerProcess) -> None:
    seen = ask(server, "async_caller", [2], target="square", mode="gather")
    assert seen["calls"] == [[out(2), out(2), EMPTY]] * 2
    seen = ask(server, "async_caller", [8, 9], mode="async_for")
    assert seen["responses"] == [out(8), out(9), EMPTY]


def test_bls_from_many_threads_of_execute_at_once(server: ServerProcess) -> None:
    for _ in range(3):
        seen = ask(server, "caller", [0], mode="threads")
        assert seen["results"] == {str(i): [111 * i, i] for i in range(1, 9)}
        assert seen["main"] == out(7)


class Stream:
    """tritonclient's gRPC stream, its callbacks collected in a queue."""

    def __init__(self, srv: ServerProcess) -> None:
        self.client = client(srv)
        self.events: queue.Queue = queue.Queue()
        self.client.start_stream(callback=partial(self._callback), stream_timeout=TIMEOUT)

    def _callback(self, result, error) -> None:
        self.events.put((result, error))

    def send(self, model: str, values: list[int], request_id: str) -> None:
        inp = grpcclient.InferInput("IN", [len(values)], "INT32")
        inp.set_data_from_numpy(np.array(values, dtype=np.int32))
        self.client.async_stream_infer(model, [inp], request_id=request_id, enable_empty_final_response=True)

    def until_final(self, finals: int) -> dict[str, list]:
        """Each request's responses (OUT values, or the error text) until `finals` final ones came."""
        got: dict[str, list] = {}
        while finals:
            result, error = self.events.get(timeout=TIMEOUT)
            assert error is None, error
            response = result.get_response()
            if response.outputs:
                got.setdefault(response.id, []).append(int(result.as_numpy("OUT")[0]))
            if response.parameters["triton_final_response"].bool_param:
                got.setdefault(response.id, [])
                finals -= 1
        return got

    def close(self) -> None:
        self.client.stop_stream()
        self.client.close()


def test_decoupled_model_calls_bls_from_its_sender_threads_and_streams(server: ServerProcess) -> None:
    streams = [Stream(server) for _ in range(2)]
    try:
        for s, stream in enumerate(streams):
            for r in range(3):
                stream.send("bls_stream", [1 + r, 2 + s, 3], request_id=f"{s}-{r}")
        for s, stream in enumerate(streams):
            got = stream.until_final(3)
            # v: square gives v responses of v (v*v), identity gives v
            assert got == {f"{s}-{r}": [v * v + v for v in (1 + r, 2 + s, 3)] for r in range(3)}
    finally:
        for stream in streams:
            stream.close()


def test_async_execute_of_a_decoupled_model_runs_in_the_background(server: ServerProcess) -> None:
    stream = Stream(server)
    try:
        started = time.monotonic()
        for r in range(3):  # one instance; each request sleeps 0.5 s in its coroutine
            stream.send("async_decoupled", [r, 10 + r], request_id=f"r{r}")
        got = stream.until_final(3)
        took = time.monotonic() - started
        assert got == {f"r{r}": [2 * r, 2 * (10 + r)] for r in range(3)}
        assert took < 1.2, f"three requests took {took:.2f} s: their coroutines did not overlap"
    finally:
        stream.close()


def test_async_execute_that_raises_closes_its_request_with_the_error(server: ServerProcess) -> None:
    stream = Stream(server)
    try:
        stream.send("async_decoupled", [-1], request_id="bad")
        result, error = stream.events.get(timeout=TIMEOUT)
        assert error is None and int(result.as_numpy("OUT")[0]) == -1
        result, error = stream.events.get(timeout=TIMEOUT)
        assert "async execute gave up" in str(error)
        stream.send("async_decoupled", [4], request_id="good")  # the instance still serves
        assert stream.until_final(1) == {"good": [8]}
    finally:
        stream.close()
