"""Two asyncio building blocks that the request path pays for once per message.

Why not asyncio's own: on a stream every request message and every response passes through
a queue, and (in one process and in the `--workers` owner) each streamed request ran in a
Task of its own. Profiled under perf_analyzer `--streaming` (py-spy, the owner of
`--workers 2` at concurrency 16), `asyncio.Queue`'s put/get and its loop checks were about a
quarter of the owner's time, and a Task per request costs a loop pass and a done callback
even when the request finishes without ever waiting (an inline model). Measured with
`scripts/bench_owner.py --streams 4` before and after: docs/ARCHITECTURE.md.

- `Mailbox`: a queue with one reader, no size bound (the callers bound what they put:
  stream_window.py, link.Window) and none of asyncio.Queue's task accounting.
- `start`: run a coroutine's first step now, as Python 3.12's eager tasks do, and make a
  Task only if it waits; most streamed inferences on a cheap model end in that first step.
"""

from __future__ import annotations

import asyncio
import contextvars
import types
from collections import deque
from collections.abc import Callable, Coroutine, Generator
from typing import Any, Generic, TypeVar

_T = TypeVar("_T")


class Mailbox(Generic[_T]):
    """An unbounded FIFO with a single reader (`get`); `put_nowait` from the event loop's thread."""

    __slots__ = ("_items", "_waiter")

    def __init__(self) -> None:
        self._items: deque[_T] = deque()
        self._waiter: asyncio.Future[None] | None = None

    def put_nowait(self, item: _T) -> None:
        self._items.append(item)
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    async def get(self) -> _T:
        """The oldest item, waiting for one if there is none (cancellable: nothing is lost)."""
        while not self._items:
            waiter = self._waiter = asyncio.get_running_loop().create_future()
            try:
                await waiter
            finally:
                if self._waiter is waiter:
                    self._waiter = None
        return self._items.popleft()

    def get_nowait(self) -> _T:
        """The oldest item; asyncio.QueueEmpty if there is none."""
        if not self._items:
            raise asyncio.QueueEmpty
        return self._items.popleft()

    def qsize(self) -> int:
        return len(self._items)

    def empty(self) -> bool:
        return not self._items


def start(run: Coroutine[Any, Any, Any], loop: asyncio.AbstractEventLoop,
          done: Callable[[asyncio.Task[Any] | None], None] | None = None) -> asyncio.Task[Any] | None:
    """Run `run`'s first step now, in a copy of the current context (as a Task would); if it
    waits, it goes on in a Task (returned; cancellable as any other) and `done(task)` is
    called when that ends, else `done(None)` is called at once and None returned.

    An exception from the first step propagates to the caller: callers pass coroutines that
    handle their own errors. The coroutine's result is dropped."""
    ctx = contextvars.copy_context()
    try:
        waiting = ctx.run(run.send, None)
    except StopIteration:
        if done is not None:
            done(None)
        return None
    rest = _continued(run, waiting)
    rest.send(None)  # primed: see _rest
    # The Task goes on in a copy of `ctx` (what the first step set included). Not
    # `create_task(rest, context=ctx)`: that argument is Python 3.11's, and on 3.10 (which
    # pyproject.toml allows) every call that waited raised TypeError here.
    task: asyncio.Task[Any] = ctx.run(loop.create_task, rest)
    if done is not None:
        task.add_done_callback(done)
    return task


async def _continued(run: Coroutine[Any, Any, Any], waiting: Any) -> None:
    """A Task's coroutine for `_rest`. From Python 3.12 on, a Task takes only coroutines, not
    generator-based ones (`asyncio.iscoroutine`): handing it `_rest` itself made every call
    that `start` put in a Task fail there (streaming, and every call in the `--workers`
    owner), found on the GPU machine's Python 3.12."""
    await _rest(run, waiting)


@types.coroutine
def _rest(run: Coroutine[Any, Any, Any], waiting: Any) -> Generator[Any, Any, None]:
    """The rest of a coroutine whose first step ran outside a Task (`start`): it hands the
    Task what `run` waits on, and passes on what the Task sends or throws (its cancellation).
    Advanced to its first `yield` before the Task takes it, so a cancellation arriving before
    the Task's first step still reaches `run` (thrown into an unstarted generator it would not)."""
    try:
        yield  # primed past here
    except BaseException as exc:  # cancelled before the Task's first step
        step: Callable[[Any], Any] | None = run.throw
        value: Any = exc
    else:
        step, value = None, None
    while True:
        if step is not None:
            try:
                waiting = step(value)
            except StopIteration:
                return
        try:
            value = yield waiting
        except BaseException as exc:
            step, value = run.throw, exc
        else:
            step = run.send
