"""Unit tests of the lifecycle rules: change detection (the two-scan rule),
path confinement, load parameters, warmup samples, and the swap decisions of one action."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from tritonclient.grpc import model_config_pb2 as mc
from util import identity_config, write_model

from server.core.signature import TensorInfo
from server.core.spec import tensor_specs
from server.core.state import ModelState
from server.core.warmup import build_samples
from server.errors import ConfigError, ErrorCode, InvalidInput, NereidError
from server.repository.actions import Source, describe_failure, run_action
from server.repository.changes import ChangeDetector, Stamp, snapshot_model, tree_stamp
from server.repository.config import parse_config_text
from server.repository.entry import ModelEntry
from server.repository.overrides import parse_load_parameters, remove_override_dir, write_override_dir
from server.repository.safepath import check_model_name, find_model_dir, override_relpath, override_target
from server.settings import Settings

# (Version policy, `select_versions`: the table in test_config_unit.py.)


# -- change detection --


def test_tree_stamp_sees_size_count_and_mtime(tmp_path: Path) -> None:
    (tmp_path / "a").write_bytes(b"x" * 10)
    first = tree_stamp(tmp_path)
    assert (first.size, first.files) == (10, 1)
    (tmp_path / "a").write_bytes(b"x" * 11)
    assert tree_stamp(tmp_path).size == 11
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b").write_bytes(b"yy")
    assert tree_stamp(tmp_path).files == 2
    stamp = tree_stamp(tmp_path)
    os.utime(tmp_path / "sub" / "b", ns=(stamp.mtime_ns + 10**9, stamp.mtime_ns + 10**9))
    assert tree_stamp(tmp_path).mtime_ns == stamp.mtime_ns + 10**9  # same size and count: mtime tells


def test_tree_stamp_same_mtime_but_growing_copy_differs(tmp_path: Path) -> None:
    """cp -p / rsync preserve mtimes: a half-copied file must still look different from the whole one."""
    path = tmp_path / "model.onnx"
    path.write_bytes(b"half")
    os.utime(path, ns=(1_000_000_000, 1_000_000_000))
    half = tree_stamp(path)
    path.write_bytes(b"half and the rest")
    os.utime(path, ns=(1_000_000_000, 1_000_000_000))
    assert tree_stamp(path) != half


def test_snapshot_splits_config_versions_and_extras(tmp_path: Path) -> None:
    model = write_model(tmp_path, "m", "name: \"m\"", versions=(1, 2), files={"1/model.onnx": b"abc"})
    (model / "labels.txt").write_text("a\nb\n")
    (model / "01").mkdir()  # not a version: counts as an extra
    (model / ".incoming").mkdir()  # hidden: ignored
    (model / ".incoming" / "model.onnx").write_bytes(b"partial")
    snap = snapshot_model(model)
    assert sorted(snap.versions) == [1, 2]
    assert snap.versions[1].size == 3 and snap.versions[2].files == 0
    assert snap.config.files == 1
    assert snap.extras.files == 1 and snap.extras.size == 4
    (model / ".incoming" / "model.onnx").write_bytes(b"partial, longer now")
    assert snapshot_model(model) == snap  # hidden staging never counts as a change


def test_snapshot_without_config(tmp_path: Path) -> None:
    model = write_model(tmp_path, "m", None)
    assert snapshot_model(model).config == Stamp(-1, -1, -1)


def _snap(tmp_path: Path, name: str = "m"):
    return snapshot_model(tmp_path / name)


def test_two_scan_rule_new_model(tmp_path: Path) -> None:
    detector = ChangeDetector()
    write_model(tmp_path, "m", "name: \"m\"")
    first = detector.observe({"m": _snap(tmp_path)})
    assert first.apply == [] and first.unsettled == ["m"]  # first sight: wait one scan
    second = detector.observe({"m": _snap(tmp_path)})
    assert [s.name for s in second.apply] == ["m"]
    assert detector.observe({"m": _snap(tmp_path)}).apply == []  # unchanged: nothing to do


def test_two_scan_rule_copy_in_progress_is_never_applied(tmp_path: Path) -> None:
    detector = ChangeDetector()
    model = write_model(tmp_path, "m", "name: \"m\"")
    detector.observe({"m": _snap(tmp_path)})
    detector.observe({"m": _snap(tmp_path)})
    (model / "2").mkdir()
    for size in range(1, 6):  # the file keeps growing between scans
        (model / "2" / "model.onnx").write_bytes(b"x" * size)
        changes = detector.observe({"m": _snap(tmp_path)})
        assert changes.apply == [] and changes.unsettled == ["m"], size
    applied = detector.observe({"m": _snap(tmp_path)}).apply  # one quiet scan later
    assert [sorted(s.versions) for s in applied] == [[1, 2]]


def test_two_scan_rule_removal_needs_two_absent_scans(tmp_path: Path) -> None:
    detector = ChangeDetector()
    write_model(tmp_path, "m", "name: \"m\"")
    snap = _snap(tmp_path)
    detector.observe({"m": snap})
    detector.observe({"m": snap})
    assert detector.observe({}).remove == []  # gone once: maybe a replace in progress
    assert detector.observe({"m": snap}).apply == []  # back unchanged: nothing happened
    detector.observe({})
    assert detector.observe({}).remove == ["m"]


def test_busy_model_is_left_for_a_later_scan(tmp_path: Path) -> None:
    detector = ChangeDetector()
    write_model(tmp_path, "m", "name: \"m\"")
    snap = _snap(tmp_path)
    detector.observe({"m": snap})
    assert detector.observe({"m": snap}, busy=frozenset({"m"})).apply == []
    assert [s.name for s in detector.observe({"m": snap}).apply] == ["m"]


def test_forget_hands_the_model_out_again(tmp_path: Path) -> None:
    detector = ChangeDetector()
    write_model(tmp_path, "m", "name: \"m\"")
    snap = _snap(tmp_path)
    detector.observe({"m": snap})
    assert detector.observe({"m": snap}).apply
    detector.forget("m")
    assert detector.observe({"m": snap}).apply


# -- path confinement --


@pytest.mark.parametrize("name,text", [
    ("", "model name must not be empty"),
    (" ", "model name must not contain only whitespace characters"),
    ("\t\n\v\f\r ", "model name must not contain only whitespace characters"),
    (".", "must not contain path traversal characters"),
    ("..", "must not contain path traversal characters"),
    ("../etc", "invalid model name '../etc', model name must not contain path traversal characters"),
    ("a/b", "must not contain path traversal characters"),
    ("/abs", "must not contain path traversal characters"),
    ("a\\b", "must not contain path traversal characters"),
    ("x\0y", "NUL"),
    ("m" * 256, "at most 255 bytes"),
    ("ü" * 128, "at most 255 bytes"),
])
def test_bad_model_names(name: str, text: str) -> None:
    with pytest.raises(InvalidInput, match=text.replace(".", "\\.").replace("(", "\\(")):
        check_model_name(name)


@pytest.mark.parametrize("name", ["simple", "model-1", "a.b", "ü", ".hidden", "...", "..my_model", " a ", "m" * 255])
def test_good_model_names(name: str) -> None:
    assert check_model_name(name) == name


def test_symlinked_model_dir_out_of_repository_is_refused(tmp_path: Path) -> None:
    repo, outside = tmp_path / "repo", tmp_path / "outside"
    repo.mkdir()
    outside.mkdir()
    (repo / "evil").symlink_to(outside)
    (repo / "inner").mkdir()
    (repo / "alias").symlink_to(repo / "inner")
    with pytest.raises(InvalidInput, match="outside the model repository"):
        find_model_dir("evil", (repo,))
    assert find_model_dir("alias", (repo,)) == repo / "alias"  # a link that stays inside is fine
    assert find_model_dir("missing", (repo,)) is None


@pytest.mark.parametrize("key", ["file:", "file:/etc/passwd", "file:../x", "file:1/../../x", "file:1//x",
                                 "file:./1/x", "file:1/x/..", "file:1\\x", "file:1/x\0"])
def test_bad_override_paths(key: str) -> None:
    with pytest.raises(InvalidInput):
        override_relpath(key)


def test_good_override_paths() -> None:
    assert str(override_relpath("file:1/model.onnx")) == "1/model.onnx"
    assert str(override_relpath("file:labels.txt")) == "labels.txt"
    assert str(override_relpath("file:2/sub/dir/weights.bin")) == "2/sub/dir/weights.bin"


def test_override_target_refuses_symlink_escape(tmp_path: Path) -> None:
    base, outside = tmp_path / "base", tmp_path / "outside"
    base.mkdir()
    outside.mkdir()
    (base / "1").symlink_to(outside)
    with pytest.raises(InvalidInput, match="outside"):
        override_target(base, "file:1/model.onnx")
    assert override_target(base, "file:2/model.onnx") == base / "2" / "model.onnx"


# -- load parameters --


def test_load_parameters() -> None:
    request = parse_load_parameters("m", {"config": '{"backend": "identity"}', "file:1/a.bin": b"\x00"})
    assert request.config is not None and request.config.backend == "identity"
    assert request.files == {"file:1/a.bin": b"\x00"} and request.overridden
    assert not parse_load_parameters("m", {}).overridden


@pytest.mark.parametrize("params,match", [
    ({"file:1/model.onnx": b"x"}, "need the 'config' parameter"),
    ({"config": ""}, "non-empty JSON"),
    ({"config": b"{}"}, "non-empty JSON"),
    ({"config": "{}", "file:1/x": "text"}, "must be bytes"),
    ({"config": "{}", "file:../x": b"x"}, "not allowed"),
    ({"conifg": "{}"}, "unknown parameter 'conifg'"),
])
def test_bad_load_parameters(params: dict, match: str) -> None:
    with pytest.raises(InvalidInput, match=match):
        parse_load_parameters("m", params)


def test_bad_config_json_is_invalid_argument() -> None:
    with pytest.raises(NereidError, match="'config' parameter of the load of 'm'") as info:
        parse_load_parameters("m", {"config": "{not json"})
    assert info.value.code is ErrorCode.INVALID_ARGUMENT


def test_override_dir_is_private_and_removed(tmp_path: Path) -> None:
    request = parse_load_parameters("m", {"config": "{}", "file:1/model.onnx": b"abc", "file:labels.txt": b"l"})
    model_dir = write_override_dir(request)
    try:
        assert model_dir.name == "m"
        assert (model_dir / "1" / "model.onnx").read_bytes() == b"abc"
        assert (model_dir / "labels.txt").read_bytes() == b"l"
        assert oct(model_dir.stat().st_mode & 0o777) == oct(0o700)
    finally:
        remove_override_dir(model_dir)
    assert not model_dir.parent.exists()


# -- warmup samples --


def _inputs(config: mc.ModelConfig) -> dict[str, TensorInfo]:
    return {s.name: TensorInfo.from_spec(s, config.max_batch_size) for s in tensor_specs(config.input)}


WARM_CONFIG = """name: "w"
max_batch_size: 4
input [ { name: "A" data_type: TYPE_FP32 dims: [ 3 ] }, { name: "B" data_type: TYPE_INT32 dims: [ -1 ] },
        { name: "S" data_type: TYPE_STRING dims: [ 2 ] } ]
