"""The soak's client threads (scripts/soak.py): valid, invalid, cancelled and control traffic.

Every worker paces itself to its share of the total request rate and records each request
in the Tally (soak_tally.py). Valid traffic goes through tritonclient (sync infer and the
bidirectional stream), as users send it; malformed traffic through raw stubs and a raw-bytes
method, so that it can be as wrong as a hostile client makes it. Every call has a deadline:
a server that stops answering shows up as failures, never as a hung soak.
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import numpy as np
import tritonclient.grpc as grpcclient
from grpc_health.v1 import health_pb2, health_pb2_grpc
from soak_repo import CONFIG_MODEL, GENERATION_KEY, MODELS, PY_SLOW_MARKER, SLOW_MS
from soak_tally import Tally, status_name
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc
from tritonclient.utils import InferenceServerException

ANSWER_TIMEOUT = 10.0  # seconds a valid request may take before it counts as failed (a hang)
SLOW_DEADLINE = 0.03  # client deadline for slow requests that are meant to expire (SLOW_MS is longer)
CANCEL_AFTER = 0.02  # seconds before an explicit cancel
LARGE_ELEMENTS = 256 * 1024  # FP32 elements: 1 MiB requests
MAX_MESSAGE = 64 * 1024 * 1024
SERVICE = "/inference.GRPCInferenceService/"

# Which share of the total request rate each worker gets (two unary workers get one share each).
SHARES = {"unary": 0.2, "stream": 0.2, "slow": 0.05, "invalid": 0.16, "cancel": 0.05, "control": 0.12, "large": 0.02}

INPUT_WIDTH = {"mlp": 64}


def channel(url: str) -> grpc.Channel:
    return grpc.insecure_channel(url, options=[("grpc.max_send_message_length", MAX_MESSAGE),
                                               ("grpc.max_receive_message_length", MAX_MESSAGE)])


class Pacer:
    """Spaces calls 1/rate apart; when the worker falls behind it does not burst to catch up."""

    def __init__(self, rate: float) -> None:
        self.interval = 1.0 / rate
        self.next = time.monotonic()

    def wait(self, stop: threading.Event) -> bool:
        """Sleep until the next slot; False once `stop` is set."""
        now = time.monotonic()
        self.next = max(self.next + self.interval, now - self.interval)
        delay = self.next - now
        if delay > 0:
            return not stop.wait(delay)
        return not stop.is_set()


class Worker(threading.Thread):
    """One client thread: setup, then `step` (one request, or one window/case) at its pace until stopped."""

    kind = "worker"
    prime_steps = 4  # unpaced steps in the priming burst (prime)

    def __init__(self, url: str, tally: Tally, stop: threading.Event, rate: float, seed: int) -> None:
        super().__init__(name=f"soak-{self.kind}-{seed}", daemon=True)
        self.url = url
        self.tally = tally
        self.stop_event = stop
        self.rate = rate
        self.rng = np.random.default_rng(seed)

    def run(self) -> None:
        pacer = Pacer(self.rate)
        try:
            self.setup()
        except Exception as exc:
            self.tally.bad(self.kind, "client-setup", type(exc).__name__, repr(exc))
            return
        try:
            while pacer.wait(self.stop_event):
                try:
                    self.step()
                except Exception as exc:  # a bug in the soak or the client library: count it, go on
                    self.tally.bad(self.kind, "client-exception", type(exc).__name__, repr(exc))
        finally:
            self.teardown()

    def setup(self) -> None:
        pass

    def step(self) -> None:
        raise NotImplementedError

    def teardown(self) -> None:
        pass


# ---------------------------------------------------------------------------
# Valid traffic and how its answers are checked


class Expectations:
    """The answer each valid request must get. Identity and Python models echo their input;
    mlp is deterministic, so each of a few fixed inputs must always give the output it gave the
    first time (a batching mix-up or a bad reload would change it)."""

    def __init__(self, rng: np.random.Generator) -> None:
        self._mlp_inputs = [rng.standard_normal((1, 64)).astype(np.float32) for _ in range(4)]
        self._mlp_outputs: dict[int, np.ndarray] = {}
        self._lock = threading.Lock()

    def make(self, model: str, rng: np.random.Generator) -> tuple[np.ndarray, int]:
        if model == "mlp":
            index = int(rng.integers(len(self._mlp_inputs)))
            return self._mlp_inputs[index], index
        return rng.standard_normal((1, 4)).astype(np.float32), -1

    def check(self, model: str, sent: np.ndarray, index: int, got: np.ndarray | None) -> str:
        """'' if `got` is the right answer, else what is wrong."""
        if got is None:
            return "no OUTPUT0 in the response"
        if model != "mlp":
            return "" if np.array_equal(sent, got) else f"echo mismatch: sent {sent.ravel()[:4]}, got {got.ravel()[:4]}"
        if got.shape != (1, 16):
            return f"mlp output shape {got.shape}, expected (1, 16)"
        with self._lock:
            reference = self._mlp_outputs.setdefault(index, got.copy())
        return "" if np.allclose(reference, got, rtol=1e-5, atol=1e-6) else "mlp output differs from its first answer"


def infer_inputs(data: np.ndarray) -> list[grpcclient.InferInput]:
    inp = grpcclient.InferInput("INPUT0", list(data.shape), "FP32")
    inp.set_data_from_numpy(data)
    return [inp]


class UnaryWorker(Worker):
    """tritonclient's sync infer over the fast models."""

    kind = "unary"
    models = ("id_direct", "id_batched", "mlp", "py_echo")
    prime_steps = len(models)

    def __init__(self, *args: Any, expectations: Expectations, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.expect = expectations
        self.order = itertools.cycle(self.models)

    def setup(self) -> None:
        self.client = grpcclient.InferenceServerClient(self.url)

    def teardown(self) -> None:
        self.client.close()

    def step(self) -> None:
        model = next(self.order)
        data, index = self.expect.make(model, self.rng)
        start = time.perf_counter()
        try:
            result = self.client.infer(model, infer_inputs(data), client_timeout=ANSWER_TIMEOUT)
        except InferenceServerException as exc:
            self.tally.bad(self.kind, model, status_name(exc.status()), exc.message())
            return
        seconds = time.perf_counter() - start
        wrong = self.expect.check(model, data, index, result.as_numpy("OUTPUT0"))
        if wrong:
            self.tally.bad(self.kind, model, "WRONG_OUTPUT", wrong)
        else:
            self.tally.good(self.kind, f"unary {model}", model, result.get_response().model_version, seconds)


class SlowWorker(Worker):
    """Valid requests that take SLOW_MS (id_slow, and py_echo's slow path), several in flight at
    once through tritonclient's async_infer, so that some are always running when versions swap:
    the old copy must finish them."""

    kind = "slow"
    IN_FLIGHT = 4
    prime_steps = 2

    def setup(self) -> None:
        self.client = grpcclient.InferenceServerClient(self.url)
        self.slots = threading.Semaphore(self.IN_FLIGHT)
        self.targets = itertools.cycle(("id_slow", "py_echo"))

    def teardown(self) -> None:
        for _ in range(self.IN_FLIGHT):  # wait for the answers still due
            self.slots.acquire(timeout=ANSWER_TIMEOUT)
        self.client.close()

    def step(self) -> None:
        if not self.slots.acquire(timeout=ANSWER_TIMEOUT):
            self.tally.bad(self.kind, "slow", "NO_ANSWER", f"{self.IN_FLIGHT} requests unanswered in {ANSWER_TIMEOUT}s")
            return
        model = next(self.targets)
        data = self.rng.standard_normal((1, 4)).astype(np.float32)
        if model == "py_echo":
            data[0, 0] = PY_SLOW_MARKER
        start = time.perf_counter()

        def done(result: Any, error: Any) -> None:
            try:
                if error is not None:
                    self.tally.bad(self.kind, model, status_name(error.status()), error.message())
                elif not np.array_equal(result.as_numpy("OUTPUT0"), data):
                    self.tally.bad(self.kind, model, "WRONG_OUTPUT", "echo mismatch")
                else:
                    self.tally.good(self.kind, f"slow {model} ({SLOW_MS} ms)", model,
                                    result.get_response().model_version, time.perf_counter() - start)
            finally:
                self.slots.release()

        self.client.async_infer(model, infer_inputs(data), callback=done, client_timeout=ANSWER_TIMEOUT)


class StreamWorker(Worker):
    """tritonclient's bidirectional stream: windows of WINDOW requests in flight at once."""

    kind = "stream"
    WINDOW = 4
    models = ("id_batched", "mlp", "py_echo", "id_direct")

    def __init__(self, *args: Any, expectations: Expectations, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.rate = self.rate / self.WINDOW  # one step sends a window
        self.expect = expectations
        self.order = itertools.cycle(self.models)
        self.ids = itertools.count()
        self.pending: dict[str, tuple[str, np.ndarray, int, float]] = {}
        self.cond = threading.Condition()
        self.request_errors: list[str] = []  # error_message answers (tritonclient drops their id)
        self.stream_error: tuple[str, str] | None = None  # the stream itself ended
        self.client: grpcclient.InferenceServerClient | None = None

    def _on_response(self, result: Any, error: Any) -> None:
        now = time.perf_counter()
        with self.cond:
            if error is not None:
                if error.status():
                    self.stream_error = (status_name(error.status()), error.message())
                else:
                    self.request_errors.append(error.message())
            else:
                response = result.get_response()
                item = self.pending.pop(response.id, None)
                if item is None:
                    self.tally.bad(self.kind, "stream", "UNMATCHED", f"response for unknown id {response.id!r}",
                                   count_sent=False)
                else:
                    model, data, index, start = item
                    wrong = self.expect.check(model, data, index, result.as_numpy("OUTPUT0"))
                    if wrong:
                        self.tally.bad(self.kind, model, "WRONG_OUTPUT", wrong)
                    else:
                        self.tally.good(self.kind, f"stream {model}", model, response.model_version, now - start)
            self.cond.notify_all()

    def _open(self) -> None:
        self.client = grpcclient.InferenceServerClient(self.url)
        self.client.start_stream(callback=self._on_response)

    def _close(self) -> None:
        if self.client is not None:
            try:
                self.client.stop_stream(cancel_requests=True)
            finally:
                self.client.close()
            self.client = None

    def teardown(self) -> None:
        self._close()

    def step(self) -> None:
        if self.client is None:
            self._open()
        assert self.client is not None
        with self.cond:
            self.request_errors.clear()
            self.stream_error = None
        for _ in range(self.WINDOW):
            model = next(self.order)
            data, index = self.expect.make(model, self.rng)
            request_id = str(next(self.ids))
            with self.cond:
                self.pending[request_id] = (model, data, index, time.perf_counter())
            self.client.async_stream_infer(model, infer_inputs(data), request_id=request_id)
        deadline = time.monotonic() + ANSWER_TIMEOUT
        with self.cond:
            while (len(self.pending) > len(self.request_errors) and self.stream_error is None
                   and time.monotonic() < deadline):
                self.cond.wait(0.1)
            if not self.pending:
                return
            # Every request still pending failed: answered with an error (tritonclient drops the
            # id of those, so they are matched by count), ended with the stream, or never answered.
            messages = list(self.request_errors)
            for model, *_ in self.pending.values():
                if messages:
                    self.tally.bad(self.kind, model, "STREAM_ERROR", messages.pop(0))
                elif self.stream_error is not None:
                    self.tally.bad(self.kind, model, *self.stream_error)
                else:
                    self.tally.bad(self.kind, model, "NO_ANSWER", f"no answer on the stream in {ANSWER_TIMEOUT}s")
            self.pending.clear()
        self._close()  # a fresh stream for the next window


# ---------------------------------------------------------------------------
# Invalid traffic: each case with the status(es) Triton gives it


def raw_request(model: str, data: np.ndarray, datatype: str = "FP32", shape: list[int] | None = None,
                version: str = "") -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model, model_version=version)
    request.inputs.add(name="INPUT0", datatype=datatype, shape=list(data.shape) if shape is None else shape)
    request.raw_input_contents.append(data.tobytes())
    return request


INVALID = frozenset({"INVALID_ARGUMENT"})
NOT_FOUND = frozenset({"NOT_FOUND"})
FOUR = np.arange(4, dtype=np.float32).reshape(1, 4)


def _bad_priority() -> pb.ModelInferRequest:
    request = raw_request("id_direct", FOUR)
    request.parameters["priority"].string_param = "high"
    return request


def _shared_memory() -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="id_batched")
    tensor = request.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 4])
    tensor.parameters["shared_memory_region"].string_param = "soak_region"
    tensor.parameters["shared_memory_byte_size"].int64_param = 16
    return request


