"""Where a stub's BLS answers wait for their callers, whichever thread calls.

A model may call BLS from `execute`, from an `async def execute` (many calls awaited at
once), and from threads of its own (a decoupled model's sender threads, a thread pool inside
`execute`), all at the same time. The answers come back on one socket, in any order, each
naming its call. The mailbox keeps them per call until the caller takes them:

- *Listened* (a decoupled model: its BLS travels on the response channel, which a listener
  thread already reads for cancellations): that thread delivers every answer here; callers
  only wait.
- Otherwise (the instance's main channel): nobody reads the socket between messages, so a
  caller that finds no answer and no reader becomes the reader (leader/follower): it reads
  until its own answer is in, delivering every other message it reads on the way, and the
  next waiting caller takes over. The stub's main loop reads its `exec` and `stop` messages
  through the mailbox as well (`next_other`), so no two threads ever read the socket at once;
  that costs the per-request path one uncontended lock, nothing more. An event loop awaiting
  answers watches the socket (`add_reader`) while no thread reads it.

Answers of a call nobody waits for any more (`abandon`) are dropped on arrival, closing the
shared-memory descriptor that came with them. Only stdlib: the stub imports this module.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import os
import threading
from typing import Any

from backends.python_ipc import Channel, ChannelClosed

ANSWER = "bls_r"
_INTERNAL = 1  # pb_utils.TritonError.INTERNAL

# (final, result, fd, size): one answer as received
Answer = tuple[bool, tuple[Any, ...], int | None, int]


class _Call:
    __slots__ = ("answers", "future", "loop")

    def __init__(self) -> None:
        self.answers: collections.deque[Answer] = collections.deque()
        self.future: asyncio.Future[None] | None = None  # an awaiting coroutine's wake-up
        self.loop: asyncio.AbstractEventLoop | None = None


def _close_fds(call: _Call) -> None:
    """Close the shared-memory descriptors of the answers a call still holds."""
    for _, _, fd, _ in call.answers:
        if fd is not None:
            os.close(fd)


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class Mailbox:
    """The answers to one stub's BLS calls, and who reads the socket they come on."""

    def __init__(self, channel: Channel, listened: bool) -> None:
        self.channel = channel
        self.listened = listened
        self._cond = threading.Condition(threading.Lock())
        self._calls: dict[int, _Call] = {}
        self._ids = itertools.count(1)
        self._reading = False  # a thread (or the event loop) is reading the socket
        self._sleepers = 0  # threads in _sleep (notify only when there are: the per-request path stays cheap)
        self._others: collections.deque[tuple[Any, int | None]] = collections.deque()  # for next_other
        self._closed = ""  # why nothing more can come
        self._watching: asyncio.AbstractEventLoop | None = None  # a loop with a reader on the socket
        self._rewatch: asyncio.AbstractEventLoop | None = None  # a loop to watch again once a thread stops reading
        # Calls abandoned while the lock was taken (maybe by the abandoning thread itself: a
        # `__del__` run by the garbage collector inside one of our locked sections); reaped by
        # the next locked operation. deque.append needs no lock.
        self._later: collections.deque[int] = collections.deque()

    # -- calls --

    def open(self) -> int:
        """A new call's id, registered before its message is sent (its answer may come at once)."""
        with self._cond:
            if self._later:
                self._reap()
            call_id = next(self._ids)
            self._calls[call_id] = _Call()
        return call_id

    def abandon(self, call_id: int) -> None:
        """Nobody waits for this call any more: drop what came and what will come. Never waits
        for the lock (it may run in a `__del__` while this very thread holds it): if the lock is
        taken, the next locked operation drops the call."""
        if not self._cond.acquire(blocking=False):
            self._later.append(call_id)
            return
        try:
            call = self._calls.pop(call_id, None)
        finally:
            self._cond.release()
        if call is not None:
            _close_fds(call)

    def _reap(self) -> None:
        """(holding the lock) Drop the calls abandoned while the lock was taken."""
        while self._later:
            call = self._calls.pop(self._later.popleft(), None)
            if call is not None:
                _close_fds(call)

    def wait(self, call_id: int) -> Answer:
        """Block until the next answer to `call_id` (any thread)."""
        with self._cond:
            while True:
                call = self._calls[call_id]
                if call.answers:
                    return self._take(call_id, call)
                if self._closed:
                    return self._gone(call_id)
                if self.listened or self._reading:
                    self._sleep()
                    continue
                self._lead()

    async def wait_async(self, call_id: int) -> Answer:
        """The next answer to `call_id`, awaited on the running event loop."""
        loop = asyncio.get_running_loop()
        while True:
            with self._cond:
                call = self._calls[call_id]
                if call.answers:
                    return self._take(call_id, call)
                if self._closed:
                    return self._gone(call_id)
                future: asyncio.Future[None] = loop.create_future()
                call.future, call.loop = future, loop
                watch = not self.listened and not self._reading
                if not self.listened and self._reading:
                    self._rewatch = loop
            if watch:
                self._watch(loop)
            try:
                await future
            finally:
                with self._cond:
                    call.future = call.loop = None
                    idle = not any(c.future is not None for c in self._calls.values())
                if idle:
                    self._unwatch()

    def next_other(self) -> tuple[Any, int | None]:
        """The stub's main loop: the next message that is not a BLS answer (reading the socket
        itself unless a caller is reading it, which hands such messages over)."""
        with self._cond:
            while True:
                if self._others:
                    return self._others.popleft()
                if self._closed:
                    raise ChannelClosed(self._closed)
                if self._reading:
                    self._sleep()
                    continue
                self._lead()

    # -- delivery --

    def deliver(self, message: Any, fd: int | None) -> None:
        """An answer read by the listener thread (listened mode)."""
        with self._cond:
            self._deliver(message, fd)
            if self._sleepers:
                self._cond.notify_all()

    def close(self, reason: str) -> None:
        """Nothing more can come (the server went away): every waiter gets an error."""
        with self._cond:
            self._closed = reason or "the server closed the channel"
            self._wake_all()
            self._cond.notify_all()

    def _deliver(self, message: Any, fd: int | None) -> None:
        """(holding the lock)"""
        if self._later:
            self._reap()
        if message[0] != ANSWER:
            self._others.append((message, fd))
            return
        _, call_id, final, result, size = message
        call = self._calls.get(call_id)
        if call is None:  # a call nobody waits for any more
            if fd is not None:
                os.close(fd)
            return
        call.answers.append((final, result, fd, size))
        if call.future is not None and call.loop is not None:
            try:
                call.loop.call_soon_threadsafe(_wake, call.future)
            except RuntimeError:  # that loop is closed: nobody awaits there any more
                pass

    def _take(self, call_id: int, call: _Call) -> Answer:
        answer = call.answers.popleft()
        if answer[0]:  # final: the call is over
            self._calls.pop(call_id, None)
        return answer

    def _gone(self, call_id: int) -> Answer:
        self._calls.pop(call_id, None)
        return (True, ("err", f"BLS call lost: {self._closed}", _INTERNAL), None, 0)

    def _wake_all(self) -> None:
        for call in self._calls.values():
            if call.future is not None and call.loop is not None:
                try:
                    call.loop.call_soon_threadsafe(_wake, call.future)
                except RuntimeError:
                    pass

    # -- reading the socket (leader/follower) --

    def _sleep(self) -> None:
        """(holding the lock) Wait for a reader to deliver something."""
        self._sleepers += 1
        try:
            self._cond.wait()
        finally:
            self._sleepers -= 1

    def _lead(self) -> None:
        """(holding the lock) Read what is on the socket (blocking for one message), deliver it,
        wake the others; the lock is let go while reading."""
        self._reading = True
        self._cond.release()
        got: list[tuple[Any, int | None]] = []
        closed = ""
        try:
            got.append(self.channel.recv())
            while self.channel.buffered():
                got.append(self.channel.recv())
        except (ChannelClosed, OSError) as exc:
            closed = str(exc) or type(exc).__name__
        finally:
            self._cond.acquire()
            self._reading = False
        for message, fd in got:
            self._deliver(message, fd)
        if closed:
            self._closed = closed
            self._wake_all()
        if self._sleepers:
            self._cond.notify_all()
        loop, self._rewatch = self._rewatch, None
        if loop is not None and not closed:
            try:
                loop.call_soon_threadsafe(self._rewatch_if_waiting, loop)
            except RuntimeError:
                pass

    def _rewatch_if_waiting(self, loop: asyncio.AbstractEventLoop) -> None:
        with self._cond:
            waiting = any(c.future is not None and c.loop is loop for c in self._calls.values())
        if waiting:
            self._watch(loop)

    def _watch(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._watching is None:
            loop.add_reader(self.channel.sock.fileno(), self._readable)
            self._watching = loop

    def _unwatch(self) -> None:
        if self._watching is not None:
            self._watching.remove_reader(self.channel.sock.fileno())
            self._watching = None

    def _readable(self) -> None:
        """The watching loop's reader: read what came unless a thread is reading (it delivers,
        and the loop watches again when it is done)."""
        loop = self._watching
        with self._cond:
            if self._reading:
                self._rewatch = loop
                busy = True
            else:
                busy = False
                self._lead()
        if busy:
            self._unwatch()
