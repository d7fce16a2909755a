"""The manifest of a batch job: which row ranges are done, and for which input and model.

It lives in `<output>.parts/manifest.json` beside the chunk files and is replaced atomically
(write, fsync, rename) after each chunk's part file is in place, so after a crash every range it
lists has its part on disk; a part without an entry is simply scored again. A rerun with another
input file, model or chunk size refuses to mix the two unless told to start over (--restart).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from server.batchjob.errors import BatchError

FORMAT = 1


def fingerprint(source: Path, model: str, version: str, chunk_rows: int, rows: int) -> dict[str, Any]:
    stat = source.stat()
    return {"format": FORMAT, "input": str(source.resolve()), "input_bytes": stat.st_size,
            "input_mtime_ns": stat.st_mtime_ns, "model": model, "version": version,
            "chunk_rows": chunk_rows, "rows": rows}


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


class Checkpoint:
    def __init__(self, parts: Path, identity: dict[str, Any], restart: bool) -> None:
        self.parts = parts
        self.path = parts / "manifest.json"
        self.identity = identity
        self.done: set[int] = set()  # chunk start rows
        if restart and parts.exists():
            shutil.rmtree(parts)
        if self.path.exists():
            try:
                saved = json.loads(self.path.read_text(encoding="utf-8"))
            except ValueError as exc:
                raise BatchError(f"'{self.path}' is damaged ({exc}); rerun with --restart") from None
            mine = {k: v for k, v in saved.items() if k != "done"}
            if mine != identity:
                changed = sorted(k for k in set(mine) | set(identity) if mine.get(k) != identity.get(k))
                raise BatchError(f"'{self.path}' belongs to another job (differs in {', '.join(changed)}); "
                                 "rerun with --restart to discard it")
            for start, stop in saved["done"]:
                self.done.update(range(start, stop, identity["chunk_rows"]))
            self.done = {start for start in self.done if self.part(start).exists()}  # a part deleted: redo it
        parts.mkdir(parents=True, exist_ok=True)

    @property
    def resumed_rows(self) -> int:
        chunk, rows = self.identity["chunk_rows"], self.identity["rows"]
        return sum(min(chunk, rows - start) for start in self.done)

    def part(self, start: int) -> Path:
        return self.parts / f"part-{start:013d}.npz"

    def ranges(self) -> list[list[int]]:
        """The done chunks as merged [start, stop) row ranges."""
        chunk, rows = self.identity["chunk_rows"], self.identity["rows"]
        merged: list[list[int]] = []
        for start in sorted(self.done):
            stop = min(start + chunk, rows)
            if merged and merged[-1][1] == start:
                merged[-1][1] = stop
            else:
                merged.append([start, stop])
        return merged

    def mark(self, start: int) -> None:
        self.done.add(start)
        _write_atomic(self.path, json.dumps({**self.identity, "done": self.ranges()}))

    def complete(self) -> bool:
        return self.resumed_rows == self.identity["rows"]

    def remove(self) -> None:
        shutil.rmtree(self.parts, ignore_errors=True)