def _short_by_one() -> pb.ModelInferRequest:
    request = raw_request("id_direct", FOUR)
    request.raw_input_contents[0] = FOUR.tobytes()[:-1]
    return request


def _two_contents() -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="mlp")
    tensor = request.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 64])
    tensor.contents.fp32_contents.extend([0.0] * 64)
    tensor.contents.int_contents.extend([0] * 64)
    return request


# name -> (request builder or raw body, expected statuses)
INFER_CASES: dict[str, tuple[Callable[[], Any], frozenset[str]]] = {
    "wrong-shape": (lambda: raw_request("id_direct", np.zeros((1, 5), np.float32)), INVALID),
    "wrong-dtype": (lambda: raw_request("id_batched", np.zeros((1, 4), np.int32), "INT32"), INVALID),
    "wrong-dtype-mlp": (lambda: raw_request("mlp", np.zeros((1, 64), np.float64), "FP64"), INVALID),
    "byte-size-short": (_short_by_one, INVALID),
    "too-large-batch": (lambda: raw_request("py_echo", np.zeros((9, 4), np.float32)), INVALID),
    "missing-input": (lambda: pb.ModelInferRequest(model_name="py_echo"), INVALID),
    "unknown-model": (lambda: raw_request("soak_no_such_model", FOUR), NOT_FOUND),
    "unknown-version": (lambda: raw_request("id_direct", FOUR, version="7"), NOT_FOUND),
    "noncanonical-version": (lambda: raw_request("id_direct", FOUR, version="01"), INVALID),
    "bad-priority": (_bad_priority, INVALID),
    "shared-memory": (_shared_memory, NOT_FOUND),  # a region nobody registered
    "two-contents": (_two_contents, INVALID),
}
GARBAGE_CASES: dict[str, tuple[str, bytes, frozenset[str]]] = {
    "garbage-infer": ("ModelInfer", b"\xff\xff\xff\xff", INVALID),
    "truncated-infer": ("ModelInfer", b"\x0a\x20soak", INVALID),
    "zero-tag-infer": ("ModelInfer", b"\x00\x01\x02", INVALID),
    "garbage-metadata": ("ModelMetadata", b"\xff\x01", INVALID),
    "garbage-config": ("ModelConfig", b"\x0a\xff\xff\xff\xff\x0f", INVALID),
    "empty-infer": ("ModelInfer", b"", NOT_FOUND | INVALID),
}


