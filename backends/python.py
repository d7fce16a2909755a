"""Python models (`backend: "python"`, `<version>/model.py`), compatible with Triton's.

Each instance runs the model in its own stub process (backends/python_stub.py), as
Triton does, so a model that holds the GIL, leaks or crashes cannot stall the
server. Tensors cross through shared memory (backends/python_ipc.py); only their
layout is pickled.

Per-request outcomes: `execute_requests` hands the model one pb_utils request per
client request and returns one outcome each, so an error response fails only its
request. An exception from the model's `execute` fails the requests of that call,
as in Triton. Through plain `execute` (one batch) the model sees a single request.

`submit` and `collect(timeout)` are the two halves of `execute_requests`, so the core
can run a Python model on the event loop with a bounded wait (the cheap-model inline
path) without letting a slow or hung model stall the loop.

A stub that dies (crash, `os._exit`, OOM kill) fails the request(s) it was running
with the exit status, and the instance starts a new stub right away (calling
`initialize` again). If that restart fails, each request fails fast with the reason
and a new restart is tried at most every RESTART_INTERVAL_S seconds. A stub that
hangs hangs its instance (as in Triton); requests time out through the core.
"""

from __future__ import annotations

import json
import logging
import math
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from google.protobuf import json_format, text_format
from tritonclient.grpc import model_config_pb2 as mc

from backends.base import (
    Backend,
    BackendError,
    BackendInputError,
    BackendStatusError,
    Device,
    ModelSpec,
    Outcome,
    Request,
    ResponseOutputs,
    Signature,
)
from backends.python_bls import ANSWER, REQUEST_KINDS, BlsRouter
from backends.python_config import config_signature, initialize_args, request_parameters, triton_config_json
from backends.python_decoupled import STATUS_OF_CODE, ResponseRouter, response_channel
from backends.python_events import StubEvents
from backends.python_ipc import Arena, Channel, ChannelClosed, layout, read, write
from backends.python_responses import IS_CANCELLED

log = logging.getLogger("nereid.python")

RESTART_INTERVAL_S = 10.0
STOP_TIMEOUT_S = 10.0
WARMUP_FINAL_TIMEOUT_S = 300.0  # a decoupled model's warmup request waits this long for its final flag
_ROOT = str(Path(__file__).resolve().parent.parent)  # the folder holding the `backends` package
_FD_SETSIZE = 1024  # select() takes descriptors below this

def _exit_status(proc: subprocess.Popen[bytes]) -> str:
    try:
        code = proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        return "stopped answering"
    if code < 0:
        try:
            return f"was killed by signal {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def _readable(sock: socket.socket, poller: select.poll, timeout: float) -> bool:
    """Whether `sock` turns readable within `timeout` seconds; microsecond resolution where
    `select` can take the descriptor, else poll's milliseconds (rounded up)."""
    fd = sock.fileno()
    timeout = max(0.0, timeout)
    if fd < _FD_SETSIZE:
        return bool(select.select((fd,), (), (), timeout)[0])
    return bool(poller.poll(math.ceil(timeout * 1000)))


class _Drain:
    """The response sink of a request run outside the scheduler (warmup of a decoupled model)."""

    def __init__(self) -> None:
        self._done = threading.Event()
        self._outputs: dict[str, Any] = {}
        self._error: BackendError | None = None
        self.responses = 0

    def send(self, outcome: dict[str, Any] | BackendError | None, final: bool) -> None:
        if isinstance(outcome, BackendError):
            self._error = self._error or outcome
        elif outcome is not None:
            self._outputs.update(outcome)
        if outcome is not None:
            self.responses += 1
        if final:
            self._done.set()

    def on_cancel(self, callback: Any) -> None:
        pass

    def wait(self, label: str) -> dict[str, Any]:
        if not self._done.wait(WARMUP_FINAL_TIMEOUT_S):
            raise BackendError(f"python model instance {label}: no final response (TRITONSERVER_RESPONSE_COMPLETE_"
                               f"FINAL) within {WARMUP_FINAL_TIMEOUT_S:g} s")
        if self._error is not None:
            raise self._error
        return self._outputs


