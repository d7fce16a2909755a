"""Files a model config names stay inside the model's folder (issue 9, defect 1), in process:
safepath.confine / require_regular and config normalisation (config_paths.py).

Every outside path is refused before anything outside is looked at, with the same text
whether it exists or not; FIFOs and devices are never opened. The same rules run through a
real server in test_config_paths.py.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from util import identity_config, write_model

from backends.base import TensorSpec
from server.confine import confine, require_regular
from server.core.signature import TensorInfo
from server.core.warmup import build_samples
from server.errors import ConfigError, ErrorCode
from server.repository.config import config_from_json, load_model_config, parse_config_text
from server.repository.layout import scan_model_dir
from server.settings import Settings

SETTINGS = Settings(model_repositories=())
FIELD = "default_model_filename"


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """tmp/repo/m/{1/model.py, 1/link.py -> outside, 1/dangling.py -> outside/missing, warmup/},
    tmp/outside/evil.py."""
    model = tmp_path / "repo" / "m"
    (model / "1").mkdir(parents=True)
    (model / "warmup").mkdir()
    (model / "1" / "model.py").write_text("x")
    (model / "labels.txt").write_text("a\nb\n")
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "evil.py").write_text("evil")
    (model / "1" / "link.py").symlink_to("../../../outside/evil.py")
    (model / "1" / "dangling.py").symlink_to("../../../outside/missing.py")
    (model / "1" / "abs_link.py").symlink_to(tmp_path / "outside" / "evil.py")
    (model / "1" / "inside_link.py").symlink_to(model / "1" / "model.py")
    (model / "1" / "up").symlink_to("..")
    return model


def _message(fn: Callable[[], object]) -> str:
    with pytest.raises(ConfigError) as info:
        fn()
    assert info.value.code is ErrorCode.INVALID_ARGUMENT
    return str(info.value)


@pytest.mark.parametrize("value", ["model.py", "../1/model.py", "inside_link.py", "up/1/model.py", "./model.py"])
def test_inside_paths_are_accepted(tree: Path, value: str) -> None:
    path = confine(tree, value, FIELD, base="1")
    assert path == (tree / "1" / "model.py").resolve()
    assert require_regular(path, FIELD, value)


def test_absolute_path_inside_is_accepted(tree: Path) -> None:
    assert confine(tree, str(tree / "1" / "model.py"), FIELD, base="1") == (tree / "1" / "model.py").resolve()


@pytest.mark.parametrize("existing,missing", [
    ("{out}/evil.py", "{out}/missing.py"),  # absolute
    ("../../../outside/evil.py", "../../../outside/missing.py"),  # climbing
    ("../../../../../../../../{out}/evil.py", "../../../../../../../../{out}/missing.py"),
    ("up/../../outside/evil.py", "up/../../outside/missing.py"),  # climbing through a symlink
])
def test_outside_paths_are_refused_with_one_text(tree: Path, existing: str, missing: str) -> None:
    out = str(tree.parent.parent / "outside")
    first = _message(lambda: confine(tree, existing.format(out=out), FIELD, base="1"))
    second = _message(lambda: confine(tree, missing.format(out=out), FIELD, base="1"))
    assert "outside the model's folder" in first
    assert first.replace("evil", "X") == second.replace("missing", "X")
    assert out not in first.replace(existing.format(out=out), "")  # nothing resolved is shown


def test_symlink_out_of_the_folder_is_refused_whether_its_target_exists_or_not(tree: Path) -> None:
    for link in ("link.py", "abs_link.py"):
        present = _message(lambda link=link: confine(tree, link, FIELD, base="1"))
        (tree.parent.parent / "outside" / "evil.py").rename(tree.parent.parent / "outside" / "gone.py")
        try:
            absent = _message(lambda link=link: confine(tree, link, FIELD, base="1"))
        finally:
            (tree.parent.parent / "outside" / "gone.py").rename(tree.parent.parent / "outside" / "evil.py")
        assert present == absent and "outside the model's folder" in present
    assert "outside" in _message(lambda: confine(tree, "dangling.py", FIELD, base="1"))


def test_nothing_outside_the_folder_is_ever_looked_at(tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every lstat/stat/readlink the checks make is of a path inside the model's real folder."""
    root = os.path.realpath(tree)
    seen: list[str] = []
    for name in ("lstat", "stat", "readlink"):
        real = getattr(os, name)

        def spy(path, *args, _real=real, **kwargs):  # type: ignore[no-untyped-def]
            seen.append(os.fspath(path))
            return _real(path, *args, **kwargs)

        monkeypatch.setattr(os, name, spy)
    out = str(tree.parent.parent / "outside")
    for value in (f"{out}/evil.py", "../../../outside/evil.py", "link.py", "abs_link.py", "dangling.py",
                  "up/../../outside/evil.py", "/etc/passwd", "model.py", "missing/../link.py"):
        try:
            require_regular(confine(tree, value, FIELD, base="1"), FIELD, value)
        except ConfigError:
            pass
    monkeypatch.undo()
    assert seen, "the spy saw nothing"
    # Resolving the folder's own location walks its ancestors (the operator's path, the same for any value).
    outside = [p for p in seen
               if p != root and not p.startswith(root + "/") and not root.startswith(p.rstrip("/") + "/")]
    assert not outside, outside
    assert any(p.startswith(root + "/1/") for p in seen)


