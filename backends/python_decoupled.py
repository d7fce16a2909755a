"""The server's side of a decoupled Python model's response channel.

A decoupled model's stub gets a second socket at start (sent with its init message): it
writes every response a model sends through `request.get_response_sender()` there, at any
time, from any thread (backends/python_responses.py). Here one reader thread per stub
takes them off and hands each to the sink of its request (`Request.sink`, provided by the
core: backends/responses.py), keyed by a number the server gave the request when it
submitted it. When the client gives up, the core calls the sink's cancel callback, which
writes `("cancel", key)` back on the same socket (the stub marks the request cancelled).

If the stub dies, every request still open gets an error as its final response, so no
client waits forever for a final flag that cannot come.

Only stdlib and numpy: nothing here imports `server`.
"""

from __future__ import annotations

import functools
import itertools
import logging
import socket
import threading
from collections.abc import Callable
from typing import Any

from backends.base import BackendError, BackendStatusError
from backends.python_bls import REQUEST_KINDS, BlsRouter
from backends.python_ipc import Channel, ChannelClosed
from backends.responses import ResponseSink

log = logging.getLogger("nereid.python")

# pb_utils.TritonError codes -> the gRPC status the client gets, as Triton maps them.
STATUS_OF_CODE = {0: "UNKNOWN", 1: "INTERNAL", 2: "NOT_FOUND", 3: "INVALID_ARGUMENT", 4: "UNAVAILABLE",
                  5: "UNIMPLEMENTED", 6: "ALREADY_EXISTS", 7: "CANCELLED"}


def response_channel() -> tuple[socket.socket, socket.socket]:
    """(ours, the stub's) ends of a new response channel; close the stub's once it is sent."""
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)


def as_outcome(payload: Any) -> dict[str, Any] | BackendError | None:
    """One response as the channel carries it -> outputs, the error it reports, or None (the
    final flag alone)."""
    if payload is None:
        return None
    if payload[0] == "ok":
        return dict(payload[1])
    _, message, code = payload
    # The model's message and code as they are (a BLS caller sees them as the model sent them).
    return BackendStatusError(message, STATUS_OF_CODE.get(code, "INTERNAL"))


class _Discard:
    """The sink of a request nobody streams (a warmup sample): its responses are dropped."""

    def send(self, outcome: dict[str, Any] | BackendError | None, final: bool) -> None:
        pass

    def on_cancel(self, callback: Callable[[], None]) -> None:
        pass


class ResponseRouter:
    """Routes one stub's responses to the sinks of their requests."""

    def __init__(self, sock: socket.socket, label: str, exit_status: Callable[[], str]) -> None:
        self.channel = Channel(sock)
        self._label = label
        self._exit_status = exit_status
        self._lock = threading.Lock()
        self._sinks: dict[int, ResponseSink] = {}
        self._keys = itertools.count()
        self._gone = ""  # why no more responses can come (the stub went away)
        # A decoupled model's BLS calls come on this channel too, from any of its threads at any
        # time (python_bls_stub.py); they are answered on it.
        self.bls = BlsRouter(self.channel, label)
        self._thread = threading.Thread(target=self._read, name=f"responses-{label}", daemon=True)
        self._thread.start()

    def register(self, sink: ResponseSink | None) -> int:
        """A key for a request about to be submitted; its responses will go to `sink`."""
        key = next(self._keys)
        sink = sink if sink is not None else _Discard()
        with self._lock:
            gone = self._gone
            if not gone:
                self._sinks[key] = sink
        if gone:
            sink.send(BackendError(gone), True)
            return key
        sink.on_cancel(functools.partial(self._cancel, key))
        return key

    def open_requests(self) -> int:
        with self._lock:
            return len(self._sinks)

    def _cancel(self, key: int) -> None:
        with self._lock:
            if key not in self._sinks:
                return
        try:
            self.channel.send(("cancel", key))
        except OSError:  # the stub is gone: its reader fails the request
            pass

    def _read(self) -> None:
        while True:
            try:
                message, fd = self.channel.recv()
            except (ChannelClosed, OSError):
                break
            if message[0] in REQUEST_KINDS:
                self.bls.handle(message, fd)
                continue
            _, key, payload, final = message
            with self._lock:
                sink = self._sinks.pop(key, None) if final else self._sinks.get(key)
            if sink is None:
                continue
            try:
                sink.send(as_outcome(payload), final)
            except Exception:
                log.exception("python model instance %s: delivering a response failed", self._label)
        self.bls.close()  # its decoupled BLS calls: nobody will take their answers
        reason = f"python model instance {self._label}: the Python stub process {self._exit_status()} " \
                 "before the request's final response"
        with self._lock:
            self._gone = reason
            sinks, self._sinks = list(self._sinks.values()), {}
        for sink in sinks:
            sink.send(BackendError(reason), True)

    def close(self) -> None:
        try:
            self.channel.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._thread.join(5)
        self.channel.close()
