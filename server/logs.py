"""Logging with tritonserver's flags, changeable at run time through the LogSettings RPC.

`--log-info`, `--log-warning`, `--log-error` switch each severity on or off; `--log-verbose N`
adds verbose lines (1: one line per request and per batch, with model, version and request
id; 2: also grpcio's own debug lines); `--log-format` is `default` (Triton's layout:
`I1126 14:39:36.123456 thread logger] message`), `ISO8601` (the same with an ISO 8601 UTC
timestamp) or `json` (one object per line: time, level, logger, message, and model, version,
request_id where the line is about one). `--log-file` writes there instead of stderr.

The request path asks `verbose()` (a module global, no logging machinery) before building a
verbose line, so with verbose logging off a request pays one global read.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from dataclasses import dataclass, replace
from typing import Any, TextIO

FORMATS = ("default", "ISO8601", "json")
_LETTER = {"DEBUG": "I", "INFO": "I", "WARNING": "W", "ERROR": "E", "CRITICAL": "E"}
# Fields a log call may attach with `extra=` that the json format writes out.
CONTEXT_FIELDS = ("model", "version", "request_id")


@dataclass(frozen=True)
class LogState:
    verbose: int = 0
    info: bool = True
    warning: bool = True
    error: bool = True
    format: str = "default"
    file: str = ""


_state = LogState()
_verbose = 0
_lock = threading.Lock()


def verbose() -> int:
    """The verbose level now (0: off)."""
    return _verbose


def state() -> LogState:
    return _state


class _SeverityFilter(logging.Filter):
    """--log-info / --log-warning / --log-error, read on each record (they change at run time)."""

    def filter(self, record: logging.LogRecord) -> bool:
        s = _state
        if record.levelno >= logging.ERROR:
            return s.error
        if record.levelno >= logging.WARNING:
            return s.warning
        if record.levelno >= logging.INFO:
            return s.info
        return s.verbose > 0


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fmt = _state.format
        message = record.getMessage()
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if fmt == "json":
            entry: dict[str, Any] = {
                "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
                + f".{int(record.msecs * 1000):06d}Z",
                "level": record.levelname, "logger": record.name, "message": message,
            }
            for key in CONTEXT_FIELDS:
                if hasattr(record, key):
                    entry[key] = getattr(record, key)
            if record.exc_text:
                entry["exception"] = record.exc_text
            return json.dumps(entry, default=str)
        letter = _LETTER.get(record.levelname, "I")
        if fmt == "ISO8601":
            stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + "Z"
        else:
            stamp = time.strftime("%m%d %H:%M:%S", time.localtime(record.created)) + f".{int(record.msecs * 1000):06d}"
        text = f"{letter}{stamp} {(record.thread or 0) % 100000} {record.name}] {message}"
        if record.exc_text:
            text += "\n" + record.exc_text
        return text


_handler: logging.Handler | None = None


def configure(new: LogState) -> None:
    """Apply a log state (at startup, or from LogSettings): levels, format and destination."""
    global _state, _verbose, _handler
    with _lock:
        if new.format not in FORMATS:
            raise ValueError(f"log format must be one of {', '.join(FORMATS)}, got '{new.format}'")
        stream: TextIO = sys.stderr
        if new.file and (_handler is None or new.file != _state.file):
            stream = open(new.file, "a", encoding="utf-8", buffering=1)  # noqa: SIM115 - lives with the server
        root = logging.getLogger()
        if _handler is None or new.file != _state.file:
            handler = logging.StreamHandler(stream)
            handler.setFormatter(_Formatter())
            handler.addFilter(_SeverityFilter())
            if _handler is not None:
                root.removeHandler(_handler)
            root.addHandler(handler)
            _handler = handler
        root.setLevel(logging.DEBUG if new.verbose else logging.INFO)
        # grpcio logs a debug line per call ("Loaded running loop"): only from verbose level 2.
        logging.getLogger("grpc").setLevel(logging.DEBUG if new.verbose >= 2 else logging.WARNING)
        _state, _verbose = new, new.verbose


def update(changes: dict[str, Any]) -> LogState:
    """LogSettings: Triton's keys `log_info`, `log_warning`, `log_error` (bool), `log_verbose_level`
    (uint32), `log_format` (string). `log_file` cannot change at run time: it would let a client pick
    a file the server writes to. Raises ValueError naming the key."""
    s = _state
    values: dict[str, Any] = {}
    for key, value in changes.items():
        if key in ("log_info", "log_warning", "log_error"):
            if not isinstance(value, bool):
                raise ValueError(f"expect boolean for '{key}'")
            values[key[4:]] = value
        elif key == "log_verbose_level":
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"expect unsigned integer for '{key}'")
            values["verbose"] = value
        elif key == "log_format":
            if not isinstance(value, str) or value not in FORMATS:
                raise ValueError(f"expect one of {', '.join(FORMATS)} for '{key}'")
            values["format"] = value
        elif key == "log_file":
            if value != s.file:
                raise ValueError("'log_file' cannot be changed at run time (it would let a client choose a file "
                                 "the server writes); start the server with --log-file")
        else:
            raise ValueError(f"unknown log setting '{key}'; expected log_file, log_info, log_warning, log_error, "
                             "log_verbose_level or log_format")
    new = replace(s, **values)
    configure(new)
    return new


def as_settings(s: LogState) -> dict[str, Any]:
    """The state under LogSettings' keys."""
    return {"log_file": s.file, "log_info": s.info, "log_warning": s.warning, "log_error": s.error,
            "log_verbose_level": s.verbose, "log_format": s.format}
