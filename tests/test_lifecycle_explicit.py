"""Explicit mode through tritonclient: --load-model, load_model (plain, with a config
override, with file overrides), unload_model, the errors Triton gives, path confinement,
and loads that never block inference on other models.

The load / unload cases run over gRPC and over HTTP/REST (`transport`: tritonclient.http on
the repository routes, or transports.HttpStub for raw requests) with the same expectations:
the same states afterwards (always read over gRPC), the same messages, and the HTTP status
Triton gives each gRPC code."""

from __future__ import annotations

import json
import re
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2
from lifecycle_util import add_model_bytes, index_of, infer_fp32, states, wait_until
from transports import TRANSPORTS, open_stub, transport_client
from tritonclient.grpc import service_pb2
from util import (
    ServerProcess,
    client,
    expect_error,
    expect_rpc_error,
    health_status,
    identity_config,
    scaled,
    write_model,
)

EXPLICIT = ("--model-control-mode", "explicit")
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
WARM_SLOW = """model_warmup [ { name: "slow" batch_size: 1 count: 6
  inputs { key: "INPUT0" value: { data_type: TYPE_FP32 dims: [ 4 ] zero_data: true } } } ]
"""


def _id_config(name: str, **kwargs) -> str:
    return identity_config(name, [("INPUT0", "FP32", [4])], **kwargs)


def _x() -> np.ndarray:
    return np.arange(4, dtype=np.float32)


def _config_json(name: str, backend: str = "identity", outputs: tuple[str, ...] = ("OUTPUT0",), **extra) -> str:
    config = {
        "name": name, "backend": backend, "max_batch_size": 0,
        "input": [{"name": "INPUT0", "data_type": "TYPE_FP32", "dims": [4]}],
        "output": [{"name": o, "data_type": "TYPE_FP32", "dims": [4]} for o in outputs],
    }
    config.update(extra)
    return json.dumps(config)


@pytest.fixture(params=TRANSPORTS)
def transport(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="module")
def explicit_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("explicit")
    repo = root / "repo"
    write_model(repo, "a", _id_config("a"))
    write_model(repo, "b", _id_config("b"), versions=(1, 2))
    write_model(repo, "c", _id_config("c"))
    write_model(repo, "heavy", _id_config("heavy", execute_delay_ms=300, extra=WARM_SLOW))
    write_model(repo, "broken", _id_config("broken").replace('backend: "identity"', 'backend: "nope"'))
    (root / "outside").mkdir()
    write_model(root / "outside", "secret", _id_config("secret"))
    (repo / "escape").symlink_to(root / "outside" / "secret")
    return repo


@pytest.fixture(scope="module")
def explicit_server(explicit_repo: Path, session_servers: list[ServerProcess]) -> ServerProcess:
    server = ServerProcess([explicit_repo], [*EXPLICIT, "--load-model", "a", "--exit-timeout-secs", "10"])
    session_servers.append(server)
    return server


def test_startup_loads_only_load_model(explicit_server: ServerProcess) -> None:
    c = client(explicit_server)
    assert states(c, "a") == {"1": "READY"}
    rows = {r.name: (r.version, r.state) for r in c.get_model_repository_index().models}
    for name in ("b", "c", "heavy", "broken", "escape"):
        assert rows[name] == ("", ""), (name, rows[name])  # listed, never loaded: name only, as Triton
    expect_error("NOT_FOUND", infer_fp32, c, "c", _x())
    assert c.is_server_ready()
    meta = c.get_server_metadata()
    assert "model_repository" in meta.extensions and "model_repository(unload_dependents)" in meta.extensions


def test_load_then_unload(explicit_server: ServerProcess, transport: str) -> None:
    c, lc = client(explicit_server), transport_client(explicit_server, transport)
    lc.load_model("b")  # synchronous: ready when it returns
    assert states(c, "b") == {"2": "READY"}
    assert infer_fp32(c, "b", _x()).get_response().model_version == "2"
    assert c.is_model_ready("b")
    wait_until(lambda: health_status(explicit_server, "b") == SERVING, timeout=5, what="health of loaded 'b'")
    lc.unload_model("b")
    assert index_of(c, "b") == [("2", "UNAVAILABLE", "unloaded")]
    assert not c.is_model_ready("b")
    wait_until(lambda: health_status(explicit_server, "b") == NOT_SERVING, timeout=5,
               what="health of unloaded 'b' to go NOT_SERVING")
    assert "has no available versions" in expect_error("NOT_FOUND", infer_fp32, c, "b", _x()).message()
    lc.unload_model("b")  # unloading again is harmless
    assert health_status(explicit_server, "b") == NOT_SERVING
    assert c.is_server_ready()  # deliberately unloaded models do not count against readiness
    assert health_status(explicit_server, "") == SERVING
    assert health_status(explicit_server, "a") == SERVING
    lc.load_model("b")
    assert states(c, "b") == {"2": "READY"}
    wait_until(lambda: health_status(explicit_server, "b") == SERVING, timeout=5, what="health of reloaded 'b'")


