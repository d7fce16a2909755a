"""Rollouts on several replicas sharing one repository (docs/ROLLOUTS.md, "Replicas"): a decision
one server takes reaches the others through `.rollout-state.json` without a reload; and in poll
mode an edited rollout.yaml or a removed version takes effect without a restart."""

from __future__ import annotations

import json
import shutil
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from tests.test_rollout import ALL_VERSIONS, PY_BROKEN, PY_ECHO, _inputs, _rollout, _version
from tests.util import ServerProcess, identity_config, python_config, scaled, write_model

MIN_REQUESTS = 20
PROPAGATION_S = 3.0  # the bound a decision must reach the other replica within (scaled)


def _status(srv: ServerProcess, model: str) -> dict:
    answer = _rollout(srv, "status", model, "--json")
    assert answer.returncode == 0, answer.stderr
    return json.loads(answer.stdout)


def _weights(srv: ServerProcess, model: str) -> dict[int, float]:
    return {r["version"]: r["weight"] for r in _status(srv, model)["versions"]}


def _wait_for(check, limit: float, step: float = 0.05) -> float:
    """Seconds until `check()` holds; fails after `limit` seconds."""
    started = time.monotonic()
    while not check():
        assert time.monotonic() - started < limit, f"not within {limit:.1f}s"
        time.sleep(step)
    return time.monotonic() - started


def _raw_weights(channel: grpc.Channel, model: str) -> dict[int, float]:
    call = channel.unary_unary("/nereid.Rollout/Status")
    status = json.loads(call(json.dumps({"model": model}).encode(), timeout=10))
    return {r["version"]: r["weight"] for r in status["versions"]}


@pytest.fixture(scope="module")
def replicas(tmp_path_factory: pytest.TempPathFactory):
    repo = tmp_path_factory.mktemp("shared_repo")
    canary = write_model(repo, "canary", python_config("canary", ALL_VERSIONS),
                         files={"1/model.py": PY_ECHO, "2/model.py": PY_BROKEN})
    (canary / "rollout.yaml").write_text(
        f"weights: {{1: 90, 2: 10}}\nrollback: {{window_s: 30, min_requests: {MIN_REQUESTS}, max_error_rate: 0.01}}\n")
    ab = write_model(repo, "ab", identity_config("ab", [("INPUT0", "FP32", [2])], extra=ALL_VERSIONS),
                     versions=(1, 2))
    (ab / "rollout.yaml").write_text("weights: {1: 50, 2: 50}\nrollback: false\n")
    a = ServerProcess([repo])
    try:
        b = ServerProcess([repo])
    except BaseException:
        a.stop()
        raise
    yield a, b
    a.stop()
    b.stop()


