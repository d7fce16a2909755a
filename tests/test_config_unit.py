"""Unit tests (no server) for server/repository/config.py: version selection, parse errors,
name checks, backend fields, auto-complete from ONNX files, defaults and validation."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc
from util import MODEL_REPOSITORY, identity_config, write_model

from backends.base import TensorSpec
from server.core.signature import TensorInfo
from server.errors import ConfigError, ErrorCode
from server.repository.config import load_model_config, parse_config_text, read_config, select_versions
from server.repository.layout import scan_model_dir
from server.settings import Settings

# -- select_versions --


def policy(text: str) -> mc.ModelConfig:
    return parse_config_text(text, "test")


@pytest.mark.parametrize(
    "text,available,expected",
    [
        ("", (1, 2, 3), [3]),
        ("version_policy: { latest: { num_versions: 1 } }", (1, 2, 3), [3]),
        ("version_policy: { latest: { num_versions: 2 } }", (1, 2, 3), [2, 3]),
        ("version_policy: { latest: { num_versions: 5 } }", (1, 2, 3), [1, 2, 3]),
        ("version_policy: { latest: { num_versions: 2 } }", (1, 7, 30), [7, 30]),
        ("version_policy: { all: { } }", (1, 2, 3), [1, 2, 3]),
        ("version_policy: { all: { } }", (), []),
        ("version_policy: { specific: { versions: [ 1, 3 ] } }", (1, 2, 3), [1, 3]),
        ("version_policy: { specific: { versions: [ 3, 1 ] } }", (1, 2, 3), [1, 3]),
        ("version_policy: { specific: { versions: [ 4 ] } }", (1, 2, 3), []),
        ("version_policy: { specific: { versions: [ 2, 9 ] } }", (1, 2, 3), [2]),
        ("", (), []),
        ("", (5,), [5]),
        ("", (2, 3, 10), [10]),  # versions compare as numbers: 10 is the latest, not 3
        ("version_policy: { latest: { num_versions: 2 } }", (2, 3, 10), [3, 10]),
        ("version_policy: { latest: { num_versions: 1 } }", (), []),
        ("version_policy: { all: { } }", (1, 4, 9), [1, 4, 9]),
        ("version_policy: { specific: { versions: [ 7 ] } }", (1, 2, 3), []),
    ],
)
def test_select_versions(text: str, available: tuple[int, ...], expected: list[int]) -> None:
    assert select_versions(policy(text), available) == expected


# -- parsing --


def test_parse_error_names_file_and_line() -> None:
    text = 'name: "m"\nmax_batch_size: 4\ninput [ { name: "x" data_typo: TYPE_FP32 } ]\n'
    with pytest.raises(ConfigError) as info:
        parse_config_text(text, "/some/where/m/config.pbtxt")
    message = str(info.value)
    assert "/some/where/m/config.pbtxt" in message
    assert re.search(r"\b3:\d+\b", message), message
    assert "data_typo" in message
    assert info.value.code is ErrorCode.INVALID_ARGUMENT


def test_parse_error_bad_enum_value_line() -> None:
    text = 'name: "m"\n\n\n\ninput [ { name: "x" data_type: TYPE_FLOAT32 dims: [ 1 ] } ]\n'
    with pytest.raises(ConfigError) as info:
        parse_config_text(text, "cfg.pbtxt")
    assert "cfg.pbtxt" in str(info.value)
    assert re.search(r"\b5:\d+\b", str(info.value)), str(info.value)


def test_read_config_missing_file_gives_empty_config(tmp_path: Path) -> None:
    model_dir = tmp_path / "m"
    (model_dir / "1").mkdir(parents=True)
    assert read_config(scan_model_dir(model_dir)) == mc.ModelConfig()


def test_read_config_reports_file_path(tmp_path: Path) -> None:
    write_model(tmp_path, "m", 'name: "m"\nmax_batch_size: "four"\n')
    with pytest.raises(ConfigError) as info:
        read_config(scan_model_dir(tmp_path / "m"))
    assert str(tmp_path / "m" / "config.pbtxt") in str(info.value)
    assert re.search(r"\b2:\d+\b", str(info.value))


# -- load_model_config: names, backend fields, defaults --


def settings(repo: Path, **kwargs) -> Settings:
    return Settings(model_repositories=(repo,), **kwargs)


def load(repo: Path, name: str, **kwargs) -> mc.ModelConfig:
    return load_model_config(scan_model_dir(repo / name), settings(repo, **kwargs))


def test_name_mismatch(tmp_path: Path) -> None:
    write_model(tmp_path, "dir_name", identity_config("config_name", [("INPUT0", "FP32", [2])]))
    with pytest.raises(ConfigError) as info:
        load(tmp_path, "dir_name")
    message = str(info.value)
    assert "dir_name" in message and "config_name" in message
    assert "config.pbtxt" in message


def test_missing_name_is_filled_from_directory(tmp_path: Path) -> None:
    text = identity_config("x", [("INPUT0", "FP32", [2])]).replace('name: "x"\n', "")
    write_model(tmp_path, "from_dir", text)
    assert load(tmp_path, "from_dir").name == "from_dir"


def test_identity_defaults(tmp_path: Path) -> None:
    write_model(tmp_path, "m", identity_config("m", [("INPUT0", "FP32", [2])]))
    config = load(tmp_path, "m")
    assert config.backend == "identity"
    assert config.platform == ""
    assert config.max_batch_size == 0
    assert len(config.instance_group) == 1
    group = config.instance_group[0]
    assert group.kind == mc.ModelInstanceGroup.KIND_CPU
    assert group.count == 1
    assert group.name == "m_0"
    assert config.version_policy.WhichOneof("policy_choice") == "latest"
    assert config.version_policy.latest.num_versions == 1
    assert config.WhichOneof("scheduling_choice") is None  # no auto-complete for identity


def test_explicit_instance_group_count_is_kept(tmp_path: Path) -> None:
    write_model(tmp_path, "m", identity_config("m", [("INPUT0", "FP32", [2])], instance_count=3))
    config = load(tmp_path, "m")
    assert [(g.kind, g.count) for g in config.instance_group] == [(mc.ModelInstanceGroup.KIND_CPU, 3)]


def test_negative_max_batch_size(tmp_path: Path) -> None:
    write_model(tmp_path, "m", identity_config("m", [("INPUT0", "FP32", [2])], max_batch_size=-1))
    with pytest.raises(ConfigError, match="max_batch_size"):
        load(tmp_path, "m")


def test_unknown_platform(tmp_path: Path) -> None:
    write_model(tmp_path, "m", 'platform: "caffe2_netdef"\n')
    with pytest.raises(ConfigError, match="caffe2_netdef"):
        load(tmp_path, "m")


def test_no_backend_and_no_model_file(tmp_path: Path) -> None:
    write_model(tmp_path, "m", "max_batch_size: 0\n")
    with pytest.raises(ConfigError) as info:
        load(tmp_path, "m")
    assert str(tmp_path / "m") in str(info.value)


def test_no_backend_and_no_version_folder(tmp_path: Path) -> None:
    write_model(tmp_path, "m", "max_batch_size: 0\n", versions=())
    with pytest.raises(ConfigError, match="version"):
        load(tmp_path, "m")


# -- validation --


def _io(inputs: str, outputs: str = 'output [ { name: "y" data_type: TYPE_FP32 dims: [ 2 ] } ]') -> str:
    return f'backend: "identity"\n{inputs}\n{outputs}\n'


@pytest.mark.parametrize(
    "text,needle",
    [
        (_io('input [ { name: "x" data_type: TYPE_FP32 } ]'), "'x'"),
        (_io('input [ { name: "x" data_type: TYPE_FP32 dims: [ -2 ] } ]'), "'x'"),
        (_io('input [ { name: "x" dims: [ 2 ] } ]'), "'x'"),
        (_io('input [ { name: "x" data_type: TYPE_FP32 dims: [ 2 ] },'
             ' { name: "x" data_type: TYPE_FP32 dims: [ 2 ] } ]'), "'x'"),
        (_io('input [ { name: "x" data_type: TYPE_FP32 dims: [ 2, 3 ] reshape: { shape: [ 5 ] } } ]'), "'x'"),
        (_io('input [ { data_type: TYPE_FP32 dims: [ 2 ] } ]'), "name"),
        (_io("", ""), "input"),
    ],
    ids=["empty_dims", "dims_below_minus_one", "no_data_type", "duplicate", "reshape_count", "no_name", "no_io"],
)
def test_invalid_tensors(tmp_path: Path, text: str, needle: str) -> None:
    write_model(tmp_path, "m", text)
    with pytest.raises(ConfigError) as info:
        load(tmp_path, "m")
    assert needle in str(info.value)
    assert "config.pbtxt" in str(info.value)


def test_scalar_reshape_is_valid(tmp_path: Path) -> None:
    write_model(tmp_path, "m", _io('input [ { name: "x" data_type: TYPE_FP32 dims: [ 1 ] reshape: { shape: [ ] } } ]',
                                   'output [ { name: "y" data_type: TYPE_FP32 dims: [ 1 ] reshape: { shape: [ ] } } ]'))
    config = load(tmp_path, "m")
    assert list(config.input[0].dims) == [1]
    assert config.input[0].HasField("reshape")


# -- auto-complete from ONNX --



def onnx_identity_bytes(shape: list[int | str], elem: str = "FLOAT") -> bytes:
    """A one-node Identity model x -> y with the given graph shape (ints or symbolic names)."""
    pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    helper, elem_type = onnx.helper, getattr(onnx.TensorProto, elem)
    node = helper.make_node("Identity", ["x"], ["y"])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", elem_type, shape)],
                              [helper.make_tensor_value_info("y", elem_type, shape)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    return model.SerializeToString()


def add_sub_repo(tmp_path: Path, config: str | None = None) -> Path:
    pytest.importorskip("onnxruntime")
    shutil.copytree(MODEL_REPOSITORY / "add_sub_autocomplete", tmp_path / "add_sub_autocomplete")
    if config is not None:
        (tmp_path / "add_sub_autocomplete" / "config.pbtxt").write_text(config)
    return tmp_path


def _shapes(tensors) -> dict[str, tuple[int, list[int]]]:
    return {t.name: (t.data_type, list(t.dims)) for t in tensors}


def test_auto_complete_add_sub_defaults(tmp_path: Path) -> None:
    config = load(add_sub_repo(tmp_path), "add_sub_autocomplete")
    assert config.name == "add_sub_autocomplete"
    assert config.backend == "onnxruntime"
    assert config.platform == "onnxruntime_onnx"
    assert config.default_model_filename == "model.onnx"
    assert config.max_batch_size == 4
    assert _shapes(config.input) == {"INPUT0": (mc.TYPE_FP32, [4]), "INPUT1": (mc.TYPE_FP32, [4])}
    assert _shapes(config.output) == {"OUTPUT0": (mc.TYPE_FP32, [4]), "OUTPUT1": (mc.TYPE_FP32, [4])}
    assert config.HasField("dynamic_batching")
    assert [(g.kind, g.count) for g in config.instance_group] == [(mc.ModelInstanceGroup.KIND_CPU, 2)]


@pytest.mark.parametrize("backend_config", [{"onnxruntime": {"default-max-batch-size": "8"}},
                                            {"": {"default-max-batch-size": "8"}}], ids=["per_backend", "global"])
def test_auto_complete_default_max_batch_size_setting(tmp_path: Path, backend_config) -> None:
    config = load(add_sub_repo(tmp_path), "add_sub_autocomplete", backend_config=backend_config)
    assert config.max_batch_size == 8
    assert config.HasField("dynamic_batching")


def test_auto_complete_other_backend_setting_does_not_apply(tmp_path: Path) -> None:
    config = load(add_sub_repo(tmp_path), "add_sub_autocomplete",
                  backend_config={"tensorrt": {"default-max-batch-size": "8"}})
    assert config.max_batch_size == 4


def test_auto_complete_keeps_explicit_max_batch_size(tmp_path: Path) -> None:
    config = load(add_sub_repo(tmp_path, "max_batch_size: 2\n"), "add_sub_autocomplete")
    assert config.max_batch_size == 2
    assert _shapes(config.input)["INPUT0"] == (mc.TYPE_FP32, [4])
    assert config.HasField("dynamic_batching")


def test_auto_complete_no_dynamic_batching_for_max_batch_size_1(tmp_path: Path) -> None:
    config = load(add_sub_repo(tmp_path, "max_batch_size: 1\n"), "add_sub_autocomplete")
    assert config.max_batch_size == 1
    assert config.WhichOneof("scheduling_choice") is None


def test_auto_complete_fills_only_the_missing_side(tmp_path: Path) -> None:
    text = ('max_batch_size: 4\ninput [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ 4 ] },'
            ' { name: "INPUT1" data_type: TYPE_FP32 dims: [ 4 ] optional: true } ]\n')
    config = load(add_sub_repo(tmp_path, text), "add_sub_autocomplete")
    assert [t.name for t in config.input] == ["INPUT0", "INPUT1"]
    assert config.input[1].optional is True  # what the config said is left alone
    assert _shapes(config.output) == {"OUTPUT0": (mc.TYPE_FP32, [4]), "OUTPUT1": (mc.TYPE_FP32, [4])}


def test_auto_complete_skipped_when_config_is_complete(tmp_path: Path) -> None:
    text = ('max_batch_size: 0\ninput [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ -1, 4 ] },'
            ' { name: "INPUT1" data_type: TYPE_FP32 dims: [ -1, 4 ] } ]\n'
            'output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ -1, 4 ] },'
            ' { name: "OUTPUT1" data_type: TYPE_FP32 dims: [ -1, 4 ] } ]\n')
    config = load(add_sub_repo(tmp_path, text), "add_sub_autocomplete")
    assert config.max_batch_size == 0
    assert config.WhichOneof("scheduling_choice") is None


def test_disable_auto_complete(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load(add_sub_repo(tmp_path), "add_sub_autocomplete", disable_auto_complete_config=True)
    assert "add_sub_autocomplete" in str(info.value)
    assert "input" in str(info.value)


def test_auto_complete_non_batchable_model(tmp_path: Path) -> None:
    write_model(tmp_path, "fixed", None, files={"1/model.onnx": onnx_identity_bytes([2, 3])})
    config = load(tmp_path, "fixed")
    assert config.backend == "onnxruntime"
    assert config.max_batch_size == 0
    assert _shapes(config.input) == {"x": (mc.TYPE_FP32, [2, 3])}
    assert _shapes(config.output) == {"y": (mc.TYPE_FP32, [2, 3])}
    assert config.WhichOneof("scheduling_choice") is None


def test_auto_complete_rejects_batching_for_non_batchable_model(tmp_path: Path) -> None:
    write_model(tmp_path, "fixed", "max_batch_size: 4\n", files={"1/model.onnx": onnx_identity_bytes([2, 3])})
    with pytest.raises(ConfigError) as info:
        load(tmp_path, "fixed")
    assert "autofill failed" in str(info.value)
    assert "fixed" in str(info.value)


def test_auto_complete_scalar_per_batch_item(tmp_path: Path) -> None:
    write_model(tmp_path, "scalar", None, files={"1/model.onnx": onnx_identity_bytes(["N"], "INT64")})
    config = load(tmp_path, "scalar")
    assert config.max_batch_size == 4
    for tensor in (config.input[0], config.output[0]):
        assert tensor.data_type == mc.TYPE_INT64
        assert list(tensor.dims) == [1]
        assert tensor.HasField("reshape") and list(tensor.reshape.shape) == []


def test_auto_complete_broken_model_file(tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    write_model(tmp_path, "bad", 'backend: "onnxruntime"\n', files={"1/model.onnx": b"not an onnx file"})
    with pytest.raises(ConfigError) as info:
        load(tmp_path, "bad")
    assert str(tmp_path / "bad" / "1" / "model.onnx") in str(info.value)


def test_instance_and_warmup_counts_are_bounded(tmp_path) -> None:
    """A config (or load override) cannot ask for 100,000 instances or a warmup that never ends."""
    from server.core.warmup import MAX_COUNT, build_samples
    from server.repository.config import MAX_INSTANCES

    repo = tmp_path
    text = identity_config("many", [("INPUT0", "FP32", [2])]) + \
        f"instance_group [ {{ kind: KIND_CPU count: {MAX_INSTANCES + 1} }} ]\n"
    write_model(repo, "many", text)
    with pytest.raises(ConfigError, match=f"asks for {MAX_INSTANCES + 1} instances"):
        load_model_config(scan_model_dir(repo / "many"), Settings(model_repositories=(repo,)))
    config = mc.ModelConfig()
    text_format.Parse(f'model_warmup [ {{ name: "w" batch_size: 1 count: {MAX_COUNT + 1} '
                      'inputs { key: "INPUT0" value: { data_type: TYPE_FP32 dims: [ 2 ] zero_data: true } } } ]',
                      config)
    info = {"INPUT0": TensorInfo.from_spec(TensorSpec("INPUT0", "FP32", (2,)), 0)}
    with pytest.raises(ConfigError, match="count .* is over"):
        build_samples(config.model_warmup, info, repo, 0, "config.pbtxt")
