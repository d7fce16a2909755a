"""`nereid serve --workers N`: frontend processes on one port, forwarding to the model owner.

The server must behave as one whichever frontend a client reaches: statistics, load and
unload, readiness and health are the owner's; a frontend that dies is restarted while the
others keep serving; SIGTERM drains every frontend; if the owner dies the frontends go too.
Clients reach different frontends only on different connections (SO_REUSEPORT spreads
connections, not calls): each test client here has its own connection
(`grpc.use_local_subchannel_pool`), and the tests open clients until the metrics show that
every frontend has forwarded calls.
"""

from __future__ import annotations

import collections
import http.client
import os
import re
import signal
import socket
import subprocess
import threading
import time

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.utils import InferenceServerException
from util import PYTHON, ROOT, WORKERS_ENV, ServerProcess, identity_config, scaled, write_model

WORKER_RE = re.compile(r"worker (\d+) \(pid (\d+)\) serving")


def _client(srv: ServerProcess) -> grpcclient.InferenceServerClient:
    """A client on a connection of its own (tritonclient's channels otherwise share one)."""
    limit = 2**31 - 1  # tritonclient's own defaults, which channel_args replace
    return grpcclient.InferenceServerClient(srv.url, channel_args=[
        ("grpc.use_local_subchannel_pool", 1), ("grpc.max_send_message_length", limit),
        ("grpc.max_receive_message_length", limit)])


def _metrics(srv: ServerProcess) -> str:
    conn = http.client.HTTPConnection("127.0.0.1", srv.metrics_port, timeout=10)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    conn.close()
    return text


def _worker_values(srv: ServerProcess, family: str) -> dict[int, float]:
    pattern = re.compile(rf'^{family}{{worker="(\d+)"}} ([0-9.e+]+)$', re.M)
    return {int(w): float(v) for w, v in pattern.findall(_metrics(srv))}


def _inputs(data: np.ndarray) -> list[grpcclient.InferInput]:
    inp = grpcclient.InferInput("INPUT0", list(data.shape), "FP32")
    inp.set_data_from_numpy(data)
    return [inp]


