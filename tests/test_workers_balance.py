"""`--connection-balance round-robin` (server/workers/balance.py): new connections go to the
frontends in turn, by an eBPF program on the port's reuseport group, instead of by the
kernel's hash of addresses and ports (which put all 3 of perf_analyzer's connections on one
of two frontends in one measured run).

The program is checked on its own first (listeners in this process, exact counts), then in
the server: N connections opened one after another reach each frontend N / frontends times,
also after a frontend was killed and restarted (the program belongs to the group, which the
new listener joins, and each frontend attaches it again as it starts). The hash gives an exact
split only by chance (8 + 8 of 16: one time in five), so these counts fail without it.
"""

from __future__ import annotations

import os
import select
import signal
import socket
import subprocess
import time

import numpy as np
import pytest
from test_workers import _client, _inputs, _worker_pids, _worker_values
from util import PYTHON, ROOT, ServerProcess, identity_config, scaled, write_model

from server.workers import balance


def _spread(listeners: int, connections: int) -> list[int]:
    prog = balance.load(listeners)
    socks: list[socket.socket] = []
    clients: list[socket.socket] = []
    try:
        for _ in range(listeners):
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            s.bind(("127.0.0.1", socks[0].getsockname()[1] if socks else 0))
            s.listen(64)
            socks.append(s)
        port = socks[0].getsockname()[1]
        assert balance.attach(prog, port) == listeners
        clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(connections)]
        counts = [0] * listeners
        deadline = time.monotonic() + scaled(5)
        while sum(counts) < connections and time.monotonic() < deadline:
            ready, _, _ = select.select(socks, [], [], 0.2)
            for s in ready:
                s.accept()[0].close()
                counts[socks.index(s)] += 1
        return counts
    finally:
        os.close(prog)
        for s in socks + clients:
            s.close()


def test_the_program_hands_connections_to_the_listeners_in_turn() -> None:
    assert _spread(3, 12) == [4, 4, 4]
    assert sorted(_spread(2, 13)) == [6, 7]


def test_attach_refuses_a_port_this_process_does_not_listen_on() -> None:
    prog = balance.load(2)
    try:
        with pytest.raises(balance.BalanceUnavailable, match="no listening socket"):
            balance.attach(prog, 1)
    finally:
        os.close(prog)


@pytest.fixture
def ident_repo(tmp_path):
    repo = tmp_path / "repo"
    write_model(repo, "ident", identity_config("ident", [("INPUT0", "FP32", [-1])], max_batch_size=8))
    return repo


def _one_call_per_connection(srv, connections: int) -> dict[int, int]:
    """Open `connections` clients one after another, one infer each; the calls each frontend forwarded."""
    before = _worker_values(srv, "nereid_worker_calls_total")
    data = np.ones((1, 3), np.float32)
    for _ in range(connections):
        c = _client(srv)
        c.infer("ident", _inputs(data))
        c.close()
    after = _worker_values(srv, "nereid_worker_calls_total")
    return {w: int(after[w] - before.get(w, 0)) for w in after}


def test_connections_reach_the_frontends_in_turn_also_after_a_restart(ident_repo, server_factory) -> None:
    srv = server_factory(ident_repo, "--workers", "2")
    assert "new connections go to the 2 frontends in turn" in srv.log, srv.log
    assert "by the kernel's hash" not in srv.log
    assert _one_call_per_connection(srv, 16) == {0: 8, 1: 8}
    pid = _worker_pids(srv)[1]
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + scaled(20)
    while (_worker_pids(srv).get(1) == pid or _worker_values(srv, "nereid_worker_up").get(1) != 1.0) \
            and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _worker_pids(srv)[1] != pid, srv.log
    assert _one_call_per_connection(srv, 16) == {0: 8, 1: 8}


def test_hash_balance_is_the_kernels_own(ident_repo, server_factory) -> None:
    srv = server_factory(ident_repo, "--workers", "2", "--connection-balance", "hash")
    assert "in turn" not in srv.log and "by the kernel's hash" not in srv.log
    assert sum(_one_call_per_connection(srv, 4).values()) == 4


# Containers usually run without CAP_BPF (ours drop every capability): the same as here.
WITHOUT_BPF = ["setpriv", "--inh-caps=-all", "--bounding-set=-bpf,-sys_admin", "--"]


def test_without_bpf_the_load_is_refused_clearly() -> None:
    code = "from server.workers import balance\ntry:\n    balance.load(2)\nexcept balance.BalanceUnavailable as e:\n" \
           "    print('refused', e)\n"
    out = subprocess.run([*WITHOUT_BPF, PYTHON, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         timeout=scaled(30))
    assert out.stdout.strip() == "refused [Errno 1] bpf(): Operation not permitted", out


def test_without_bpf_the_server_says_so_and_serves_by_the_hash(ident_repo) -> None:
    srv = ServerProcess([ident_repo], ["--workers", "2"], prefix=WITHOUT_BPF)
    try:
        assert "connections are spread over the 2 frontends by the kernel's hash, not in turn: the eBPF " \
               "program could not be loaded ([Errno 1] bpf(): Operation not permitted); what a container needs " \
               "for it: docs/DEPLOYMENT.md, \"--workers N in a container\"; --connection-balance=hash chooses " \
               "the hash without this warning" in srv.log, srv.log
        assert "in turn (eBPF" not in srv.log
        assert sum(_one_call_per_connection(srv, 4).values()) == 4
    finally:
        srv.stop()


def test_a_one_channel_client_reaches_every_frontend_only_through_a_proxy(ident_repo, server_factory,
                                                                         tmp_path) -> None:
    """A service with one tritonclient channel holds one HTTP/2 connection, so it reaches one
    frontend whatever its concurrency; behind an L7 proxy (nginx's grpc_pass, as
    docs/DEPLOYMENT.md sets it up) its calls reach every frontend, because nginx opens its own
    upstream connections, one per call in flight, and those go to the frontends in turn."""
    from concurrent.futures import ThreadPoolExecutor

    import tritonclient.grpc as grpcclient
    from balancer import Balancer

    srv = server_factory(ident_repo, "--workers", "2")
    data = np.ones((1, 3), np.float32)

    def calls_from_one_channel(url: str) -> dict[int, int]:
        before = _worker_values(srv, "nereid_worker_calls_total")
        c = grpcclient.InferenceServerClient(url)  # one channel, shared by 8 threads
        try:
            with ThreadPoolExecutor(8) as pool:
                for result in pool.map(lambda _: c.infer("ident", _inputs(data)), range(160)):
                    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), data)
        finally:
            c.close()
        after = _worker_values(srv, "nereid_worker_calls_total")
        return {w: int(after[w] - before.get(w, 0)) for w in after}

    direct = calls_from_one_channel(srv.url)
    assert sorted(direct.values()) == [0, 160], direct
    proxy = Balancer("nginx", [srv.url], tmp_path / "nginx")
    try:
        spread = calls_from_one_channel(proxy.url)
    finally:
        proxy.stop()
    assert sum(spread.values()) == 160 and min(spread.values()) >= 160 // 8, spread