def test_rollback_on_one_replica_reaches_the_other(replicas: tuple[ServerProcess, ServerProcess]) -> None:
    """A fails its canary under load and rolls it back; B, which sends the canary nothing, stops
    routing to it within PROPAGATION_S and says why (status, index, log, metrics)."""
    a, b = replicas
    assert _weights(b, "canary") == {1: 90.0, 2: 10.0}
    stop = threading.Event()
    errors = [0]

    def load() -> None:
        client = grpcclient.InferenceServerClient(a.url)
        while not stop.is_set():
            try:
                client.infer("canary", _inputs(shape=(4,)))
            except InferenceServerException:
                errors[0] += 1

    workers = [threading.Thread(target=load) for _ in range(3)]
    for worker in workers:
        worker.start()
    try:
        channel_a = grpc.insecure_channel(a.url)
        channel_b = grpc.insecure_channel(b.url)
        _wait_for(lambda: _raw_weights(channel_a, "canary")[2] == 0, scaled(30), 0.01)
        rolled_back = time.monotonic()
        seconds = _wait_for(lambda: _raw_weights(channel_b, "canary")[2] == 0, scaled(PROPAGATION_S), 0.01)
    finally:
        stop.set()
        for worker in workers:
            worker.join()
    print(f"\nrollback on replica A reached replica B {seconds:.2f}s after A's status showed it "
          f"({errors[0]} errors on A)")
    assert time.monotonic() - rolled_back < scaled(PROPAGATION_S)
    row = next(r for r in _status(b, "canary")["versions"] if r["version"] == 2)
    assert row["note"].startswith("rolled back (decided by replica ") and "error rate 100.0%" in row["note"], row
    assert row["rollbacks"] == 0 and row["replica_decisions"] == {"rollback": 1}, row
    client = grpcclient.InferenceServerClient(b.url)
    assert {_version(client, "canary", input={"shape": (4,)}) for _ in range(60)} == {"1"}
    rows = {r.version: r for r in client.get_model_repository_index().models if r.name == "canary"}
    assert "rolled back (decided by replica" in rows["2"].reason and "error rate 100.0%" in rows["2"].reason
    assert "applied rollback of version 2 decided by another replica" in b.log
    text = urllib.request.urlopen(f"http://127.0.0.1:{b.metrics_port}/metrics", timeout=10).read().decode()
    assert 'nereid_rollout_replica_decisions_total{decision="rollback",model="canary",version="2"} 1.0' in text \
        or 'nereid_rollout_replica_decisions_total{model="canary",version="2",decision="rollback"} 1.0' in text, \
        [line for line in text.splitlines() if "replica_decisions" in line]
    assert "decided by another replica" not in a.log  # A's own decision, not echoed back


def test_manual_promote_on_one_replica_reaches_the_other(replicas: tuple[ServerProcess, ServerProcess]) -> None:
    a, b = replicas
    assert _weights(a, "ab") == {1: 50.0, 2: 50.0}
    promoted = _rollout(b, "promote", "ab")
    assert promoted.returncode == 0 and "promoted version 2 to 100%" in promoted.stdout, promoted
    channel_a = grpc.insecure_channel(a.url)
    seconds = _wait_for(lambda: _raw_weights(channel_a, "ab") == {1: 0.0, 2: 100.0}, scaled(PROPAGATION_S), 0.01)
    print(f"\npromotion on replica B reached replica A in {seconds:.2f}s")
    status = _status(a, "ab")
    assert status["stable"] == 2
    client = grpcclient.InferenceServerClient(a.url)
    assert {_version(client, "ab") for _ in range(40)} == {"2"}
    assert "applied promotion of version 2 by the operator decided by another replica" in a.log


def test_poll_mode_follows_an_edited_policy_and_a_removed_version(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    model = write_model(repo, "ab", identity_config("ab", [("INPUT0", "FP32", [2])], extra=ALL_VERSIONS),
                        versions=(1, 2))
    (model / "rollout.yaml").write_text("weights: {1: 90, 2: 10}\nrollback: false\n")
    srv = ServerProcess([repo], ["--model-control-mode", "poll", "--repository-poll-secs", "0.5"])
    try:
        assert _weights(srv, "ab") == {1: 90.0, 2: 10.0}
        (model / "rollout.yaml").write_text("weights: {1: 50, 2: 50}\nrollback: false\n")
        _wait_for(lambda: _weights(srv, "ab") == {1: 50.0, 2: 50.0}, scaled(15), 0.2)
        client = grpcclient.InferenceServerClient(srv.url)
        counts = {"1": 0, "2": 0}
        for _ in range(200):
            counts[_version(client, "ab")] += 1
        assert 60 <= counts["2"] <= 140, counts  # 50/50 now (90/10 would give about 20)
        shutil.rmtree(model / "2")  # the version leaves the disk: it loses its share
        _wait_for(lambda: {r.version: r.state for r in client.get_model_repository_index().models
                           if r.name == "ab"}.get("2") != "READY", scaled(15), 0.2)
        assert {_version(client, "ab") for _ in range(40)} == {"1"}
        row = next(r for r in _status(srv, "ab")["versions"] if r["version"] == 2)
        assert row["share"] == 0.0 and not row["ready"], row
    finally:
        srv.stop()
