"""`--workers` under abuse: hung frontends, a dying owner, open Watch streams at shutdown,
streams cancelled mid-way. Each test starts its own server on 127.0.0.1 port 0."""

from __future__ import annotations

import os
import re
import signal
import threading
import time

import grpc
import numpy as np
import tritonclient.grpc as grpcclient
from grpc_health.v1 import health_pb2, health_pb2_grpc
from test_workers import (
    _alive,
    _client,
    _clients_on_each_worker,
    _inputs,
    _metrics,
    _try,
    _worker_pids,
    identity_repo_slow,
)
from util import scaled

__all__ = ["identity_repo_slow"]  # the fixture, shared with test_workers


def _inflight(srv) -> float:
    match = re.search(r"^nereid_inflight_requests ([0-9.]+)$", _metrics(srv), re.M)
    return float(match.group(1)) if match else -1.0


def _watch(srv, out: list) -> threading.Thread:
    """A health Watch on a connection of its own, recording every status and how it ended."""
    def run() -> None:
        channel = grpc.insecure_channel(srv.url, options=[("grpc.use_local_subchannel_pool", 1)])
        try:
            for reply in health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service="")):
                out.append(reply.status)
            out.append("ended OK")
        except grpc.RpcError as exc:
            out.append(exc.code())
        finally:
            channel.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_a_stopped_frontend_does_not_hold_the_shutdown(identity_repo_slow, server_factory) -> None:
    """A SIGSTOPped (hung, not dead) frontend: the other serves, and SIGTERM still ends the
    server in bounded time with no frontend left behind."""
    srv = server_factory(identity_repo_slow, "--workers", "2", "--exit-timeout-secs", "3")
    clients = _clients_on_each_worker(srv, 2, "ident")
    pids = _worker_pids(srv)
    os.kill(pids[0], signal.SIGSTOP)
    data = np.ones((1, 2), np.float32)
    np.testing.assert_array_equal(clients[1].infer("ident", _inputs(data)).as_numpy("OUTPUT0"), data)
    started = time.monotonic()
    srv.terminate()
    srv.wait(scaled(30))
    assert time.monotonic() - started < scaled(20), "shutdown waited on the stopped frontend"
    deadline = time.monotonic() + scaled(5)
    while any(_alive(p) for p in pids.values()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(p) for p in pids.values()), "a frontend outlived the server"
    for c in clients.values():
        c.close()


def test_owner_death_ends_calls_and_watches_unavailable(identity_repo_slow, server_factory) -> None:
    srv = server_factory(identity_repo_slow, "--workers", "2")
    c = _client(srv)
    watched: list = []
    watcher = _watch(srv, watched)
    outcome: list = []
    call = threading.Thread(target=lambda: outcome.append(_try(c, "slow", np.ones((1, 2), np.float32))))
    call.start()
    time.sleep(0.5)
    srv.proc.kill()
    call.join(scaled(10))
    watcher.join(scaled(10))
    assert outcome == ["StatusCode.UNAVAILABLE"], outcome
    assert watched and watched[-1] == grpc.StatusCode.UNAVAILABLE, watched
    c.close()


def test_an_open_watch_through_a_frontend_ends_at_shutdown(identity_repo_slow, server_factory) -> None:
    srv = server_factory(identity_repo_slow, "--workers", "2", "--exit-timeout-secs", "20")
    watched: list = []
    watchers = [_watch(srv, watched) for _ in range(4)]
    deadline = time.monotonic() + scaled(10)
    while len(watched) < 4 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert watched.count(health_pb2.HealthCheckResponse.SERVING) == 4, watched
    started = time.monotonic()
    srv.terminate()
    assert srv.wait(scaled(30)) == 0, srv.log
    assert time.monotonic() - started < scaled(10), "an open Watch held the shutdown"
    for w in watchers:
        w.join(scaled(5))
    ends = [x for x in watched if not isinstance(x, int)]
    assert len(ends) == 4 and all(e == grpc.StatusCode.UNAVAILABLE for e in ends), watched


def test_a_stream_cancelled_mid_way_frees_its_requests_in_the_owner(identity_repo_slow, server_factory) -> None:
    srv = server_factory(identity_repo_slow, "--workers", "2")
    c = _client(srv)
    c.start_stream(callback=lambda result, error: None)
    for i in range(8):
        c.async_stream_infer("slow", _inputs(np.full((1, 2), i, np.float32)), request_id=str(i))
    deadline = time.monotonic() + scaled(5)
    while _inflight(srv) < 8 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _inflight(srv) == 8
    c.stop_stream(cancel_requests=True)
    deadline = time.monotonic() + 1.2  # the model takes 1.5 s per batch
    while _inflight(srv) != 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _inflight(srv) == 0, "the owner still holds the cancelled stream's requests"
    c.close()


def test_binary_metadata_and_many_headers_reach_the_owner_intact(identity_repo_slow, server_factory) -> None:
    """Client-chosen metadata crosses the link with marshal: binary values, odd bytes, many keys."""
    srv = server_factory(identity_repo_slow, "--workers", "2")
    c = _client(srv)
    data = np.ones((1, 2), np.float32)
    headers = {f"x-h{i}": "v" * 40 for i in range(80)}  # near grpc's 8 KiB limit
    np.testing.assert_array_equal(c.infer("ident", _inputs(data), headers=headers).as_numpy("OUTPUT0"), data)
    channel = grpc.insecure_channel(srv.url)
    stub = health_pb2_grpc.HealthStub(channel)
    reply = stub.Check(health_pb2.HealthCheckRequest(service=""),
                       metadata=[("k-bin", bytes(range(256))), ("k2-bin", b"\x80" * 1000)], timeout=scaled(5))
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    channel.close()
    assert isinstance(c, grpcclient.InferenceServerClient) and c.is_server_live()
    c.close()


def test_a_hung_frontend_is_replaced(identity_repo_slow, server_factory) -> None:
    """A frontend that stops answering (SIGSTOP here: alive, but its clients wait forever) is
    killed and restarted, as one that exits is."""
    srv = server_factory(identity_repo_slow, "--workers", "2")
    pids = _worker_pids(srv)
    os.kill(pids[0], signal.SIGSTOP)
    deadline = time.monotonic() + scaled(30)
    while _worker_pids(srv).get(0) == pids[0] and time.monotonic() < deadline:
        time.sleep(0.2)
    try:
        assert _worker_pids(srv)[0] != pids[0], "the hung frontend was not replaced"
        assert "did not answer" in srv.log
        assert not _alive(pids[0]), "the hung frontend was not killed"
    finally:
        if _alive(pids[0]):
            os.kill(pids[0], signal.SIGKILL)
