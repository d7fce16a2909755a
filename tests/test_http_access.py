"""`--http-restricted-api`, as tritonserver defines it: an HTTP request to a restricted API
group needs header `<key>: <value>`; without it, or with a wrong value, it is answered 403
`{"error": "This API is restricted, expecting header '<key>'"}` (Triton's status and text,
server/src/http_server.cc RespondIfRestricted); other groups stay open; the secret never
reaches the log or an answer; gRPC restrictions and HTTP restrictions are separate flags."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException
from util import ServerProcess, http_request, identity_config, scaled, write_model

from server.settings import RESTRICTED_PROTOCOL_GROUPS, parse_restricted_apis

INFER_SECRET = "s3cret-Http-Infer-51d0"
ADMIN_SECRET = "s3cret-Http-Admin-9ce2"
INFER_OK = {"infer-key": INFER_SECRET}
ADMIN_OK = {"admin-key": ADMIN_SECRET}


def refused(header: str) -> bytes:
    return json.dumps({"error": f"This API is restricted, expecting header '{header}'"}).encode()


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("http_restricted_repo")
    write_model(path, "echo", identity_config("echo", [("INPUT0", "FP32", [4])]))
    return path


@pytest.fixture(scope="module")
def server(repo: Path) -> Iterator[ServerProcess]:
    srv = ServerProcess([repo], [
        "--log-verbose", "1",
        f"--http-restricted-api=health,inference:Infer-Key={INFER_SECRET}",
        f"--http-restricted-api=model-repository:admin-key={ADMIN_SECRET}",
    ])
    yield srv
    srv.stop()


def _inputs() -> list[httpclient.InferInput]:
    tensor = httpclient.InferInput("INPUT0", [4], "FP32")
    tensor.set_data_from_numpy(np.arange(4, dtype=np.float32))
    return [tensor]


def test_infer_refused_without_header_or_with_a_wrong_one(server: ServerProcess) -> None:
    c = httpclient.InferenceServerClient(server.http_url, network_timeout=scaled(30))
    for headers in (None, {"infer-key": "wrong"}, {"admin-key": ADMIN_SECRET}, {"infer-key": INFER_SECRET + "x"}):
        with pytest.raises(InferenceServerException) as info:
            c.infer("echo", _inputs(), headers=headers)
        assert info.value.message() == "This API is restricted, expecting header 'infer-key'"
        assert info.value.status() == "403"
    c.close()


def test_infer_passes_with_header(server: ServerProcess) -> None:
    c = httpclient.InferenceServerClient(server.http_url, network_timeout=scaled(30))
    result = c.infer("echo", _inputs(), headers={"Infer-Key": INFER_SECRET})  # header names: any case
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), np.arange(4, dtype=np.float32))
    c.close()


def test_raw_health_restricted(server: ServerProcess) -> None:
    for path in ("/v2/health/live", "/v2/health/ready", "/v2/models/echo/ready"):
        status, headers, body = http_request(server.http_port, "GET", path)
        assert (status, body) == (403, refused("infer-key")), path
        assert headers["content-type"] == "application/json"
        assert http_request(server.http_port, "GET", path, headers=INFER_OK)[0] == 200, path


def test_model_repository_restricted_with_its_own_key(server: ServerProcess) -> None:
    assert http_request(server.http_port, "POST", "/v2/repository/index", b"{}", INFER_OK)[:3:2] == (
        403, refused("admin-key"))
    status, _, body = http_request(server.http_port, "POST", "/v2/repository/index", b"{}", ADMIN_OK)
    assert status == 200 and json.loads(body)[0]["name"] == "echo"


def test_other_groups_stay_open(server: ServerProcess) -> None:
    c = httpclient.InferenceServerClient(server.http_url, network_timeout=scaled(30))
    assert c.get_server_metadata()["name"] == "nereid"
    assert c.get_model_metadata("echo")["name"] == "echo"
    assert c.get_model_config("echo")["name"] == "echo"
    assert "model_stats" in c.get_inference_statistics("echo")
    assert c.get_log_settings() and c.get_trace_settings()
    c.close()


def test_grpc_is_not_restricted_by_the_http_flag(server: ServerProcess) -> None:
    g = grpcclient.InferenceServerClient(server.url)
    tensor = grpcclient.InferInput("INPUT0", [4], "FP32")
    tensor.set_data_from_numpy(np.ones(4, np.float32))
    assert g.is_server_live()
    np.testing.assert_array_equal(g.infer("echo", [tensor]).as_numpy("OUTPUT0"), np.ones(4, np.float32))
    g.close()


def test_secrets_never_leave_the_server(server: ServerProcess) -> None:
    answers = [http_request(server.http_port, "GET", "/v2/health/live", headers={"infer-key": "guess"})[2],
               http_request(server.http_port, "POST", "/v2/repository/index", b"{}")[2]]
    for secret in (INFER_SECRET, ADMIN_SECRET):
        assert secret not in server.log
        assert all(secret.encode() not in body for body in answers)


# Every route, with the group tritonserver files it under.
ROUTES = [
    ("GET", "/v2/health/live", "health"), ("GET", "/v2/health/ready", "health"),
    ("GET", "/v2/models/echo/ready", "health"), ("GET", "/v2", "metadata"),
    ("GET", "/v2/models/echo", "metadata"), ("GET", "/v2/models/echo/versions/1", "metadata"),
    ("POST", "/v2/models/echo/infer", "inference"), ("GET", "/v2/models/echo/config", "model-config"),
    ("GET", "/v2/models/stats", "statistics"), ("GET", "/v2/models/echo/stats", "statistics"),
    ("POST", "/v2/repository/index", "model-repository"),
    ("POST", "/v2/repository/models/echo/load", "model-repository"),
    ("POST", "/v2/repository/models/echo/unload", "model-repository"),
    ("GET", "/v2/systemsharedmemory/status", "shared-memory"),
    ("POST", "/v2/systemsharedmemory/region/r/register", "shared-memory"),
    ("POST", "/v2/systemsharedmemory/unregister", "shared-memory"),
    ("GET", "/v2/cudasharedmemory/status", "shared-memory"),
    ("POST", "/v2/cudasharedmemory/region/r/register", "shared-memory"),
    ("GET", "/v2/trace/setting", "trace"), ("POST", "/v2/models/echo/trace/setting", "trace"),
    ("GET", "/v2/logging", "logging"), ("POST", "/v2/logging", "logging"),
]


def test_every_route_is_refused_when_its_group_is_restricted(repo: Path, server_factory) -> None:
    """One key per group: each route is refused without a header, and a key of another group
    does not open it (so each route sits in exactly the group listed)."""
    flags = [f"--http-restricted-api={g}:k-{g}=v-{g}" for g in RESTRICTED_PROTOCOL_GROUPS]
    srv = server_factory(repo, *flags)
    assert {g for _, _, g in ROUTES} == set(RESTRICTED_PROTOCOL_GROUPS)
    for method, path, group in ROUTES:
        body = b"{}" if method == "POST" else None
        status, _, answer = http_request(srv.http_port, method, path, body)
        assert (status, answer) == (403, refused(f"k-{group}")), (method, path)
        for other in RESTRICTED_PROTOCOL_GROUPS:
            if other != group:
                status, _, _ = http_request(srv.http_port, method, path, body, {f"k-{other}": f"v-{other}"})
                assert status == 403, (method, path, other)
    # With its own key a route is served (live is 200, an empty infer body a 400 from the codec).
    assert http_request(srv.http_port, "GET", "/v2/health/live", headers={"k-health": "v-health"})[0] == 200
    status, _, _ = http_request(srv.http_port, "POST", "/v2/models/echo/infer", b"{}", {"k-inference": "v-inference"})
    assert status == 400


def test_parse_restricted_apis() -> None:
    parsed = parse_restricted_apis(["health,inference:Infer-Key=a:b=c", "model-repository:admin-bin=x"])
    assert [(r.groups, r.header, r.value) for r in parsed] == [
        (("health", "inference"), "infer-key", "a:b=c"),
        (("model-repository",), "admin-bin", "x"),
    ]
    assert "a:b=c" not in repr(parsed)


@pytest.mark.parametrize(("values", "message"), [
    # Triton's own message (L0_http restricted-API test).
    (["model-repository,health:k1=v1", "metadata,health:k2=v2"],
     "api 'health' can not be specified in multiple config groups"),
    (["inference,infer:k=v"], "unknown restricted api 'infer'; expected one of health, metadata, inference, "
                              "shared-memory, model-config, model-repository, statistics, trace, logging"),
    (["health:k"], "--http-restricted-api option format is '<api>[,<api>...]:<key>=<value>'. Got 'health:...'"),
    (["health=secretvalue"], "--http-restricted-api option format is '<api>[,<api>...]:<key>=<value>'."),
    (["health:a b=v"], "--http-restricted-api key 'a b' is not a usable HTTP header name "
                       "(letters, digits, '-', '_', '.')"),
])
def test_parse_errors(values: list[str], message: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_restricted_apis(values)
    assert message in str(info.value)
    assert "secretvalue" not in str(info.value)
