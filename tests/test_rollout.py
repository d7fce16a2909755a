"""Rollouts (docs/ROLLOUTS.md) on a real server: weighted splits, sticky keys, automatic rollback
of a failing canary under load, shadow agreement, the index, metrics and `nereid rollout`."""

from __future__ import annotations

import json
import math
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from tests.util import PYTHON, ROOT, ServerProcess, identity_config, python_config, scaled, write_model

ALL_VERSIONS = "version_policy: { all: { } }\n"

PY_ECHO = b'''import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        return [pb_utils.InferenceResponse([pb_utils.Tensor(
            "OUTPUT0", pb_utils.get_input_tensor_by_name(r, "INPUT0").as_numpy())]) for r in requests]
'''

PY_BROKEN = b'''import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        return [pb_utils.InferenceResponse(error=pb_utils.TritonError("canary is broken")) for _ in requests]
'''

# Disagrees on purpose: doubles every input whose first element is odd.
PY_SHADOW = b'''import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        out = []
        for r in requests:
            x = pb_utils.get_input_tensor_by_name(r, "INPUT0").as_numpy()
            y = x * 2 if int(x.reshape(-1)[0]) % 2 else x.copy()
            out.append(pb_utils.InferenceResponse([pb_utils.Tensor("OUTPUT0", y)]))
        return out
'''

ROLLBACK_MIN = 20
WINDOW_S = 30


def _write_repo(repo: Path) -> Path:
    split = write_model(repo, "split", identity_config("split", [("INPUT0", "FP32", [2])], extra=ALL_VERSIONS),
                        versions=(1, 2))
    (split / "rollout.yaml").write_text(
        "weights: {1: 80, 2: 20}\nsticky: {parameter: user, metadata: x-user}\nrollback: false\n")
    canary = write_model(repo, "canary", python_config("canary", ALL_VERSIONS),
                         files={"1/model.py": PY_ECHO, "2/model.py": PY_BROKEN})
    (canary / "rollout.yaml").write_text(
        f"weights: {{1: 90, 2: 10}}\nrollback: {{window_s: {WINDOW_S}, min_requests: {ROLLBACK_MIN}, "
        "max_error_rate: 0.01}\n")
    shadowed = write_model(repo, "shadowed", python_config("shadowed", ALL_VERSIONS),
                           files={"1/model.py": PY_ECHO, "2/model.py": PY_SHADOW})
    (shadowed / "rollout.yaml").write_text("weights: {1: 100}\nshadow: {versions: [2]}\n")
    return repo


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    srv = ServerProcess([_write_repo(tmp_path_factory.mktemp("rollout_repo"))])
    yield srv
    srv.stop()


def _inputs(value: float = 1.0, shape: tuple[int, ...] = (2,)) -> list[grpcclient.InferInput]:
    tensor = grpcclient.InferInput("INPUT0", list(shape), "FP32")
    tensor.set_data_from_numpy(np.full(shape, value, np.float32))
    return [tensor]


def _version(client: grpcclient.InferenceServerClient, model: str, **kwargs) -> str:
    return client.infer(model, _inputs(**kwargs.pop("input", {})), **kwargs).get_response().model_version


def _rollout(srv: ServerProcess, action: str, model: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PYTHON, "-m", "server.cli", "rollout", action, model, "--url", srv.url, *extra],
                          cwd=ROOT, capture_output=True, text=True, timeout=scaled(30))


def _metrics(srv: ServerProcess) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{srv.metrics_port}/metrics", timeout=10).read().decode()


def test_split_weights_hold_within_binomial_bounds(server: ServerProcess) -> None:
    client = grpcclient.InferenceServerClient(server.url)
    n = 2000
    counts = {"1": 0, "2": 0}
    for _ in range(n):
        counts[_version(client, "split")] += 1
    mean, sd = n * 0.2, math.sqrt(n * 0.2 * 0.8)
    print(f"split 80/20 over {n} requests: {counts} (version 2 expected {mean:.0f} ± {5 * sd:.0f})")
    assert abs(counts["2"] - mean) <= 5 * sd, counts
    # A request naming a version is never rerouted.
    assert {_version(client, "split", model_version="2") for _ in range(50)} == {"2"}
    assert {_version(client, "split", model_version="1") for _ in range(50)} == {"1"}


def test_sticky_keys_always_map_to_one_version(server: ServerProcess) -> None:
    client = grpcclient.InferenceServerClient(server.url)
    seen: dict[str, set[str]] = {}
    for i in range(150):
        key = f"user-{i}"
        for _ in range(4):
            seen.setdefault(key, set()).add(_version(client, "split", parameters={"user": key}))
        seen[key].add(_version(client, "split", headers={"x-user": key}))  # the metadata key, same place
    assert all(len(v) == 1 for v in seen.values()), {k: v for k, v in seen.items() if len(v) > 1}
    on_two = sum(1 for v in seen.values() if v == {"2"})
    assert 10 <= on_two <= 55, on_two  # about 20% of 150 keys; both versions get keys


