"""JSON lines datasets: one object per row, a key per input, read line by line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from server.batchjob.errors import BatchError


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
