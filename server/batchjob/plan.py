"""Dataset columns -> the model's input tensors, checked once with messages that say what to fix."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from server.batchjob.errors import BatchError
from server.batchjob.readers import NPY_COLUMN
from server.batchjob.target import Target, TensorSig


def _dims_text(dims: Sequence[int]) -> str:
    return "[" + ",".join(str(d) for d in dims) + "]"


def _fits(dims: tuple[int, ...], want: tuple[int, ...]) -> bool:
    return len(dims) == len(want) and all(w == -1 or w == d for w, d in zip(want, dims, strict=True))


class InputPlan:
    """Which dataset column feeds which model input, and the checks every chunk passes."""

    def __init__(self, target: Target, columns: Sequence[str], source: str) -> None:
        self.target = target
        for sig in (*target.inputs, *target.outputs):
            if sig.datatype == "BYTES":
                raise BatchError(f"model '{target.name}': {sig.name} is a BYTES (string) tensor; "
                                 "nereid batch scores numeric tensors only")
        self.columns: dict[str, str] = {}  # input name -> column name
        if tuple(columns) == (NPY_COLUMN,):
            required = [s for s in target.inputs if s.name not in target.optional]
            if len(required) != 1:
                raise BatchError(f"'{source}' is a .npy file (one array) but model '{target.name}' takes "
                                 f"{len(target.inputs)} inputs {[s.name for s in target.inputs]}; use .npz, "
                                 "Parquet or JSON lines with one column per input")
            self.columns[required[0].name] = NPY_COLUMN
            return
        for sig in target.inputs:
            if sig.name in columns:
                self.columns[sig.name] = sig.name
            elif sig.name not in target.optional:
                raise BatchError(f"'{source}' has no column for input '{sig.name}' of model '{target.name}'; "
                                 f"its columns are {list(columns)}")

    @property
    def wanted_columns(self) -> list[str]:
        return list(self.columns.values())

    def prepare(self, data: dict[str, Any], start: int) -> dict[str, np.ndarray]:
        """One chunk's input tensors (rows first), each checked against the model's dtype and dims."""
        out: dict[str, np.ndarray] = {}
        by_name = {s.name: s for s in self.target.inputs}
        for name, column in self.columns.items():
            out[name] = self._check(by_name[name], data[column], start)
        return out

    def _check(self, sig: TensorSig, values: Any, start: int) -> np.ndarray:
        want = sig.dtype
        if isinstance(values, np.ndarray):
            if values.dtype != want and not np.can_cast(values.dtype, want, "safe"):
                raise BatchError(f"input '{sig.name}': the dataset holds {values.dtype}, model "
                                 f"'{self.target.name}' expects {sig.datatype} ({want}); convert the column")
            array = values.astype(want, copy=False)
        else:  # JSON values: numbers (or nested lists), cast to the model's type
            try:
                array = np.asarray(values, dtype=want)
            except (ValueError, TypeError, OverflowError) as exc:
                raise BatchError(f"input '{sig.name}' (rows from {start + 1}): cannot be read as "
                                 f"{sig.datatype}: {exc}") from None
        if array.ndim == 1 and sig.dims in ((1,), (-1,)):  # a column of scalars into dims [1]
            array = array.reshape(-1, 1)
        if not _fits(tuple(array.shape[1:]), sig.dims):
            raise BatchError(f"input '{sig.name}': each row has shape {_dims_text(array.shape[1:])}, model "
                             f"'{self.target.name}' expects {_dims_text(sig.dims)}")
        return np.ascontiguousarray(array)
