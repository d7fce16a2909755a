"""Model names on RepositoryModelLoad / RepositoryModelUnload, as Triton (issue 9, defects 8 and 11).

Texts from Triton's `ValidateModelName` (triton-inference-server/core,
src/model_repository_manager/model_repository_manager.cc). A name no folder can have
(5,000 characters) is INVALID_ARGUMENT, not INTERNAL. Names that merely look hidden
(`...`, `..my_model`, `.hidden`) are folder names like any other: loadable by name,
though the repository scan (startup, polling, the index before a load) skips them.
"""

from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np
import pytest
from lifecycle_util import index_of, infer_fp32
from tritonclient.grpc import service_pb2, service_pb2_grpc
from util import ServerProcess, client, expect_error, expect_rpc_error, identity_config, write_model

HIDDEN_LOOKING = ["...", "..my_model", ".hidden"]


@pytest.fixture(scope="module")
def names_server(tmp_path_factory: pytest.TempPathFactory):
    repo: Path = tmp_path_factory.mktemp("names")
    for name in ["plain", *HIDDEN_LOOKING]:
        write_model(repo, name, identity_config(name, [("INPUT0", "FP32", [4])]))
    server = ServerProcess([repo], ["--model-control-mode", "explicit", "--exit-timeout-secs", "10"])
    yield server
    server.stop()


@pytest.mark.parametrize("name,text", [
    ("", "model name must not be empty"),
    (" ", "model name must not contain only whitespace characters"),
    ("\t \n", "model name must not contain only whitespace characters"),
    ("../plain", "invalid model name '../plain', model name must not contain path traversal characters"),
    ("a/b", "invalid model name 'a/b', model name must not contain path traversal characters"),
    ("..", "invalid model name '..', model name must not contain path traversal characters"),
    (".", "invalid model name '.', model name must not contain path traversal characters"),
    ("/etc", "invalid model name '/etc', model name must not contain path traversal characters"),
    ("a\\b", "model name must not contain path traversal characters"),
])
def test_invalid_names(names_server: ServerProcess, name: str, text: str) -> None:
    c = client(names_server)
    assert text in expect_error("INVALID_ARGUMENT", c.load_model, name).message()
    assert text in expect_error("INVALID_ARGUMENT", c.unload_model, name).message()


def test_a_name_too_long_for_any_folder_is_invalid_argument(names_server: ServerProcess) -> None:
    """Was INTERNAL (`OSError: File name too long`)."""
    c = client(names_server)
    for name in ("m" * 5000, "m" * 256, "é" * 200):
        message = expect_error("INVALID_ARGUMENT", c.load_model, name).message()
        assert "at most 255 bytes" in message and len(message) < 300
        expect_error("INVALID_ARGUMENT", c.unload_model, name)
    # A name of exactly 255 bytes is a valid name; there is simply no such folder.
    message = expect_error("INVALID_ARGUMENT", c.load_model, "m" * 255).message()
    assert "failed to poll from model repository" in message
    assert c.is_server_live()


def test_raw_rpc_with_huge_name(names_server: ServerProcess) -> None:
    with names_server.channel() as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        for name in ("x" * 5000, "x/" * 2500):
            expect_rpc_error(grpc.StatusCode.INVALID_ARGUMENT, stub.RepositoryModelLoad,
                             service_pb2.RepositoryModelLoadRequest(model_name=name), timeout=10)
            expect_rpc_error(grpc.StatusCode.INVALID_ARGUMENT, stub.RepositoryModelUnload,
                             service_pb2.RepositoryModelUnloadRequest(model_name=name), timeout=10)


@pytest.mark.parametrize("name", HIDDEN_LOOKING)
def test_hidden_looking_names_load_serve_and_unload(names_server: ServerProcess, name: str) -> None:
    c = client(names_server)
    assert index_of(c, name) == []  # the scan skips names starting with "." (docs/LIFECYCLE.md)
    c.load_model(name)
    assert c.is_model_ready(name)
    x = np.arange(4, dtype=np.float32)
    np.testing.assert_array_equal(infer_fp32(c, name, x).as_numpy("OUTPUT0"), x)
    assert index_of(c, name) == [("1", "READY", "")]  # once loaded it is listed
    c.unload_model(name)
    assert not c.is_model_ready(name)
    assert index_of(c, name) == [("1", "UNAVAILABLE", "unloaded")]


def test_plain_name_still_loads(names_server: ServerProcess) -> None:
    c = client(names_server)
    c.load_model("plain")
    assert c.is_model_ready("plain")
    c.unload_model("plain")


def test_load_model_flag_takes_hidden_looking_names(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    write_model(repo, "..my_model", identity_config("..my_model", [("INPUT0", "FP32", [4])]))
    write_model(repo, ".scratch", identity_config(".scratch", [("INPUT0", "FP32", [4])]))
    server = ServerProcess([repo], ["--model-control-mode", "explicit", "--load-model", "..my_model"])
    try:
        c = client(server)
        assert c.is_model_ready("..my_model")
        assert [m.name for m in c.get_model_repository_index().models] == ["..my_model"]
    finally:
        server.stop()
    server = ServerProcess([repo])  # mode none: the scan loads everything not hidden (here: nothing)
    try:
        c = client(server)
        assert c.get_model_repository_index().models == [] and c.is_server_ready()
    finally:
        server.stop()
