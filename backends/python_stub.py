"""The stub: one process per Python model instance, as in Triton's python backend.

Started by `backends/python.py` as `python -m backends.python_stub FD` with one end of a
Unix socket pair. It imports the model's `model.py`, calls `initialize(args)`, then
answers `exec` messages by calling `execute(requests)` until it is told to stop (it
calls `finalize()`) or the server goes away (end of file on the socket: it exits).
A crash or a hang here never takes the server's threads or its GIL with it.

Run with `autocomplete` instead of serving, it calls the model's optional
`auto_complete_config` on the existing config and sends back the result.
"""

from __future__ import annotations

import asyncio
import functools
import importlib
import importlib.util
import json
import os
import signal
import socket
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

from backends import python_observe
from backends.python_async import BackgroundLoop
from backends.python_bls_stub import BlsClient
from backends.python_calls import ExecuteFailed, ModelCalls, describe, pb_utils
from backends.python_ipc import Arena, Channel, ChannelClosed, layout, read, write
from backends.python_responses import IS_CANCELLED, InferenceResponseSender, ResponseHub


def _load_module(model_file: str) -> Any:
    """Import the model as Triton does: the version folder and the model folder go on `sys.path`
    and the file is imported as `<version>.<name>` (e.g. `1.model`), so a multi-file model can
    use `from .helper import x` (the version folder is a package) as well as `import helper`."""
    path = Path(model_file).resolve()
    version_dir, model_dir = path.parent, path.parent.parent
    for folder in (str(model_dir), str(version_dir)):  # the version folder ends up first
        if folder not in sys.path:
            sys.path.insert(0, folder)
    name = f"{version_dir.name}.{path.stem}"
    if version_dir.name.isidentifier() or version_dir.name.isdigit():
        importlib.invalidate_caches()
        module = importlib.import_module(name)
    else:  # a folder name that cannot be a package: import the file alone
        spec = importlib.util.spec_from_file_location(path.stem, model_file)
        if spec is None or spec.loader is None:
            raise ImportError(f"cannot import {model_file}")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    sys.modules.setdefault("model", module)
    if not hasattr(module, "TritonPythonModel"):
        raise AttributeError(f"{model_file} defines no class TritonPythonModel")
    return module