class Stub:
    """One stub process and the channel and arenas shared with it."""

    def __init__(self, init: dict[str, Any], label: str) -> None:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        events, events_child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_ROOT, env.get("PYTHONPATH", "")) if p)
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "backends.python_stub", str(child.fileno()), str(events_child.fileno())],
                pass_fds=(child.fileno(), events_child.fileno()), env=env, stdin=subprocess.DEVNULL,
            )
        except BaseException:
            events.close()
            raise
        finally:
            child.close()
            events_child.close()
        self.events = StubEvents(events, init.get("model_name", ""), label)  # logs, custom metrics
        self.channel = Channel(parent)
        self.poller = select.poll()
        self.poller.register(parent, select.POLLIN)
        self.inputs = Arena(f"nereid-{label}-in")  # ours
        self.outputs = Arena(f"nereid-{label}-out")  # the stub's, mirrored
        self.bls = BlsRouter(self.channel, label)  # the model's calls to other models (python_bls.py)
        # The submitted requests' "has the client given up?" probes, for `request.is_cancelled()`.
        self.cancel_probes: list[Any] = []
        # A decoupled model's responses come on a channel of their own (python_decoupled.py).
        self.router: ResponseRouter | None = None
        if init.get("decoupled"):
            ours, theirs = response_channel()
            try:
                self.channel.send(init, theirs.fileno())
            finally:
                theirs.close()
            self.router = ResponseRouter(ours, label, lambda: _exit_status(self.proc))
        else:
            self.channel.send(init)

    def readable(self, timeout: float) -> bool:
        """Whether a message is here or arrives within `timeout` seconds."""
        return self.channel.buffered() or _readable(self.channel.sock, self.poller, timeout)

    def reply(self, what: str, deadline: float | None = None) -> Any:
        """The stub's next message; BackendError with the exit status if it died.

        Business-logic-scripting calls the model makes meanwhile are handed to the server
        on the way (they never block here). With a `deadline` (time.monotonic()), None if
        no other message came by then."""
        while True:
            if deadline is not None and not self.readable(deadline - time.monotonic()):
                return None
            try:
                message, fd = self.channel.recv()
            except (ChannelClosed, ConnectionError) as exc:
                raise BackendError(f"the Python stub process {_exit_status(self.proc)} while {what}") from exc
            if message[0] in REQUEST_KINDS:
                self.bls.handle(message, fd)
                continue
            if message[0] == IS_CANCELLED:  # the model asks about one of the running requests
                self._answer_cancelled(message[1], message[2])
                continue
            if fd is not None:
                self.outputs.attach(fd, message[1])
            return message

    def _answer_cancelled(self, call_id: int, index: int) -> None:
        probes = self.cancel_probes
        probe = probes[index] if 0 <= index < len(probes) else None
        try:
            cancelled = bool(probe()) if probe is not None else False
        except Exception:  # a probe must not take the reply loop down
            cancelled = False
        self.channel.send((ANSWER, call_id, True, ("ok", cancelled), 0))

    def stop(self, timeout: float) -> None:
        if self.proc.poll() is None:
            try:
                self.channel.send(("stop",))
                self.channel.sock.settimeout(timeout)
                self.channel.recv()  # ("stopped",) once finalize() returned
            except (OSError, EOFError) as exc:
                log.warning("python stub %d did not stop cleanly: %s", self.proc.pid, exc)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.bls.close()  # its decoupled BLS calls: nobody will take their answers
        if self.router is not None:
            self.router.close()
        self.channel.close()
        self.events.close()
        self.inputs.close()
        self.outputs.close()