class InvalidWorker(Worker):
    """Malformed requests through raw stubs and raw bytes, plus a bad request on a stream
    (which must get an error for that request only, the stream and the next request staying fine)."""

    kind = "invalid"
    prime_steps = len(INFER_CASES) + len(GARBAGE_CASES) + 1

    def setup(self) -> None:
        self.channel = channel(self.url)
        self.stub = service_pb2_grpc.GRPCInferenceServiceStub(self.channel)
        self.raw = {m: self.channel.unary_unary(SERVICE + m) for m in ("ModelInfer", "ModelMetadata", "ModelConfig")}
        cases: list[Callable[[], None]] = [self._infer_case(n) for n in INFER_CASES]
        cases += [self._garbage_case(n) for n in GARBAGE_CASES]
        cases.append(self._stream_case)
        self.cases = itertools.cycle(cases)

    def teardown(self) -> None:
        self.channel.close()

    def step(self) -> None:
        next(self.cases)()

    def _infer_case(self, name: str) -> Callable[[], None]:
        build, expected = INFER_CASES[name]

        def run() -> None:
            try:
                self.stub.ModelInfer(build(), timeout=ANSWER_TIMEOUT)
                self.tally.refused(self.kind, name, "OK", expected, "an invalid request was answered OK")
            except grpc.RpcError as err:
                self.tally.refused(self.kind, name, status_name(err.code()), expected, err.details() or "")

        return run

    def _garbage_case(self, name: str) -> Callable[[], None]:
        method, body, expected = GARBAGE_CASES[name]

        def run() -> None:
            try:
                self.raw[method](body, timeout=ANSWER_TIMEOUT)
                self.tally.refused(self.kind, name, "OK", expected, "garbage was answered OK")
            except grpc.RpcError as err:
                self.tally.refused(self.kind, name, status_name(err.code()), expected, err.details() or "")

        return run

    def _stream_case(self) -> None:
        bad = raw_request("id_batched", np.zeros((1, 3), np.float32))
        bad.id = "bad"
        good = raw_request("id_batched", FOUR)
        good.id = "good"
        try:
            responses = list(self.stub.ModelStreamInfer(iter([bad, good]), timeout=ANSWER_TIMEOUT))
        except grpc.RpcError as err:
            self.tally.bad(self.kind, "stream-bad-then-good", status_name(err.code()), err.details() or "")
            return
        by_id = {r.infer_response.id: r for r in responses}
        if len(responses) != 2 or set(by_id) != {"bad", "good"}:
            ids = [r.infer_response.id for r in responses]
            self.tally.bad(self.kind, "stream-bad-then-good", "WRONG_ANSWERS", f"answers for ids {ids}")
            return
        status = "STREAM_ERROR" if by_id["bad"].error_message else "OK"
        self.tally.refused(self.kind, "stream-bad-request", status, frozenset({"STREAM_ERROR"}))
        if by_id["good"].error_message:
            self.tally.bad(self.kind, "stream-good-after-bad", "STREAM_ERROR", by_id["good"].error_message)
        else:
            self.tally.good_untimed(self.kind)


