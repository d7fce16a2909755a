"""Datasets read a row range at a time, never loaded whole.

`.npy` files and `.npz` members stored uncompressed (np.savez) are read with positioned reads
at their offset (inside the zip for .npz), compressed members (np.savez_compressed) as a
stream; Parquet one row group at a time; JSON lines one line at a time. Every reader
takes `read(start, stop)` calls in increasing order (the job reads chunks in order), so the
streaming ones only ever move forward, skipping what a resumed job already has.
"""

from __future__ import annotations

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
            from server.batchjob.parquet_reader import ParquetReader

            return ParquetReader(path)
        from server.batchjob.jsonl_reader import JsonlReader

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