def test_fifo_is_refused_without_opening_it(tree: Path) -> None:
    os.mkfifo(tree / "1" / "fifo.py")
    done: list[str] = []

    def check() -> None:
        done.append(_message(lambda: require_regular(confine(tree, "fifo.py", FIELD, base="1"), FIELD, "fifo.py")))

    thread = threading.Thread(target=check, daemon=True)
    thread.start()
    thread.join(10)
    assert done and "not a regular file" in done[0], "the check blocked on the FIFO"


def test_device_and_directory_are_refused(tree: Path) -> None:
    (tree / "1" / "null.py").symlink_to("/dev/null")  # outside the folder anyway
    assert "outside" in _message(lambda: confine(tree, "null.py", FIELD, base="1"))
    assert "not a regular file" in _message(lambda: require_regular(tree / "1", FIELD, "1"))


def test_symlink_loop_inside_the_folder(tree: Path) -> None:
    (tree / "1" / "a").symlink_to("b")
    (tree / "1" / "b").symlink_to("a")
    assert "too many levels of symbolic links" in _message(lambda: confine(tree, "a", FIELD, base="1"))


def test_a_symlinked_model_folder_is_its_own_root(tmp_path: Path) -> None:
    """The operator may keep the model folder elsewhere: `repo/m -> store/m`; inside is inside `store/m`."""
    store = tmp_path / "store" / "m"
    (store / "1").mkdir(parents=True)
    (store / "1" / "model.py").write_text("x")
    (tmp_path / "repo").mkdir()
    (tmp_path / "repo" / "m").symlink_to(store)
    named = tmp_path / "repo" / "m"
    for value in ("model.py", str(named / "1" / "model.py"), str(store / "1" / "model.py")):
        assert confine(named, value, FIELD, base="1") == store.resolve() / "1" / "model.py"
    assert "outside" in _message(lambda: confine(named, "../../x", FIELD, base="1"))


def test_keep_in_base(tree: Path) -> None:
    (tree / "warmup" / "in.bin").write_bytes(b"\0" * 4)
    assert confine(tree, "in.bin", "w", base="warmup", keep_in_base=True) == (tree / "warmup" / "in.bin").resolve()
    assert "outside" in _message(lambda: confine(tree, "../labels.txt", "w", base="warmup", keep_in_base=True))
    assert confine(tree, "../labels.txt", "l", base="warmup") == (tree / "labels.txt").resolve()


# -- through config normalisation: every field that names a file --


def _model(tmp_path: Path, extra: str, files: dict[str, bytes] | None = None) -> Path:
    config = identity_config("m", [("INPUT0", "FP32", [4])], extra=extra)
    return write_model(tmp_path / "repo", "m", config, files=files)


OUT = "/nonexistent-nereid-outside"


@pytest.mark.parametrize("extra", [
    f'default_model_filename: "{OUT}/model.py"',
    'default_model_filename: "../../x.py"',
    f'cc_model_filenames {{ key: "9.0" value: "{OUT}/model.plan" }}',
    'cc_model_filenames { key: "9.0" value: "../../../model.plan" }',
    f'model_operations {{ op_library_filename: "{OUT}/libcustom.so" }}',
    'model_operations { op_library_filename: "../libcustom.so" }',
    'runtime: "../../libtriton_evil.so"',
    f'parameters {{ key: "EXECUTION_ENV_PATH" value {{ string_value: "{OUT}/env.tar.gz" }} }}',
    'parameters { key: "EXECUTION_ENV_PATH" value { string_value: "$$TRITON_MODEL_DIRECTORY/../env.tar.gz" } }',
    'model_warmup [ { name: "w" batch_size: 1 inputs { key: "INPUT0" value: { data_type: TYPE_FP32 dims: [ 4 ] '
    f'input_data_file: "{OUT}/x.bin" }} }} }} ]',
    'sequence_batching { state [ { input_name: "S" output_name: "S" data_type: TYPE_FP32 dims: [ 1 ] '
    'initial_state [ { data_type: TYPE_FP32 dims: [ 1 ] name: "i" data_file: "../../x.bin" } ] } ] }',
])
def test_config_fields_naming_outside_files_are_refused(tmp_path: Path, extra: str) -> None:
    model = _model(tmp_path, extra)
    if "EXECUTION_ENV_PATH" in extra:  # a Python backend parameter
        text = (model / "config.pbtxt").read_text().replace('backend: "identity"', 'backend: "python"')
        (model / "config.pbtxt").write_text(text)
    message = _message(lambda: load_model_config(scan_model_dir(model), SETTINGS))
    assert "outside the model's folder" in message or "plain file name" in message, message