def test_failing_canary_is_rolled_back_under_load(server: ServerProcess) -> None:
    """A 10% canary whose every answer is an error, under steady load from 4 clients: rolled back
    automatically after `min_requests` canary requests; the stable version serves the rest."""
    stop = threading.Event()
    lock = threading.Lock()
    tally = {"requests": 0, "errors": 0, "1": 0, "2": 0}
    error_times: list[float] = []
    threads = 4

    def load() -> None:
        client = grpcclient.InferenceServerClient(server.url)
        inputs = _inputs(shape=(4,))
        while not stop.is_set():
            try:
                version = client.infer("canary", inputs).get_response().model_version
                with lock:
                    tally["requests"] += 1
                    tally[version] += 1
            except InferenceServerException as exc:
                assert "canary is broken" in str(exc), exc
                with lock:
                    tally["requests"] += 1
                    tally["errors"] += 1
                    error_times.append(time.monotonic())

    started = time.monotonic()
    workers = [threading.Thread(target=load) for _ in range(threads)]
    for worker in workers:
        worker.start()
    rolled_back_at = None
    try:
        deadline = started + scaled(WINDOW_S)
        while time.monotonic() < deadline:
            status = json.loads(_rollout(server, "status", "canary", "--json").stdout)
            row = next(r for r in status["versions"] if r["version"] == 2)
            if row["weight"] == 0:
                rolled_back_at = time.monotonic()
                break
            time.sleep(0.05)
        assert rolled_back_at is not None, f"not rolled back within the {WINDOW_S}s window: {tally}"
        with lock:
            at_rollback = dict(tally)
        time.sleep(scaled(2))  # the stable version serves the rest
    finally:
        stop.set()
        for worker in workers:
            worker.join()
    after = {k: tally[k] - at_rollback[k] for k in tally}
    print(f"\nrollback under load: {tally['requests']} requests, {tally['errors']} errors seen by clients, "
          f"version 1 answered {tally['1']}; rolled back {rolled_back_at - started:.2f}s after load began "
          f"(last error {max(error_times) - started:.2f}s after); after the rollback: {after['requests']} "
          f"requests, {after['errors']} errors")
    assert row["note"].startswith("rolled back: error rate 100.0%"), row
    assert row["rollbacks"] == 1
    # The window allows min_requests errors; requests already in flight at that moment may add one per client.
    assert ROLLBACK_MIN <= tally["errors"] <= ROLLBACK_MIN + threads, tally
    assert tally["2"] == 0 and after["errors"] == 0 and after["requests"] > 0 and tally["1"] > 0, (tally, after)
    assert rolled_back_at - started < WINDOW_S
    # The index says why; the metrics counted it; the log said it.
    client = grpcclient.InferenceServerClient(server.url)
    rows = {r.version: r for r in client.get_model_repository_index().models if r.name == "canary"}
    assert rows["2"].state == "READY" and "rolled back: error rate 100.0%" in rows["2"].reason, rows["2"]
    assert "rollout: stable, 100.0%" in rows["1"].reason, rows["1"]
    text = _metrics(server)
    assert 'nereid_rollout_rollbacks_total{model="canary",version="2"} 1.0' in text
    assert f'nereid_rollout_errors_total{{model="canary",version="2"}} {float(tally["errors"])}' in text
    assert 'nereid_rollout_share{model="canary",version="1"} 1.0' in text
    assert "version 2 rolled back (weight 0): error rate 100.0%" in server.log


def test_shadow_agreement_is_recorded_and_never_returned(server: ServerProcess) -> None:
    client = grpcclient.InferenceServerClient(server.url)
    for i in range(40):  # half the inputs odd: the shadow disagrees on those
        result = client.infer("shadowed", _inputs(float(i), (4,)))
        assert result.get_response().model_version == "1"
        np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), np.full(4, i, np.float32))
    deadline = time.monotonic() + scaled(10)
    while time.monotonic() < deadline:
        status = json.loads(_rollout(server, "status", "shadowed", "--json").stdout)
        shadow = next(r for r in status["versions"] if r["version"] == 2)["shadow"]
        if shadow["compared"] + shadow["errors"] + shadow["dropped"] >= 40:
            break
        time.sleep(0.1)
    assert shadow == {"compared": 40, "agreed": 20, "errors": 0, "dropped": 0, "agreement": 0.5}, shadow
    text = _metrics(server)
    assert 'nereid_rollout_shadow_agreement_ratio{model="shadowed",version="2"} 0.5' in text
    assert 'nereid_rollout_shadow_duration_seconds_count{model="shadowed",version="2"} 40.0' in text
    assert 'nereid_rollout_requests_total{model="shadowed",version="1"}' in text
    rows = {r.version: r for r in client.get_model_repository_index().models if r.name == "shadowed"}
    assert "rollout: shadow" in rows["2"].reason


