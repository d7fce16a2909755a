"""Datasets read a row range at a time, never loaded whole.

`.npy` files and `.npz` members stored uncompressed (np.savez) are read with positioned reads
at their offset (inside the zip for .npz), compressed members (np.savez_compressed) as a
stream; Parquet one row group at a time; JSON lines one line at a time. Every reader
takes `read(start, stop)` calls in increasing order (the job reads chunks in order), so the
streaming ones only ever move forward, skipping what a resumed job already has.
"""

from __future__ import annotations

import json
import os
import struct
import zipfile
from pathlib import Path
from typing import IO, Any, Protocol

import numpy as np

from server.batchjob.errors import BatchError

KINDS = {".npy": "npy", ".npz": "npz", ".parquet": "parquet", ".pq": "parquet", ".jsonl": "jsonl",
         ".ndjson": "jsonl"}
NPY_COLUMN = ""  # a .npy file's one array: the model's one input, whatever its name


class Reader(Protocol):
    kind: str
    rows: int
    columns: tuple[str, ...]

    def read(self, start: int, stop: int) -> dict[str, Any]:
        """Rows [start, stop) of every column: numpy arrays (jsonl: lists of Python values)."""
        ...

    def close(self) -> None: ...


def dataset_kind(path: Path) -> str:
    kind = KINDS.get(path.suffix.lower())
    if kind is None:
        raise BatchError(f"'{path}': unknown dataset format '{path.suffix}'; expected one of "
                         f"{', '.join(sorted(KINDS))}")
    return kind


def open_dataset(path: Path) -> Reader:
    if not path.is_file():
        raise BatchError(f"'{path}': no such file")
    kind = dataset_kind(path)
    try:
        if kind == "npy":
            return NpyReader(path)
        if kind == "npz":
            return NpzReader(path)
        if kind == "parquet":
            return ParquetReader(path)
        return JsonlReader(path)
    except (ValueError, OSError, zipfile.BadZipFile) as exc:
        raise BatchError(f"'{path}': cannot read it as {kind}: {exc}") from None


class _NpyFile:
    """An uncompressed .npy array at `offset` in a file, read by positioned reads (os.pread):
    unlike a memory map, pages read stay out of this process's resident memory."""

    def __init__(self, path: Path, offset: int | None = None) -> None:
        self._fd = os.open(path, os.O_RDONLY)
        with open(path, "rb") as handle:
            handle.seek(offset or 0)
            version = np.lib.format.read_magic(handle)
            reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = reader(handle)
            self._data = handle.tell()
        if dtype.hasobject:
            raise ValueError("object arrays (pickled) are not supported")
        if fortran and len(shape) > 1:
            raise ValueError("Fortran-ordered arrays cannot be read by rows")
        if not shape:
            raise ValueError("a scalar array has no rows")
        self.shape, self.dtype = tuple(shape), dtype
        self._row_bytes = int(dtype.itemsize * int(np.prod(shape[1:], dtype=np.int64)))

    def read(self, start: int, stop: int) -> np.ndarray:
        want = (stop - start) * self._row_bytes
        data = bytearray()
        while len(data) < want:
            piece = os.pread(self._fd, want - len(data), self._data + start * self._row_bytes + len(data))
            if not piece:
                raise BatchError(f"the file ends before row {stop}")
            data += piece
        return np.frombuffer(data, self.dtype).reshape((stop - start, *self.shape[1:]))

    def close(self) -> None:
        os.close(self._fd)


class NpyReader:
    kind = "npy"

    def __init__(self, path: Path) -> None:
        self._array = _NpyFile(path)
        self.rows = int(self._array.shape[0])
        self.columns: tuple[str, ...] = (NPY_COLUMN,)

    def read(self, start: int, stop: int) -> dict[str, Any]:
        return {NPY_COLUMN: self._array.read(start, stop)}

    def close(self) -> None:
        self._array.close()


