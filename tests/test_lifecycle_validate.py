"""`nereid validate PATH`: one line per problem naming the file, non-zero exit on any error."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from lifecycle_util import add_config, add_model_bytes
from util import MODEL_REPOSITORY, PYTHON, ROOT, identity_config, scaled, write_model


def _validate(*args: str | Path) -> tuple[int, list[str]]:
    proc = subprocess.run([PYTHON, "-m", "server.cli", "validate", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=scaled(120))
    return proc.returncode, proc.stdout.strip().splitlines()


def test_example_repository_is_valid() -> None:
    pytest.importorskip("onnxruntime")
    code, lines = _validate(MODEL_REPOSITORY)
    assert code == 0, lines
    assert lines[-1].endswith("0 error(s), 0 warning(s)")


def test_problems_are_one_line_each_naming_the_file(tmp_path: Path) -> None:
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    repo, other = tmp_path / "repo", tmp_path / "other"
    tensors = [("INPUT0", "FP32", [4])]
    write_model(repo, "good", add_config("good"), files={"1/model.onnx": add_model_bytes(1.0)})
    write_model(repo, "parse_error", 'name: "parse_error"\ninput [ {\n')
    write_model(repo, "missing_file", add_config("missing_file"))
    write_model(repo, "wrong_type", add_config("wrong_type").replace("TYPE_FP32", "TYPE_INT32", 1),
                files={"1/model.onnx": add_model_bytes(1.0)})
    write_model(repo, "wrong_dims", add_config("wrong_dims").replace("dims: [ 4 ] }}", "dims: [ 5 ] }}", 1)
                .replace('dims: [ 4 ] } ]\noutput', 'dims: [ 5 ] } ]\noutput'),
                files={"1/model.onnx": add_model_bytes(1.0)})
    write_model(repo, "unknown_backend", identity_config("unknown_backend", tensors).replace(
        'backend: "identity"', 'backend: "warp_drive"'))
    write_model(repo, "bad_warmup", identity_config("bad_warmup", tensors, extra=(
        'model_warmup [ { name: "w" inputs { key: "INPUT0" value: { data_type: TYPE_FP32 dims: [ 4 ] '
        'input_data_file: "absent.bin" } } } ]\n')))
    write_model(repo, "no_load", identity_config("no_load", tensors, execute_delay_ms=-5).replace(
        'string_value: "-5"', 'string_value: "later"'))
    write_model(repo, "leading_zero", identity_config("leading_zero", tensors), versions=(1, "01"))
    write_model(other, "good", identity_config("good", tensors))

    code, lines = _validate(repo, other)
    assert code == 1
    problems, summary = lines[:-1], lines[-1]
    by_model: dict[str, list[str]] = {}
    for line in problems:
        model = Path(line.split(":", 1)[0]).relative_to(tmp_path).parts[1]
        by_model.setdefault(model, []).append(line)
    assert "good" not in by_model or all(str(other) in line for line in by_model["good"])

    def one(model: str, path: Path, *needles: str, severity: str = "error") -> None:
        lines_ = by_model.pop(model)
        assert len(lines_) == 1, lines_
        assert lines_[0].startswith(f"{path}: {severity}: "), lines_[0]
        for needle in needles:
            assert needle in lines_[0], lines_[0]

    one("parse_error", repo / "parse_error" / "config.pbtxt", "2:9")
    one("missing_file", repo / "missing_file" / "1" / "model.onnx", "does not exist")
    one("wrong_type", repo / "wrong_type" / "1" / "model.onnx", "input 'INPUT0'", "INT32", "FP32")
    one("wrong_dims", repo / "wrong_dims" / "1" / "model.onnx", "input 'INPUT0'", "[5]", "[4]")
    one("unknown_backend", repo / "unknown_backend" / "config.pbtxt", "warp_drive")
    one("bad_warmup", repo / "bad_warmup" / "config.pbtxt", "model_warmup 'w'", "absent.bin")
    one("no_load", repo / "no_load" / "1", "does not load on this machine", "execute_delay_ms")
    one("leading_zero", repo / "leading_zero" / "01", "ignored", severity="warning")
    one("good", other / "good", "also appears in")
    assert not by_model, by_model
    assert summary.startswith("checked 9 model(s)") and summary.endswith("8 error(s), 1 warning(s)")


def test_no_load_skips_loading(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    write_model(repo, "no_load", identity_config("no_load", [("INPUT0", "FP32", [4])], execute_delay_ms=1)
                .replace('string_value: "1"', 'string_value: "later"'))
    assert _validate(repo, "--no-load")[0] == 0
    code, lines = _validate(repo)
    assert code == 1 and "does not load on this machine" in lines[0]


def test_missing_repository(tmp_path: Path) -> None:
    code, lines = _validate(tmp_path / "nope")
    assert code == 1 and lines[0] == f"{tmp_path / 'nope'}: error: model repository is not a directory"
