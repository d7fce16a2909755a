"""StreamWindow (server/protocol/stream_window.py) on its own: the bound, the order, and
waiters that leave (a cancelled request) without stalling those behind them."""

from __future__ import annotations

import asyncio

from server.aio import Mailbox
from server.protocol.stream_window import StreamWindow


async def _settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def test_puts_wait_for_the_writer_in_order_and_room_waits_for_a_free_place() -> None:
    async def run() -> None:
        queue: Mailbox[bytes] = Mailbox()
        window = StreamWindow(queue, messages=2, nbytes=100)
        await window.put(b"a")
        await window.put(b"b")
        third = asyncio.ensure_future(window.put(b"c"))
        fourth = asyncio.ensure_future(window.put(b"d"))
        room = asyncio.ensure_future(window.room())
        await _settle()
        assert not third.done() and not fourth.done() and not room.done() and window.held == 2
        window.taken(queue.get_nowait())  # a
        await _settle()
        assert third.done() and not fourth.done() and not room.done() and window.held == 2
        window.taken(queue.get_nowait())  # b
        window.taken(queue.get_nowait())  # c
        await _settle()
        assert fourth.done() and room.done() and window.held == 1
        assert queue.get_nowait() == b"d"

    asyncio.run(run())


def test_the_byte_bound_lets_one_large_response_in_at_a_time() -> None:
    async def run() -> None:
        queue: Mailbox[bytes] = Mailbox()
        window = StreamWindow(queue, messages=64, nbytes=100)
        await window.put(b"x" * 500)  # larger than the bound: alone, it goes in
        second = asyncio.ensure_future(window.put(b"y" * 10))
        await _settle()
        assert not second.done()
        window.taken(queue.get_nowait())
        await _settle()
        assert second.done() and window.held_bytes == 10

    asyncio.run(run())


def test_a_waiter_that_leaves_does_not_hold_up_the_others() -> None:
    async def run() -> None:
        queue: Mailbox[bytes] = Mailbox()
        window = StreamWindow(queue, messages=1, nbytes=100)
        await window.put(b"a")
        gone = asyncio.ensure_future(window.put(b"gone"))
        await _settle()
        gone.cancel()  # cancelled while waiting: it must not stay at the head of the line
        await _settle()
        window.taken(queue.get_nowait())
        assert window.held == 0
        await asyncio.wait_for(window.put(b"next"), 1)
        assert queue.get_nowait() == b"next"
        # Woken (its place counted), then cancelled before it ran: the place is given back.
        woken = asyncio.ensure_future(window.put(b"woken"))
        await _settle()
        window.taken(b"next")
        woken.cancel()
        await _settle()
        assert woken.cancelled() and window.held == 0 and queue.empty()
        await asyncio.wait_for(window.put(b"after"), 1)

    asyncio.run(run())