def test_load_with_config_override(explicit_server: ServerProcess, transport: str) -> None:
    c, lc = client(explicit_server), transport_client(explicit_server, transport)
    lc.load_model("c", config=_config_json("c", outputs=("OVERRIDDEN",)))
    np.testing.assert_array_equal(infer_fp32(c, "c", _x()).as_numpy("OVERRIDDEN"), _x())
    assert [o.name for o in c.get_model_config("c").config.output] == ["OVERRIDDEN"]
    lc.load_model("c")  # a plain load goes back to the repository's config
    assert [o.name for o in c.get_model_config("c").config.output] == ["OUTPUT0"]


def test_load_with_file_overrides(explicit_server: ServerProcess, explicit_repo: Path, transport: str) -> None:
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    c, lc = client(explicit_server), transport_client(explicit_server, transport)
    config = _config_json("fresh", backend="onnxruntime")
    lc.load_model("fresh", config=config, files={"file:7/model.onnx": add_model_bytes(7.0)})
    assert states(c, "fresh") == {"7": "READY"}
    result = infer_fp32(c, "fresh", _x())
    assert result.get_response().model_version == "7"
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), _x() + 7)
    assert not (explicit_repo / "fresh").exists()  # overrides never touch the repository

    # A corrupt override fails the load and leaves version 7 serving.
    err = expect_error("INVALID_ARGUMENT", lc.load_model, "fresh", config=config,
                       files={"file:8/model.onnx": b"corrupt"})
    assert "load failed for model 'fresh': version 8 is at UNAVAILABLE state" in err.message()
    assert infer_fp32(c, "fresh", _x()).get_response().model_version == "7"
    override_dirs = {Path(m).parents[2] for m in re.findall(r"(/\S+/8/model\.onnx)", err.message())}
    assert len(override_dirs) == 1 and all(d.name.startswith("nereid-override-") for d in override_dirs)
    lc.unload_model("fresh")
    assert not any(d.exists() for d in override_dirs), "the private override directory outlived the model"


def test_file_override_needs_config(explicit_server: ServerProcess, transport: str) -> None:
    err = expect_error("INVALID_ARGUMENT", transport_client(explicit_server, transport).load_model, "c",
                       files={"file:1/model.onnx": b"x"})
    assert "'config'" in err.message()


@pytest.mark.parametrize("key", ["file:../escape.onnx", "file:/tmp/abs.onnx", "file:1/../../up.onnx",
                                 "file:1//x", "file:./1/x"])
def test_file_override_paths_cannot_escape(explicit_server: ServerProcess, tmp_path: Path, key: str,
                                           transport: str) -> None:
    c = transport_client(explicit_server, transport)
    err = expect_error("INVALID_ARGUMENT", c.load_model, "c", config=_config_json("c"), files={key: b"x"})
    assert key in err.message()
    assert not Path("/tmp/abs.onnx").exists()


@pytest.mark.parametrize("name", ["../a", "a/..", "/abs", "sub/dir", ".."])
def test_model_names_cannot_escape(explicit_server: ServerProcess, name: str, transport: str) -> None:
    # Raw requests: tritonclient.http leaves '/' unescaped in the route, HttpStub sends it as %2F.
    with open_stub(explicit_server, transport) as stub:
        load = service_pb2.RepositoryModelLoadRequest(model_name=name)
        unload = service_pb2.RepositoryModelUnloadRequest(model_name=name)
        expect_rpc_error(grpc.StatusCode.INVALID_ARGUMENT, stub.RepositoryModelLoad, load, timeout=10)
        expect_rpc_error(grpc.StatusCode.INVALID_ARGUMENT, stub.RepositoryModelUnload, unload, timeout=10)


def test_symlink_out_of_repository_is_refused(explicit_server: ServerProcess, transport: str) -> None:
    err = expect_error("INVALID_ARGUMENT", transport_client(explicit_server, transport).load_model, "escape")
    assert "outside the model repository" in err.message()


def test_unknown_model(explicit_server: ServerProcess, transport: str) -> None:
    c = transport_client(explicit_server, transport)
    err = expect_error("INVALID_ARGUMENT", c.load_model, "no_such_model")
    assert "failed to load 'no_such_model', failed to poll from model repository" in err.message()
    err = expect_error("INVALID_ARGUMENT", c.unload_model, "no_such_model")
    assert "has not been served" in err.message()


