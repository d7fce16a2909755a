"""A decoupled BLS iterator let go of while another thread of the stub is sending
(backends/python_bls_stub.py BlsClient.drop, which may run in a `__del__` and so never
waits for the send lock itself): the server still hears of it at once, not with whatever
message the stub happens to send next (a decoupled model's threads may send none, and the
callee would stay held). Over a real socket pair: the server's end reads what arrives."""

from __future__ import annotations

import socket
import time

from util import scaled

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