class LargeWorker(Worker):
    """Large requests: valid 1 MiB echoes, and 4 MiB ones whose declared shape does not match
    their bytes (rejected). Both alternate at a low rate; a server that kept any part of them
    (a rejected request's frames, an answered request's buffers) grows by megabytes a second,
    which the RSS bound catches."""

    kind = "large"
    prime_steps = 8

    def setup(self) -> None:
        self.channel = channel(self.url)
        self.stub = service_pb2_grpc.GRPCInferenceServiceStub(self.channel)
        self.flip = itertools.cycle((True, False))
        self.valid = [self.rng.standard_normal(LARGE_ELEMENTS).astype(np.float32) for _ in range(4)]
        mismatched = np.zeros(4 * LARGE_ELEMENTS, np.float32)
        self.mismatched = raw_request("id_large", mismatched, shape=[mismatched.size + 1])

    def teardown(self) -> None:
        self.channel.close()

    def step(self) -> None:
        valid = next(self.flip)
        request = raw_request("id_large", self.valid[int(self.rng.integers(4))]) if valid else self.mismatched
        start = time.perf_counter()
        try:
            response = self.stub.ModelInfer(request, timeout=ANSWER_TIMEOUT)
        except grpc.RpcError as err:
            status = status_name(err.code())
            if valid:
                self.tally.bad(self.kind, "large-valid", status, err.details() or "")
            else:
                self.tally.refused(self.kind, "large-size-mismatch", status, INVALID, err.details() or "")
            return
        if not valid:
            self.tally.refused(self.kind, "large-size-mismatch", "OK", INVALID, "answered OK")
        elif response.raw_output_contents[0] != request.raw_input_contents[0]:
            self.tally.bad(self.kind, "large-valid", "WRONG_OUTPUT", "echo mismatch")
        else:
            self.tally.good(self.kind, "unary id_large (1 MiB)", "id_large", response.model_version,
                            time.perf_counter() - start)