def _clients_on_each_worker(srv: ServerProcess, workers: int, model: str,
                            width: int = 4) -> dict[int, grpcclient.InferenceServerClient]:
    """One client per frontend: open clients, send one call each, and see which frontend's
    forwarded-call count moved (connections hash to frontends at random)."""
    found: dict[int, grpcclient.InferenceServerClient] = {}
    data = np.ones((1, width), np.float32)
    for _ in range(80):
        before = _worker_values(srv, "nereid_worker_calls_total")
        c = _client(srv)
        c.infer(model, _inputs(data))
        after = _worker_values(srv, "nereid_worker_calls_total")
        moved = [w for w in after if after[w] > before.get(w, 0)]
        assert len(moved) == 1, (before, after)
        if moved[0] in found:
            c.close()
        else:
            found[moved[0]] = c
        if len(found) == workers:
            return found
    raise AssertionError(f"80 connections never reached all {workers} frontends: {sorted(found)}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is gone for our purposes
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _worker_pids(srv: ServerProcess) -> dict[int, int]:
    """The latest pid logged for each frontend."""
    return {int(m.group(1)): int(m.group(2)) for m in map(WORKER_RE.search, srv.log.splitlines()) if m}


@pytest.fixture
def identity_repo_slow(tmp_path):
    repo = tmp_path / "repo"
    write_model(repo, "ident", identity_config("ident", [("INPUT0", "FP32", [-1])], max_batch_size=8,
                                               instance_count=2, extra="dynamic_batching { }\n"))
    write_model(repo, "slow", identity_config("slow", [("INPUT0", "FP32", [-1])], max_batch_size=8,
                                              execute_delay_ms=1500, instance_count=4))
    return repo


def test_two_workers_serve_as_one_server(identity_repo_slow, server_factory) -> None:
    srv = server_factory(identity_repo_slow, "--workers", "2")
    assert "2 worker processes" in srv.log
    # Models load once, in the owner: the frontends hold no model.
    assert len(re.findall(r"loaded model 'ident'", srv.log)) == 1, srv.log
    clients = _clients_on_each_worker(srv, 2, "ident")
    calls = _worker_values(srv, "nereid_worker_calls_total")
    sent = rows_sent = 0
    rng = np.random.default_rng(0)
    for c in clients.values():
        for rows in (1, 3, 8):
            data = rng.standard_normal((rows, 5)).astype(np.float32)
            np.testing.assert_array_equal(c.infer("ident", _inputs(data)).as_numpy("OUTPUT0"), data)
            sent += 1
            rows_sent += rows
    # Statistics are the whole server's, whichever frontend answers them.
    found_by = _worker_values(srv, "nereid_worker_calls_total")
    total_before = int(sum(calls.values()))  # includes the probes' infers and metadata calls
    assert sum(found_by.values()) == total_before + sent
    # Every call so far was an infer of 'ident' (the probes' of one row each, and ours): both
    # frontends report the whole server's count of inferences (rows).
    stats = [c.get_inference_statistics("ident").model_stats[0].inference_count for c in clients.values()]
    assert stats == [total_before + rows_sent] * 2, (stats, total_before, rows_sent)
    for c in clients.values():
        assert c.is_server_ready() and c.is_model_ready("ident")
        assert c.get_model_metadata("ident").name == "ident"
    up = _worker_values(srv, "nereid_worker_up")
    assert up == {0: 1.0, 1: 1.0}
    # Each frontend's own CPU and memory (the process_* families are the owner's).
    cpu = _worker_values(srv, "nereid_worker_cpu_seconds_total")
    rss = _worker_values(srv, "nereid_worker_resident_memory_bytes")
    assert set(cpu) == set(rss) == {0, 1} and all(v > 0 for v in cpu.values())
    assert all(10e6 < v < 2e9 for v in rss.values()), rss
    # Health and reflection answer through the frontends too.
    with grpc.insecure_channel(srv.url) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as info:
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service="nope"), timeout=10)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
    for c in clients.values():
        c.close()


def test_errors_streams_and_large_messages_through_a_worker(identity_repo_slow, server_factory) -> None:
    srv = server_factory(identity_repo_slow, "--workers", "2")
    c = _client(srv)
    with pytest.raises(InferenceServerException) as info:
        c.infer("nope", _inputs(np.ones((1, 2), np.float32)))
    assert info.value.status() == "StatusCode.NOT_FOUND" and "nope" in info.value.message()
    # A message larger than the link's shared receive buffer (read into a buffer of its own).
    big = np.random.default_rng(1).standard_normal((2, 3_000_000)).astype(np.float32)  # 24 MB
    np.testing.assert_array_equal(c.infer("ident", _inputs(big)).as_numpy("OUTPUT0"), big)
    # A stream: several requests in flight, one bad, answered in any order with their ids.
    answers: collections.deque = collections.deque()
    done = threading.Event()

    def callback(result, error) -> None:
        answers.append((result, error))
        if len(answers) == 6:
            done.set()

    c.start_stream(callback=callback)
    for i in range(5):
        c.async_stream_infer("ident", _inputs(np.full((1, 3), i, np.float32)), request_id=str(i))
    c.async_stream_infer("nope", _inputs(np.ones((1, 3), np.float32)), request_id="bad")
    assert done.wait(scaled(20)), list(answers)
    c.stop_stream()
    ok = {r.get_response().id: r.as_numpy("OUTPUT0") for r, e in answers if e is None}
    assert sorted(ok) == ["0", "1", "2", "3", "4"]
    for i in range(5):
        np.testing.assert_array_equal(ok[str(i)], np.full((1, 3), i, np.float32))
    errors = [e for r, e in answers if e is not None]
    assert len(errors) == 1 and "nope" in str(errors[0])
    c.close()


