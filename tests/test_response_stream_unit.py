"""ResponseStream (server/core/decoupled.py) for a sender on the event loop (a decoupled
ensemble): `put` waits for room without blocking the loop, `taken` lets it go on, `close`
(a cancel) releases every waiter and drops what comes later; the final response never waits."""

from __future__ import annotations

import asyncio

import numpy as np

from server.core.decoupled import WINDOW_BYTES, WINDOW_RESPONSES, ResponseStream


async def _settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def _take(stream: ResponseStream) -> object:
    outcome, _, _, size = stream.queue.get_nowait()
    stream.taken(size)
    return outcome


def test_put_waits_for_the_consumer_and_the_final_response_does_not() -> None:
    async def run() -> None:
        stream = ResponseStream(asyncio.get_running_loop())
        for i in range(WINDOW_RESPONSES):
            await stream.put({"OUT": np.array([i])}, False)
        late = asyncio.ensure_future(stream.put({"OUT": np.array([-1])}, False))
        await _settle()
        assert not late.done() and stream.full()
        await asyncio.wait_for(stream.put(None, True), 1)  # the final flag is let in at once
        assert _take(stream)["OUT"][0] == 0  # type: ignore[index]
        await _settle()
        assert not late.done()  # the final response counts while it is held
        assert _take(stream)["OUT"][0] == 1  # type: ignore[index]
        await _settle()
        assert late.done()
        assert stream.queue.qsize() == WINDOW_RESPONSES

    asyncio.run(run())


def test_the_byte_bound_holds_large_responses_to_a_few() -> None:
    async def run() -> None:
        stream = ResponseStream(asyncio.get_running_loop())
        big = {"OUT": np.zeros(WINDOW_BYTES // 2, np.uint8)}
        await stream.put(big, False)
        await stream.put(big, False)
        third = asyncio.ensure_future(stream.put(big, False))
        await _settle()
        assert not third.done()
        _take(stream)
        await _settle()
        assert third.done()

    asyncio.run(run())


def test_close_releases_every_waiter_and_drops_what_comes_after() -> None:
    async def run() -> None:
        stream = ResponseStream(asyncio.get_running_loop())
        for i in range(WINDOW_RESPONSES):
            await stream.put({"OUT": np.array([i])}, False)
        waiting = [asyncio.ensure_future(stream.put({"OUT": np.array([-1])}, False)) for _ in range(3)]
        room = asyncio.ensure_future(stream.room())
        await _settle()
        assert not any(w.done() for w in waiting) and not room.done()
        stream.close()
        await _settle()
        assert all(w.done() for w in waiting) and room.done()
        assert stream.queue.qsize() == WINDOW_RESPONSES  # the released puts were dropped

    asyncio.run(run())