def test_cli_promote_and_abort_survive_a_restart(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    model = write_model(repo, "ab", identity_config("ab", [("INPUT0", "FP32", [2])], extra=ALL_VERSIONS),
                        versions=(1, 2, 3))
    (model / "rollout.yaml").write_text("weights: {1: 50, 2: 50}\n")
    srv = ServerProcess([repo])
    try:
        status = _rollout(srv, "status", "ab")
        assert status.returncode == 0, status.stderr
        assert "stable version 1" in status.stdout and "50.0%" in status.stdout, status.stdout
        client = grpcclient.InferenceServerClient(srv.url)
        assert {_version(client, "ab") for _ in range(60)} == {"1", "2"}
        promoted = _rollout(srv, "promote", "ab")
        assert promoted.returncode == 0 and "promoted version 2 to 100%" in promoted.stdout, promoted
        assert {_version(client, "ab") for _ in range(30)} == {"2"}
        assert _version(client, "ab", model_version="3") == "3"  # never in the policy: explicit only
        missing = _rollout(srv, "status", "nope")
        assert missing.returncode == 1 and "NOT_FOUND" in missing.stderr, missing
    finally:
        srv.stop()
    srv = ServerProcess([repo])  # the decision was saved beside the policy
    try:
        client = grpcclient.InferenceServerClient(srv.url)
        assert {_version(client, "ab") for _ in range(30)} == {"2"}
        aborted = _rollout(srv, "abort", "ab")  # no canary left: abort changes nothing
        assert aborted.returncode == 0 and "version(s) none" in aborted.stdout, aborted
    finally:
        srv.stop()
    (model / "rollout.yaml").write_text("weights: {2: 90, 3: 10}\n")  # a new policy starts afresh
    srv = ServerProcess([repo])
    try:
        status = json.loads(_rollout(srv, "status", "ab", "--json").stdout)
        assert {r["version"]: r["weight"] for r in status["versions"]} == {2: 90.0, 3: 10.0}
        assert _rollout(srv, "abort", "ab").returncode == 0
        client = grpcclient.InferenceServerClient(srv.url)
        assert {_version(client, "ab") for _ in range(30)} == {"2"}
        rows = {r.version: r for r in client.get_model_repository_index().models}
        assert "aborted by the operator" in rows["3"].reason, rows["3"]
    finally:
        srv.stop()


def test_bad_policy_is_ignored_and_said(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    model = write_model(repo, "bad", identity_config("bad", [("INPUT0", "FP32", [2])], extra=ALL_VERSIONS),
                        versions=(1, 2))
    (model / "rollout.yaml").write_text("weights: {1: 0}\n")
    srv = ServerProcess([repo])
    try:
        client = grpcclient.InferenceServerClient(srv.url)
        assert {_version(client, "bad") for _ in range(10)} == {"2"}  # Triton's default: latest ready
        rows = {r.version: r for r in client.get_model_repository_index().models}
        assert "rollout.yaml ignored: 'weights': at least one version needs a share above 0" in rows["1"].reason
        assert "rollout.yaml ignored" in srv.log
    finally:
        srv.stop()


def test_control_service_is_in_the_model_repository_group(tmp_path: Path) -> None:
    """Promote and abort change what clients get: `--grpc-restricted-protocol=model-repository:...`
    guards them like the load/unload RPCs."""
    repo = tmp_path / "repo"
    model = write_model(repo, "ab", identity_config("ab", [("INPUT0", "FP32", [2])], extra=ALL_VERSIONS),
                        versions=(1, 2))
    (model / "rollout.yaml").write_text("weights: {1: 50, 2: 50}\n")
    srv = ServerProcess([repo], ["--grpc-restricted-protocol=model-repository:admin-key=s3cret"])
    try:
        refused = _rollout(srv, "abort", "ab")
        assert refused.returncode == 1 and "expecting header 'triton-grpc-protocol-admin-key'" in refused.stderr
        allowed = _rollout(srv, "abort", "ab", "--header", "triton-grpc-protocol-admin-key=s3cret")
        assert allowed.returncode == 0 and "version(s) 2 to weight 0" in allowed.stdout, allowed
    finally:
        srv.stop()


def test_http_follows_the_same_policy_and_keys(server: ServerProcess) -> None:
    import tritonclient.http as httpclient

    http = httpclient.InferenceServerClient(server.http_url)
    client = grpcclient.InferenceServerClient(server.url)
    before = json.loads(_rollout(server, "status", "split", "--json").stdout)
    versions = set()
    for i in range(40):
        tensor = httpclient.InferInput("INPUT0", [2], "FP32")
        tensor.set_data_from_numpy(np.ones(2, np.float32))
        answer = http.infer("split", [tensor], parameters={"user": f"h{i}"}).get_response()
        assert answer["model_version"] == _version(client, "split", parameters={"user": f"h{i}"})
        versions.add(answer["model_version"])
    assert versions == {"1", "2"}
    after = json.loads(_rollout(server, "status", "split", "--json").stdout)
    assert sum(r["requests"] for r in after["versions"]) - sum(r["requests"] for r in before["versions"]) == 80
