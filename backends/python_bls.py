"""Business logic scripting (BLS), the server's half: a Python model calling other models.

A model's `pb_utils.InferenceRequest(...).exec()` in the stub process
(backends/python_bls_stub.py) sends a `("bls", id, spec, metas, size)` message over the
instance's own Unix socket, with the input tensors in a fresh shared-memory file passed
along as a descriptor. Whoever is reading that socket for the instance (the thread or
event loop waiting for the stub's answer to the client's request) hands the message to
this instance's `BlsRouter`, which gives it to the server's `BlsHost`: the server runs
it on the target model through its own scheduler, in process (server/protocol/bls.py),
never over the network. Each answer goes back as `("bls_r", id, final, result, size)`,
outputs again in a fresh shared-memory file: one copy of each tensor each way, and the
receiver's arrays are views of the sender's memory.

An answer carries `final`: a call to a decoupled target (`exec(decoupled=True)`) is answered
by a stream of responses, the last one final. A decoupled model's messages travel on its
response channel instead (python_decoupled.py reads them), so its threads can call any time.
Model-management calls (`is_model_ready`, `load_model`, `unload_model`) are
`("bls_ctl", id, op, args)`, answered the same way.

A decoupled call's answers are bounded by credit: the server sends at most a window of them
(64, or 8 MiB of tensors plus the answer that crossed it) that the caller has not taken
yet, then stops taking the callee's responses (whose own window then blocks the callee's
sender, as an unread gRPC stream does) until the stub says the caller took some:
`("bls_took", id, count)`, sent by the stub after every `TOOK_EVERY` answers or `TOOK_BYTES`
taken. Both are well inside the window, so a caller that took everything never owes the
server enough credit to make it wait, and need not report before it waits (a message per
answer to a caller that keeps up). A caller that lets go of the iterator sends `("bls_drop", id)`: the server stops the
call (the callee sees the request cancelled) and drops the rest. A stub that goes away drops
all of its calls (`BlsRouter.close`). So a caller that does not iterate stalls the callee's
instance (and what waits behind it there) until it iterates, lets go, or its `execute` ends.

Models that never use BLS pay nothing: no message, no thread, no descriptor.
Only stdlib and numpy here (the stub imports it); backends never import `server`.
"""

from __future__ import annotations

import logging
import mmap
import os
import select
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from backends.python_ipc import Arena, Channel, TensorMeta, layout, read, write

log = logging.getLogger("nereid.python.bls")

# Message kinds from the stub that belong to BLS (python.py hands them to the router).
REQUEST_KINDS = frozenset({"bls", "bls_ctl", "bls_took", "bls_drop"})
ANSWER = "bls_r"
# A decoupled call's credit: the stub reports taken answers at least this often (well inside
# the server's window of 64 answers / 8 MiB, so a caller that keeps up never makes it wait).
TOOK_EVERY = 16
TOOK_BYTES = 2 << 20
INTERNAL = 1  # pb_utils.TritonError.INTERNAL

# (message, pb_utils.TritonError code) of a failed call
Failure = tuple[str, int]


@dataclass
class BlsCall:
    """One inference a model asked for, as the server runs it."""

    model_name: str
    model_version: str  # "" lets the version policy choose (Triton's -1)
    inputs: dict[str, np.ndarray]  # in the order the model gave them
    requested_outputs: tuple[str, ...] | None  # None: every output
    request_id: str = ""
    correlation_id: int | str = 0
    flags: int = 0
    timeout_us: int = 0
    parameters: dict[str, Any] = field(default_factory=dict)
    decoupled: bool = False  # the caller takes a stream of responses (exec(decoupled=True))
    flow: CallFlow | None = None  # a decoupled call's credit from the caller's stub
    answer_room: AnswerRoom | None = None  # the socket its answers go on (the server waits for room there)


