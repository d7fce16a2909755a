"""Pure numpy helpers to merge requests into one batch and split the outputs back.

One `np.concatenate` per input and views to split: no per-element work.
"""

from __future__ import annotations

import numpy as np


def concat_inputs(requests: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Concatenate each named input along the batch dimension (request order kept)."""
    first = requests[0]
    return {name: np.concatenate([r[name] for r in requests], axis=0) for name in first}


def split_outputs(outputs: dict[str, np.ndarray], sizes: list[int]) -> list[dict[str, np.ndarray]]:
    """Split batched outputs into per-request views of `sizes` rows each."""
    parts: list[dict[str, np.ndarray]] = [{} for _ in sizes]
    for name, arr in outputs.items():
        if arr.shape[:1] != (sum(sizes),):
            raise ValueError(
                f"output '{name}' has shape {list(arr.shape)}; expected a leading batch dimension of {sum(sizes)}"
            )
        start = 0
        for part, size in zip(parts, sizes, strict=True):
            part[name] = arr[start:start + size]
            start += size
    return parts


def same_shapes(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    """Whether two requests may share a batch: same inputs, same non-batch dims."""
    if a.keys() != b.keys():
        return False
    return all(a[name].shape[1:] == b[name].shape[1:] for name in a)