def test_a_cancelled_call_is_cancelled_in_the_owner(identity_repo_slow, server_factory) -> None:
    """A client's deadline ends the call in the frontend, and the frontend tells the owner: its
    in-flight count returns to 0 before the model would have finished."""
    srv = server_factory(identity_repo_slow, "--workers", "2")
    c = _client(srv)
    started = time.monotonic()
    with pytest.raises(InferenceServerException) as info:
        c.infer("slow", _inputs(np.ones((1, 2), np.float32)), client_timeout=0.3)
    assert info.value.status() == "StatusCode.DEADLINE_EXCEEDED"
    inflight = None
    while time.monotonic() - started < 1.2:  # the model takes 1.5 s
        inflight = re.search(r"^nereid_inflight_requests ([0-9.]+)$", _metrics(srv), re.M)
        if inflight and float(inflight.group(1)) == 0:
            break
        time.sleep(0.05)
    assert inflight and float(inflight.group(1)) == 0, "the owner still holds the cancelled call"
    c.close()


def test_explicit_load_and_unload_reach_every_worker(identity_repo_slow, server_factory) -> None:
    srv = server_factory(identity_repo_slow, "--workers", "2", "--model-control-mode", "explicit",
                         "--load-model", "ident")
    clients = _clients_on_each_worker(srv, 2, "ident")
    a, b = clients[0], clients[1]
    assert not _ready(b, "slow")
    a.load_model("slow")
    assert b.is_model_ready("slow")
    assert [m["name"] for m in b.get_model_repository_index(as_json=True)["models"]
            if m.get("state") == "READY"] == ["ident", "slow"]
    b.unload_model("ident")
    with pytest.raises(InferenceServerException):
        a.infer("ident", _inputs(np.ones((1, 2), np.float32)))
    assert not _ready(a, "ident")
    a.close()
    b.close()


def test_poll_mode_loads_a_new_version_once_for_the_whole_server(identity_repo_slow, server_factory) -> None:
    """One poller, in the owner: a version dropped into the repository loads once, not once per
    frontend, and every frontend serves it."""
    srv = server_factory(identity_repo_slow, "--workers", "2", "--model-control-mode", "poll",
                         "--repository-poll-secs", "0.2")
    clients = _clients_on_each_worker(srv, 2, "ident")
    (identity_repo_slow / "ident" / "2").mkdir()
    srv.wait_for_log(re.compile(r"loaded model 'ident' version 2"), 30)
    time.sleep(1.0)  # several more polls: none may load it again
    assert len(re.findall(r"loaded model 'ident' version 2", srv.log)) == 1, srv.log
    data = np.ones((1, 3), np.float32)
    for c in clients.values():
        deadline = time.monotonic() + scaled(10)
        while c.infer("ident", _inputs(data)).get_response().model_version != "2":
            assert time.monotonic() < deadline, "version 2 never answered"
            time.sleep(0.05)
        c.close()


def test_a_killed_worker_is_restarted_and_the_others_keep_serving(identity_repo_slow, server_factory) -> None:
    srv = server_factory(identity_repo_slow, "--workers", "2")
    clients = _clients_on_each_worker(srv, 2, "ident")
    pids = _worker_pids(srv)
    victim, survivor = clients[0], clients[1]
    data = np.ones((1, 2), np.float32)
    outcome: list = []
    in_flight = threading.Thread(target=lambda: outcome.append(_try(victim, "slow", data)))
    in_flight.start()
    time.sleep(0.5)  # the slow call is in the owner now, forwarded by worker 0
    os.kill(pids[0], signal.SIGKILL)
    in_flight.join(scaled(10))
    assert outcome == ["StatusCode.UNAVAILABLE"], outcome
    # The other frontend served throughout.
    for _ in range(20):
        np.testing.assert_array_equal(survivor.infer("ident", _inputs(data)).as_numpy("OUTPUT0"), data)
    deadline = time.monotonic() + scaled(20)
    while _worker_pids(srv).get(0) == pids[0] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _worker_pids(srv)[0] != pids[0], srv.log
    assert f"worker 0 (pid {pids[0]}) exited with code -9; restarting" in srv.log
    assert _worker_values(srv, "nereid_worker_restarts_total") == {0: 1.0, 1: 0.0}
    assert _worker_values(srv, "nereid_worker_up") == {0: 1.0, 1: 1.0}
    # The victim's client reconnects (to whichever frontend) and is served again.
    deadline = time.monotonic() + scaled(10)
    while _try(victim, "ident", data) != "OK" and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _try(victim, "ident", data) == "OK"
    # The restarted frontend serves: find a connection that lands on it.
    _clients_on_each_worker(srv, 2, "ident")
    victim.close()
    survivor.close()


