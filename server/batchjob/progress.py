"""A plain-text progress bar on stderr and the throughput summary at the end.

On a terminal the bar redraws in place; otherwise (a log, a pipe) a line every few seconds.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    def __init__(self, total: int, done: int = 0, stream: TextIO | None = None, interval: float | None = None,
                 clock: object = time.monotonic, quiet: bool = False) -> None:
        self.quiet = quiet
        self.total = total
        self.resumed = done
        self.done = done
        self.stream = stream or sys.stderr
        self._tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._interval = interval if interval is not None else (0.2 if self._tty else 5.0)
        self._clock = clock
        self.started = self._now()
        self._shown = self.started

    def _now(self) -> float:
        return self._clock()  # type: ignore[operator,no-any-return]

    def _bar(self) -> str:
        fraction = self.done / self.total if self.total else 1.0
        width = 30
        filled = int(fraction * width)
        elapsed = max(self._now() - self.started, 1e-9)
        rate = (self.done - self.resumed) / elapsed
        return (f"[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} rows "
                f"({fraction * 100:5.1f}%) {rate:,.0f} rows/s")

    def add(self, rows: int) -> None:
        self.done += rows
        now = self._now()
        if not self.quiet and now - self._shown >= self._interval:
            self._shown = now
            self.stream.write(("\r" if self._tty else "") + "nereid batch: " + self._bar()
                              + ("" if self._tty else "\n"))
            self.stream.flush()

    def summary(self, output: str) -> str:
        elapsed = self._now() - self.started
        scored = self.done - self.resumed
        rate = scored / elapsed if elapsed > 0 else 0.0
        line = f"nereid batch: {scored} rows in {elapsed:.2f} s: {rate:,.0f} rows/s"
        if self.resumed:
            line += f" ({self.resumed} rows were done before this run)"
        return line + f"; wrote {output}"

    def finish(self, output: str) -> None:
        if self._tty and not self.quiet:
            self.stream.write("\r" + "nereid batch: " + self._bar() + "\n")
        self.stream.write(self.summary(output) + "\n")
        self.stream.flush()
