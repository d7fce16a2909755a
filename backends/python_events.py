"""What a Python model's stub reports on its own, beside the request/response channel: log lines
(`pb_utils.Logger`) and custom metric operations (`pb_utils.MetricFamily` / `Metric`).

Each stub gets a second socket pair for this, read by one daemon thread here, so a model can log
or update a metric at any time (in `initialize`, in `execute`, from its own threads) without
waiting for the next response. Log lines are fire-and-forget, as in Triton; metric operations
are answered (the value, or the error Triton would raise) so the model sees the server's value.

Each `MetricFamily` / `Metric` object the stub creates is a handle here (a number the stub
chose); the stub releases it when the object is garbage-collected, and closing the socket (the
stub stopped or died) releases every handle it still held, so the registry (custom_metrics.py)
drops what no model references any more, as Triton does.
"""

from __future__ import annotations

import logging
import pickle
import socket
import threading
from typing import Any

from backends.custom_metrics import REGISTRY, MetricError
from backends.python_ipc import Channel, ChannelClosed

log = logging.getLogger("nereid.python")

# pb_utils.LogLevel -> logging level: INFO, WARNING, ERROR, VERBOSE (shown with --log-verbose 1+).
_LEVELS = {0: logging.INFO, 1: logging.WARNING, 2: logging.ERROR, 3: logging.DEBUG}


class StubEvents:
    """Serves one stub's events socket until the stub closes it (exit) or `close` is called."""

    def __init__(self, sock: socket.socket, model_name: str, label: str) -> None:
        self._channel = Channel(sock)  # for the answers; reads go through a buffered file:
        # log lines are not answered, so several messages can arrive in one read.
        self._file = sock.makefile("rb")
        self._model = model_name
        self._label = label
        # handle -> ("family", name) or ("metric", name, labels): the references this stub holds
        self._handles: dict[int, tuple[Any, ...]] = {}
        self._thread = threading.Thread(target=self._run, name=f"nereid-stub-events-{label}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            try:
                message = self._next()
            except (ChannelClosed, OSError, EOFError):
                return
            try:
                self._handle(message)
            except OSError:
                return
            except Exception:  # a malformed message must not end the thread
                log.exception("python model %s: bad event from the stub", self._label)

    def _release(self, handle: int) -> None:
        held = self._handles.pop(handle, None)
        if held is None:
            return
        if held[0] == "family":
            REGISTRY.release_family(held[1])
        else:
            REGISTRY.release_metric(held[1], held[2])

    def _next(self) -> Any:
        """The next message (python_ipc.Channel's framing: 4-byte little-endian length, pickle)."""
        header = self._file.read(4)
        if len(header) < 4:
            raise ChannelClosed("the stub closed its events socket")
        size = int.from_bytes(header, "little")
        payload = self._file.read(size)
        if len(payload) < size:
            raise ChannelClosed("the stub closed its events socket mid-message")
        return pickle.loads(payload)

    def _handle(self, message: Any) -> None:
        what = message[0]
        if what == "log":
            _, level, text, where = message
            log.log(_LEVELS.get(level, logging.INFO), "model '%s' %s: %s", self._model, where, text,
                    extra={"model": self._model})
            return
        if what == "release":  # MetricFamily / Metric objects the model no longer holds
            for handle in message[1]:
                self._release(handle)
            return
        try:
            if what == "family":
                _, handle, name, description, kind = message
                REGISTRY.family(name, description, kind)
                self._handles[handle] = ("family", name)
                answer: Any = ("ok", 0.0)
            elif what == "metric":
                _, handle, name, labels, buckets = message
                REGISTRY.metric(name, labels, buckets)
                self._handles[handle] = ("metric", name, labels)
                answer = ("ok", 0.0)
            elif what == "sync":  # the releases sent before it are done
                answer = ("ok", 0.0)
            elif what == "op":
                answer = ("ok", REGISTRY.apply(*message[1:]))
            else:
                answer = ("err", f"unknown event {what!r}")
        except MetricError as exc:
            answer = ("err", str(exc))
        self._channel.send(answer)

    def close(self) -> None:
        try:
            self._channel.sock.shutdown(socket.SHUT_RDWR)  # wakes the thread's recv
        except OSError:
            pass
        self._thread.join(timeout=5)
        self._file.close()
        self._channel.close()
        for handle in list(self._handles):  # the stub is gone: so are its families and metrics
            self._release(handle)