def _ready(c: grpcclient.InferenceServerClient, model: str) -> bool:
    try:
        return bool(c.is_model_ready(model))
    except InferenceServerException:  # not known to the server yet
        return False


def _try(c: grpcclient.InferenceServerClient, model: str, data: np.ndarray) -> str:
    try:
        c.infer(model, _inputs(data), client_timeout=20)
        return "OK"
    except InferenceServerException as exc:
        return exc.status() or "None"


def _steady(srv: ServerProcess, stop: threading.Event, codes: collections.Counter, lock: threading.Lock) -> None:
    c = _client(srv)
    data = np.ones((1, 4), np.float32)
    while not stop.is_set():
        code = _try(c, "ident", data)
        with lock:
            codes[code] += 1
        if code != "OK":
            break
    c.close()


def test_sigterm_under_load_drains_every_worker(identity_repo_slow, server_factory) -> None:
    """16 clients on their own connections keep sending through a SIGTERM and stop once readiness
    is off (as a balancer would): every request is answered OK, the server exits 0, and no
    frontend outlives it."""
    srv = server_factory(identity_repo_slow, "--workers", "2", "--lame-duck-secs", "30",
                         "--exit-timeout-secs", "20")
    pids = _worker_pids(srv)
    codes: collections.Counter = collections.Counter()
    lock = threading.Lock()
    stop = threading.Event()
    threads = [threading.Thread(target=_steady, args=(srv, stop, codes, lock)) for _ in range(16)]
    for thread in threads:
        thread.start()
    time.sleep(1.5)
    with lock:
        assert codes["OK"] > 50, codes
    calls = _worker_values(srv, "nereid_worker_calls_total")
    srv.terminate()
    probe = _client(srv)
    while probe.is_server_ready():
        time.sleep(0.05)
    stop.set()
    for thread in threads:
        thread.join(scaled(30))
    assert srv.wait(scaled(40)) == 0, srv.log
    print(f"\nshutdown under load, 2 workers: {dict(codes)}, calls per worker {calls}")
    assert set(codes) == {"OK"}, codes
    assert min(calls.values()) > 0, calls  # both frontends carried load
    for pid in pids.values():
        assert not _alive(pid), f"frontend {pid} outlived the server"
    probe.close()


def test_a_stuck_owner_makes_a_frontend_refuse_beyond_the_inflight_cap(identity_repo_slow, server_factory) -> None:
    """The owner refuses only the calls it has read: while it is stopped (SIGSTOP) a frontend
    holds at most --max-inflight-requests calls and answers the rest RESOURCE_EXHAUSTED at once,
    so a stuck owner cannot make it buffer without bound; once the owner runs again the held
    calls are answered."""
    srv = server_factory(identity_repo_slow, "--workers", "2", "--max-inflight-requests", "4")
    c = _client(srv)
    data = np.ones((1, 2), np.float32)
    assert _try(c, "ident", data) == "OK"
    outcomes: list[str] = []
    lock = threading.Lock()

    def send() -> None:
        code = _try(c, "ident", data)
        with lock:
            outcomes.append(code)

    os.kill(srv.proc.pid, signal.SIGSTOP)
    try:
        threads = [threading.Thread(target=send) for _ in range(12)]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + scaled(10)
        while time.monotonic() < deadline:
            with lock:
                if len(outcomes) >= 8:
                    break
            time.sleep(0.05)
        with lock:
            refused = list(outcomes)
    finally:
        os.kill(srv.proc.pid, signal.SIGCONT)
    for thread in threads:
        thread.join(scaled(30))
    assert refused.count("StatusCode.RESOURCE_EXHAUSTED") == 8, refused
    assert sorted(outcomes) == ["OK"] * 4 + ["StatusCode.RESOURCE_EXHAUSTED"] * 8, outcomes
    c.close()


