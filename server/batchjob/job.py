"""The batch job: read chunks in order, score each as requests in flight, checkpoint, assemble.

Chunks are read (and checked) on a worker thread, in row order, while earlier chunks are still
being scored; each chunk is split into requests of the model's batch size, `--concurrency`
requests are in flight across all chunks, and a finished chunk is written as a part file and
recorded in the manifest. Chunks finish in any order; the output is assembled in row order once
all are done, so a resumed job ends with the same bytes as one that never stopped.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import sys
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from server.batchjob.checkpoint import Checkpoint, fingerprint
from server.batchjob.errors import BatchError
from server.batchjob.parquet_reader import ParquetReader
from server.batchjob.plan import InputPlan
from server.batchjob.progress import Progress
from server.batchjob.readers import Reader, open_dataset
from server.batchjob.target import Target
from server.batchjob.writers import assemble, output_path, write_part


class Scorer(Protocol):
    async def open(self, model: str, version: str) -> Target: ...

    async def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    async def close(self) -> None: ...


class Job:
    def __init__(self, scorer: Scorer, reader: Reader, checkpoint: Checkpoint, plan: InputPlan,
                 batch_size: int, concurrency: int, progress: Progress) -> None:
        self.scorer = scorer
        self.reader = reader
        self.checkpoint = checkpoint
        self.plan = plan
        self.target = plan.target
        self.rows_per_request = self.target.rows_per_request(batch_size)
        self.concurrency = concurrency
        self.progress = progress
        self.chunk_rows = checkpoint.identity["chunk_rows"]
        self._requests = asyncio.Semaphore(concurrency)

    def _read(self, start: int, stop: int) -> dict[str, np.ndarray]:
        return self.plan.prepare(self.reader.read(start, stop), start)

    async def run(self) -> None:
        rows = self.reader.rows
        todo = [s for s in range(0, rows, self.chunk_rows) if s not in self.checkpoint.done]
        # Enough chunks in flight to keep every request slot busy, and one more being read.
        ahead = max(2, math.ceil(self.concurrency * self.rows_per_request / self.chunk_rows) + 1)
        slots = asyncio.Semaphore(ahead)
        tasks: list[asyncio.Task[None]] = []
        try:
            for start in todo:
                await slots.acquire()
                for task in tasks:
                    if task.done() and task.exception() is not None:
                        raise task.exception()  # type: ignore[misc]
                stop = min(start + self.chunk_rows, rows)
                inputs = await asyncio.to_thread(self._read, start, stop)
                tasks.append(asyncio.create_task(self._chunk(start, stop, inputs, slots)))
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _chunk(self, start: int, stop: int, inputs: dict[str, np.ndarray], slots: asyncio.Semaphore) -> None:
        try:
            n = stop - start
            step = self.rows_per_request
            batching = self.target.max_batch_size > 0
            bounds = [(i, min(i + step, n)) for i in range(0, n, step)]
            results: list[dict[str, np.ndarray] | None] = [None] * len(bounds)
            order = iter(range(len(bounds)))

            async def worker() -> None:
                for index in order:
                    a, b = bounds[index]
                    request = {k: (v[a:b] if batching else v[a]) for k, v in inputs.items()}
                    async with self._requests:
                        results[index] = await self.scorer.infer(request)

            await asyncio.gather(*(worker() for _ in range(min(self.concurrency, len(bounds)))))
            join = np.concatenate if batching else np.stack
            outputs = {o.name: join([r[o.name] for r in results if r is not None]) for o in self.target.outputs}
            for name, array in outputs.items():
                if array.shape[0] != n:
                    raise BatchError(f"model '{self.target.name}': output '{name}' has {array.shape[0]} rows for "
                                     f"{n} input rows; batch scoring needs one output row per input row")
            await asyncio.to_thread(write_part, self.checkpoint.part(start), outputs)
            self.checkpoint.mark(start)
            self.progress.add(n)
        finally:
            slots.release()


async def run_job(scorer: Scorer, source: Path, model: str, version: str, args: argparse.Namespace) -> Path:
    reader = open_dataset(source)
    try:
        target = await scorer.open(model, version)
        plan = InputPlan(target, reader.columns, str(source))
        if isinstance(reader, ParquetReader):
            reader.select(plan.wanted_columns)
        dest = args.output or output_path(source, model, reader.kind)
        parts = dest.with_name(dest.name + ".parts")
        checkpoint = Checkpoint(parts, fingerprint(source, model, version, args.chunk_rows, reader.rows), args.restart)
        progress = Progress(reader.rows, checkpoint.resumed_rows, quiet=args.quiet)
        if checkpoint.resumed_rows:
            print(f"nereid batch: resuming: {checkpoint.resumed_rows} of {reader.rows} rows already done "
                  f"({parts})", file=sys.stderr)
        job = Job(scorer, reader, checkpoint, plan, args.batch_size, args.concurrency, progress)
        await job.run()
        ordered = [checkpoint.part(s) for s in range(0, reader.rows, args.chunk_rows)]
        await asyncio.to_thread(assemble, reader.kind, ordered, target.outputs, reader.rows, dest)
        checkpoint.remove()
        progress.finish(str(dest))
        return dest
    finally:
        reader.close()
        await scorer.close()


def run_batch(args: argparse.Namespace) -> int:
    """`nereid batch`: 0 when the output is complete, 1 on an error, 130 when interrupted."""
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    scorer: Any
    try:
        if args.url:
            from server.batchjob.remote import RemoteScorer

            scorer = RemoteScorer(args.url)
        else:
            from server.batchjob.inprocess import InProcessScorer
            from server.settings import parse_backend_config

            try:
                backend_config = parse_backend_config(args.backend_config)
            except ValueError as exc:
                raise BatchError(str(exc)) from None
            scorer = InProcessScorer(args.repository, backend_config)
        asyncio.run(run_job(scorer, args.input, args.model, args.model_version, args))
    except BatchError as exc:
        print(f"nereid batch: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("nereid batch: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    return 0
