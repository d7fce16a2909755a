"""The fuzz suite's view of a server: raw calls to any method, the status codes each RPC may
answer to a client mistake, and the checks run after every example (the process is alive, its
log shows no bug, a known-good request still works) and after the run (resident memory).

A status other than the acceptable ones fails the example with the method, the code, the
server's message and the start of the body, so that hypothesis's shrunk example is a
reproducer on its own.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import grpc
from fuzz_strategies import ITEMSIZE, ModelSig, TensorSig
from hypothesis import note as hypothesis_note
from hypothesis.control import currently_in_test_context
from tritonclient.grpc import service_pb2 as pb
from util import ServerProcess, proc_status_mb, scaled

Code = grpc.StatusCode
INFERENCE = "inference.GRPCInferenceService"
HEALTH = "grpc.health.v1.Health"
REFLECTION = "grpc.reflection.v1alpha.ServerReflection"
INFERENCE_METHODS = tuple(m.name for m in pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods)
STREAMS = {f"/{INFERENCE}/ModelStreamInfer", f"/{REFLECTION}/ServerReflectionInfo"}

# What a client mistake may be answered with. UNKNOWN and INTERNAL never: they say the server
# failed, and a client cannot tell whether to retry. DEADLINE_EXCEEDED is a hang.
CLIENT_MISTAKE = frozenset({Code.OK, Code.INVALID_ARGUMENT, Code.NOT_FOUND, Code.UNAVAILABLE, Code.UNIMPLEMENTED,
                            Code.RESOURCE_EXHAUSTED})
_SERVER_WIDE = frozenset({Code.OK, Code.INVALID_ARGUMENT})  # no model, nothing to be missing
ACCEPTABLE: dict[str, frozenset[Code]] = {
    **{f"/{INFERENCE}/{m}": _SERVER_WIDE for m in ("ServerLive", "ServerReady", "ServerMetadata")},
    f"/{INFERENCE}/RepositoryIndex": frozenset({Code.OK, Code.INVALID_ARGUMENT, Code.NOT_FOUND}),
    **{f"/{INFERENCE}/{m}": frozenset({Code.INVALID_ARGUMENT, Code.UNIMPLEMENTED})
       for m in INFERENCE_METHODS if m.startswith("CudaSharedMemory")},
    # System shared memory (docs/SHARED_MEMORY.md): random keys name no object (NOT_FOUND).
    **{f"/{INFERENCE}/{m}": frozenset({Code.OK, Code.INVALID_ARGUMENT, Code.NOT_FOUND, Code.ALREADY_EXISTS})
       for m in INFERENCE_METHODS if m.startswith("SystemSharedMemory")},
    f"/{INFERENCE}/LogSettings": frozenset({Code.OK, Code.INVALID_ARGUMENT}),
    f"/{INFERENCE}/TraceSetting": frozenset({Code.OK, Code.INVALID_ARGUMENT, Code.NOT_FOUND}),
    f"/{HEALTH}/Check": frozenset({Code.OK, Code.NOT_FOUND, Code.INVALID_ARGUMENT}),
    f"/{HEALTH}/Watch": frozenset({Code.OK, Code.INVALID_ARGUMENT, Code.CANCELLED}),  # we cancel it
    f"/{REFLECTION}/ServerReflectionInfo": frozenset({Code.OK, Code.INVALID_ARGUMENT}),
}
# Log lines that only a bug writes: handlers.failure logs "<method> failed" (with a traceback) for an
# exception that is not a domain error; asyncio and the interpreter have their own. (A traceback
# alone is not one: a Python model that fails to import logs its own, as it should.)
BUG_LINE = re.compile(r"nereid\.protocol\] \S+ failed$|reading the stream failed|Task exception was never retrieved"
                      r"|Exception in callback|Fatal Python error|Segmentation fault|core dumped")


# Defects found by this suite and not fixed yet, each pinned by a strict xfail reproducer in
# tests/test_fuzz_findings.py (which turns into a failure once the defect is fixed). While one is
# open, exactly the answer it describes is tolerated here, keyed by a line that names it; whoever
# fixes it deletes the entry and the reproducer's xfail marker. (The first ones this suite found,
# long model names on load and config paths outside the model folder, were fixed on main by the
# model-names and config-paths work.)
OPEN_FINDINGS: dict[str, Callable[[str, Answer], bool]] = {}


def open_finding(method: str, answer: Answer) -> str | None:
    return next((name for name, matches in OPEN_FINDINGS.items() if matches(method, answer)), None)


# The same for config overrides that make a load read or run a file outside the repository
# (the argument is the override's text).
OPEN_OUTSIDE_FINDINGS: dict[str, Callable[[str], bool]] = {}


def open_outside_finding(config_text: str) -> str | None:
    return next((name for name, matches in OPEN_OUTSIDE_FINDINGS.items() if matches(config_text)), None)


def note(text: str) -> None:
    """Attach `text` to the failing example's report (outside a hypothesis test: nothing)."""
    if currently_in_test_context():
        hypothesis_note(text)