class Stub(ModelCalls):
    def __init__(self, channel: Channel, init: dict[str, Any], responses: Channel | None = None) -> None:
        self.channel = channel
        # Response senders; `responses` is the response channel of a decoupled model.
        self.hub = ResponseHub(responses)
        self.model_name = init["model_name"]
        self.inputs = Arena("nereid-in")  # the server's arena, mirrored
        self.outputs = Arena("nereid-out")  # ours
        # BLS: a decoupled model calls over its response channel, read by the hub's listener thread.
        self.bls = BlsClient(responses or channel, pb_utils, listened=responses is not None)
        self.hub.answers = self.bls.mailbox if responses is not None else None
        pb_utils._BLS = self.bls
        self._loop: asyncio.AbstractEventLoop | None = None  # for `async def execute` models, made on first use
        self._background: BackgroundLoop | None = None  # a decoupled model's `async def execute` runs there
        self._executing = False  # a default-mode `execute` runs (request.is_cancelled() may ask the server)
        module = _load_module(init["model_file"])
        self.model = module.TritonPythonModel()

    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args.get("model_config") or "{}")
        self.iterative = bool(config.get("sequence_batching", {}).get("iterative_sequence", False))
        if hasattr(self.model, "initialize"):
            self.model.initialize(args)
        if not hasattr(self.model, "execute"):
            raise AttributeError("TritonPythonModel has no execute(requests) method")
        self.bls.phase = "execute"

    def serve(self) -> None:
        # The main socket also carries a default-mode model's BLS answers, which any thread may be
        # reading for: read it through the mailbox. A decoupled model's go elsewhere.
        receive = self.channel.recv if self.hub.decoupled else self.bls.mailbox.next_other
        while True:
            try:
                message, fd = receive()
            except (ChannelClosed, ConnectionError):
                return  # the server went away
            if message[0] == "stop":
                self.finalize()
                return
            arena_size, requests = message[1], message[2]
            if fd is not None:
                self.inputs.attach(fd, arena_size)
            if len(message) > 3:  # a decoupled model: the server's keys for its requests
                result = self.execute_decoupled(requests, message[3])
            else:
                result = self.execute(requests)
            self.bls.flush()  # BLS iterators let go of during execute that could not say so then
            self.channel.send(*result)

    def execute(self, wire_requests: list[Any]) -> tuple[Any, int | None]:
        started = time.perf_counter_ns()  # the server decides how to wait from this: count our I/O too
        requests, wanted = [], []
        for request_id, parameters, requested, metas, *sequence in wire_requests:
            tensors = [pb_utils.Tensor(name, arr) for name, arr in read(self.inputs, metas, copy=False)]
            correlation_id, flags = sequence if sequence else (0, 0)
            requests.append(pb_utils.InferenceRequest(
                model_name=self.model_name, inputs=tensors, requested_output_names=requested,
                request_id=request_id, parameters=parameters, correlation_id=correlation_id, flags=flags,
            ))
            wanted.append(set(requested))
        states = [self.hub.open(i, names) for i, names in enumerate(wanted)]
        for index, (request, state) in enumerate(zip(requests, states, strict=True)):
            request._sender = InferenceResponseSender(self.hub, state)
            request._cancel_probe = functools.partial(self._ask_cancelled, index)
        self._executing = True
        try:
            responses = self._run(requests, states)
        except ExecuteFailed as exc:
            return ("fail", str(exc)), None
        finally:
            self._executing = False
        results: list[Any] = []
        tensors_out: list[tuple[str, Any]] = []
        counts: list[int] = []
        params: list[Any] = []
        for response, names in zip(responses, wanted, strict=True):
            outcome = self._response(response, names)
            if isinstance(outcome, list):
                tensors_out.extend(outcome)
                counts.append(len(outcome))
                results.append(None)
                params.append(getattr(response, "_parameters", None) or None)
            else:
                counts.append(0)
                results.append(outcome)
                params.append(None)
        try:
            plan, needed = layout(tensors_out)
        except Exception as exc:
            return ("fail", f"cannot send the outputs: {describe(exc)}"), None
        fd = self.outputs.ensure(needed)
        metas = write(self.outputs, plan)
        start = 0
        for i, count in enumerate(counts):
            if results[i] is None:
                results[i] = ("ok", metas[start:start + count], params[i])
                start += count
        return ("done", self.outputs.size if fd is not None else 0, results, time.perf_counter_ns() - started), fd

    def _ask_cancelled(self, index: int) -> bool:
        """`request.is_cancelled()` of a model in the default mode: ask the server (the reply loop
        waiting for this `execute` answers). Only from the thread running `execute`, while it runs:
        elsewhere the request channel is not ours to use, and after it the answer is moot."""
        if not self._executing or threading.current_thread() is not threading.main_thread():
            return False
        bls = self.bls
        _, result, fd, _ = bls.mailbox.wait(bls._send(lambda call_id: (IS_CANCELLED, call_id, index)))
        if fd is not None:
            os.close(fd)
        return bool(result[1])

    def execute_decoupled(self, wire_requests: list[Any], keys: list[int]) -> tuple[Any, int | None]:
        """A decoupled model: responses go out through the senders (the response channel) as the
        model sends them; the reply only says `execute` returned. If it raised (or returned
        something other than None), each request it left open gets the error as its final response."""
        started = time.perf_counter_ns()
        requests, states = [], []
        for (request_id, parameters, requested, metas, *sequence), key in zip(wire_requests, keys, strict=True):
            tensors = [pb_utils.Tensor(name, arr) for name, arr in read(self.inputs, metas, copy=True)]
            correlation_id, flags = sequence if sequence else (0, 0)
            request = pb_utils.InferenceRequest(
                model_name=self.model_name, inputs=tensors, requested_output_names=requested,
                request_id=request_id, parameters=parameters, correlation_id=correlation_id, flags=flags,
            )
            state = self.hub.open(key, set(requested))
            request._sender = InferenceResponseSender(self.hub, state)
            requests.append(request)
            states.append(state)
        try:
            returned = self.model.execute(requests)
            if asyncio.iscoroutine(returned):  # as in Triton: run in the background, not waited for
                if self._background is None:
                    self._background = BackgroundLoop()
                self._background.run(returned, self._async_failed(states))
                returned = None
            if returned is not None:
                raise pb_utils.TritonModelException(
                    f"Python model '{self.model_name}' is using the decoupled mode and the execute function "
                    "must return None.")
        except Exception as exc:
            traceback.print_exc()
            message = exc.message() if isinstance(exc, pb_utils.TritonModelException) else describe(exc)
            self.hub.fail_open(states, message, pb_utils.TritonError.INTERNAL)
            return ("fail", message), None
        return ("done", 0, [("decoupled",)] * len(requests), time.perf_counter_ns() - started), None

    def _async_failed(self, states: list[Any]) -> Any:
        """What happens when a decoupled model's `async def execute` raises in the background: each
        request it left open gets the error as its final response (Triton only logs it, and the
        client would wait for a final flag that never comes)."""
        def failed(exc: BaseException) -> None:
            traceback.print_exception(exc)
            message = exc.message() if isinstance(exc, pb_utils.TritonModelException) else describe(exc)
            self.hub.fail_open(states, message, pb_utils.TritonError.INTERNAL)
        return failed

    def finalize(self) -> None:
        self.bls.phase = "finalize"
        if self._background is not None:
            self._background.stop()
        if hasattr(self.model, "finalize"):
            try:
                self.model.finalize()
            except Exception:
                traceback.print_exc()
        self.channel.send(("stopped",))


