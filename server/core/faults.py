"""What happens when a model misbehaves: executions that hang, instances that keep failing.

A backend that raises already fails only its own batch (instance.py). Two more cases:

- An execution running past the model's execution timeout (`--model-execution-timeout-secs`,
  or the model's `parameters { key: "execution_timeout_ms" }`) is reported, its requests
  are answered at once with DEADLINE_EXCEEDED, and the backend is interrupted if it can be
  (a Python model's stub process is killed and restarted); an in-process framework call
  cannot be stopped, so that instance stays busy until it returns, while the model's other
  instances and every other model keep serving.
- An instance whose executions fail `--model-failure-threshold` times in a row (or the
  model's `failure_threshold` parameter; errors of the model or its runtime, not a client's
  bad input) is taken out of service; when no instance of a model version is left, the
  version becomes UNAVAILABLE with the reason, which the repository index, readiness and
  health then report until it is loaded again. Off by default: a model that fails for some
  inputs could otherwise be pushed offline by a client sending only those.

One watchdog thread per process checks the running executions a few times per timeout.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

from tritonclient.grpc import model_config_pb2 as mc

log = logging.getLogger("nereid.faults")

TIMEOUT_PARAMETER = "execution_timeout_ms"
THRESHOLD_PARAMETER = "failure_threshold"


def _parameter(config: mc.ModelConfig, key: str, what: str) -> float | None:
    param = config.parameters.get(key)
    if param is None:
        return None
    try:
        value = float(param.string_value)
    except ValueError:
        raise ValueError(f"parameter {key} must be {what}, got '{param.string_value}'") from None
    if not value >= 0 or value == float("inf"):
        raise ValueError(f"parameter {key} must be {what} >= 0, got '{param.string_value}'")
    return value


def execution_timeout_s(config: mc.ModelConfig, default_s: float) -> float:
    """The model's own `execution_timeout_ms` parameter, else the server default (0: none)."""
    value = _parameter(config, TIMEOUT_PARAMETER, "a number of milliseconds")
    return default_s if value is None else value / 1000.0


def failure_threshold(config: mc.ModelConfig, default: int) -> int:
    """The model's own `failure_threshold` parameter, else the server default (0: never)."""
    value = _parameter(config, THRESHOLD_PARAMETER, "a whole number")
    return default if value is None else int(value)


class Watched:
    """What an instance shares with the watchdog: the execution running now, if any."""

    __slots__ = ("started", "payload", "expired", "__weakref__")

    def __init__(self) -> None:
        self.started = 0.0  # monotonic start of the running execution; 0 when idle
        self.payload: Any = None
        self.expired = False

    def begin(self, payload: Any) -> None:
        self.payload = payload
        self.expired = False
        self.started = time.monotonic()

    def end(self) -> bool:
        """Mark the execution done; True if the watchdog had already given up on it."""
        self.started = 0.0
        self.payload = None
        return self.expired


class Watchdog:
    """A daemon thread calling `on_expired(payload)` once for each execution that runs longer
    than its timeout. Entries are weakly held: an unloaded model needs no unregistering."""

    def __init__(self) -> None:
        self._entries: weakref.WeakKeyDictionary[Watched, tuple[float, Callable[[Any], None]]] = \
            weakref.WeakKeyDictionary()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def watch(self, watched: Watched, timeout_s: float, on_expired: Callable[[Any], None]) -> None:
        with self._lock:
            self._entries[watched] = (timeout_s, on_expired)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="nereid-watchdog", daemon=True)
                self._thread.start()
        self._wake.set()

    def _period(self) -> float:
        with self._lock:
            timeouts = [t for t, _ in self._entries.values()]
        return min(max(min(timeouts) / 4, 0.01), 1.0) if timeouts else 1.0

    def _run(self) -> None:
        while True:
            self._wake.wait(self._period())
            self._wake.clear()
            now = time.monotonic()
            with self._lock:
                entries = list(self._entries.items())
            for watched, (timeout_s, on_expired) in entries:
                started, payload = watched.started, watched.payload
                if started and not watched.expired and now - started > timeout_s and payload is not None:
                    watched.expired = True
                    try:
                        on_expired(payload)
                    except Exception:  # the watchdog must outlive any one model
                        log.exception("handling an execution timeout failed")
            del entries


WATCHDOG = Watchdog()


class FailureCounter:
    """Consecutive failed executions of one instance; `failed` returns the reason once the
    threshold is reached (then the instance is retired)."""

    __slots__ = ("threshold", "count")

    def __init__(self, threshold: int) -> None:
        self.threshold = threshold
        self.count = 0

    def succeeded(self) -> None:
        self.count = 0

    def failed(self, error: BaseException) -> str | None:
        self.count += 1
        if self.threshold and self.count >= self.threshold:
            return f"its executions failed {self.count} times in a row; the last error: {error}"
        return None
