"""A decoupled BLS iterator let go of while another thread of the stub is sending
(backends/python_bls_stub.py BlsClient.drop, which may run in a `__del__` and so never
waits for the send lock itself): the server still hears of it at once, not with whatever
message the stub happens to send next (a decoupled model's threads may send none, and the
callee would stay held). Over a real socket pair: the server's end reads what arrives."""

from __future__ import annotations

import os
import socket
import threading
import time

import pytest
from util import scaled

from backends.python_bls_mailbox import ANSWER, Mailbox
from backends.python_bls_stub import BlsClient
from backends.python_ipc import Channel


def test_a_drop_made_during_another_send_still_reaches_the_server() -> None:
    ours, theirs = socket.socketpair()
    try:
        client = BlsClient(Channel(ours), pb_utils=None, listened=True)
        server = Channel(theirs)
        lock = client.channel._send_lock
        lock.acquire()  # another thread is in the middle of a send
        try:
            client.drop(7)
        finally:
            time.sleep(0.05)
            lock.release()  # that send ends; the stub sends nothing more of its own
        theirs.settimeout(scaled(5))
        message, _ = server.recv()
        assert message == ("bls_drop", 7), message
    finally:
        ours.close()
        theirs.close()


def test_abandon_inside_a_locked_section_of_the_same_thread_does_not_deadlock() -> None:
    """`abandon` runs in an iterator's `__del__`, which the garbage collector may run while this
    very thread is inside one of the mailbox's locked sections: it must not wait for the lock
    (a plain Lock: that thread would wait for itself forever). The call is dropped by the next
    locked operation, and the shared-memory descriptor its answer carried is closed."""
    ours, theirs = socket.socketpair()
    read_end, write_end = os.pipe()  # stands for an answer's memfd
    try:
        mailbox = Mailbox(Channel(ours), listened=True)
        call_id = mailbox.open()
        mailbox.deliver((ANSWER, call_id, False, ("ok", []), 0), read_end)
        done = threading.Event()

        def collected_while_locked() -> None:
            with mailbox._cond:  # as if GC ran the __del__ inside a locked section
                mailbox.abandon(call_id)
            done.set()

        thread = threading.Thread(target=collected_while_locked, daemon=True)
        thread.start()
        thread.join(scaled(5))
        assert done.is_set(), "abandon waited for a lock its own thread holds"
        mailbox.open()  # the next locked operation drops the call
        assert call_id not in mailbox._calls
        with pytest.raises(OSError):
            os.fstat(read_end)  # closed with the dropped answer
    finally:
        ours.close()
        theirs.close()
        os.close(write_end)