def _autocomplete(channel: Channel, init: dict[str, Any]) -> None:
    module = _load_module(init["model_file"])
    cls = module.TritonPythonModel
    if not hasattr(cls, "auto_complete_config"):
        channel.send(("config", None))
        return
    config = pb_utils.ModelConfig(json.loads(init["config"]))
    result = cls.auto_complete_config(config)
    channel.send(("config", (result if result is not None else config).as_dict()))


def _await_stop(channel: Channel) -> None:
    """Having said all it had to say (a config, a fatal error), the stub waits for the server's
    `stop` and answers it, as a serving stub does, so the server sees a clean stop rather than a
    socket reset by a process that already exited."""
    try:
        while channel.recv()[0][0] != "stop":
            pass
        channel.send(("stopped",))
    except (ChannelClosed, ConnectionError):
        pass  # the server went away first


def main() -> int:
    # Ctrl-C, `timeout` and systemd signal the whole process group; the server decides when
    # its stubs stop (after draining, calling finalize), and a dead server is seen as end of file.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    channel = Channel(socket.socket(fileno=int(sys.argv[1])))
    if len(sys.argv) > 2:  # logs and custom metrics go to the server on their own socket
        python_observe.connect(Channel(socket.socket(fileno=int(sys.argv[2]))))
    init, responses_fd = channel.recv()  # a decoupled model's response channel comes with init
    try:
        if init["mode"] == "autocomplete":
            _autocomplete(channel, init)
            _await_stop(channel)
            return 0
        responses = None if responses_fd is None else Channel(socket.socket(fileno=responses_fd))
        stub = Stub(channel, init, responses)
        stub.initialize(init["args"])
    except Exception as exc:
        traceback.print_exc()
        channel.send(("fatal", describe(exc)))
        _await_stop(channel)
        return 1
    channel.send(("ready", os.getpid()))
    stub.serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())
