"""Failover through a real load balancer: two Nereid replicas behind nginx or HAProxy on
127.0.0.1, steady load from 8 clients (one channel each to the balancer), and:

1. both replicas serve;
2. replica A gets SIGTERM (a rolling restart) and drains, B keeps serving;
3. A is started again on its port, and the balancer sends to it again;
4. replica B is SIGKILLed (a crash), A serves everything.

Every request is counted with the phase in which it was sent, and every failure must have one
of the explanations below (the balancer's access log says which replica each request went to):

- `refused while draining`: A answered UNAVAILABLE "Server is stopping". The status rides in
  gRPC trailers, after HTTP 200: neither nginx nor HAProxy can see it, so neither retries it.
  A serves what arrives during its lame duck (readiness off, --lame-duck-secs): HAProxy's
  next health check sees NOT_SERVING and stops sending, so A goes quiet; nginx (passive health
  only) keeps sending until the lame duck ends, and A then closes its listener instead of
  refusing. Neither should see a refusal.
- `cut at the exit timeout` (now: at the end of the lame duck): closing the listener while
  nginx still sends ends a call grpcio had received but not handed over (CANCELLED), or one
  nginx had just sent on a closing connection.
- `in flight on the killed replica`: the request had reached B when it died. A balancer cannot
  know whether B executed it; nginx never resends a gRPC request it has sent (the body is not
  buffered, `non_idempotent` does not help), HAProxy resends it (`retry-on empty-response`).
- `sent to A while it loaded`: nginx tried the restarted A once its port was open, before its
  models were loaded (UNAVAILABLE, "the server is starting").

Nothing else may fail: no request in flight at SIGTERM is lost, the balancer retries
connection refusals on the other replica, and no request sent after the kill fails.

Through HAProxy the rolling restart loses nothing: its health check sees NOT_SERVING within
the lame duck. Through nginx the replica serves for the whole lame duck, then closes its
listener rather than refusing, and nginx resends what finds the port closed: at most the calls
grpcio held at the close are cut (`cut at the exit timeout`), see docs/DEPLOYMENT.md,
"Load balancers".
"""

from __future__ import annotations

import collections
import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from balancer import Balancer, Passage
from failover_load import Load, Outcome
from util import ServerProcess, identity_config, scaled, write_model

MODEL = "m"
CLIENTS = 8
EXIT_TIMEOUT_S = 2.0
LAME_DUCK_S = 2.0  # nginx keeps a draining replica busy until then
FAIL_TIMEOUT_S = 1.0  # nginx's fail_timeout: how long a replica that failed sits out

REFUSED = "refused while draining"
CUT = "cut at the exit timeout"
KILLED = "in flight on the killed replica"
LOADING = "sent to A while it loaded"


@dataclasses.dataclass
class Run:
    """What one failover run did: the times of its events, every outcome, the balancer's log."""

    lb: Balancer
    a: str  # replica addresses
    b: str
    a_exit_code: int
    marks: dict[str, float]
    outcomes: list[Outcome]
    passages: dict[str, Passage]
    explained: dict[str, list[Outcome]]  # explanation -> failures
    unexplained: list[Outcome]

    def via(self, outcome: Outcome) -> str:
        passage = self.passages.get(outcome.request_id)
        if passage is None:
            return "?"
        names = {self.a: "A", self.b: "B"}
        path = "->".join(names.get(u, u) for u in passage.upstreams)
        return f"retried->{path}" if passage.retried and len(passage.upstreams) == 1 else path

    def table(self) -> str:
        """Per phase: outcome and replica(s) -> count; then each failure's explanation."""
        rows: dict[str, collections.Counter[str]] = {}
        for o in self.outcomes:
            rows.setdefault(o.phase, collections.Counter())[f"{o.code} via {self.via(o)}"] += 1
        lines = [f"  {phase:12s} {dict(counts)}" for phase, counts in rows.items()]
        lines += [f"  {why}: {len(items)}" for why, items in self.explained.items()]
        kill = self.marks["sigkill"]
        lines += [f"    killed: sent {o.sent - kill:+.4f}s after SIGKILL (B gone {self.marks['b_gone'] - kill:+.4f}s)"
                  for o in self.explained[KILLED]]
        lines += [f"  UNEXPLAINED {o.phase} {o.code} via {self.via(o)}: {o.message[:120]}" for o in self.unexplained]
        return "\n".join(lines)

    def failed(self, sent_from: float, sent_until: float = float("inf")) -> list[Outcome]:
        return [o for o in self.outcomes if o.code != "OK" and sent_from <= o.sent < sent_until]

    def served_by(self, replica: str, sent_from: float, sent_until: float = float("inf")) -> int:
        return sum(1 for o in self.outcomes if o.code == "OK" and sent_from <= o.sent < sent_until
                   and (p := self.passages.get(o.request_id)) is not None and p.last == replica)


