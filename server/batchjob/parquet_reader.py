"""Parquet datasets (pyarrow), one row group at a time; a column per input."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from server.batchjob.errors import BatchError


def _column_to_numpy(column: Any) -> np.ndarray:
    """A Parquet column of scalars -> shape (n,); of (nested) lists -> (n, d1, d2, ...)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    n = len(column)
    shape = [n]
    while pa.types.is_list(column.type) or pa.types.is_large_list(column.type) or \
            pa.types.is_fixed_size_list(column.type):
        if n and column.null_count:
            raise ValueError("null rows are not supported")
        lengths = pc.list_value_length(column)
        low, high = pc.min(lengths).as_py(), pc.max(lengths).as_py()
        if low != high:
            raise ValueError(f"rows are lists of different lengths ({low} to {high})")
        column = column.flatten()
        shape.append(int(low or 0))
    if column.null_count:
        raise ValueError("null values are not supported")
    values = column.to_numpy(zero_copy_only=False)
    return np.asarray(values).reshape(shape)


class ParquetReader:
    """Reads one row group at a time (the unit Parquet decodes), only the model's columns.
    pyarrow's iter_batches was measured holding every batch it had decoded (Arrow's allocation
    grew with the file), reading row group by row group stays at one group's size."""

    kind = "parquet"

    def __init__(self, path: Path) -> None:
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise BatchError("Parquet needs pyarrow: pip install 'nereid[batch]'") from None
        self._file = pq.ParquetFile(path)
        meta = self._file.metadata
        self.rows = int(meta.num_rows)
        self.columns = tuple(self._file.schema_arrow.names)
        self._starts = np.cumsum([0] + [meta.row_group(i).num_rows for i in range(meta.num_row_groups)])
        self._wanted: list[str] | None = None
        self._table: Any = None  # the rows [self._at, ...) of the row group read last
        self._group = 0  # the next row group to read
        self._at = 0

    def select(self, columns: list[str]) -> None:
        """Read only these columns (the model's inputs)."""
        self._wanted = columns

    def read(self, start: int, stop: int) -> dict[str, Any]:
        import pyarrow as pa

        if self._table is None or start < self._at or start >= self._at + len(self._table):
            self._group = int(np.searchsorted(self._starts, start, side="right")) - 1
            self._table, self._at = None, int(self._starts[self._group])
        pieces = []
        while start < stop:
            if self._table is None or start >= self._at + len(self._table):
                if self._table is not None:
                    self._at += len(self._table)
                self._table = self._file.read_row_group(self._group, columns=self._wanted, use_threads=False)
                self._group += 1
            take = min(stop, self._at + len(self._table)) - start
            pieces.append(self._table.slice(start - self._at, take))
            start += take
        piece = pa.concat_tables(pieces) if len(pieces) > 1 else pieces[0]
        return {name: _column_to_numpy(piece.column(name)) for name in piece.column_names}

    def close(self) -> None:
        self._table = None
