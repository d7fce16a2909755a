"""Chunk parts while the job runs, and the final output assembled from them at the end.

Every chunk's outputs go to one uncompressed `.npz` part (exact bytes, any dtype, cheap to
write); when every chunk is done the parts are streamed, in row order, into the output file in
the input's kind: `.npz` (one array per output), Parquet (one column per output, one row group
per part) or JSON lines (one object per row). The output is written to a temporary name and
renamed, so a file at the output path is always complete.
"""

from __future__ import annotations

import json
import os
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from server.batchjob.target import TensorSig

_EPOCH = (1980, 1, 1, 0, 0, 0)
OUTPUT_EXT = {"npy": "npz", "npz": "npz", "parquet": "parquet", "jsonl": "jsonl"}


def output_path(source: Path, model: str, kind: str) -> Path:
    """`<input>.<model>.out.<ext>` beside the input."""
    return source.with_name(f"{source.name}.{model}.out.{OUTPUT_EXT[kind]}")


def write_part(path: Path, outputs: dict[str, np.ndarray]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as handle:
        np.savez(handle, **outputs)  # type: ignore[arg-type]
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def assemble(kind: str, parts: Sequence[Path], outputs: Sequence[TensorSig], rows: int, dest: Path) -> None:
    tmp = dest.with_name(dest.name + ".tmp")
    if OUTPUT_EXT[kind] == "npz":
        _assemble_npz(parts, outputs, rows, tmp)
    elif kind == "parquet":
        _assemble_parquet(parts, outputs, tmp)
    else:
        _assemble_jsonl(parts, outputs, tmp)
    os.replace(tmp, dest)


def _assemble_npz(parts: Sequence[Path], outputs: Sequence[TensorSig], rows: int, tmp: Path) -> None:
    """An .npz np.load reads as np.savez's: each output one stored .npy member, its header
    written first with the full row count, then the parts' bytes appended in order."""
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
        for sig in outputs:
            info = zipfile.ZipInfo(f"{sig.name}.npy", date_time=_EPOCH)  # fixed: a rerun gives the same bytes
            with archive.open(info, "w", force_zip64=True) as member:
                header_written = False
                for part in parts:
                    with np.load(part) as data:
                        array = np.ascontiguousarray(data[sig.name])
                    if not header_written:
                        header = {"descr": np.lib.format.dtype_to_descr(array.dtype), "fortran_order": False,
                                  "shape": (rows, *array.shape[1:])}
                        np.lib.format.write_array_header_2_0(member, header)
                        header_written = True
                    member.write(array.tobytes())
                if not header_written:  # no rows at all
                    empty = np.zeros((0, *[max(d, 0) for d in sig.dims]), sig.dtype)
                    np.lib.format.write_array(member, empty)


def _arrow_array(array: np.ndarray) -> object:
    import pyarrow as pa

    flat = pa.array(np.ascontiguousarray(array).reshape(-1))
    for size in reversed(array.shape[1:]):
        flat = pa.FixedSizeListArray.from_arrays(flat, size)
    return flat


def _assemble_parquet(parts: Sequence[Path], outputs: Sequence[TensorSig], tmp: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    writer = None
    try:
        for part in parts:
            with np.load(part) as data:
                table = pa.table({sig.name: _arrow_array(data[sig.name]) for sig in outputs})
            if writer is None:
                writer = pq.ParquetWriter(tmp, table.schema)
            writer.write_table(table)
        if writer is None:
            empty = {sig.name: pa.array(np.zeros(0, sig.dtype)) for sig in outputs}
            pq.write_table(pa.table(empty), tmp)
    finally:
        if writer is not None:
            writer.close()


def _assemble_jsonl(parts: Sequence[Path], outputs: Sequence[TensorSig], tmp: Path) -> None:
    """One object per row; floats as the shortest text that reads back to the same value."""
    with open(tmp, "w", encoding="utf-8") as handle:
        for part in parts:
            with np.load(part) as data:
                columns = {sig.name: data[sig.name].tolist() for sig in outputs}
            names = list(columns)
            lines = [json.dumps(dict(zip(names, row, strict=True)), separators=(",", ":"))
                     for row in zip(*columns.values(), strict=True)]
            if lines:
                handle.write("\n".join(lines) + "\n")
