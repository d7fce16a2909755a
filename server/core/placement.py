"""Where each model instance runs: a pure function of `instance_group` and the visible GPUs.

Triton's rules, computed once so config normalisation, loading and the tests agree:

- KIND_CPU: `count` instances in total, all on the CPU.
- KIND_GPU: `count` instances on EACH listed GPU (`gpus`, default every visible GPU).
  No visible GPU, or a listed GPU that is not visible, fails the model's load with
  a reason (never a silent fallback to the CPU: that would hide a misconfigured node).
- KIND_AUTO: GPU placement when a GPU is visible and the backend can use one, else
  CPU. Config normalisation resolves AUTO (`resolve_kind`) so that the config the
  ModelConfig RPC returns says where the instances really are.
- KIND_MODEL: the model places itself (Triton passes no device); CPU device 0 here.

`visible_gpus()` is the only impure part; it is cached and never imports a framework.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from tritonclient.grpc import model_config_pb2 as mc

from backends.base import BackendError, Device

log = logging.getLogger("nereid.placement")

KIND_AUTO = mc.ModelInstanceGroup.KIND_AUTO
KIND_GPU = mc.ModelInstanceGroup.KIND_GPU
KIND_CPU = mc.ModelInstanceGroup.KIND_CPU
KIND_MODEL = mc.ModelInstanceGroup.KIND_MODEL


class PlacementError(BackendError):
    """The instance groups ask for devices this machine does not have."""


@dataclass(frozen=True)
class Placement:
    """One instance: its group, its index within the group, its name and its device."""

    group: str
    index: int
    name: str
    device: Device


def resolve_kind(kind: int, gpus: Sequence[int], visible: Sequence[int], backend_uses_gpu: bool) -> int:
    """KIND_AUTO becomes KIND_GPU when the listed (or any) GPUs are visible and the backend
    can use them, else KIND_CPU. Other kinds are returned unchanged."""
    if kind != KIND_AUTO:
        return kind
    wanted = list(gpus) or list(visible)
    if backend_uses_gpu and wanted and all(g in visible for g in wanted):
        return KIND_GPU
    return KIND_CPU


def place_group(group: mc.ModelInstanceGroup, visible: Sequence[int], backend_uses_gpu: bool = True) -> list[Placement]:
    """The instances of one (normalised) instance group, in load order."""
    kind = resolve_kind(group.kind, group.gpus, visible, backend_uses_gpu)
    count = max(int(group.count), 1)
    if kind != KIND_GPU:
        devices = [Device("CPU", 0)] * count
    else:
        gpus = list(group.gpus) or list(visible)
        if not visible:
            raise PlacementError(
                f"instance group '{group.name}' asks for KIND_GPU but no CUDA device is visible to the server "
                "(no driver, no GPU, or CUDA_VISIBLE_DEVICES hides them); use KIND_CPU or KIND_AUTO"
            )
        missing = [g for g in gpus if g not in visible]
        if missing:
            raise PlacementError(
                f"instance group '{group.name}' lists GPU(s) {missing}, but the visible GPUs are {list(visible)}"
            )
        devices = [Device("GPU", g) for g in gpus for _ in range(count)]
    total = len(devices)
    return [
        Placement(group.name, i, f"{group.name}_{i}" if total > 1 else group.name, device)
        for i, device in enumerate(devices)
    ]


def place_instances(
    groups: Iterable[mc.ModelInstanceGroup], visible: Sequence[int], backend_uses_gpu: bool = True
) -> list[Placement]:
    """Every instance of a model, group after group."""
    placements: list[Placement] = []
    for group in groups:
        placements.extend(place_group(group, visible, backend_uses_gpu))
    return placements


# -- discovering the GPUs (impure, cached) --


@functools.lru_cache(maxsize=1)
def visible_gpus() -> tuple[int, ...]:
    """CUDA ordinals this process can use, honouring CUDA_VISIBLE_DEVICES; () without a GPU.

    Asks torch if something already imported it, else the CUDA driver (libcuda, which
    applies CUDA_VISIBLE_DEVICES itself), else nvidia-smi. Never imports a framework:
    that would cost seconds and memory on servers that do not use it.
    """
    for probe in (_from_torch, _from_driver, _from_nvidia_smi):
        try:
            count = probe()
        except Exception as exc:  # a broken driver install must not stop the server
            log.debug("GPU probe %s failed: %s", probe.__name__, exc)
            continue
        if count is not None:
            return tuple(range(count))
    return ()


def _from_torch() -> int | None:
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    return int(torch.cuda.device_count())


def _from_driver() -> int | None:
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    if cuda.cuInit(0) != 0:
        return 0
    count = ctypes.c_int(0)
    if cuda.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return 0
    return count.value


def _from_nvidia_smi() -> int | None:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    out = subprocess.run([exe, "-L"], capture_output=True, text=True, timeout=10, check=False).stdout
    physical = sum(1 for line in out.splitlines() if line.startswith("GPU "))
    mask = os.environ.get("CUDA_VISIBLE_DEVICES")
    if mask is None:
        return physical
    entries = [e for e in mask.split(",") if e.strip()]
    if not entries or entries[0].strip() == "-1":
        return 0
    return min(len(entries), physical)