def acceptable(method: str) -> frozenset[Code]:
    return ACCEPTABLE.get(method, CLIENT_MISTAKE)


@dataclass
class Answer:
    code: Code
    details: str
    messages: list[bytes] = field(default_factory=list)


@dataclass(repr=False)
class Target:
    """A server under fuzz, with what the strategies need to know about its models."""

    server: ServerProcess
    channel: grpc.Channel
    sigs: dict[str, ModelSig]
    good_model: str
    extra_bug_lines: tuple[re.Pattern[str], ...] = ()
    rss_baseline_mb: float = 0.0
    tolerated: bool = False  # the current example met an open finding
    timeout: float = field(default_factory=lambda: scaled(15))

    def __repr__(self) -> str:
        return f"Target({self.server.url}, models={sorted(self.sigs)})"

    def unary(self, method: str, body: bytes) -> Answer:
        try:
            response = self.channel.unary_unary(method)(body, timeout=self.timeout)
            return Answer(Code.OK, "", [response])
        except grpc.RpcError as err:
            return Answer(err.code(), err.details() or "")

    def stream(self, method: str, bodies: Iterable[bytes]) -> Answer:
        messages: list[bytes] = []
        try:
            for message in self.channel.stream_stream(method)(iter(list(bodies)), timeout=self.timeout):
                messages.append(message)
            return Answer(Code.OK, "", messages)
        except grpc.RpcError as err:
            return Answer(err.code(), err.details() or "", messages)

    def first_of_stream(self, method: str, body: bytes) -> Answer:
        """A server-streaming call (health Watch): the first message, then cancel."""
        call = self.channel.unary_stream(method)(body, timeout=self.timeout)
        try:
            first = next(call)
            call.cancel()
            return Answer(Code.OK, "", [first])
        except grpc.RpcError as err:
            return Answer(err.code(), err.details() or "")

    def call(self, method: str, body: bytes) -> Answer:
        if method in STREAMS:
            return self.stream(method, [body])
        if method == f"/{HEALTH}/Watch":
            return self.first_of_stream(method, body)
        return self.unary(method, body)

    # -- properties --

    def check(self, method: str, body: bytes, answer: Answer, allowed: frozenset[Code] | None = None) -> None:
        """The answer is one a client mistake may get, and the server is still running."""
        allowed = acceptable(method) if allowed is None else allowed
        what = f"{method} answered {answer.code.name}: {answer.details[:500]!r}; body[:200]={body[:200]!r}"
        note(what)
        self.check_alive()
        if answer.code not in allowed and (finding := open_finding(method, answer)) is not None:
            note(f"tolerated: open finding {finding}")
            self.tolerated = True  # its traceback in the log is tolerated too, for this example
            return
        assert answer.code in allowed, what
        assert "Traceback" not in answer.details and "internal error" not in answer.details, what

    def check_alive(self) -> None:
        code = self.server.proc.poll()
        assert code is None, f"the server exited with {code}; log tail:\n" + "\n".join(self.server.lines[-40:])

    def bug_lines(self, since: int) -> list[str]:
        lines = self.server.lines[since:]
        return [line for line in lines if BUG_LINE.search(line) or any(p.search(line) for p in self.extra_bug_lines)]

    def check_healthy(self, since: int) -> None:
        """Alive, no bug in the log since line `since`, and a known-good request is answered right."""
        self.check_alive()
        bugs = [] if self.tolerated else self.bug_lines(since)
        self.tolerated = False
        assert not bugs, "the server logged a bug:\n" + "\n".join(self.server.lines[since:][-60:])
        request = good_request(self.sigs[self.good_model])
        answer = self.unary(f"/{INFERENCE}/ModelInfer", request.SerializeToString())
        assert answer.code == Code.OK, f"known-good request to {self.good_model}: {answer.code}: {answer.details}"
        response = pb.ModelInferResponse.FromString(answer.messages[0])
        assert list(response.raw_output_contents) == list(request.raw_input_contents), response

    def rss_mb(self) -> float:
        return proc_status_mb(self.server.proc.pid)