# ---------------------------------------------------------------------------
# Cancelled traffic: the client gives up on requests to the slow model


class CancelWorker(Worker):
    """Requests the client abandons: a deadline shorter than the model's delay, an explicit
    cancel of tritonclient's async_infer, and a stream cancelled mid-request; each against the
    batched identity model id_slow and against the Python model py_echo (a request it sleeps on),
    whose instances serve valid traffic at the same time."""

    kind = "cancel"
    TARGETS = (("id_slow", FOUR), ("py_echo", np.full((1, 4), PY_SLOW_MARKER, np.float32)))
    prime_steps = 6

    def setup(self) -> None:
        self.client = grpcclient.InferenceServerClient(self.url)
        self.channel = channel(self.url)
        self.stub = service_pb2_grpc.GRPCInferenceServiceStub(self.channel)
        self.modes = itertools.cycle(itertools.product(
            (self._deadline, self._cancel_future, self._cancel_stream), self.TARGETS))

    def teardown(self) -> None:
        self.client.close()
        self.channel.close()

    def step(self) -> None:
        mode, (model, data) = next(self.modes)
        mode(model, data)

    def _deadline(self, model: str, data: np.ndarray) -> None:
        try:
            self.client.infer(model, infer_inputs(data), client_timeout=SLOW_DEADLINE)
            status, detail = "OK", ""
        except InferenceServerException as exc:
            status, detail = status_name(exc.status()), exc.message()
        self.tally.gave_up(self.kind, f"client-deadline {model}", status, "DEADLINE_EXCEEDED", detail)

    def _cancel_future(self, model: str, data: np.ndarray) -> None:
        answers: queue.Queue[Any] = queue.Queue()
        context = self.client.async_infer(model, infer_inputs(data), callback=lambda result, error: answers.put(
            ("OK", "") if error is None else (status_name(error.status()), error.message())))
        time.sleep(CANCEL_AFTER)
        context.cancel()
        try:
            status, detail = answers.get(timeout=ANSWER_TIMEOUT)
        except queue.Empty:
            status, detail = "NO_ANSWER", "async_infer's callback never ran after cancel()"
        self.tally.gave_up(self.kind, f"future-cancel {model}", status, "CANCELLED", detail)

    def _cancel_stream(self, model: str, data: np.ndarray) -> None:
        release = threading.Event()

        def requests() -> Iterator[pb.ModelInferRequest]:
            yield raw_request(model, data)
            release.wait(ANSWER_TIMEOUT)

        call = self.stub.ModelStreamInfer(requests(), timeout=ANSWER_TIMEOUT)
        time.sleep(CANCEL_AFTER)
        call.cancel()
        release.set()
        how = f"stream-cancel {model}"
        try:
            for response in call:
                if response.error_message:
                    self.tally.gave_up(self.kind, how, "STREAM_ERROR", "CANCELLED", response.error_message)
                    return
            status, detail = "OK", ""
        except grpc.RpcError as err:
            status, detail = status_name(err.code()), err.details() or ""
        self.tally.gave_up(self.kind, how, status, "CANCELLED", detail)


