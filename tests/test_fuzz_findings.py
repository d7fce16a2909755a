"""Defects the fuzz suite (test_fuzz.py) found that are not fixed yet: a minimal reproducer each,
marked xfail(strict=True).

When a fix lands, its reproducer passes and strict turns that into a failure: then delete the
xfail marker here AND the finding's entry in fuzz_harness.OPEN_FINDINGS or
OPEN_OUTSIDE_FINDINGS, which meanwhile let the fuzz tests tolerate exactly what the finding
describes (and nothing else).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fuzz_harness import INFERENCE, Answer, Code, Target
from fuzz_repos import Explicit, absent
from fuzz_strategies import path_config
from tritonclient.grpc import service_pb2 as pb

LOAD = f"/{INFERENCE}/RepositoryModelLoad"
UNLOAD = f"/{INFERENCE}/RepositoryModelUnload"


@pytest.fixture(scope="module")
def explicit(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Target, Explicit]]:
    place = Explicit(tmp_path_factory.mktemp("fuzz_findings"))
    target = place.start()
    yield target, place
    target.channel.close()
    target.server.stop()


def load(target: Target, name: str, config: str | None = None) -> Answer:
    """RepositoryModelLoad; whatever it loaded is unloaded again."""
    request = pb.RepositoryModelLoadRequest(model_name=name)
    if config is not None:
        request.parameters["config"].string_param = config
    answer = target.unary(LOAD, request.SerializeToString())
    if answer.code == Code.OK:
        target.unary(UNLOAD, pb.RepositoryModelUnloadRequest(model_name=name).SerializeToString())
    return answer


@pytest.mark.xfail(strict=True, reason="finding: RepositoryModelLoad of a model name longer than a file name "
                   "(255 bytes) answers INTERNAL 'OSError(36, File name too long)' from a stat of the repository "
                   "path, and logs a traceback; issue 9 defect 8 wants INVALID_ARGUMENT")
@pytest.mark.parametrize("name", ["n" * 256, "\u00e9" * 128], ids=["256_ascii", "128_two_byte_chars"])
def test_load_of_a_name_longer_than_a_file_name_is_invalid_argument(explicit, name: str) -> None:
    target, _ = explicit
    answer = load(target, name)
    assert answer.code == Code.INVALID_ARGUMENT, answer
    target.check_alive()


# Issue 9 defect 1: every path a config override names must resolve inside the model's folder,
# or the load is INVALID_ARGUMENT before any file is opened, saying nothing about whether the
# path exists. Today default_model_filename is opened wherever it points.

@pytest.mark.xfail(strict=True, reason="finding (issue 9 defect 1): a config override whose default_model_filename "
                   "points outside the model folder (absolute, '..', or a symlink) makes the Python backend run "
                   "that file, and the load answers OK")
@pytest.mark.parametrize("style", ["absolute", "from_version", "symlink"])
def test_python_model_file_outside_the_model_folder_is_refused_and_never_run(explicit, style: str) -> None:
    target, place = explicit
    answer = load(target, "ld_py", path_config("ld_py", "python", "default_model_filename",
                                              place.path("secret.py", style)))
    ran = place.marker.exists()
    place.marker.unlink(missing_ok=True)
    assert not ran, f"the load ran {place.outside / 'secret.py'} (answer: {answer})"
    assert answer.code == Code.INVALID_ARGUMENT, answer


@pytest.mark.xfail(strict=True, reason="finding (issue 9 defect 1): an ONNX default_model_filename outside the "
                   "model folder is opened by onnxruntime, and the answer differs between a file that exists "
                   "('could not load ... Protobuf parsing failed') and one that does not ('does not exist')")
@pytest.mark.parametrize("style", ["absolute", "symlink"])
def test_onnx_model_file_outside_is_refused_without_reading_or_revealing_it(explicit, style: str) -> None:
    target, place = explicit
    answers = [load(target, "ld_onnx", path_config("ld_onnx", "onnxruntime", "default_model_filename",
                                                   place.path(name, style, "ld_onnx")))
               for name in ("secret.onnx", absent("secret.onnx"))]
    read = place.read_files()
    place.reset_atimes()
    exists, missing = answers
    assert exists.code == Code.INVALID_ARGUMENT, exists
    assert (exists.code, exists.details) == (missing.code, missing.details.replace(absent("secret.onnx"),
                                                                                   "secret.onnx")), answers
    assert not read, f"the load read {read}"


@pytest.mark.xfail(strict=True, reason="finding (issue 9 defect 1): a config override naming a file outside the "
                   "model folder in cc_model_filenames, label_filename, EXECUTION_ENV_PATH or (for a backend that "
                   "opens none) default_model_filename is accepted: the load answers OK")
@pytest.mark.parametrize("field", ["default_model_filename", "cc_model_filenames", "label_filename",
                                   "EXECUTION_ENV_PATH"])
def test_a_path_field_naming_a_file_outside_is_invalid_argument(explicit, field: str) -> None:
    target, place = explicit
    answer = load(target, "ld_id", path_config("ld_id", "identity", field, place.path("secret.txt", "absolute",
                                                                                     "ld_id")))
    assert answer.code == Code.INVALID_ARGUMENT, answer
