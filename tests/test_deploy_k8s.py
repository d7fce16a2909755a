"""deploy/k8s/: strict schema validation offline, and the manifests held to each other and to
Nereid's drain timing (docs/DEPLOYMENT.md).

Core kinds are validated against kubernetes-validate's strict schemas for the oldest and
newest Kubernetes this project targets; the KServe ServingRuntime and InferenceService
through the kserve SDK's model classes (tests/deploy_validate.py). The negative tests
prove both validators reject what a cluster would.
"""

from __future__ import annotations

import copy
import re
from typing import Any

import pytest
import yaml
from deploy_validate import core_errors, kserve_errors, load_documents
from util import ROOT

K8S = ROOT / "deploy" / "k8s"
# Native gRPC probes are GA from 1.27; 1.28 is the oldest release still in common support.
VERSIONS = ("1.28.0", "1.37.0")
CORE_FILES = ("deployment.yaml", "pvc.yaml", "service.yaml", "pdb.yaml", "hpa.yaml", "prometheus-adapter.yaml")


def docs(name: str) -> list[dict[str, Any]]:
    return load_documents(K8S / name)


def by_kind(kind: str) -> dict[str, Any]:
    found = [d for f in (*CORE_FILES, "kserve.yaml") for d in docs(f) if d["kind"] == kind]
    assert len(found) == 1, kind
    return found[0]


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("name", CORE_FILES)
def test_core_manifests_validate_strictly(name: str, version: str) -> None:
    for doc in docs(name):
        assert core_errors(doc, version) == []


@pytest.mark.parametrize("version", VERSIONS)
def test_kserve_resources_validate(version: str) -> None:
    kinds = []
    for doc in docs("kserve.yaml"):
        assert kserve_errors(doc, version) == []
        kinds.append(doc["kind"])
    assert kinds == ["ServingRuntime", "InferenceService"]


def test_every_manifest_is_covered() -> None:
    on_disk = {p.name for p in K8S.glob("*.yaml")}
    assert on_disk == {*CORE_FILES, "kserve.yaml", "kustomization.yaml"}
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert set(kustomization["resources"]) == set(CORE_FILES)


def test_the_core_validator_rejects_what_a_cluster_would() -> None:
    deployment = copy.deepcopy(by_kind("Deployment"))
    deployment["spec"]["replicas"] = "two"
    deployment["spec"]["bogusField"] = 1
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    container["livenessProbe"]["grpc"] = {"port": "grpc", "service": "live"}  # named ports are not allowed
    errors = "\n".join(core_errors(deployment, VERSIONS[-1]))
    assert "spec.replicas: 'two' is not of type 'integer'" in errors
    assert "'bogusField' was unexpected" in errors
    assert "livenessProbe.grpc.port: 'grpc' is not of type 'integer'" in errors


def test_the_kserve_walker_rejects_what_a_cluster_would() -> None:
    runtime, service = (copy.deepcopy(d) for d in docs("kserve.yaml"))
    runtime["spec"]["supportedModelFormats"][0]["version"] = 2
    runtime["spec"]["supportedModelFormats"][1]["autoselect"] = True
    runtime["spec"]["containers"][0]["ports"][0]["containerPort"] = "8001"
    del runtime["spec"]["containers"][0]["name"]
    runtime["metadata"]["labelz"] = {}
    errors = "\n".join(kserve_errors(runtime, VERSIONS[-1]))
    assert "supportedModelFormats[0].version: expected str, got int 2" in errors
    assert "supportedModelFormats[1].autoselect: unknown field" in errors
    assert "containers[0].ports.0.containerPort: '8001' is not of type 'integer'" in errors
    assert "containers[0]: 'name' is a required property" in errors
    assert "metadata: Additional properties are not allowed ('labelz' was unexpected)" in errors
    del service["spec"]["predictor"]["model"]["modelFormat"]
    service["spec"]["predictor"]["minReplicas"] = "2"
    errors = "\n".join(kserve_errors(service, VERSIONS[-1]))
    assert "model_format`, must not be `None`" in errors
    assert "predictor.minReplicas: expected int, got str '2'" in errors


def _arg(args: list[str], name: str) -> str:
    [value] = [a.split("=", 1)[1] for a in args if a.startswith(f"{name}=")]
    return value