def test_failed_load_reports_and_previous_keeps_serving(explicit_server: ServerProcess, transport: str) -> None:
    c, lc = client(explicit_server), transport_client(explicit_server, transport)
    err = expect_error("INVALID_ARGUMENT", lc.load_model, "broken")
    assert "load failed for model 'broken'" in err.message() and "nope" in err.message()
    assert index_of(c, "broken")[0][1] == "UNAVAILABLE"
    # A bad override of a serving model changes nothing.
    err = expect_error("INVALID_ARGUMENT", lc.load_model, "a", config=_config_json("a", backend="nope"))
    assert "nope" in err.message()
    assert states(c, "a") == {"1": "READY"}
    np.testing.assert_array_equal(infer_fp32(c, "a", _x()).as_numpy("OUTPUT0"), _x())
    lc.unload_model("broken")


def test_unload_dependents_and_raw_parameters(explicit_server: ServerProcess, transport: str) -> None:
    c, lc = client(explicit_server), transport_client(explicit_server, transport)
    lc.load_model("c")
    lc.unload_model("c", unload_dependents=True)
    assert index_of(c, "c") == [("1", "UNAVAILABLE", "unloaded")]
    with open_stub(explicit_server, transport) as stub:
        request = service_pb2.RepositoryModelLoadRequest(model_name="c")
        request.parameters["conifg"].string_param = "{}"
        err = expect_rpc_error(grpc.StatusCode.INVALID_ARGUMENT, stub.RepositoryModelLoad, request, timeout=10)
        assert "unknown parameter 'conifg'" in err.details()
        if transport == "http":  # Triton's HTTP routes name no repository: gRPC-only
            return
        elsewhere = service_pb2.RepositoryModelLoadRequest(model_name="c", repository_name="elsewhere")
        expect_rpc_error(grpc.StatusCode.NOT_FOUND, stub.RepositoryModelLoad, elsewhere, timeout=10)


def test_loading_never_blocks_inference_on_other_models(explicit_server: ServerProcess) -> None:
    """`heavy` takes ~2 s to load (warmup); requests to `a` keep flowing fast meanwhile."""
    c = client(explicit_server)
    latencies: list[float] = []
    loading = threading.Event()

    def load() -> None:
        loading.set()
        client(explicit_server).load_model("heavy")

    loader = threading.Thread(target=load)
    loader.start()
    loading.wait(scaled(5))
    started = time.monotonic()
    seen_loading, ready_throughout = False, True
    while loader.is_alive() and time.monotonic() - started < scaled(30):
        t0 = time.monotonic()
        infer_fp32(c, "a", _x())
        latencies.append(time.monotonic() - t0)
        if len(latencies) % 10 == 0:
            seen_loading = seen_loading or states(c, "heavy") == {"1": "LOADING"}
            ready_throughout = ready_throughout and c.is_server_ready()
    loader.join(scaled(30))
    assert seen_loading, "the index never showed the load in progress"
    assert ready_throughout, "a load in the background must not make the server unready"
    load_secs = time.monotonic() - started
    assert load_secs >= 1.0, "the load was too quick to show anything"
    assert states(c, "heavy") == {"1": "READY"}
    assert len(latencies) >= 20, latencies
    assert max(latencies) < scaled(0.5), f"a request waited {max(latencies):.3f}s while another model loaded"
    c.unload_model("heavy")


def test_load_unload_refused_outside_explicit_mode(identity_server: ServerProcess, transport: str) -> None:
    c = transport_client(identity_server, transport)
    message = "explicit model load / unload is not allowed if polling is enabled"
    assert message in expect_error("UNAVAILABLE", c.load_model, "id_FP32").message()
    assert message in expect_error("UNAVAILABLE", c.unload_model, "id_FP32").message()


def test_load_model_star_loads_everything(tmp_path: Path, server_factory) -> None:
    repo = tmp_path / "repo"
    write_model(repo, "x", _id_config("x"))
    write_model(repo, "y", _id_config("y"))
    srv = server_factory(repo, *EXPLICIT, "--load-model", "*")
    c = client(srv)
    assert states(c, "x") == {"1": "READY"} and states(c, "y") == {"1": "READY"}


def test_load_model_unknown_name_is_reported(tmp_path: Path, server_factory) -> None:
    repo = tmp_path / "repo"
    write_model(repo, "x", _id_config("x"))
    srv = server_factory(repo, *EXPLICIT, "--load-model", "x", "--load-model", "ghost")
    c = client(srv)
    assert states(c, "x") == {"1": "READY"}
    assert index_of(c, "ghost")[0][1] == "UNAVAILABLE"
    assert not c.is_server_ready()
    assert "model 'ghost' failed to load" in srv.log
