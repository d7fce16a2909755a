"""`pb_utils.Logger`, `LogLevel`, `MetricFamily` and `Metric`, as a model sees them in its stub.

Calls go to the server over the stub's events socket (backends/python_events.py serves the other
end): log lines without waiting, metric operations with an answer, so `Metric.value()` is the
server's value and a refused operation raises `TritonModelException` where the model made it, as
in Triton. Outside a stub (a model imported by a unit test) log lines go to stderr and metrics
are kept in this process.
"""

from __future__ import annotations

import os
import sys
import threading
from typing import Any

from backends.python_ipc import Channel


class _Events:
    def __init__(self, channel: Channel) -> None:
        self.channel = channel
        self.lock = threading.Lock()  # the model's threads share one socket

    def post(self, message: Any) -> None:
        with self.lock:
            self.channel.send(message)

    def call(self, message: Any) -> Any:
        with self.lock:
            self.channel.send(message)
            answer, _ = self.channel.recv()
        if answer[0] != "ok":
            raise _exception(answer[1])
        return answer[1]


_events: _Events | None = None


def connect(channel: Channel) -> None:
    """Called once by the stub with its events channel."""
    global _events
    _events = _Events(channel)


def _exception(message: str) -> Exception:
    pb_utils = sys.modules.get("triton_python_backend_utils")
    cls = getattr(pb_utils, "TritonModelException", RuntimeError)
    return cls(message)  # type: ignore[no-any-return]


def _call(message: Any) -> Any:
    if _events is not None:
        return _events.call(message)
    from backends.custom_metrics import REGISTRY, MetricError  # no stub: keep the metrics here

    try:
        handler: Any = {"family": REGISTRY.family, "metric": REGISTRY.metric, "op": REGISTRY.apply}[message[0]]
        result = handler(*message[1:])
    except MetricError as exc:
        raise _exception(str(exc)) from None
    return 0.0 if result is None else result


class LogLevel:
    INFO = 0
    WARNING = 1
    ERROR = 2
    VERBOSE = 3


class Logger:
    """Log lines that reach the server's log, naming the model and the caller's file and line."""

    @staticmethod
    def log(message: str, level: int = LogLevel.INFO) -> None:
        Logger._send(message, level, 2)

    @staticmethod
    def log_info(message: str) -> None:
        Logger._send(message, LogLevel.INFO, 2)

    @staticmethod
    def log_warn(message: str) -> None:
        Logger._send(message, LogLevel.WARNING, 2)

    @staticmethod
    def log_error(message: str) -> None:
        Logger._send(message, LogLevel.ERROR, 2)

    @staticmethod
    def log_verbose(message: str) -> None:
        Logger._send(message, LogLevel.VERBOSE, 2)

    @staticmethod
    def _send(message: str, level: int, depth: int) -> None:
        frame = sys._getframe(depth)
        where = f"({os.path.basename(frame.f_code.co_filename)}:{frame.f_lineno})"
        if _events is None:
            print(f"{'IWEV'[level] if 0 <= level < 4 else 'I'} {where} {message}", file=sys.stderr)
            return
        _events.post(("log", int(level), str(message), where))


class MetricFamily:
    """A named family of metrics of one kind; `Metric(labels)` makes (or finds) one of its metrics."""

    COUNTER = 0
    GAUGE = 1
    HISTOGRAM = 2

    def __init__(self, name: str, description: str, kind: int) -> None:
        _call(("family", name, description, int(kind)))
        self._name = name
        self._kind = kind

    def Metric(self, labels: dict[str, str] | None = None, buckets: list[float] | None = None) -> Metric:  # noqa: N802 - Triton's name
        return Metric(self, labels, buckets)


class Metric:
    """One labelled metric; same family and labels means the same metric (in every instance)."""

    def __init__(self, family: MetricFamily, labels: dict[str, str] | None = None,
                 buckets: list[float] | None = None) -> None:
        if not isinstance(family, MetricFamily):
            raise TypeError("Metric needs a MetricFamily; use family.Metric(labels=...)")
        self._name = family._name
        self._labels = tuple(sorted((str(k), str(v)) for k, v in (labels or {}).items()))
        _call(("metric", self._name, self._labels, None if buckets is None else [float(b) for b in buckets]))

    def increment(self, value: float) -> None:
        _call(("op", self._name, self._labels, "increment", float(value)))

    def set(self, value: float) -> None:
        _call(("op", self._name, self._labels, "set", float(value)))

    def observe(self, value: float) -> None:
        _call(("op", self._name, self._labels, "observe", float(value)))

    def value(self) -> float:
        return float(_call(("op", self._name, self._labels, "value", 0.0)))