class _NpyStream:
    """One compressed .npz member read forward, a row's bytes at a time."""

    def __init__(self, handle: IO[bytes]) -> None:
        self._handle = handle
        version = np.lib.format.read_magic(handle)
        reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = reader(handle)
        if fortran and len(shape) > 1:
            raise ValueError("Fortran-ordered arrays cannot be streamed by rows")
        if dtype.hasobject:
            raise ValueError("object arrays (pickled) are not supported")
        self.shape, self.dtype = tuple(shape), dtype
        self._row_bytes = int(dtype.itemsize * int(np.prod(shape[1:], dtype=np.int64)))
        self._at = 0

    def read(self, start: int, stop: int) -> np.ndarray:
        skip = (start - self._at) * self._row_bytes
        while skip > 0:
            skip -= len(self._handle.read(min(skip, 1 << 24)))
        data = self._handle.read((stop - start) * self._row_bytes)
        self._at = stop
        return np.frombuffer(data, self.dtype).reshape((stop - start, *self.shape[1:])).copy()


def _stored_offset(path: Path, info: zipfile.ZipInfo) -> int:
    """Where an uncompressed .npz member's bytes (its .npy header) start inside the zip."""
    with open(path, "rb") as handle:
        handle.seek(info.header_offset)
        local = handle.read(30)
    name_len, extra_len = struct.unpack("<HH", local[26:30])
    return info.header_offset + 30 + name_len + extra_len


class NpzReader:
    kind = "npz"

    def __init__(self, path: Path) -> None:
        self._zip = zipfile.ZipFile(path)
        self._columns: dict[str, Any] = {}
        for info in self._zip.infolist():
            if not info.filename.endswith(".npy"):
                continue
            name = info.filename[:-4]
            if info.compress_type == zipfile.ZIP_STORED:
                self._columns[name] = _NpyFile(path, _stored_offset(path, info))
            else:
                self._columns[name] = _NpyStream(self._zip.open(info))
        if not self._columns:
            raise ValueError("no arrays in the archive")
        lengths = {name: int(col.shape[0]) if col.shape else 0 for name, col in self._columns.items()}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"arrays have different numbers of rows: {lengths}")
        self.rows = next(iter(lengths.values()))
        self.columns = tuple(self._columns)

    def read(self, start: int, stop: int) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, col in self._columns.items():
            out[name] = col.read(start, stop)
        return out

    def close(self) -> None:
        for col in self._columns.values():
            if isinstance(col, _NpyFile):
                col.close()
        self._columns.clear()
        self._zip.close()


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


class JsonlReader:
    kind = "jsonl"

    def __init__(self, path: Path) -> None:
        self._path = path
        self._handle = open(path, "rb")
        self.rows = self._count_rows()
        first = self._next_line()
        if first is None:
            self.columns: tuple[str, ...] = ()
        else:
            obj = self._parse(first, 1)
            self.columns = tuple(obj)
        self._handle.seek(0)
        self._line = 0  # rows consumed

    def _count_rows(self) -> int:
        count = 0
        last = b"\n"
        while block := self._handle.read(1 << 24):
            count += block.count(b"\n")
            last = block[-1:]
        self._handle.seek(0)
        blank = self._blank_lines()
        return count + (last != b"\n") - blank

    def _blank_lines(self) -> int:
        """Blank lines are not rows; they are only allowed at the end (a trailing newline)."""
        blank = 0
        for line in self._handle:
            if not line.strip():
                blank += 1
        self._handle.seek(0)
        return blank

    def _next_line(self) -> bytes | None:
        while True:
            line = self._handle.readline()
            if not line:
                return None
            if line.strip():
                return line

    def _parse(self, line: bytes, number: int) -> dict[str, Any]:
        try:
            obj = json.loads(line)
        except ValueError as exc:
            raise BatchError(f"'{self._path}' row {number}: not valid JSON: {exc}") from None
        if not isinstance(obj, dict):
            raise BatchError(f"'{self._path}' row {number}: expected an object keyed by input name, "
                             f"got {type(obj).__name__}")
        return obj

    def read(self, start: int, stop: int) -> dict[str, Any]:
        while self._line < start:
            if self._next_line() is None:
                break
            self._line += 1
        values: dict[str, list[Any]] = {name: [] for name in self.columns}
        for number in range(start, stop):
            line = self._next_line()
            if line is None:
                raise BatchError(f"'{self._path}': ended at row {number}, expected {self.rows} rows")
            obj = self._parse(line, number + 1)
            for name, column in values.items():
                if name not in obj:
                    raise BatchError(f"'{self._path}' row {number + 1}: no key '{name}' (the first row has "
                                     f"{list(self.columns)})")
                column.append(obj[name])
        self._line = stop
        return values

    def close(self) -> None:
        self._handle.close()