class PythonBackend(Backend):
    name = "python"
    default_model_filename = "model.py"
    supports_gpu = True  # the instance's kind and device id are passed on; the model decides
    wants_requests = True
    out_of_process = True
    supports_decoupled = True

    @classmethod
    def variant(cls, spec: ModelSpec) -> type[Backend]:
        """`nereid_in_process: true` runs the model inside the server (backends/python_inproc.py)."""
        if spec.parameters.get("nereid_in_process") is None:
            return cls
        from backends.python_inproc import InProcessPythonBackend, wants_in_process

        return InProcessPythonBackend if wants_in_process(spec) else cls

    @classmethod
    def describe(cls, model_file: Path) -> Signature | None:
        """Run the model's `auto_complete_config` (in a throwaway stub) on the config on disk; a model
        without one keeps the config's inputs and outputs as they are (a model may have no inputs)."""
        model_dir = model_file.parent.parent
        config = mc.ModelConfig()
        config_path = model_dir / "config.pbtxt"
        if config_path.is_file():  # a regular file only: reading a FIFO would never return
            text_format.Parse(config_path.read_text(encoding="utf-8"), config)
        if not config.name:  # set after parsing: Parse refuses a second `name` on a filled message
            config.name = model_dir.name
        init = {"mode": "autocomplete", "model_file": str(model_file),
                "config": triton_config_json(json_format.MessageToJson(config))}
        stub = Stub(init, "autocomplete")
        try:
            message = stub.reply("running auto_complete_config")
        finally:
            stub.stop(STOP_TIMEOUT_S)
        if message[0] == "fatal":
            raise BackendError(f"auto_complete_config failed: {message[1]}")
        if message[1] is None:  # no auto_complete_config: the config's own I/O stands (none is fine)
            return config_signature(json.loads(init["config"]))
        return config_signature(message[1])

    def load(self, spec: ModelSpec, device: Device) -> None:
        self._spec = spec
        self._label = spec.instance_name or spec.name
        self._outputs = [o.name for o in spec.outputs]
        config_json = triton_config_json(spec.config_json)
        decoupled = bool(json.loads(config_json).get("model_transaction_policy", {}).get("decoupled"))
        self._init = {
            "mode": "serve",
            "decoupled": decoupled,
            "model_file": str(spec.model_file),
            "model_name": spec.name,
            "args": initialize_args(spec, device, config_json),
        }
        self._stub: Stub | None = None
        self._pending: Stub | None = None  # the stub running submitted requests
        self._broken = ""
        self._interrupted = ""  # why the running stub was killed from outside (an execution timeout)
        self._last_restart = 0.0
        self._model_ns: float | None = None  # moving average of the stub's time per call
        self._stub = self._start()

    def _start(self) -> Stub:
        stub = Stub(self._init, self._label)
        try:
            message = stub.reply("initializing the model")
        except BackendError:
            stub.stop(1.0)
            raise
        if message[0] != "ready":
            stub.stop(1.0)
            raise BackendError(f"Python model {self._spec.model_file} failed to initialize: {message[1]}")
        return stub

    def _restart(self) -> None:
        self._last_restart = time.monotonic()
        try:
            self._stub = self._start()
            self._broken = ""
            log.warning("python model instance %s: started a new stub (pid %d)", self._label, self._stub.proc.pid)
        except BackendError as exc:
            self._stub = None
            self._broken = str(exc)
            log.error("python model instance %s: restarting the stub failed: %s", self._label, exc)

    def execute(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """One request, outside the scheduler (warmup). A decoupled model's responses are drained
        up to its final flag: an error response fails the call; the outputs the responses carried
        come back together (a later response's tensor replaces an earlier one of the same name)."""
        sink = _Drain() if self._init["decoupled"] else None
        outcome = self.execute_requests([Request(inputs, sink=sink)])[0]
        if isinstance(outcome, BackendError):
            raise outcome
        if sink is not None:
            return sink.wait(self._label)
        return outcome

    def execute_requests(self, requests: Sequence[Request]) -> list[Outcome]:
        self.submit(requests)
        outcomes = self.collect(None)
        assert outcomes is not None
        return outcomes

    # -- the two halves of execute_requests, for a caller that must not block for long --

    def submit(self, requests: Sequence[Request]) -> None:
        """Hand the requests to the stub and return at once (tens of microseconds).

        With `collect(timeout)` this lets the core run a Python model on the event loop
        with a bounded wait: submit, collect(a few hundred µs), and only if the model is
        not done by then hand the rest of the wait to a worker thread (`collect(None)`).
        """
        if self._pending is not None:
            raise BackendError(f"python model instance {self._label}: submit() while a batch is in flight")
        stub = self._running_stub()
        tensors = [(name, arr) for r in requests for name, arr in r.inputs.items()]
        try:
            plan, needed = layout(tensors)
        except UnicodeEncodeError as exc:
            raise BackendInputError(f"cannot pass a string tensor to the model: {exc}") from exc
        fd = stub.inputs.ensure(needed)
        metas = write(stub.inputs, plan)
        wire, start = [], 0
        for r in requests:
            count = len(r.inputs)
            requested = list(r.requested_outputs) if r.requested_outputs else self._outputs
            parameters, correlation_id, flags = request_parameters(r.parameters)
            wire.append((r.id, parameters, requested, metas[start:start + count], correlation_id, flags))
            start += count
        stub.cancel_probes = [r.cancelled for r in requests]
        message: tuple[Any, ...] = ("exec", stub.inputs.size if fd is not None else 0, wire)
        if stub.router is not None:  # decoupled: each request's key for its responses
            message += ([stub.router.register(r.sink) for r in requests],)
        try:
            stub.channel.send(message, fd)
        except OSError as exc:
            self._crashed(stub, f"the Python stub process {_exit_status(stub.proc)}", exc)
        self._pending = stub

    def collect(self, timeout: float | None) -> list[Outcome] | None:
        """The outcomes of the submitted requests; None if not ready within `timeout` seconds
        (then call again). `timeout=None` waits as long as the model takes."""
        stub = self._pending
        if stub is None:
            raise BackendError(f"python model instance {self._label}: collect() without submit()")
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            message = stub.reply("executing the request", deadline)
        except BackendError as exc:
            self._crashed(stub, str(exc), exc)
        if message is None:
            return None
        self._pending = None
        if message[0] == "fail":
            raise BackendError(f"python model {self._spec.name} raised {message[1]}")
        took = message[3]
        last = self._model_ns
        self._model_ns = took if last is None else last + 0.1 * (min(took, 3 * last) - last)
        return [self._outcome(result, stub) for result in message[2]]

    def pending_fd(self) -> int | None:
        """The socket that turns readable once the submitted requests are answered (or the stub
        died), so an event loop can wait for it without a thread; None if nothing is submitted."""
        stub = self._pending
        return None if stub is None else stub.channel.sock.fileno()

    def model_ns(self) -> float | None:
        """A moving average of the time the stub spends per call (reading the inputs, the model's
        `execute`, writing the outputs), as timed in the stub, without the hand-offs to and from
        it; None before the first call."""
        return self._model_ns

    def pending_ready(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds (microsecond resolution) for the submitted requests'
        answer to start arriving (or the stub to die); whether it did. For a cheap model the
        event loop waits here briefly instead of going round the loop."""
        stub = self._pending
        return stub is not None and stub.readable(timeout)

    def pending_alive(self) -> bool:
        """Whether the stub running the submitted requests is still alive (so `collect` will not
        have to restart it, which takes a while). Asked right after the socket turned readable,
        a stub that just died may not be reaped yet: its end of file on the socket says so first."""
        stub = self._pending
        if stub is None or stub.proc.poll() is not None:
            return False
        try:
            return stub.channel.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) != b""
        except BlockingIOError:  # nothing to read yet: it is still working
            return True
        except OSError:
            return False

    def _running_stub(self) -> Stub:
        stub = self._stub
        if stub is None:
            if time.monotonic() - self._last_restart >= RESTART_INTERVAL_S:
                self._restart()
            stub = self._stub
            if stub is None:
                raise BackendError(f"python model instance {self._label} is not running: {self._broken}")
        return stub

    def interrupt(self, reason: str) -> bool:
        """Kill the stub running the submitted requests (a hung model); the waiting `collect`
        sees it die, starts a new stub and fails the requests with `reason`."""
        stub = self._pending
        if stub is None or stub.proc.poll() is not None:
            return False
        self._interrupted = reason
        stub.proc.kill()
        return True

    def _crashed(self, stub: Stub, reason: str, exc: BaseException) -> NoReturn:
        """The stub died under a request: start a new one, then fail the request with why."""
        if self._interrupted:
            reason, self._interrupted = f"{self._interrupted} (the stub process was killed)", ""
        self._pending = None
        stub.stop(1.0)
        self._restart()
        after = "a new stub was started" if self._stub else f"restarting it failed: {self._broken}"
        raise BackendError(f"python model instance {self._label}: {reason}; {after}") from exc

    @staticmethod
    def _outcome(result: Any, stub: Stub) -> Outcome:
        if result[0] == "ok":
            outputs = dict(read(stub.outputs, result[1], copy=True))
            if len(result) > 2 and result[2]:  # InferenceResponse(parameters=...)
                return ResponseOutputs(outputs, result[2])
            return outputs
        if result[0] == "decoupled":  # its responses went to the request's sink
            return {}
        _, message, code = result
        return BackendStatusError(message, STATUS_OF_CODE.get(code, "INTERNAL"))

    def close(self) -> None:
        stub, self._stub = getattr(self, "_stub", None), None
        if stub is not None:
            stub.stop(STOP_TIMEOUT_S)
