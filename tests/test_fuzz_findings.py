"""Defects the fuzz suite (test_fuzz.py) found: a minimal reproducer each, kept as a regression
test once fixed.

A finding not fixed yet is marked xfail(strict=True) here and has an entry in
fuzz_harness.OPEN_FINDINGS (or OPEN_OUTSIDE_FINDINGS), which lets the fuzz tests tolerate exactly
what the finding describes and nothing else; when the fix lands, strict turns the passing
reproducer into a failure: then delete both.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from fuzz_harness import INFERENCE, Code, Target
from fuzz_overrides import io_config
from fuzz_repos import Explicit
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


@pytest.mark.parametrize("key", ["file:1/" + "n" * 256, "file:" + "n" * 256 + "/model.onnx",
                                 "file:1/" + "d/" * 2100 + "x"],
                         ids=["file_name_256_bytes", "folder_name_256_bytes", "path_over_4096_bytes"])
def test_override_key_too_long_for_the_file_system_is_invalid_argument(explicit, key: str) -> None:
    target, place = explicit
    request = pb.RepositoryModelLoadRequest(model_name="ld_id")
    request.parameters["config"].string_param = json.dumps(io_config("ld_id", "identity"))
    request.parameters[key].bytes_param = b"x"
    answer = target.unary(LOAD, request.SerializeToString())
    if answer.code == Code.OK:
        target.unary(UNLOAD, pb.RepositoryModelUnloadRequest(model_name="ld_id").SerializeToString())
    target.check_alive()
    assert not [p for p in place.tmp.iterdir() if p.name.startswith("nereid-override-")], "left behind"
    assert answer.code == Code.INVALID_ARGUMENT, answer