def _repo(tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    write_model(repo, MODEL, identity_config(MODEL, [("INPUT0", "FP32", [4])], max_batch_size=8,
                                             execute_delay_ms=20, instance_count=2,
                                             extra="dynamic_batching { }\n"))
    return repo


def _wait(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + scaled(timeout)
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.05)


def _served_again(load: Load, lb: Balancer, replica: str, since: float) -> bool:
    passages = lb.passages()
    return any(o.code == "OK" and o.sent > since and (p := passages.get(o.request_id)) is not None
               and p.last == replica for o in load.snapshot())


def run_failover(kind: str, tmp_path: Path, server_factory: Callable[..., ServerProcess],
                 channel_args: list[tuple[str, Any]] | None = None) -> Run:
    """The four phases of the module docstring through `kind` ("nginx" or "haproxy"); clients
    use `channel_args` (default: tritonclient's)."""
    repo = _repo(tmp_path)
    args = ("--exit-timeout-secs", f"{scaled(EXIT_TIMEOUT_S):g}", "--lame-duck-secs", f"{scaled(LAME_DUCK_S):g}")
    a = server_factory(repo, *args)
    b = server_factory(repo, *args)
    options = {"fail_timeout_s": FAIL_TIMEOUT_S} if kind == "nginx" else {"check_interval_ms": 300}
    lb = Balancer(kind, [a.url, b.url], tmp_path / kind, **options)
    marks: dict[str, float] = {}
    try:
        lb.wait_serving()
        marks["both"] = time.monotonic()
        load = Load(lb.url, MODEL, CLIENTS, channel_args, phase="both")
        try:
            load.wait_ok(40, 10)
            time.sleep(0.8)

            marks["sigterm"] = load.set_phase("A draining")
            a.terminate()
            a_exit_code = a.wait(scaled(EXIT_TIMEOUT_S + LAME_DUCK_S) + 15)
            marks["a_exited"] = load.set_phase("A down")

            a_again = server_factory(repo, *args, "--grpc-port", str(a.port))
            assert a_again.url == a.url
            marks["a_back"] = load.set_phase("A back")
            _wait(lambda: _served_again(load, lb, a.url, marks["a_back"]),
                  10, f"{kind} never sent to the restarted replica A:\n{lb.output()[-3000:]}")
            time.sleep(0.8)

            marks["sigkill"] = load.set_phase("B killed")
            b.proc.kill()
            b.proc.wait(scaled(10))
            marks["b_gone"] = time.monotonic()  # its sockets are closed now
            time.sleep(max(1.5, FAIL_TIMEOUT_S + 0.5))  # nginx tries B again once (refused: retried on A)
            load.wait_ok(40, 10)
        finally:
            outcomes = load.stop()
        marks["end"] = time.monotonic()
    finally:
        lb.stop()

    passages = lb.passages()
    explained: dict[str, list[Outcome]] = {REFUSED: [], CUT: [], KILLED: [], LOADING: []}
    unexplained = []
    for o in outcomes:
        if o.code == "OK":
            continue
        why = _explain(o, passages.get(o.request_id), a.url, b.url, marks)
        (explained[why] if why else unexplained).append(o)
    return Run(lb, a.url, b.url, a_exit_code, marks, outcomes, passages, explained, unexplained)


def _explain(o: Outcome, passage: Passage | None, a: str, b: str, marks: dict[str, float]) -> str | None:
    """Which of the module docstring's explanations fits this failure, if any."""
    if passage is None:
        return None
    if (passage.last == a and o.code == "UNAVAILABLE" and "stopping" in o.message
            and marks["sigterm"] <= o.done and o.sent < marks["a_exited"]):
        return REFUSED
    if (passage.last == a and o.code in ("CANCELLED", "UNAVAILABLE") and "stopping" not in o.message
            and marks["sigterm"] <= o.sent < marks["a_exited"] <= o.done + scaled(1.0)):
        return CUT
    if (b in passage.upstreams and o.code == "UNAVAILABLE"
            and o.sent < marks["b_gone"] and o.done >= marks["sigkill"]):
        return KILLED
    if (passage.last == a and o.code == "UNAVAILABLE" and "starting" in o.message
            and marks["a_exited"] <= o.sent < marks["sigkill"]):
        return LOADING
    return None


def _check_common(run: Run) -> None:
    """What holds for any balancer configured as docs/DEPLOYMENT.md says."""
    m = run.marks
    assert not run.unexplained, f"failures nothing explains:\n{run.table()}"
    assert not any(o.code == "WRONG_ANSWER" for o in run.outcomes), run.table()
    # 1. Both replicas serve.
    refused = run.explained[REFUSED]
    assert all(o in refused for o in run.failed(m["both"], m["sigterm"])), run.table()  # sent as SIGTERM came
    assert run.served_by(run.a, m["both"], m["sigterm"]) >= 5, run.table()
    assert run.served_by(run.b, m["both"], m["sigterm"]) >= 5, run.table()
    # 2. The drain: A exits cleanly, B keeps serving, the only failures are A's refusals and cuts.
    assert run.a_exit_code == 0, run.table()
    assert run.served_by(run.b, m["sigterm"], m["a_exited"]) >= 5, run.table()
    # 3. A down then back: connection refusals are retried on B; the restarted A serves again.
    assert all(o in run.explained[LOADING] for o in run.failed(m["a_exited"], m["sigkill"])
               if not o.in_flight_at(m["sigkill"])), run.table()
    assert run.served_by(run.a, m["a_back"], m["sigkill"]) >= 5, run.table()
    # 4. B killed: only requests in flight on B fail; every request sent after the kill succeeds, on A.
    assert not run.failed(m["b_gone"]), run.table()
    assert len(run.explained[KILLED]) <= CLIENTS, run.table()
    after_kill = [o for o in run.outcomes if o.sent >= m["b_gone"]]
    assert len(after_kill) >= 40 and run.served_by(run.a, m["b_gone"]) == len(after_kill), run.table()
    # ... and some the balancer sent to B after the kill, before its health check saw B gone: the
    # refused connection made it retry on A (sent after the kill; whether any were sent after the
    # kill was *confirmed* depends on how fast the check ran on a loaded machine).
    since_kill = [o for o in run.outcomes if o.sent >= m["sigkill"]]
    assert any(run.passages[o.request_id].retried for o in since_kill), run.table()


def test_failover_through_nginx(tmp_path: Path, server_factory: Callable[..., ServerProcess]) -> None:
    """nginx, passive health: it keeps sending to the draining replica through its lame duck;
    the replica then closes its listener at once rather than refusing, and nginx resends what
    finds the port closed. Only a call grpcio held at the close can be cut (one per client at
    most; 0 in 5 of 6 runs, 1 in the sixth)."""
    run = run_failover("nginx", tmp_path, server_factory)
    print(f"\nnginx failover ({CLIENTS} clients):\n{run.table()}")
    _check_common(run)
    assert not run.explained[REFUSED], run.table()
    assert len(run.explained[CUT]) <= CLIENTS, run.table()
    # nginx answered 502 for each request B died with, and resent none of them.
    assert all(run.passages[o.request_id].status == 502 and not run.passages[o.request_id].retried
               for o in run.explained[KILLED]), run.table()


def test_failover_through_haproxy(tmp_path: Path, server_factory: Callable[..., ServerProcess]) -> None:
    """HAProxy, active grpc.health.v1 checks: the draining replica is out at the first check
    that sees NOT_SERVING, and serves (lame duck) what it is sent until then, so a rolling
    restart loses nothing; a request in flight on a killed replica is resent to the other."""
    run = run_failover("haproxy", tmp_path, server_factory)
    print(f"\nhaproxy failover ({CLIENTS} clients):\n{run.table()}")
    _check_common(run)
    assert not run.explained[KILLED], run.table()
    assert not run.explained[CUT] and not run.explained[LOADING], run.table()
    assert not run.explained[REFUSED], run.table()
    # HAProxy resends what a replica drops, which would hide a drain that drops requests: A's
    # drain and exit dropped none, so HAProxy resent none until B died.
    assert not [o for o in run.outcomes if o.done < run.marks["sigkill"] and o.code == "OK"
                and run.passages[o.request_id].retried], run.table()
    # Every refusal was sent before HAProxy took A out, none after.
    a_out = run.lb.first_line(r"Server nereid/r0 is DOWN", after=run.marks["sigterm"])
    assert a_out is not None, run.lb.output()
    assert all(o.sent < a_out for o in run.explained[REFUSED]), run.table()
    assert a_out - run.marks["sigterm"] < scaled(2.0), run.lb.output()


def test_client_retry_policy_retries_a_drain_refusal_on_another_replica(
        tmp_path: Path, server_factory: Callable[..., ServerProcess]) -> None:
    """Without a proxy: a gRPC client balancing over both replicas (round_robin) with a retry
    policy on UNAVAILABLE gets every call answered while one replica drains. The refusal must be
    trailers-only for that: a client commits to an attempt once it has received headers, and
    then does not retry it."""
    import json

    import numpy as np
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException
    from util import client, health_status

    repo = _repo(tmp_path)
    write_model(repo, "slow", identity_config("slow", [("INPUT0", "FP32", [4])], max_batch_size=8,
                                              execute_delay_ms=int(scaled(3000))))
    a = server_factory(repo, "--exit-timeout-secs", f"{scaled(20):g}", "--lame-duck-secs", "0")  # refuses at once
    b = server_factory(repo)
    service_config = {
        "loadBalancingConfig": [{"round_robin": {}}],
        "methodConfig": [{"name": [{"service": "inference.GRPCInferenceService"}], "retryPolicy": {
            "maxAttempts": 3, "initialBackoff": "0.01s", "maxBackoff": "0.1s", "backoffMultiplier": 2,
            "retryableStatusCodes": ["UNAVAILABLE"]}}],
    }
    both = grpcclient.InferenceServerClient(
        f"ipv4:{a.url},{b.url}", channel_args=[("grpc.service_config", json.dumps(service_config))])
    inp = grpcclient.InferInput("INPUT0", [1, 4], "FP32")
    inp.set_data_from_numpy(np.ones((1, 4), np.float32))
    for _ in range(4):  # both subchannels connected
        both.infer(MODEL, [inp], client_timeout=scaled(10))

    # A drains: one slow request keeps it busy (and refusing) for seconds.
    slow_done: list[object] = []
    client(a).async_infer("slow", [inp], callback=lambda result, error: slow_done.append(error),
                          client_timeout=scaled(30))
    time.sleep(0.3)
    a.terminate()
    _wait(lambda: health_status(a, "") == 2, 5, "A never went NOT_SERVING")
    with pytest.raises(InferenceServerException, match="stopping"):
        client(a).infer(MODEL, [inp], client_timeout=scaled(10))  # A refuses

    outcomes = collections.Counter()
    for _ in range(10):
        try:
            both.infer(MODEL, [inp], client_timeout=scaled(10))
            outcomes["OK"] += 1
        except InferenceServerException as exc:
            outcomes[str(exc.status())] += 1
    assert outcomes == {"OK": 10}, outcomes
    assert not slow_done, "A finished its slow request early: it may not have been draining throughout"
    _wait(lambda: bool(slow_done), 30, "A's slow request never finished")
    assert slow_done == [None]
    assert a.wait(30) == 0, a.log
    both.close()
