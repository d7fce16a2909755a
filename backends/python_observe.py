"""`pb_utils.Logger`, `LogLevel`, `MetricFamily` and `Metric`, as a model sees them in its stub.

Calls go to the server over the stub's events socket (backends/python_events.py serves the other
end): log lines without waiting, metric operations with an answer, so `Metric.value()` is the
server's value and a refused operation raises `TritonModelException` where the model made it, as
in Triton. Outside a stub, metrics are kept in this process (the server's own registry when
the model runs in the server, `nereid_in_process`) and log lines go to the server's log (in the
server) or to stderr (a model imported by a unit test).
"""

from __future__ import annotations

import collections
import contextvars
import itertools
import logging
import os
import sys
import threading
import weakref
from typing import Any

from backends.python_ipc import Channel

# Handles of MetricFamily / Metric objects that were garbage-collected and not yet released on the
# server. `__del__` may run anywhere (inside a call holding the lock, on any thread), so it only
# queues the handle; the queue is sent first thing by the next message, or at once when free.
_released: collections.deque[int] = collections.deque()
_handles = itertools.count(1)


class _Events:
    def __init__(self, channel: Channel) -> None:
        self.channel = channel
        self.lock = threading.Lock()  # the model's threads share one socket

    def _flush(self) -> None:
        """Send the queued releases (caller holds the lock)."""
        handles = []
        while _released:
            handles.append(_released.popleft())
        if handles:
            self.channel.send(("release", handles))

    def post(self, message: Any) -> None:
        with self.lock:
            self._flush()
            self.channel.send(message)

    def call(self, message: Any) -> Any:
        with self.lock:
            self._flush()
            self.channel.send(message)
            answer, _ = self.channel.recv()
        if answer[0] != "ok":
            raise _exception(answer[1])
        return answer[1]

    def released(self) -> None:
        """A handle was queued: release it now (and wait for the server, so a scrape that
        follows `del family` sees it gone, as in Triton) unless the socket is busy."""
        if not self.lock.acquire(blocking=False):
            return  # the holder, or the next message, sends it
        try:
            if not _released:
                return
            self._flush()
            self.channel.send(("sync",))
            self.channel.recv()
        except OSError:
            pass
        finally:
            self.lock.release()


def _release(handle: int, *held: Any) -> None:
    """A MetricFamily (`held`: name) or Metric (name, labels) object is gone (from `__del__`)."""
    if _events is None:  # no stub: the metrics are kept in this process
        kept = _held.pop(handle, None)
        if kept is None:  # released already, with the model instance that made it (release_owned)
            return
        if kept[0] is not None:
            kept[0].discard(handle)
        _registry_release(held)
        return
    _released.append(handle)
    _events.released()


def _registry_release(held: tuple[Any, ...]) -> None:
    from backends.custom_metrics import REGISTRY

    if len(held) == 1:
        REGISTRY.release_family(held[0])
    else:
        REGISTRY.release_metric(held[0], held[1])


_events: _Events | None = None

# No stub (the model runs in the server, `nereid_in_process`): each live MetricFamily / Metric
# handle of this process, with the handles set of the model instance that made it (`metric_owner`,
# set around its initialize, execute and finalize). Unloading the instance releases what it still
# holds (release_owned) as a stub's exit does, even objects a reference cycle (a module global)
# would keep until the garbage collector ran; their later `__del__` then does nothing.
_held: dict[int, tuple[set[int] | None, tuple[Any, ...]]] = {}
metric_owner: contextvars.ContextVar[set[int] | None] = contextvars.ContextVar("nereid_metric_owner", default=None)


def release_owned(owned: set[int]) -> None:
    """Release every metric handle a model instance in this process still holds (at its unload)."""
    for handle in list(owned):
        kept = _held.pop(handle, None)
        if kept is not None:
            _registry_release(kept[1])
    owned.clear()

# The model whose code runs now, in the server's own process (backends/python_inproc.py sets it
# around initialize, execute and finalize): its Logger lines go to the server's log naming it,
# as a stub's lines do (python_events.py). Unset in a stub and in a unit test.
current_model: contextvars.ContextVar[str | None] = contextvars.ContextVar("nereid_python_model", default=None)
_LOG_LEVELS = {0: logging.INFO, 1: logging.WARNING, 2: logging.ERROR, 3: logging.DEBUG}


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
        result = handler(*message[2:] if message[0] in ("family", "metric") else message[1:])
    except MetricError as exc:
        raise _exception(str(exc)) from None
    if message[0] in ("family", "metric"):  # ("family", handle, name, ...) / ("metric", handle, name, labels, ...)
        owner = metric_owner.get()
        _held[message[1]] = (owner, (message[2],) if message[0] == "family" else (message[2], message[3]))
        if owner is not None:
            owner.add(message[1])
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
            model = current_model.get()
            if model is not None:
                logging.getLogger("nereid.python").log(_LOG_LEVELS.get(level, logging.INFO), "model '%s' %s: %s",
                                                       model, where, message, extra={"model": model})
                return
            print(f"{'IWEV'[level] if 0 <= level < 4 else 'I'} {where} {message}", file=sys.stderr)
            return
        _events.post(("log", int(level), str(message), where))


class MetricFamily:
    """A named family of metrics of one kind; `Metric(labels)` makes (or finds) one of its metrics."""

    COUNTER = 0
    GAUGE = 1
    HISTOGRAM = 2

    def __init__(self, name: str, description: str, kind: int) -> None:
        handle = next(_handles)
        _call(("family", handle, name, description, int(kind)))
        self._handle = handle
        self._name = name
        self._kind = kind
        self._metrics: weakref.WeakSet[Metric] = weakref.WeakSet()

    def Metric(self, labels: dict[str, str] | None = None, buckets: list[float] | None = None) -> Metric:  # noqa: N802 - Triton's name
        return Metric(self, labels, buckets)

    def __del__(self) -> None:
        # As Triton's stub: the family's metrics are deleted with it (using one afterwards
        # raises), then the family itself.
        handle = getattr(self, "_handle", None)
        if handle is None:
            return
        for metric in list(self._metrics):
            metric._invalidate()
        _release(handle, self._name)


class Metric:
    """One labelled metric; same family and labels means the same metric (in every instance)."""

    def __init__(self, family: MetricFamily, labels: dict[str, str] | None = None,
                 buckets: list[float] | None = None) -> None:
        if not isinstance(family, MetricFamily):
            raise TypeError("Metric needs a MetricFamily; use family.Metric(labels=...)")
        self._name = family._name
        self._labels = tuple(sorted((str(k), str(v)) for k, v in (labels or {}).items()))
        self._handle: int | None = None
        handle = next(_handles)
        _call(("metric", handle, self._name, self._labels, None if buckets is None else [float(b) for b in buckets]))
        self._handle = handle
        family._metrics.add(self)

    def _invalidate(self) -> None:
        handle, self._handle = self._handle, None
        if handle is not None:
            _release(handle, self._name, self._labels)

    def _op(self, op: str, value: float) -> Any:
        if self._handle is None:
            from backends.custom_metrics import FAMILY_DELETED

            raise _exception(FAMILY_DELETED)
        return _call(("op", self._name, self._labels, op, float(value)))

    def increment(self, value: float) -> None:
        self._op("increment", value)

    def set(self, value: float) -> None:
        self._op("set", value)

    def observe(self, value: float) -> None:
        self._op("observe", value)

    def value(self) -> float:
        return float(self._op("value", 0.0))

    def __del__(self) -> None:
        self._invalidate()
