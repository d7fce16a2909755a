"""`model_warmup`: run sample requests through every instance before the model turns READY.

The first executions of a model are often slow (lazy allocations, kernel
selection, caches), and without warmup the first real clients pay for them.
Samples follow Triton's config: `batch_size`, `count` (0 means once), and per
input `zero_data`, `random_data` or `input_data_file` (raw row-major bytes in
`<model>/warmup/`; BYTES elements as a 4-byte little-endian length plus bytes;
one sample's worth is repeated over the batch, as Triton does). Samples are
built and checked once (`build_samples`, also used by `nereid validate`), then
run directly on each backend before the instance threads start, so no request
can reach an instance that has not warmed up. Any failure fails the load with
a reason that names the sample and the instance.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from time import perf_counter

import numpy as np
from tritonclient.grpc import model_config_pb2 as mc

from backends.base import BackendError
from backends.datatypes import config_to_protocol
from server.confine import confine, require_regular
from server.core.instance import OutputShaper
from server.core.signature import TensorInfo
from server.errors import ConfigError

log = logging.getLogger("nereid.warmup")

# Where a sample's `input_data_file` lives, under the model's folder (as in Triton). The
# repository checks these names against the same folder when it normalises a config.
WARMUP_DIR = "warmup"

# Executions per sample and instance at most (Triton has no bound): a count of 10^9 in a config or
# load override would keep a loader thread busy for good and the model never READY.
MAX_COUNT = 10_000

Execute = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]


@dataclass(frozen=True)
class WarmupSample:
    name: str
    batch_size: int
    count: int  # executions per instance (at least 1)
    inputs: dict[str, np.ndarray]  # API shapes: with the batch dimension when the model batches


def _decode_bytes(data: bytes, where: str) -> list[bytes]:
    items, offset = [], 0
    while offset < len(data):
        if offset + 4 > len(data):
            raise ConfigError(f"{where}: truncated BYTES element length at byte {offset}")
        length = int.from_bytes(data[offset:offset + 4], "little")
        offset += 4
        if offset + length > len(data):
            raise ConfigError(f"{where}: BYTES element of {length} bytes runs past the end of the file")
        items.append(data[offset:offset + length])
        offset += length
    return items


def _from_file(info: TensorInfo, relpath: str, model_dir: Path, shape: tuple[int, ...], batch: int) -> np.ndarray:
    field = f"input '{info.name}' input_data_file"
    if not relpath:
        raise ConfigError(f"{field} is empty; name a file inside <model>/{WARMUP_DIR}/")
    # The same check as config normalisation (config_paths.py): inside <model>/warmup/, symlinks
    # followed, a regular file (a FIFO would block the loader forever).
    path = confine(model_dir, relpath, field, base=WARMUP_DIR, keep_in_base=True)
    require_regular(path, field, relpath)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read warmup data for input '{info.name}': {exc.strerror}") from exc
    total = math.prod(shape)
    one = total // batch if batch else total
    if info.datatype == "BYTES":
        items = _decode_bytes(data, str(path))
        if len(items) == one and batch > 1:
            items = items * batch
        if len(items) != total:
            raise ConfigError(f"{path}: warmup input '{info.name}' needs {one} BYTES element(s) per batch item "
                              f"(shape {list(shape)}), the file holds {len(items)}")
        arr = np.empty(total, dtype=object)
        arr[:] = items
        return arr.reshape(shape)
    size = info.dtype.itemsize
    if len(data) == one * size and batch > 1:
        data = data * batch
    if len(data) != total * size:
        raise ConfigError(f"{path}: warmup input '{info.name}' needs {one * size} bytes per batch item "
                          f"({one} {info.datatype} element(s)), the file holds {len(data)}")
    return np.frombuffer(data, dtype=info.dtype).reshape(shape)


def _random(info: TensorInfo, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    if info.datatype == "BYTES":  # as Triton: strings get zero data (empty elements)
        arr = np.empty(shape, dtype=object)
        arr.fill(b"")
        return arr
    if info.datatype == "BF16":  # the top half of random float32s
        return (rng.random(shape, dtype=np.float32).view(np.uint32) >> 16).astype("<u2")
    if info.dtype.kind == "b":
        return rng.integers(0, 2, size=shape).astype(np.bool_)
    if info.dtype.kind in "iu":  # small values: safe as indices, lengths and ids
        return rng.integers(0, 8, size=shape).astype(info.dtype)
    return rng.random(shape).astype(info.dtype)


def _zeros(info: TensorInfo, shape: tuple[int, ...]) -> np.ndarray:
    if info.datatype == "BYTES":
        arr = np.empty(shape, dtype=object)
        arr.fill(b"")
        return arr
    return np.zeros(shape, dtype=info.dtype)


def build_samples(
    warmups: Sequence[mc.ModelWarmup], inputs: Mapping[str, TensorInfo], model_dir: Path, max_batch_size: int,
    where: str = "config.pbtxt", seed: int = 0,
) -> list[WarmupSample]:
    """Turn the config's `model_warmup` into tensors; every inconsistency is a ConfigError naming the sample."""
    rng = np.random.default_rng(seed)
    samples = []
    for index, warmup in enumerate(warmups):
        label = f"{where}: model_warmup '{warmup.name or index}'"
        batch = max(int(warmup.batch_size), 1)
        if max_batch_size == 0 and batch > 1:
            raise ConfigError(f"{label}: batch_size {batch} but the model does not batch (max_batch_size 0)")
        if max_batch_size and batch > max_batch_size:
            raise ConfigError(f"{label}: batch_size {batch} exceeds max_batch_size {max_batch_size}")
        missing = [n for n, i in inputs.items() if not i.optional and n not in warmup.inputs]
        if missing:
            raise ConfigError(f"{label}: no data for required input(s) {missing}")
        tensors: dict[str, np.ndarray] = {}
        for name, spec in sorted(warmup.inputs.items()):
            info = inputs.get(name)
            if info is None:
                raise ConfigError(f"{label}: '{name}' is not an input of the model (inputs: {sorted(inputs)})")
            datatype = config_to_protocol(mc.DataType.Name(spec.data_type))
            if datatype != info.datatype:
                raise ConfigError(f"{label}: input '{name}' has data_type {datatype}, the model input is "
                                  f"{info.datatype}")
            dims = tuple(int(d) for d in spec.dims)
            if len(dims) != len(info.dims) or any(d < 0 for d in dims) or any(
                    want not in (-1, got) for want, got in zip(info.dims, dims, strict=True)):
                raise ConfigError(f"{label}: input '{name}' dims {list(dims)} do not fit the model's dims "
                                  f"{list(info.dims)} (warmup dims must be concrete)")
            shape = ((batch,) if max_batch_size else ()) + dims
            which = spec.WhichOneof("input_data_type")
            if which == "input_data_file":
                try:
                    tensors[name] = _from_file(info, spec.input_data_file, model_dir, shape, batch)
                except ConfigError as exc:
                    raise ConfigError(f"{label}: {exc}") from exc
            elif which == "random_data":
                tensors[name] = _random(info, shape, rng)
            elif which == "zero_data":
                tensors[name] = _zeros(info, shape)
            else:
                raise ConfigError(f"{label}: input '{name}' sets none of zero_data, random_data, input_data_file")
        if warmup.count > MAX_COUNT:
            raise ConfigError(f"{label}: count {warmup.count} is over {MAX_COUNT} (a warmup that long never "
                              "lets the model become ready)")
        samples.append(WarmupSample(warmup.name or str(index), batch, max(int(warmup.count), 1), tensors))
    return samples


def run_warmup(
    label: str, samples: Sequence[WarmupSample], instances: Sequence[tuple[str, Execute]], shaper: OutputShaper,
    decoupled: bool = False,
) -> None:
    """Run every sample `count` times on every instance; raise BackendError naming what failed.
    A decoupled model's `execute` drains the request's responses up to the final flag and returns
    what they carried, which may be fewer outputs than the config lists (or none): those are checked."""
    for sample in samples:
        started = perf_counter()
        for instance_name, execute in instances:
            inputs = shaper.backend_inputs(sample.inputs, sample.batch_size)
            for _ in range(sample.count):
                try:
                    outputs = execute(inputs)
                    shaper.response(outputs, tuple(n for n in outputs if n in shaper.outputs) if decoupled else None)
                except Exception as exc:
                    raise BackendError(
                        f"model_warmup '{sample.name}' failed on instance {instance_name}: {exc}"
                    ) from exc
        log.info("model %s: warmup '%s' ran %d time(s) on %d instance(s) in %.1f ms", label, sample.name,
                 sample.count, len(instances), (perf_counter() - started) * 1000)