"""


def _warm(tmp_path: Path, warmup: str) -> list:
    config = parse_config_text(WARM_CONFIG + warmup, "config.pbtxt")
    return build_samples(config.model_warmup, _inputs(config), tmp_path, config.max_batch_size)


def test_warmup_zero_random_and_file(tmp_path: Path) -> None:
    (tmp_path / "warmup").mkdir()
    (tmp_path / "warmup" / "a.bin").write_bytes(np.arange(3, dtype="<f4").tobytes())  # one batch item
    (tmp_path / "warmup" / "s.bin").write_bytes(b"\x02\x00\x00\x00hi\x00\x00\x00\x00")
    samples = _warm(tmp_path, """model_warmup [ {
      name: "s1" batch_size: 2 count: 3
      inputs { key: "A" value: { data_type: TYPE_FP32 dims: [ 3 ] input_data_file: "a.bin" } }
      inputs { key: "B" value: { data_type: TYPE_INT32 dims: [ 5 ] random_data: true } }
      inputs { key: "S" value: { data_type: TYPE_STRING dims: [ 2 ] input_data_file: "s.bin" } }
    }, { name: "s2" inputs { key: "A" value: { data_type: TYPE_FP32 dims: [ 3 ] zero_data: true } }
                    inputs { key: "B" value: { data_type: TYPE_INT32 dims: [ 1 ] zero_data: true } }
                    inputs { key: "S" value: { data_type: TYPE_STRING dims: [ 2 ] random_data: true } } } ]""")
    first, second = samples
    assert (first.name, first.batch_size, first.count) == ("s1", 2, 3)
    np.testing.assert_array_equal(first.inputs["A"], [[0, 1, 2], [0, 1, 2]])  # repeated over the batch
    assert first.inputs["B"].shape == (2, 5) and first.inputs["B"].dtype == np.dtype("<i4")
    assert first.inputs["S"].tolist() == [[b"hi", b""], [b"hi", b""]]
    assert (second.batch_size, second.count) == (1, 1)  # proto defaults: 0 means 1
    assert not second.inputs["A"].any() and second.inputs["S"].tolist() == [[b"", b""]]


@pytest.mark.parametrize("warmup,match", [
    ('inputs { key: "A" value: { data_type: TYPE_FP32 dims: [ 3 ] zero_data: true } }', "required input"),
    ('inputs { key: "X" value: { data_type: TYPE_FP32 dims: [ 3 ] zero_data: true } }', "required input"),
    ('batch_size: 9', "exceeds max_batch_size"),
    ('inputs { key: "A" value: { data_type: TYPE_INT32 dims: [ 3 ] zero_data: true } } '
     'inputs { key: "B" value: { data_type: TYPE_INT32 dims: [ 1 ] zero_data: true } } '
     'inputs { key: "S" value: { data_type: TYPE_STRING dims: [ 2 ] zero_data: true } }', "data_type INT32"),
    ('inputs { key: "A" value: { data_type: TYPE_FP32 dims: [ 4 ] zero_data: true } } '
     'inputs { key: "B" value: { data_type: TYPE_INT32 dims: [ -1 ] zero_data: true } } '
     'inputs { key: "S" value: { data_type: TYPE_STRING dims: [ 2 ] zero_data: true } }', "do not fit"),
    ('inputs { key: "A" value: { data_type: TYPE_FP32 dims: [ 3 ] input_data_file: "nope.bin" } } '
     'inputs { key: "B" value: { data_type: TYPE_INT32 dims: [ 1 ] zero_data: true } } '
     'inputs { key: "S" value: { data_type: TYPE_STRING dims: [ 2 ] zero_data: true } }', "nope.bin"),
    ('inputs { key: "A" value: { data_type: TYPE_FP32 dims: [ 3 ] input_data_file: "../../etc/passwd" } } '
     'inputs { key: "B" value: { data_type: TYPE_INT32 dims: [ 1 ] zero_data: true } } '
     'inputs { key: "S" value: { data_type: TYPE_STRING dims: [ 2 ] zero_data: true } }', "inside"),
    ('inputs { key: "A" value: { data_type: TYPE_FP32 dims: [ 3 ] input_data_file: "short.bin" } } '
     'inputs { key: "B" value: { data_type: TYPE_INT32 dims: [ 1 ] zero_data: true } } '
     'inputs { key: "S" value: { data_type: TYPE_STRING dims: [ 2 ] zero_data: true } }', "needs 12 bytes"),
])
def test_warmup_errors_name_the_problem(tmp_path: Path, warmup: str, match: str) -> None:
    (tmp_path / "warmup").mkdir()
    (tmp_path / "warmup" / "short.bin").write_bytes(b"\x00" * 5)
    with pytest.raises(ConfigError, match=match) as info:
        _warm(tmp_path, f"model_warmup [ {{ name: \"bad\" {warmup} }} ]")
    assert "model_warmup 'bad'" in str(info.value)


# -- one action: what loads, what keeps serving, what retires (identity models, in process) --


SETTINGS = Settings(model_repositories=())


def _act(entry: ModelEntry, path: Path, **kwargs):
    outcome = run_action(entry, Source(snapshot_model(path), **kwargs), SETTINGS, lambda v, m: None)
    for model, _ in outcome.retire:
        model.unload(5)
    entry.versions, entry.keys, entry.failures = outcome.rows, outcome.keys, outcome.failures
    entry.error, entry.error_covered = outcome.error, outcome.covered
    entry.refresh_latest()
    return outcome


def _serving(entry: ModelEntry) -> list[int]:
    return sorted(v for v, m in entry.versions.items() if m.state is ModelState.READY)


@pytest.fixture
def model_dir(tmp_path: Path):
    path = write_model(tmp_path, "m", identity_config("m", [("INPUT0", "FP32", [4])]))
    entry = ModelEntry(name="m", path=path)
    yield path, entry
    for model in entry.versions.values():
        if model.state is ModelState.READY:
            model.unload(5)


BROKEN = 'parameters: { key: "execute_delay_ms" value: { string_value: "soon" } }\n'


def test_action_new_version_replaces_old(model_dir) -> None:
    path, entry = model_dir
    first = _act(entry, path)
    assert first.ok and _serving(entry) == [1]
    old = entry.versions[1]
    (path / "2").mkdir()
    second = _act(entry, path)
    assert second.ok and [m.version for m in second.loaded] == [2]
    assert _serving(entry) == [2]
    assert [(m, why) for m, why in second.retire] == [(old, "no longer selected by the version policy")]
    assert entry.versions[1].reason == "unloaded" and entry.is_ready()


def test_action_unchanged_versions_are_kept(model_dir) -> None:
    path, entry = model_dir
    _act(entry, path)
    model = entry.versions[1]
    again = _act(entry, path)
    assert again.loaded == [] and again.retire == [] and entry.versions[1] is model


def test_action_failed_new_version_keeps_old_serving(model_dir) -> None:
    path, entry = model_dir
    _act(entry, path)
    (path / "2").mkdir()
    (path / "config.pbtxt").write_text(identity_config("m", [("INPUT0", "FP32", [4])]) + BROKEN)
    outcome = _act(entry, path)  # the new config breaks every load: 2 fails, 1 fails to reload
    assert not outcome.ok and set(outcome.failed) == {1, 2}
    assert _serving(entry) == [1]  # the old copy of 1, with the old config
    assert entry.is_ready()  # a failed update while the old copy serves
    assert "execute_delay_ms" in describe_failure("m", outcome)
    assert entry.failures[2].covered
    assert {r.version: r.state for r in entry.index_rows(False)} == {"1": "READY", "2": "UNAVAILABLE"}


def test_action_failed_version_is_not_retried_until_it_changes(model_dir) -> None:
    path, entry = model_dir
    _act(entry, path)
    (path / "2").mkdir()
    (path / "2" / "bad").mkdir()
    (path / "config.pbtxt").write_text(identity_config("m", [("INPUT0", "FP32", [4])]) + BROKEN)
    _act(entry, path, retry_failed=False)
    (path / "config.pbtxt").write_text(identity_config("m", [("INPUT0", "FP32", [4])]))
    fixed = _act(entry, path, retry_failed=False)  # the config changed: 2 is retried, and loads
    assert fixed.ok and _serving(entry) == [2] and not entry.failures


def test_action_known_bad_version_is_skipped(model_dir) -> None:
    path, entry = model_dir
    _act(entry, path)
    model_file_config = identity_config("m", [("INPUT0", "FP32", [4])]).replace(
        'backend: "identity"', 'platform: "onnxruntime_onnx"')
    (path / "config.pbtxt").write_text(model_file_config)
    failed = _act(entry, path, retry_failed=False)  # no model.onnx: version 1 fails to reload
    assert set(failed.failed) == {1} and _serving(entry) == [1]
    again = _act(entry, path, retry_failed=False)
    assert again.failed == {} and again.loaded == [] and _serving(entry) == [1]  # not retried


def test_action_broken_config_keeps_serving(model_dir) -> None:
    path, entry = model_dir
    _act(entry, path)
    (path / "config.pbtxt").write_text("name: \"m\" input [")
    outcome = _act(entry, path)
    assert outcome.error and "config.pbtxt" in outcome.error
    assert _serving(entry) == [1] and entry.is_ready()
    rows = entry.index_rows(False)
    assert [(r.version, r.state) for r in rows] == [("1", "READY")]
    assert "config.pbtxt" in rows[0].reason


def test_action_removed_version_folder_is_retired(model_dir) -> None:
    path, entry = model_dir
    (path / "config.pbtxt").write_text(identity_config("m", [("INPUT0", "FP32", [4])],
                                                       extra="version_policy: { all { } }\n"))
    (path / "2").mkdir()
    _act(entry, path)
    assert _serving(entry) == [1, 2]
    os.rmdir(path / "1")
    outcome = _act(entry, path)
    assert [why for _, why in outcome.retire] == ["its version folder was removed"]
    assert _serving(entry) == [2] and "1" not in {r.version for r in entry.index_rows(False)}


def test_first_load_failure_makes_model_unready(model_dir) -> None:
    path, entry = model_dir
    (path / "config.pbtxt").write_text(identity_config("m", [("INPUT0", "FP32", [4])]) + BROKEN)
    outcome = _act(entry, path)
    assert not outcome.ok and not outcome.covered
    assert not entry.is_ready()
