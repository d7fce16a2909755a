"""`model_warmup` on real servers: samples run on every instance before READY, and a warmup
that fails fails the load with a reason naming the sample."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from lifecycle_util import index_of, infer_fp32
from util import ServerProcess, client, identity_config, write_model


def _warmup(name: str, data: str, batch: int = 1, count: int = 0, dims: str = "4") -> str:
    return (f'model_warmup [ {{ name: "{name}" batch_size: {batch} count: {count}\n'
            f'  inputs {{ key: "INPUT0" value: {{ data_type: TYPE_FP32 dims: [ {dims} ] {data} }} }} }} ]\n')


@pytest.fixture(scope="module")
def warm_server(tmp_path_factory: pytest.TempPathFactory, session_servers: list[ServerProcess]) -> ServerProcess:
    repo = tmp_path_factory.mktemp("warm")
    tensors = [("INPUT0", "FP32", [4])]
    write_model(repo, "zero", identity_config("zero", tensors, max_batch_size=4, instance_count=2,
                                              extra=_warmup("z", "zero_data: true", batch=3, count=2)))
    write_model(repo, "random", identity_config("random", tensors, extra=_warmup("r", "random_data: true")))
    write_model(repo, "from_file", identity_config("from_file", tensors, extra=_warmup(
        "f", 'input_data_file: "in.bin"')), files={"warmup/in.bin": np.ones(4, "<f4").tobytes()})
    write_model(repo, "short_file", identity_config("short_file", tensors, extra=_warmup(
        "s", 'input_data_file: "in.bin"')), files={"warmup/in.bin": b"\x00" * 7})
    write_model(repo, "bad_dims", identity_config("bad_dims", tensors, extra=_warmup("d", "zero_data: true", dims="5")))
    # Runs, then fails: identity hands back FP32 where the config promises INT32.
    write_model(repo, "bad_output", identity_config("bad_output", tensors, extra=_warmup("o", "zero_data: true"))
                .replace("output [\n  {\n    name: \"OUTPUT0\"\n    data_type: TYPE_FP32",
                         "output [\n  {\n    name: \"OUTPUT0\"\n    data_type: TYPE_INT32"))
    server = ServerProcess([repo])
    session_servers.append(server)
    return server


def _row(srv: ServerProcess, name: str) -> tuple[str, str, str]:
    rows = index_of(client(srv), name)
    assert len(rows) == 1, rows
    return rows[0]


@pytest.mark.parametrize("name", ["zero", "random", "from_file"])
def test_warmed_models_are_ready(warm_server: ServerProcess, name: str) -> None:
    assert _row(warm_server, name)[1] == "READY"
    data = np.ones((1, 4) if name == "zero" else (4,), np.float32)  # `zero` batches
    np.testing.assert_array_equal(infer_fp32(client(warm_server), name, data).as_numpy("OUTPUT0"), data)


def test_warmup_runs_on_every_instance_before_ready(warm_server: ServerProcess) -> None:
    log = warm_server.log
    assert re.search(r"model 'zero' version 1: warmup 'z' ran 2 time\(s\) on 2 instance\(s\)", log), log
    warm = log.index("warmup 'z' ran")
    assert warm < log.index("loaded model 'zero' version 1")


@pytest.mark.parametrize("name,needle", [
    ("short_file", "needs 16 bytes per batch item"),
    ("bad_dims", "dims [5] do not fit"),
    ("bad_output", "model_warmup 'o' failed on instance"),
])
def test_failed_warmup_fails_the_load(warm_server: ServerProcess, name: str, needle: str) -> None:
    version, state, reason = _row(warm_server, name)
    assert (version, state) == ("1", "UNAVAILABLE")
    assert needle in reason, reason
    assert f"model '{name}' version 1 failed to load" in warm_server.log
    assert not client(warm_server).is_model_ready(name)


def test_warmup_file_outside_the_warmup_folder_is_refused(tmp_path: Path, server_factory) -> None:
    repo = tmp_path / "repo"
    write_model(repo, "m", identity_config("m", [("INPUT0", "FP32", [4])],
                                           extra=_warmup("x", 'input_data_file: "../config.pbtxt"')))
    srv = server_factory(repo)
    version, state, reason = _row(srv, "m")
    assert state == "UNAVAILABLE" and "inside" in reason
