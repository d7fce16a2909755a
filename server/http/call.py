"""An HTTP request seen through the few methods of a gRPC servicer context that the shared
inference path (`InferenceServicer.infer`) uses, so rate limits, tracing and logging name
clients and read headers the same way on both transports.

- `invocation_metadata`: the request headers, lower-case names (as gRPC metadata), so
  `--rate-limit-client-header` and W3C `traceparent` / `tracestate` are read from them;
- `peer`: `ipv4:ADDRESS:PORT` / `ipv6:[ADDRESS]:PORT` as grpcio writes it, so one client
  gets one rate-limit bucket whichever transport it uses;
- `auth_context`: empty (HTTP has no TLS client certificates here);
- `add_done_callback`: run once the answer is built (a trace ends there).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from server.http.transport import Request

log = logging.getLogger("nereid.http")


class HttpCall:
    __slots__ = ("request", "_callbacks")

    def __init__(self, request: Request) -> None:
        self.request = request
        self._callbacks: list[Callable[[Any], None]] = []

    def invocation_metadata(self) -> list[tuple[str, str]]:
        return list(self.request.headers.items())

    def peer(self) -> str:
        return self.request.peer

    def auth_context(self) -> dict[str, list[bytes]]:
        return {}

    def add_done_callback(self, callback: Callable[[Any], None]) -> None:
        self._callbacks.append(callback)

    def done(self) -> None:
        """The answer is built: run the callbacks (each once; one failing does not stop the others)."""
        callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            try:
                callback(self)
            except Exception:
                log.exception("HTTP request callback failed")