# ---------------------------------------------------------------------------
# Control traffic: health, metadata, statistics, index; all must answer, and say ready


class ControlWorker(Worker):
    kind = "control"
    prime_steps = 7 + 2 * len(MODELS)

    def setup(self) -> None:
        self.channel = channel(self.url)
        self.stub = service_pb2_grpc.GRPCInferenceServiceStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)
        calls: list[tuple[str, Callable[[], str]]] = [
            ("ServerLive", lambda: "" if self.stub.ServerLive(pb.ServerLiveRequest(), timeout=ANSWER_TIMEOUT).live
             else "live=false"),
            ("ServerReady", lambda: "" if self.stub.ServerReady(pb.ServerReadyRequest(), timeout=ANSWER_TIMEOUT).ready
             else "ready=false"),
            ("health.Check", self._health_check),
            ("health.Watch", self._health_watch),
            ("RepositoryIndex", lambda: "" if self.stub.RepositoryIndex(
                pb.RepositoryIndexRequest(), timeout=ANSWER_TIMEOUT).models else "empty index"),
            ("ModelStatistics", lambda: "" if self.stub.ModelStatistics(
                pb.ModelStatisticsRequest(), timeout=ANSWER_TIMEOUT).model_stats else "no statistics"),
            (f"ModelConfig {CONFIG_MODEL}", self._config_check),
        ]
        for model in MODELS:
            calls.append((f"ModelReady {model}", self._ready_check(model)))
            calls.append((f"ModelMetadata {model}", self._metadata_check(model)))
        self.calls = itertools.cycle(calls)

    def teardown(self) -> None:
        self.channel.close()

    def _health_check(self) -> str:
        status = self.health.Check(health_pb2.HealthCheckRequest(service=""), timeout=ANSWER_TIMEOUT).status
        return "" if status == health_pb2.HealthCheckResponse.SERVING else f"health status {status}"

    def _health_watch(self) -> str:
        """Open a Watch, take its first answer, and hang up (the server must not mind)."""
        call = self.health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=ANSWER_TIMEOUT)
        try:
            status = next(call).status
        finally:
            call.cancel()
        return "" if status == health_pb2.HealthCheckResponse.SERVING else f"health status {status}"

    def _config_check(self) -> str:
        config = self.stub.ModelConfig(pb.ModelConfigRequest(name=CONFIG_MODEL), timeout=ANSWER_TIMEOUT).config
        return "" if GENERATION_KEY in config.parameters else f"{GENERATION_KEY} missing from the config"

    def _ready_check(self, model: str) -> Callable[[], str]:
        return lambda: "" if self.stub.ModelReady(pb.ModelReadyRequest(name=model), timeout=ANSWER_TIMEOUT).ready \
            else "ready=false"

    def _metadata_check(self, model: str) -> Callable[[], str]:
        return lambda: "" if self.stub.ModelMetadata(pb.ModelMetadataRequest(name=model), timeout=ANSWER_TIMEOUT).name \
            == model else "wrong name"

    def step(self) -> None:
        name, call = next(self.calls)
        start = time.perf_counter()
        try:
            wrong = call()
        except grpc.RpcError as err:
            self.tally.bad(self.kind, name, status_name(err.code()), err.details() or "")
            return
        if wrong:
            self.tally.bad(self.kind, name, "WRONG_ANSWER", wrong)
        else:
            self.tally.good(self.kind, "control (health, metadata, index, stats)", "", "",
                            time.perf_counter() - start)


