"""Code execution outside the repository (issue 9, defect 1), through a real server in explicit
mode and tritonclient's `load_model(name, config=json)`.

A config (override or on disk) that names a file outside the model's own folder is
INVALID_ARGUMENT before the file is opened, with one text whether it exists or not; an
outside `.py` is never imported (its marker file never appears); a FIFO as the model file
is refused instead of blocking the loader. Unit-level cases: test_config_paths_unit.py.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
from lifecycle_util import infer_fp32
from util import ServerProcess, client, expect_error, python_config, write_model

EXPLICIT = ("--model-control-mode", "explicit")

GOOD_MODEL = '''import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        return [pb_utils.InferenceResponse([pb_utils.Tensor(
            "OUTPUT0", pb_utils.get_input_tensor_by_name(r, "INPUT0").as_numpy())]) for r in requests]
'''

# Importing this file is the attack: it leaves a marker next to itself.
EVIL_MODEL = '''import pathlib
pathlib.Path(__file__).with_name("PWNED").write_text("code ran")


class TritonPythonModel:
    def execute(self, requests):
        return []
'''


def _json(name: str, **extra: object) -> str:
    config: dict[str, object] = {
        "name": name, "backend": "python", "max_batch_size": 0,
        "input": [{"name": "INPUT0", "data_type": "TYPE_FP32", "dims": [4]}],
        "output": [{"name": "OUTPUT0", "data_type": "TYPE_FP32", "dims": [4]}],
        "instance_group": [{"kind": "KIND_CPU", "count": 1}],
    }
    config.update(extra)
    return json.dumps(config)


@pytest.fixture(scope="module")
def layout(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("paths")
    repo, outside = root / "repo", root / "outside"
    outside.mkdir()
    (outside / "evil.py").write_text(EVIL_MODEL)
    write_model(repo, "victim", python_config("victim"), files={"1/model.py": GOOD_MODEL.encode()})
    # On disk: a model file that is a symlink out of the folder (and one whose target is missing).
    for name, target in (("linked", outside / "evil.py"), ("dangling", outside / "missing.py")):
        write_model(repo, name, python_config(name))
        (repo / name / "1" / "model.py").symlink_to(os.path.relpath(target, repo / name / "1"))
    # On disk: config.pbtxt itself names an outside file.
    write_model(repo, "disk_abs", python_config("disk_abs", f'default_model_filename: "{outside / "evil.py"}"'),
                files={"1/model.py": b""})
    # A FIFO as the model file.
    write_model(repo, "fifo", python_config("fifo"))
    os.mkfifo(repo / "fifo" / "1" / "model.py")
    return {"repo": repo, "outside": outside, "marker": outside / "PWNED"}


@pytest.fixture(scope="module")
def srv(layout: dict[str, Path]):
    server = ServerProcess([layout["repo"]], [*EXPLICIT, "--load-model", "victim", "--exit-timeout-secs", "10"])
    yield server
    server.stop()


def _refused(server: ServerProcess, name: str, **kwargs: object) -> str:
    err = expect_error("INVALID_ARGUMENT", client(server).load_model, name, client_timeout=60, **kwargs)
    return err.message()


def _same_text_with_and_without_the_file(server: ServerProcess, layout: dict[str, Path], name: str,
                                         **kwargs: object) -> str:
    """Load once with outside/evil.py present and once with it gone: the answers must be identical."""
    evil, hidden = layout["outside"] / "evil.py", layout["outside"] / "evil.py.away"
    present = _refused(server, name, **kwargs)
    evil.rename(hidden)
    try:
        absent = _refused(server, name, **kwargs)
    finally:
        hidden.rename(evil)
    private = re.compile(r"nereid-override-[^/]+")  # each file-override load gets a fresh private directory
    assert private.sub("X", present) == private.sub("X", absent)
    assert not layout["marker"].exists(), "the outside model.py was imported"
    return present


@pytest.mark.parametrize("value", ["{outside}/evil.py", "../../outside/evil.py",
                                   "../../../../../../../../../..{outside}/evil.py"])
def test_config_override_cannot_name_an_outside_model_file(srv: ServerProcess, layout: dict[str, Path],
                                                           value: str) -> None:
    value = value.format(outside=layout["outside"])
    message = _same_text_with_and_without_the_file(
        srv, layout, "victim", config=_json("victim", default_model_filename=value))
    assert "outside the model's folder" in message and "default_model_filename" in message
    # The previous copy keeps serving.
    np.testing.assert_array_equal(infer_fp32(client(srv), "victim", np.arange(4, dtype=np.float32))
                                  .as_numpy("OUTPUT0"), np.arange(4, dtype=np.float32))


def test_file_override_directory_is_confined_too(srv: ServerProcess, layout: dict[str, Path]) -> None:
    """With `file:` overrides the model folder is the private override directory."""
    value = "../" * 12 + str(layout["outside"] / "evil.py").lstrip("/")
    message = _same_text_with_and_without_the_file(
        srv, layout, "fresh", config=_json("fresh", default_model_filename=value),
        files={"file:1/model.py": GOOD_MODEL.encode()})
    assert "outside the model's folder" in message


@pytest.mark.parametrize("name", ["linked", "dangling"])
def test_symlink_out_of_the_model_folder_on_disk_is_refused(srv: ServerProcess, layout: dict[str, Path],
                                                            name: str) -> None:
    message = _refused(srv, name)
    assert "default_model_filename 'model.py' is outside the model's folder" in message
    assert not layout["marker"].exists()


def test_linked_and_dangling_give_the_same_text(srv: ServerProcess) -> None:
    assert _refused(srv, "linked").replace("linked", "X") == _refused(srv, "dangling").replace("dangling", "X")


def test_on_disk_config_gets_the_same_rule(srv: ServerProcess, layout: dict[str, Path]) -> None:
    message = _same_text_with_and_without_the_file(srv, layout, "disk_abs")
    assert "outside the model's folder" in message


def test_fifo_model_file_is_refused_not_opened(srv: ServerProcess) -> None:
    message = _refused(srv, "fifo")  # client_timeout: a loader blocked on the FIFO would time out
    assert "is not a regular file" in message
    c = client(srv)
    assert c.is_server_live() and c.is_model_ready("victim")


def test_execution_environment_is_refused(srv: ServerProcess, layout: dict[str, Path]) -> None:
    env = {"EXECUTION_ENV_PATH": {"string_value": "$$TRITON_MODEL_DIRECTORY/env.tar.gz"}}
    assert "not supported" in _refused(srv, "victim", config=_json("victim", parameters=env))
    env = {"EXECUTION_ENV_PATH": {"string_value": str(layout["outside"] / "env.tar.gz")}}
    assert "outside the model's folder" in _refused(srv, "victim", config=_json("victim", parameters=env))


def test_inside_paths_still_load(srv: ServerProcess, layout: dict[str, Path]) -> None:
    """A model file named by an absolute path inside the folder, or through `..` that stays inside."""
    model_file = layout["repo"] / "victim" / "1" / "model.py"
    c = client(srv)
    for value in (str(model_file), "../1/model.py"):
        c.load_model("victim", config=_json("victim", default_model_filename=value), client_timeout=60)
        assert c.get_model_config("victim").config.default_model_filename == value
        result = infer_fp32(c, "victim", np.arange(4, dtype=np.float32))
        np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), np.arange(4, dtype=np.float32))
    c.load_model("victim", client_timeout=60)
