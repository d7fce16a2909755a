"""The stub's side of response senders (`request.get_response_sender()`), as in Triton.

Decoupled models (`model_transaction_policy { decoupled: true }`) answer a request with
zero or more responses, from `execute` or from any thread after it returned, and close it
with `TRITONSERVER_RESPONSE_COMPLETE_FINAL`. Each `send` goes at once to the server over a
second socket (the *response channel*, separate from the request/reply channel that
`exec` uses), so a response sent while `execute` still runs reaches the client then. Tensors
travel pickled in that message: they are written by many threads at any time, so the
arena (one writer, reused per call) cannot hold them. The server writes `("cancel", key)`
on the same socket when the client gives up; a listener thread here marks the request,
and `is_cancelled()` reads the mark.

Models in the default (non-decoupled) mode may use the sender too, as Triton allows:
exactly one response per request, then the final flag, from `execute` or after it. Nothing
of that leaves the stub: the stub waits for each such request's final flag and answers
the `exec` with the sent response as if `execute` had returned it.

Only stdlib and numpy (and the model-facing pb_utils module): nothing here imports `server`.
"""

from __future__ import annotations

import os
import threading
from typing import Any

import numpy as np

from backends.python_ipc import Channel, ChannelClosed

FINAL = 1  # TRITONSERVER_RESPONSE_COMPLETE_FINAL
# (IS_CANCELLED, call id, request index): a model in the default mode asks the server, over the
# request channel, whether the client gave up on one of the requests `execute` runs.
IS_CANCELLED = "is_cancelled"

# Where a Triton message exists for a misuse, it is used word for word (python_backend
# src/response_sender.cc), so that models and tests matching on them keep working.
_BAD_FLAG = "Unable to send response. Unsupported flag provided."
_NEED_RESPONSE = "Inference Response object must be provided when the response flags is set to zero."
_CLOSED = "Unable to send response. Response sender has been closed."
_ONE_ONLY = "Unable to send response. Non-decoupled model cannot send more than one response."
_FINAL_FIRST = "Unable to send response. Non-decoupled model cannot send complete final before sending a response."


class RequestState:
    """What is known about one request's responses: sent, closed, cancelled."""

    __slots__ = ("key", "wanted", "sent", "closed", "cancelled", "response", "done")

    def __init__(self, key: int, wanted: set[str]) -> None:
        self.key = key
        self.wanted = wanted
        self.sent = 0
        self.closed = False
        self.cancelled = False
        self.response: Any = None  # default mode: the one response, for the exec reply
        self.done = threading.Event()  # default mode: set with the final flag


class InferenceResponseSender:
    """Triton's `pb_utils.InferenceResponseSender`: what `request.get_response_sender()` returns."""

    def __init__(self, hub: ResponseHub, state: RequestState) -> None:
        self._hub = hub
        self._state = state

    def send(self, response: Any = None, flags: int = 0) -> None:
        if flags not in (0, FINAL):
            raise _exception(_BAD_FLAG)
        if flags == 0 and response is None:
            raise _exception(_NEED_RESPONSE)
        self._hub.send(self._state, response, flags == FINAL)

    def is_cancelled(self) -> bool:
        return self._state.cancelled


class ResponseHub:
    """The senders of one stub. With a response channel (a decoupled model) every `send`
    goes to the server at once; without one (the default mode) the one response is kept for
    the `exec` reply."""

    def __init__(self, channel: Channel | None) -> None:
        self.channel = channel
        self._lock = threading.Lock()
        self._open: dict[int, RequestState] = {}
        self.answers: Any = None  # the BLS mailbox (python_bls_mailbox.py) when BLS calls travel here
        if channel is not None:
            threading.Thread(target=self._listen, name="nereid-cancel-listener", daemon=True).start()

    @property
    def decoupled(self) -> bool:
        return self.channel is not None

    def open(self, key: int, wanted: set[str]) -> RequestState:
        state = RequestState(key, wanted)
        if self.channel is not None:
            with self._lock:
                self._open[key] = state
        return state

    def send(self, state: RequestState, response: Any, final: bool) -> None:
        with self._lock:
            if self.channel is None:
                if response is not None and state.sent > 0:
                    raise _exception(_ONE_ONLY)
                if response is None and final and state.sent == 0:
                    raise _exception(_FINAL_FIRST)
            if state.closed:
                raise _exception(_CLOSED)
            state.closed = final
            state.sent += 1
            if self.channel is None:
                if response is not None:
                    state.response = response
                if final:
                    state.done.set()
                return
            if final:
                self._open.pop(state.key, None)
            payload = None if response is None else encode(response, state.wanted)
            self.channel.send(("response", state.key, payload, final))

    def fail_open(self, states: list[RequestState], message: str, code: int) -> None:
        """`execute` raised (or broke the rules): each request it left open gets the error as its
        last response, as Triton's python backend sends it."""
        for state in states:
            with self._lock:
                if state.closed:
                    continue
                state.closed = True
                self._open.pop(state.key, None)
                if self.channel is not None:
                    self.channel.send(("response", state.key, ("err", message, code), True))

    def _listen(self) -> None:
        assert self.channel is not None
        while True:
            try:
                message, fd = self.channel.recv()
            except (ChannelClosed, OSError) as exc:
                if self.answers is not None:
                    self.answers.close(f"the response channel closed: {exc}")
                return
            if message[0] != "cancel":  # an answer to a BLS call (decoupled models call over this channel)
                if self.answers is not None:
                    self.answers.deliver(message, fd)
                elif fd is not None:
                    os.close(fd)
                continue
            if message[0] == "cancel":
                with self._lock:
                    state = self._open.get(message[1])
                if state is not None:
                    state.cancelled = True


def encode(response: Any, wanted: set[str]) -> tuple[Any, ...]:
    """A pb_utils.InferenceResponse as the response channel carries it: its error, or its
    requested outputs as (name, array) pairs (arrays are pickled with the message)."""
    if response.has_error():
        error = response.error()
        code = error.code() if hasattr(error, "code") else 1
        message = error.message() if hasattr(error, "message") else str(error)
        return ("err", message, code)
    return ("ok", [(t.name(), np.asarray(t.as_numpy())) for t in response.output_tensors() if t.name() in wanted])


def _exception(message: str) -> Exception:
    import triton_python_backend_utils as pb_utils  # the stub put it on sys.path

    return pb_utils.TritonModelException(message)  # type: ignore[no-any-return]
