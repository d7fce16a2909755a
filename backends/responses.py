"""The contract for backends whose models send many responses per request (decoupled models).

The core hands such a backend, with each request (`Request.sink`), an object to send that
request's responses to, from any thread, at any time, until one of them is marked final.
The backend guarantees the final one: a model that fails, or a process that dies, still
closes each request it accepted with an error. The core registers nothing else: when the
client gives up, it calls the callback the backend gave `on_cancel`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from backends.base import BackendError


class ResponseSink(Protocol):
    def send(self, outcome: dict[str, Any] | BackendError | None, final: bool) -> None:
        """One response: outputs, an error (the stream stays open), or None (the final flag
        alone). Thread-safe; after a final one, nothing more is sent."""

    def on_cancel(self, callback: Callable[[], None]) -> None:
        """`callback` is called (on the event loop) if the client cancels the request."""
