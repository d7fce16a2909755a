"""Races and failure paths of `--workers`, each driven to its harmful point in one process.

They use the real WorkerPool, OwnerLink and FrontendLink over a real socket pair; the
frontend process is stood in for by an object that records whether it was killed.
"""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path

import grpc
import pytest

from server.settings import Settings
from server.workers import link
from server.workers import pool as pool_module
from server.workers.frontend import FrontendLink
from server.workers.methods import method_table
from server.workers.owner import OwnerLink
from server.workers.pool import WorkerPool, _Worker


class _Process:
    """What the pool's ping loop looks at of a frontend process."""

    pid = 4242

    def __init__(self) -> None:
        self.returncode: int | None = None
        self.killed = 0

    def kill(self) -> None:
        self.killed += 1


async def _pool_with_one_frontend() -> tuple[WorkerPool, _Worker, FrontendLink]:
    """A pool whose one frontend is a FrontendLink in this process, answering the pool's PINGs."""
    settings = Settings(model_repositories=(Path("."),), grpc_address="127.0.0.1", grpc_port=0, workers=2,
                        connection_balance="hash")
    pool = WorkerPool(settings, {})
    loop = asyncio.get_running_loop()
    ours, theirs = socket.socketpair()
    worker = _Worker(0, process=_Process(), ready=loop.create_future())  # type: ignore[arg-type]
    worker.ready.set_result(4242)  # type: ignore[union-attr]
    worker.link = OwnerLink(0, [], lambda i, p: None, lambda i: None, pool.calls)
    await loop.connect_accepted_socket(lambda: worker.link.protocol, ours)  # type: ignore[union-attr]
    frontend = FrontendLink(secure=False)
    await loop.connect_accepted_socket(lambda: frontend.protocol, theirs)
    pool._workers = [worker]
    return pool, worker, frontend


async def _close(pool: WorkerPool, worker: _Worker, frontend: FrontendLink) -> None:
    pool._stopping = True
    if pool._pinger is not None:
        pool._pinger.cancel()
    for protocol in (frontend.protocol, worker.link.protocol):  # type: ignore[union-attr]
        if protocol.transport is not None:
            protocol.transport.close()
    pool._holder.close()
    await asyncio.sleep(0)


def test_an_owner_that_did_not_run_for_a_while_does_not_kill_its_answering_frontends(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The owner's own event loop stalls for longer than the hang limit (SIGSTOP, a paused
    container, a long blocking call) while its frontend is fine. On resume, the ping loop ran
    before it had sent a PING, so it saw no answer for the length of the stall and killed every
    frontend (every client connection broken). A stall of the owner is not a frontend's silence."""
    monkeypatch.setattr(pool_module, "_PING_S", 0.05)
    monkeypatch.setattr(pool_module, "_HUNG_S", 0.5)

    async def run() -> None:
        pool, worker, frontend = await _pool_with_one_frontend()
        link, process = worker.link, worker.process
        assert link is not None and isinstance(process, _Process)
        pool._pinger = asyncio.get_running_loop().create_task(pool._ping())
        try:
            for _ in range(3):  # a few PING/PONG rounds, then stall right after an answer was read
                answered = link.answered
                while link.answered == answered:
                    await asyncio.sleep(0)
            time.sleep(1.0)  # the owner's loop does not run: twice the hang limit
            await asyncio.sleep(0.3)  # six ping rounds: the frontend answers each
            assert process.killed == 0, "a frontend that answers every PING was killed after the owner's stall"

            # A frontend that really stops answering is still found (it no longer reads the link).
            assert frontend.protocol.transport is not None
            frontend.protocol.transport.pause_reading()
            deadline = time.monotonic() + 5.0
            while process.killed == 0 and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert process.killed >= 1, "a frontend that stopped answering was not killed"
        finally:
            await _close(pool, worker, frontend)

    asyncio.run(run())



_NUMBERS = {(m.service.rsplit(".", 1)[-1], m.name): i for i, m in enumerate(method_table())}
_INFER = _NUMBERS["GRPCInferenceService", "ModelInfer"]
_STREAM = _NUMBERS["GRPCInferenceService", "ModelStreamInfer"]


class _Context:
    """What FrontendLink.start reads of a grpc.aio call."""

    def invocation_metadata(self) -> tuple[()]:
        return ()

    def peer(self) -> str:
        return "ipv4:127.0.0.1:1"

    def time_remaining(self) -> None:
        return None


def test_open_streams_do_not_use_up_a_frontends_inflight_cap() -> None:
    """--max-inflight-requests N in a frontend bounds the unary calls it holds for a stuck owner.
    Open streams counted in it too, so N idle streams through one frontend made it refuse every
    other call, ServerReady and health checks included (RESOURCE_EXHAUSTED; one process serves
    them: its cap counts requests, not open streams). A stream's buffered messages are bounded
    by its link window instead."""
    async def run() -> None:
        forward = FrontendLink(secure=False, limit=2)
        context = _Context()
        streams = [forward.start(link.OPEN, _STREAM, context, b"", streaming=True) for _ in range(2)]
        ready_id, ready = forward.start(link.CALL, _INFER, context, b"", streaming=False)
        assert ready.future is not None and not ready.future.done(), ready.future  # held, not refused
        _, second = forward.start(link.CALL, _INFER, context, b"", streaming=False)
        _, third = forward.start(link.CALL, _INFER, context, b"", streaming=False)
        assert not second.future.done()  # type: ignore[union-attr]
        assert third.future.result()[0] == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]  # type: ignore[union-attr]
        # Calls ending every way give their place back: a reply, a status, a cancel.
        forward._frame(link.STATUS, streams[0][0], link.status_payload(0, ""))
        forward.forget(streams[1][0], cancel=True)
        forward._frame(link.REPLY, ready_id, b"r")
        _, fourth = forward.start(link.CALL, _INFER, context, b"", streaming=False)
        assert not fourth.future.done()  # type: ignore[union-attr]
        _, fifth = forward.start(link.CALL, _INFER, context, b"", streaming=False)
        assert fifth.future.result()[0] == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]  # type: ignore[union-attr]
        forward.protocol.connection_lost(None)
        assert forward._calls == {} and forward._held == 0

    asyncio.run(run())


def test_a_frontend_at_its_inflight_cap_still_answers_readiness_and_health() -> None:
    """The cap mirrors the owner's (servicer.infer), which counts inference requests only: a
    frontend holding N ModelInfer calls refused ServerReady and health Check as well, so a gRPC
    readiness or liveness probe failed under a load one process serves them through."""
    async def run() -> None:
        forward = FrontendLink(secure=False, limit=1)
        context = _Context()
        _, infer = forward.start(link.CALL, _INFER, context, b"", streaming=False)
        for name in (("GRPCInferenceService", "ServerReady"), ("Health", "Check"),
                     ("GRPCInferenceService", "ModelMetadata")):
            _, call = forward.start(link.CALL, _NUMBERS[name], context, b"", streaming=False)
            assert call.future is not None and not call.future.done(), (name, call.future)
        _, over = forward.start(link.CALL, _INFER, context, b"", streaming=False)
        assert over.future.result()[0] == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]  # type: ignore[union-attr]
        assert not infer.future.done()  # type: ignore[union-attr]
        forward.protocol.connection_lost(None)
        assert forward._calls == {} and forward._held == 0

    asyncio.run(run())