def prime(workers: list[Worker]) -> None:
    """Run every worker's first steps at once, unpaced, before the paced run starts: each case
    and model is touched, and the allocator's arenas grow to their working size, so that the
    RSS baseline taken after the warm-up is not still climbing in a short soak. These requests
    are counted like all others."""

    def burst(worker: Worker) -> None:
        try:
            worker.setup()
            for _ in range(worker.prime_steps):
                worker.step()
        except Exception as exc:
            worker.tally.bad(worker.kind, "client-exception", type(exc).__name__, repr(exc))
        finally:
            worker.teardown()

    threads = [threading.Thread(target=burst, args=(w,), daemon=True) for w in workers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(2 * ANSWER_TIMEOUT)


def start_workers(url: str, tally: Tally, stop: threading.Event, rate: float) -> list[Worker]:
    """Every worker, each paced to its share of `rate` requests/s, after a priming burst."""
    prime(make_workers(url, tally, stop, rate))
    workers = make_workers(url, tally, stop, rate)
    for worker in workers:
        worker.start()
    return workers


def make_workers(url: str, tally: Tally, stop: threading.Event, rate: float) -> list[Worker]:
    expectations = Expectations(np.random.default_rng(0))
    return [
        UnaryWorker(url, tally, stop, rate * SHARES["unary"], 1, expectations=expectations),
        UnaryWorker(url, tally, stop, rate * SHARES["unary"], 2, expectations=expectations),
        StreamWorker(url, tally, stop, rate * SHARES["stream"], 3, expectations=expectations),
        SlowWorker(url, tally, stop, rate * SHARES["slow"], 8),
        InvalidWorker(url, tally, stop, rate * SHARES["invalid"], 4),
        CancelWorker(url, tally, stop, rate * SHARES["cancel"], 5),
        ControlWorker(url, tally, stop, rate * SHARES["control"], 6),
        LargeWorker(url, tally, stop, rate * SHARES["large"], 7),
    ]