def test_frontends_exit_when_the_owner_dies(identity_repo_slow, server_factory) -> None:
    srv = server_factory(identity_repo_slow, "--workers", "2")
    pids = _worker_pids(srv)
    srv.proc.kill()
    srv.proc.wait(10)
    deadline = time.monotonic() + scaled(10)
    while any(_alive(p) for p in pids.values()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(p) for p in pids.values()), "a frontend outlived its owner"


def test_restricted_protocols_apply_in_the_frontends(identity_repo_slow, server_factory) -> None:
    srv = server_factory(identity_repo_slow, "--workers", "2",
                         "--grpc-restricted-protocol", "model-repository:admin-key=secret")
    c = _client(srv)
    with pytest.raises(InferenceServerException) as info:
        c.get_model_repository_index()
    assert info.value.status() == "StatusCode.UNAVAILABLE" and "admin-key" in info.value.message()
    assert c.get_model_repository_index(headers={"triton-grpc-protocol-admin-key": "secret"}) is not None
    c.close()


def test_workers_flag_values(identity_repo_slow, server_factory) -> None:
    bad = subprocess.run([PYTHON, "-m", "server.cli", "serve", "--model-repository", str(identity_repo_slow),
                          "--workers", "0"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--workers" in bad.stderr
    srv = server_factory(identity_repo_slow, "--workers", "auto")
    cores = len(os.sched_getaffinity(0))
    assert (f"{cores} worker processes" in srv.log) == (cores > 1), srv.log


def test_a_port_in_use_is_a_clear_error(identity_repo_slow) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        run = subprocess.run([PYTHON, "-m", "server.cli", "serve", "--model-repository", str(identity_repo_slow),
                              "--grpc-address", "127.0.0.1", "--grpc-port", str(port), "--http-port", "0",
                              "--metrics-port", "0", "--workers", "2"],
                             cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert run.returncode == 1, run.stderr
    assert f"could not bind 127.0.0.1:{port}" in run.stderr and "in use" in run.stderr, run.stderr


# Test modules that run again, whole, against servers started with --workers 2: the protocol,
# statistics, lifecycle (explicit and poll), health, streams (decoupled, sequences), shared
# memory, ensembles, TLS, rollouts, shutdown, the cache, overload, hostile input, restricted
# protocols and Python models must behave the same whichever mode serves them. (Modules whose assertions are
# about batching heuristics under a given timing, such as test_streaming.py, are not here:
# with the gRPC work on other cores, requests reach the batcher at another pace.)
CONFORMANCE = ("test_infer.py", "test_statistics.py", "test_lifecycle_explicit.py", "test_health.py",
               "test_metadata.py", "test_decoupled.py", "test_sequence.py", "test_bad_inputs.py",
               "test_shared_memory.py", "test_ensemble.py", "test_tls.py", "test_rollout.py",
               "test_shutdown.py", "test_lifecycle_poll.py", "test_response_cache.py", "test_overload.py",
               "test_hostile_requests.py", "test_restricted_protocols.py", "test_python_backend.py")


def test_conformance_modules_pass_with_two_workers() -> None:
    env = dict(os.environ, **{WORKERS_ENV: "2"})
    run = subprocess.run([PYTHON, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          *(f"tests/{name}" for name in CONFORMANCE)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=scaled(900))
    tail = "\n".join(run.stdout.splitlines()[-30:])
    print(f"\n{WORKERS_ENV}=2: {run.stdout.splitlines()[-1] if run.stdout else run.stderr[-2000:]}")
    assert run.returncode == 0, tail + run.stderr[-2000:]