def test_label_file_outside_is_refused(tmp_path: Path) -> None:
    model = _model(tmp_path, "")
    text = (model / "config.pbtxt").read_text().replace(
        'name: "OUTPUT0"', f'name: "OUTPUT0" label_filename: "{OUT}/labels.txt"', 1)
    (model / "config.pbtxt").write_text(text)
    assert "label_filename" in _message(lambda: load_model_config(scan_model_dir(model), SETTINGS))


def test_the_same_rules_apply_to_a_json_override(tmp_path: Path) -> None:
    model = _model(tmp_path, "")
    override = config_from_json(
        '{"name": "m", "backend": "python", "default_model_filename": "/etc/passwd",'
        ' "input": [{"name": "I", "data_type": "TYPE_FP32", "dims": [1]}],'
        ' "output": [{"name": "O", "data_type": "TYPE_FP32", "dims": [1]}]}', "test")
    assert "outside" in _message(lambda: load_model_config(scan_model_dir(model), SETTINGS, override))


def test_execution_env_inside_is_refused_as_unsupported(tmp_path: Path) -> None:
    model = _model(tmp_path, 'parameters { key: "EXECUTION_ENV_PATH" value { string_value: '
                             '"$$TRITON_MODEL_DIRECTORY/env.tar.gz" } }', files={"env.tar.gz": b"x"})
    text = (model / "config.pbtxt").read_text().replace('backend: "identity"', 'backend: "python"')
    (model / "config.pbtxt").write_text(text)
    message = _message(lambda: load_model_config(scan_model_dir(model), SETTINGS))
    assert "not supported" in message and "EXECUTION_ENV_PATH" in message


def test_files_inside_pass_and_fifos_are_refused(tmp_path: Path) -> None:
    model = _model(tmp_path, 'model_warmup [ { name: "w" batch_size: 1 inputs { key: "INPUT0" value: { '
                             'data_type: TYPE_FP32 dims: [ 4 ] input_data_file: "in.bin" } } } ]',
                   files={"warmup/in.bin": b"\0" * 16})
    config = load_model_config(scan_model_dir(model), SETTINGS)
    assert config.model_warmup[0].inputs["INPUT0"].input_data_file == "in.bin"
    (model / "warmup" / "in.bin").unlink()
    os.mkfifo(model / "warmup" / "in.bin")
    assert "not a regular file" in _message(lambda: load_model_config(scan_model_dir(model), SETTINGS))


def test_fifo_config_file_is_refused(tmp_path: Path) -> None:
    model = tmp_path / "repo" / "m"
    (model / "1").mkdir(parents=True)
    os.mkfifo(model / "config.pbtxt")
    done: list[str] = []
    thread = threading.Thread(target=lambda: done.append(
        _message(lambda: load_model_config(scan_model_dir(model), SETTINGS))), daemon=True)
    thread.start()
    thread.join(10)
    assert done and "not a regular file" in done[0], "reading config.pbtxt blocked on a FIFO"


def test_warmup_uses_the_same_check(tmp_path: Path) -> None:
    (tmp_path / "warmup").mkdir()
    os.mkfifo(tmp_path / "warmup" / "f.bin")
    (tmp_path / "warmup" / "out").symlink_to("/etc/hostname")
    info = {"A": TensorInfo.from_spec(TensorSpec("A", "FP32", (3,)), 0)}
    for name, needle in (("f.bin", "not a regular file"), ("out", "outside"), ("../../x", "outside")):
        warmup = parse_config_text(
            f'model_warmup [ {{ name: "w" inputs {{ key: "A" value: {{ data_type: TYPE_FP32 dims: [ 3 ] '
            f'input_data_file: "{name}" }} }} }} ]', "t").model_warmup
        assert needle in _message(lambda warmup=warmup: build_samples(warmup, info, tmp_path, 0))


def test_inside_config_still_loads(tmp_path: Path) -> None:
    model = _model(tmp_path, 'default_model_filename: "sub/../weights.bin"',
                   files={"1/sub/x": b"", "1/weights.bin": b"x"})
    config = load_model_config(scan_model_dir(model), SETTINGS)
    assert config.default_model_filename == "sub/../weights.bin"  # kept as written (the ModelConfig RPC shows it)
