"""server/aio.py on its own: the one-reader Mailbox and `start` (a coroutine's first step run
at once, a Task only if it waits). The request path relies on both for every streamed
message (servicer.ModelStreamInfer, the --workers link), so their edge cases are pinned here:
order, a cancelled reader losing nothing, cancellation reaching a coroutine whose Task has not
run yet, the context a Task would have, and the done callback in both cases."""

from __future__ import annotations

import asyncio
import collections.abc
import contextvars
import types

import pytest

from server.aio import Mailbox, start

_VAR: contextvars.ContextVar[str] = contextvars.ContextVar("_VAR", default="outer")


def test_mailbox_keeps_order_and_wakes_its_reader() -> None:
    async def run() -> None:
        box: Mailbox[int] = Mailbox()
        reader = asyncio.ensure_future(box.get())
        await asyncio.sleep(0)
        assert not reader.done()
        box.put_nowait(1)
        box.put_nowait(2)
        assert await reader == 1
        assert box.qsize() == 1 and not box.empty()
        assert await box.get() == 2
        assert box.empty()
        with pytest.raises(asyncio.QueueEmpty):
            box.get_nowait()
        box.put_nowait(3)
        assert box.get_nowait() == 3

    asyncio.run(run())


def test_a_cancelled_reader_loses_nothing_and_the_next_reader_gets_it() -> None:
    async def run() -> None:
        box: Mailbox[str] = Mailbox()
        reader = asyncio.ensure_future(box.get())
        await asyncio.sleep(0)
        box.put_nowait("kept")  # wakes the reader...
        reader.cancel()  # ...which is cancelled before it runs
        with pytest.raises(asyncio.CancelledError):
            await reader
        assert await asyncio.wait_for(box.get(), 1) == "kept"
        late = asyncio.ensure_future(box.get())  # a reader after a cancelled one is still woken
        await asyncio.sleep(0)
        box.put_nowait("next")
        assert await asyncio.wait_for(late, 1) == "next"

    asyncio.run(run())


def test_start_finishes_a_coroutine_that_never_waits_without_a_task() -> None:
    async def run() -> None:
        ran: list[str] = []
        ended: list[object] = []

        async def quick() -> None:
            _VAR.set("inner")  # in a copy of the context, as in a Task
            ran.append(_VAR.get())

        assert start(quick(), asyncio.get_running_loop(), ended.append) is None
        assert ran == ["inner"] and ended == [None]
        assert _VAR.get() == "outer"

    asyncio.run(run())


def test_start_continues_a_waiting_coroutine_in_a_task_with_its_context() -> None:
    async def run() -> None:
        gate = asyncio.get_running_loop().create_future()
        seen: list[str] = []
        ended: list[object] = []

        async def waits() -> None:
            _VAR.set("inner")
            seen.append("before")
            await gate
            seen.append(_VAR.get())

        task = start(waits(), asyncio.get_running_loop(), ended.append)
        assert task is not None and seen == ["before"] and not ended
        gate.set_result(None)
        await task
        assert seen == ["before", "inner"] and ended == [task]
        assert _VAR.get() == "outer"

    asyncio.run(run())


def test_a_cancel_before_the_task_first_runs_reaches_the_coroutine() -> None:
    async def run() -> None:
        cleaned: list[str] = []

        async def waits() -> None:
            try:
                await asyncio.get_running_loop().create_future()
            finally:
                cleaned.append("finally")

        task = start(waits(), asyncio.get_running_loop())
        assert task is not None
        task.cancel()  # before the Task's first step
        with pytest.raises(asyncio.CancelledError):
            await task
        assert cleaned == ["finally"]

    asyncio.run(run())


def test_an_error_in_the_first_step_reaches_the_caller() -> None:
    async def run() -> None:
        async def fails() -> None:
            raise ValueError("boom")

        with pytest.raises(ValueError, match="boom"):
            start(fails(), asyncio.get_running_loop())

    asyncio.run(run())


def test_start_hands_its_task_a_coroutine_as_python_3_12_requires() -> None:
    """From Python 3.12, `asyncio.iscoroutine` (which a Task checks) accepts only coroutines,
    not generator-based ones; `start` once handed its Task a generator, so every call it put
    in a Task failed on Python 3.12 (streaming; every call of the `--workers` owner). The same
    check is made here on any Python."""
    async def run() -> None:
        loop = asyncio.get_running_loop()
        create_task = loop.create_task

        def strict(coro, **kwargs):  # type: ignore[no-untyped-def]
            if not isinstance(coro, (types.CoroutineType, collections.abc.Coroutine)):
                raise TypeError(f"a coroutine was expected, got {coro!r}")
            return create_task(coro, **kwargs)

        loop.create_task = strict  # type: ignore[method-assign]
        gate = loop.create_future()

        async def waits() -> str:
            return await gate

        task = start(waits(), loop)
        assert task is not None
        gate.set_result("go")
        await task
        cancelled = start(waits_forever(loop), loop)
        assert cancelled is not None
        cancelled.cancel()
        with pytest.raises(asyncio.CancelledError):
            await cancelled

    async def waits_forever(loop: asyncio.AbstractEventLoop) -> None:
        await loop.create_future()

    asyncio.run(run())


def test_start_runs_on_python_3_10s_create_task() -> None:
    """pyproject.toml allows Python 3.10, whose `loop.create_task` has no `context` argument
    (3.11 added it): `start` once passed one, and every call that waited raised TypeError on
    3.10. 3.10's signature is imposed here on any Python; the Task still has the context the
    first step set."""
    async def run() -> None:
        loop = asyncio.get_running_loop()
        create_task = loop.create_task

        def py310(coro, *, name=None):  # type: ignore[no-untyped-def]
            return create_task(coro, name=name)

        loop.create_task = py310  # type: ignore[method-assign]
        gate = loop.create_future()
        seen: list[str] = []

        async def waits() -> None:
            _VAR.set("inner")
            await gate
            seen.append(_VAR.get())

        task = start(waits(), loop)
        assert task is not None
        gate.set_result(None)
        await task
        assert seen == ["inner"] and _VAR.get() == "outer"

    asyncio.run(run())