def good_request(sig: ModelSig) -> pb.ModelInferRequest:
    """A request `sig`'s model answers (zeros, one batch item, variable dimensions 1)."""
    request = pb.ModelInferRequest(model_name=sig.name, id="good")
    for tensor in sig.inputs:
        shape = [1 if d < 0 else d for d in tensor.shape]
        count = 1
        for d in shape:
            count *= d
        request.inputs.add(name=tensor.name, datatype=tensor.datatype, shape=shape)
        if tensor.datatype == "BYTES":
            request.raw_input_contents.append((b"\x01\x00\x00\x00a") * count)
        else:
            request.raw_input_contents.append(bytes(ITEMSIZE[tensor.datatype] * count))
    return request


def read_signatures(channel: grpc.Channel) -> dict[str, ModelSig]:
    """Every READY model's inputs and outputs, from RepositoryIndex, ModelMetadata and ModelConfig."""
    def ask(method: str, request: Any, cls: Any) -> Any:
        return cls.FromString(channel.unary_unary(f"/{INFERENCE}/{method}")(request.SerializeToString(), timeout=30))

    index = ask("RepositoryIndex", pb.RepositoryIndexRequest(ready=True), pb.RepositoryIndexResponse)
    sigs = {}
    for name in sorted({m.name for m in index.models}):
        meta = ask("ModelMetadata", pb.ModelMetadataRequest(name=name), pb.ModelMetadataResponse)
        config = ask("ModelConfig", pb.ModelConfigRequest(name=name), pb.ModelConfigResponse).config
        sigs[name] = ModelSig(
            name, tuple(TensorSig(t.name, t.datatype, tuple(t.shape)) for t in meta.inputs),
            tuple(TensorSig(t.name, t.datatype, tuple(t.shape)) for t in meta.outputs), config.max_batch_size)
    return sigs


def stream_agrees(unary: Answer, stream: Answer) -> str | None:
    """Whether one request sent alone on ModelStreamInfer got the answer ModelInfer gave it:
    a response without error_message exactly when ModelInfer said OK. None if so, else why not."""
    if stream.code != Code.OK:
        return f"the stream ended with {stream.code.name}: {stream.details}"
    if len(stream.messages) != 1:
        return f"{len(stream.messages)} responses to one request"
    response = pb.ModelStreamInferResponse.FromString(stream.messages[0])
    if "internal error" in response.error_message or "Traceback" in response.error_message:
        return f"stream error looks like a bug: {response.error_message!r}"
    if bool(response.error_message) == (unary.code == Code.OK):
        return f"ModelInfer said {unary.code.name} ({unary.details!r}), the stream said {response.error_message!r}"
    return None

