"""The model a batch job scores, described by what both scorers can learn about it.

The remote scorer fills it from ModelMetadata and ModelConfig, the in-process one from the
loaded Model; the rest of the job sees only this, so it cannot tell the two apart.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from backends.datatypes import NUMPY_OF


@dataclass(frozen=True)
class TensorSig:
    name: str
    datatype: str  # protocol name: FP32, INT64, ...
    dims: tuple[int, ...]  # without the batch dim; -1 for any

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(NUMPY_OF[self.datatype])


@dataclass(frozen=True)
class Target:
    name: str
    version: str  # the version that answers ("" before it is known)
    max_batch_size: int  # 0: the model does not batch; each row is one request
    inputs: tuple[TensorSig, ...]
    outputs: tuple[TensorSig, ...]
    optional: frozenset[str] = frozenset()

    def rows_per_request(self, batch_size: int) -> int:
        """Rows one request carries: --batch-size, capped by the model's max_batch_size."""
        if self.max_batch_size <= 0:
            return 1
        return max(1, min(batch_size, self.max_batch_size))
