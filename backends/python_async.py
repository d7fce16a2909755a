"""The event loop a decoupled model's `async def execute` runs on, in the background.

As in Triton's python backend (`Stub::RunCoroutine(..., in_background=true)`), a decoupled
model's `execute` coroutine is not waited for: it is handed to an event loop running on a
thread of its own, and the instance takes the next requests at once. So one instance can
work on many requests together, each coroutine sending its responses through the request's
sender and awaiting BLS calls (`async_exec`) without holding the others up.

A coroutine that raises is reported through `on_error` (the stub then closes the requests it
left open with the error). Only stdlib: the stub imports this module.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine
from typing import Any


class BackgroundLoop:
    """An event loop on a daemon thread, started when first needed."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="nereid-async-execute", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def run(self, coroutine: Coroutine[Any, Any, Any], on_error: Callable[[BaseException], None]) -> None:
        """Start `coroutine` on the loop and return at once."""
        future = asyncio.run_coroutine_threadsafe(coroutine, self.loop)

        def done(future: Any) -> None:
            if future.cancelled():
                return
            error = future.exception()
            if error is not None:
                on_error(error)

        future.add_done_callback(done)

    def stop(self) -> None:
        """Stop the loop (the model is being finalized); coroutines still running are dropped."""
        try:
            self.loop.call_soon_threadsafe(self.loop.stop)
        except RuntimeError:  # already closed
            return
        self._thread.join(5)