def _check_container(container: dict[str, Any], grace: int) -> None:
    """Probes on the gRPC port with distinct live/ready names, and a grace period the drain fits in."""
    grpc_port = int(_arg(container["args"], "--grpc-port"))
    assert grpc_port in [p["containerPort"] for p in container["ports"]]
    assert _arg(container["args"], "--grpc-address") == "0.0.0.0"  # the kubelet calls the pod IP
    probes = {kind: container[kind]["grpc"] for kind in ("startupProbe", "livenessProbe", "readinessProbe")}
    assert all(p["port"] == grpc_port for p in probes.values())
    assert probes["startupProbe"]["service"] == probes["livenessProbe"]["service"] == "live"
    assert probes["readinessProbe"]["service"] == "ready"
    lame_duck = float(_arg(container["args"], "--lame-duck-secs"))
    assert lame_duck >= 3, "endpoint removal takes seconds to reach the balancers"
    exit_timeout = float(_arg(container["args"], "--exit-timeout-secs"))
    # The lame duck, then the drain (bounded by --exit-timeout-secs), then 1 s quiet + 1 s close + unload.
    assert grace >= lame_duck + exit_timeout + 7, (grace, lame_duck, exit_timeout)
    assert container["securityContext"]["allowPrivilegeEscalation"] is False


def test_deployment_probes_and_drain_timing() -> None:
    pod = by_kind("Deployment")["spec"]["template"]["spec"]
    [container] = pod["containers"]
    _check_container(container, pod["terminationGracePeriodSeconds"])
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 10001
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert {"name": "tmp", "mountPath": "/tmp"} in container["volumeMounts"]
    annotations = by_kind("Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == _arg(container["args"], "--metrics-port")


def test_kserve_runtime_probes_and_drain_timing() -> None:
    runtime, service = docs("kserve.yaml")
    [container] = runtime["spec"]["containers"]
    _check_container(container, service["spec"]["predictor"]["terminationGracePeriodSeconds"])
    assert _arg(container["args"], "--model-repository") == "/mnt/models"  # where KServe puts storageUri
    assert [p["name"] for p in container["ports"]] == ["h2c"]
    model = service["spec"]["predictor"]["model"]
    assert model["runtime"] == runtime["metadata"]["name"]
    assert model["modelFormat"]["name"] in [f["name"] for f in runtime["spec"]["supportedModelFormats"]]
    assert model["protocolVersion"] in runtime["spec"]["protocolVersions"]


def test_selectors_and_targets_agree() -> None:
    deployment = by_kind("Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert by_kind("PodDisruptionBudget")["spec"]["selector"]["matchLabels"].items() <= labels.items()
    services = docs("service.yaml")
    assert {s["metadata"]["name"] for s in services} == {"nereid", "nereid-headless"}
    for service in services:
        assert service["spec"]["selector"].items() <= labels.items()
        assert {"port": 8001, "targetPort": "grpc"}.items() <= service["spec"]["ports"][0].items()
    assert [s["spec"].get("clusterIP") for s in services].count("None") == 1
    target = by_kind("HorizontalPodAutoscaler")["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])


def test_hpa_scales_on_the_metric_the_adapter_serves() -> None:
    [metric] = by_kind("HorizontalPodAutoscaler")["spec"]["metrics"]
    assert metric["type"] == "Pods"
    assert metric["pods"]["metric"]["name"] == "nv_inference_pending_request_count"
    assert metric["pods"]["target"] == {"type": "AverageValue", "averageValue": "50"}
    config = yaml.safe_load(by_kind("ConfigMap")["data"]["config.yaml"])
    [rule] = config["rules"]
    assert re.match(r"nv_inference_pending_request_count\{", rule["seriesQuery"])
    assert rule["name"]["as"] == metric["pods"]["metric"]["name"]
    assert rule["resources"]["overrides"] == {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}
    assert "<<.Series>>{<<.LabelMatchers>>}" in rule["metricsQuery"]
    alerts = yaml.safe_load((ROOT / "deploy" / "prometheus" / "alerts.yml").read_text())
    [queue] = [r for r in alerts["groups"][0]["rules"] if r["alert"] == "NereidQueueDepth"]
    assert queue["expr"].strip().endswith("> 50")


def test_manifests_match_the_image() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "USER 10001:10001" in dockerfile
    assert re.search(r"^EXPOSE 8000 8001 8002$", dockerfile, re.M)
    for container in (by_kind("Deployment")["spec"]["template"]["spec"]["containers"][0],
                      by_kind("ServingRuntime")["spec"]["containers"][0]):
        assert container["args"][0] == "serve"  # after the image's `tini -- nereid` entrypoint
