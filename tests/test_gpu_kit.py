"""The GPU verification kit (scripts/gpu_check) carries what the lent GPU machine lacks.

That machine reaches no network: a package the server or the GPU tests import that is neither
in its image nor carried as a wheel fails the whole run there, and a lent session has 15
minutes in all. It happened twice: `httptools` (the HTTP endpoint) and `tritonclient.http`'s
`geventhttpclient` (tests/test_cuda_shm_gpu.py) were added after the kit's list was written,
so every server start and the test collection would have failed on the next GPU run. Found by
running the kit in a Python venv holding only the image's packages; this test keeps the lists
in step with pyproject.toml from now on.
"""

from __future__ import annotations

import importlib.metadata
import re

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from test_image_dependencies import base_dependencies
from util import ROOT

# tritonclient's extras the server and the GPU tests import (grpc; http in test_cuda_shm_gpu.py;
# cuda: tritonclient.utils.cuda_shared_memory).
TRITONCLIENT_EXTRAS = ("grpc", "http", "cuda")


def _kit_list(variable: str) -> set[str]:
    text = (ROOT / "scripts" / "gpu_check").read_text()
    found = re.search(rf'^{variable}="([^"]*)"', text, re.M)
    assert found, f"scripts/gpu_check has no {variable}=\"...\" list"
    return {canonicalize_name(item.split("==")[0]) for item in found.group(1).split()}


def _applies(requirement: Requirement, extra: str = "") -> bool:
    return requirement.marker is None or requirement.marker.evaluate({"extra": extra})


def _requirements_of(name: str, extras: tuple[str, ...] = ("",)) -> list[Requirement]:
    try:
        requires = importlib.metadata.requires(name) or []
    except importlib.metadata.PackageNotFoundError:
        return []
    found = [Requirement(r) for r in requires]
    return [r for r in found if any(_applies(r, extra) for extra in extras)]


def test_every_dependency_is_on_the_gpu_image_or_carried() -> None:
    has, carried = _kit_list("GPU_IMAGE_HAS"), _kit_list("CARRIED")
    # pyproject.toml read without tomllib (3.11+): the suite runs on every version Nereid supports.
    todo = [Requirement(r) for r in base_dependencies()]
    todo = [r for r in todo if _applies(r)]
    todo += _requirements_of("tritonclient", TRITONCLIENT_EXTRAS)
    missing: set[str] = set()
    seen: set[str] = set()
    while todo:
        name = canonicalize_name(todo.pop().name)
        if name in seen:
            continue
        seen.add(name)
        if name in has:
            continue  # the image brings what it needs
        if name not in carried:
            missing.add(name)
            continue
        todo += _requirements_of(name)  # a carried wheel goes with --no-deps: its own needs too
    assert not missing, (f"neither on the GPU image nor carried by scripts/gpu_check: {sorted(missing)}; "
                         "add them to CARRIED (or, if the image has them, GPU_IMAGE_HAS)")


def test_the_kit_lists_are_read() -> None:
    """The parse above must see the lists (an empty one would pass everything)."""
    assert {"httptools", "grpcio", "geventhttpclient"} <= _kit_list("CARRIED")
    assert {"numpy", "pyyaml", "torch"} <= _kit_list("GPU_IMAGE_HAS")