class AnswerRoom:
    """Whether the stub's socket takes one more answer now without blocking the sender (the
    server's event loop, which must never block on a stub that is not reading).

    Polled, but not for every answer: a Unix socket polls writable while at most a quarter
    of its send buffer is in use, so once it did, the next `allowance` answers (a few KB
    each at most: tensors travel in shared memory) fit without looking again. A caller that
    keeps up thus costs one poll per `allowance` answers. Closed with the stub: nothing waits
    for room in a socket that is gone (its descriptor may already name another file)."""

    MESSAGE_BYTES = 4096  # what one answer may take of the send buffer, at most (its error text included)

    def __init__(self, sock: socket.socket) -> None:
        self._fd = sock.fileno()
        sndbuf = sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
        self.allowance = max(1, min(32, sndbuf * 3 // 4 // self.MESSAGE_BYTES))
        self._left = 0
        self.closed = False

    def ready(self) -> bool:
        """Whether one answer may be sent now (counted as sent if so)."""
        if self._left > 0 or self.closed:
            self._left -= 1
            return True
        poller = select.poll()
        poller.register(self._fd, select.POLLOUT)
        if not poller.poll(0):  # a broken socket polls too (the send then fails at once)
            return False
        self._left = self.allowance - 1
        return True


class CallFlow:
    """What the caller's stub says about one decoupled call as it goes: how many answers the
    caller took, or that it let go. Told from the thread that reads the stub's socket; passed
    on to the host's `listen` callback (count taken, or -1: dropped), kept until it listens."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._listener: Callable[[int], None] | None = None
        self._took = 0
        self._dropped = False

    def listen(self, listener: Callable[[int], None]) -> None:
        with self._lock:
            self._listener = listener
            took, dropped = self._took, self._dropped
        if took:
            listener(took)
        if dropped:
            listener(-1)

    def took(self, count: int) -> None:
        with self._lock:
            listener = self._listener
            if listener is None:
                self._took += count
                return
        listener(count)

    def drop(self) -> None:
        with self._lock:
            listener = self._listener
            if listener is None:
                self._dropped = True
                return
        listener(-1)


# respond(outputs, failure, final): one answer to a call; exactly one of outputs/failure is set.
Respond = Callable[[dict[str, np.ndarray] | None, Failure | None, bool], None]


class BlsHost(Protocol):
    """What the server provides (server/protocol/bls.py). Both methods return at once and
    answer later through `respond`, from any thread."""

    def infer(self, call: BlsCall, respond: Respond) -> None: ...

    def control(self, op: str, args: dict[str, Any], respond: Respond, room: AnswerRoom | None = None) -> None:
        """op: "ready" (answers {"ready": bool}), "load", "unload" (answer {}); the answer waits
        for `room` on the caller's socket as an inference answer does."""


_HOST: BlsHost | None = None


def set_host(host: BlsHost | None) -> None:
    """Install the server's BLS host (once, at startup); None removes it."""
    global _HOST
    _HOST = host


# -- tensors in one-shot shared memory --


def pack_tensors(tensors: list[tuple[str, np.ndarray]]) -> tuple[list[TensorMeta], int | None, int]:
    """Write tensors into a new anonymous shared-memory file sized for them.

    Returns (their metas, the file's descriptor to send and then close, its size); no
    file at all when they hold no bytes. One file per message, so a message's tensors
    stay valid for as long as the receiver keeps arrays over them, whatever comes next.
    """
    plan, needed = layout(tensors)
    arena = Arena("nereid-bls")
    if needed == 0:
        return write(arena, plan), None, 0
    fd = os.memfd_create("nereid-bls", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, needed)
        arena.map, arena.size = mmap.mmap(fd, needed), needed
        metas = write(arena, plan)
    except BaseException:
        os.close(fd)
        raise
    finally:
        if arena.map is not None:
            try:
                arena.map.close()
            except BufferError:  # an array still points into it: let it go with that array
                pass
    return metas, fd, needed


def unpack_tensors(metas: list[TensorMeta], fd: int | None, size: int) -> list[tuple[str, np.ndarray]]:
    """Arrays over a received shared-memory file (no copy; the file is unmapped when the
    last array over it is gone). Closes `fd`."""
    arena = Arena("nereid-bls")
    if fd is not None:
        try:
            if size:
                arena.map, arena.size = mmap.mmap(fd, size), size
        finally:
            os.close(fd)
    return read(arena, metas, copy=False)


def send_answer(channel: Channel, call_id: int, outputs: dict[str, np.ndarray] | None, failure: Failure | None,
                final: bool) -> None:
    """Send one answer to call `call_id` (either side may use it: the stub never does)."""
    fd = None
    try:
        if failure is not None:
            message: tuple[Any, ...] = (ANSWER, call_id, final, ("err", failure[0], failure[1]), 0)
        else:
            try:
                metas, fd, size = pack_tensors(list((outputs or {}).items()))
                message = (ANSWER, call_id, final, ("ok", metas), size)
            except Exception as exc:  # e.g. a string tensor that cannot be encoded
                message = (ANSWER, call_id, final, ("err", f"cannot pass the response to the model: {exc}",
                                                    INTERNAL), 0)
        channel.send(message, fd)
    except OSError as exc:  # the stub died meanwhile: nobody is waiting any more
        log.debug("BLS answer to call %d not delivered: %s", call_id, exc)
    finally:
        if fd is not None:
            os.close(fd)


class BlsRouter:
    """The server side of one stub's BLS messages: decode, hand to the host, answer."""

    def __init__(self, channel: Channel, label: str) -> None:
        self.channel = channel
        self.label = label
        self._flows: dict[int, CallFlow] = {}  # decoupled calls not answered to the end yet
        self._lock = threading.Lock()
        self._closed = False
        self.room = AnswerRoom(channel.sock)  # the server's answers wait for room there

    def handle(self, message: tuple[Any, ...], fd: int | None) -> None:
        """Take one BLS message from the stub; never blocks (the host answers later)."""
        kind, call_id = message[0], message[1]
        if kind == "bls_took" or kind == "bls_drop":
            with self._lock:
                flow = self._flows.get(call_id) if kind == "bls_took" else self._flows.pop(call_id, None)
            if flow is not None and kind == "bls_took":
                flow.took(message[2])
            elif flow is not None:
                flow.drop()
            return
        host = _HOST
        flows = kind == "bls" and bool(message[2].get("decoupled"))

        def respond(outputs: dict[str, np.ndarray] | None, failure: Failure | None, final: bool = True) -> None:
            if final and flows:
                with self._lock:
                    self._flows.pop(call_id, None)
            send_answer(self.channel, call_id, outputs, failure, final)

        if kind == "bls_ctl":
            if host is None:
                respond(None, ("the model management API needs a running server", INTERNAL), True)
                return
            host.control(message[2], message[3], respond, self.room)
            return
        _, _, spec, metas, size = message
        try:
            inputs = dict(unpack_tensors(metas, fd, size))
        except Exception as exc:
            respond(None, (f"cannot read the BLS request's inputs: {exc}", INTERNAL), True)
            return
        if host is None:
            respond(None, ("BLS needs a running server", INTERNAL), True)
            return
        call = BlsCall(
            model_name=spec["model_name"], model_version=spec["model_version"], inputs=inputs,
            requested_outputs=tuple(spec["requested"]) or None, request_id=spec["request_id"],
            correlation_id=spec["correlation_id"], flags=spec["flags"], timeout_us=spec["timeout"],
            parameters=spec["parameters"], decoupled=spec["decoupled"], answer_room=self.room,
        )
        if flows:
            call.flow = CallFlow()
            with self._lock:
                if self._closed:
                    call.flow.drop()
                else:
                    self._flows[call_id] = call.flow
        host.infer(call, respond)

    def close(self) -> None:
        """The stub went away: its decoupled calls stop (nobody will take their answers)."""
        with self._lock:
            self._closed = True
            self.room.closed = True
            flows, self._flows = list(self._flows.values()), {}
        for flow in flows:
            flow.drop()
