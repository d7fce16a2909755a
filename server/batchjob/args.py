"""The `nereid batch` subcommand's flags (built on call, as the rest of the CLI)."""

from __future__ import annotations

import argparse
from pathlib import Path


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got '{text}'") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got '{text}'")
    return value


def add_batch_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    batch = sub.add_parser("batch", help="score a dataset (.npy/.npz/Parquet/JSON lines) with a model",
                           description="Score every row of a dataset with MODEL, through a running server "
                           "(--url) or in this process (--repository), writing <input>.<model>.out.<ext> beside "
                           "it. Resumable: rerun the same command after an interruption (docs/BATCH.md).")
    batch.add_argument("model", metavar="MODEL", help="model name")
    batch.add_argument("input", type=Path, metavar="INPUT",
                       help="dataset: .npy (one input), .npz (one array per input), .parquet or .jsonl "
                       "(a column / key per input)")
    where = batch.add_mutually_exclusive_group(required=True)
    where.add_argument("--url", metavar="HOST:PORT", help="a running server's gRPC endpoint")
    where.add_argument("--repository", type=Path, action="append", metavar="PATH",
                       help="model repository: load MODEL here, with the server's backends and batcher "
                       "(repeatable)")
    batch.add_argument("--model-version", default="", metavar="N", help="version to use (default: the latest)")
    batch.add_argument("--batch-size", type=_positive, default=64, metavar="ROWS",
                       help="rows per request, capped by the model's max_batch_size (default 64)")
    batch.add_argument("--concurrency", type=_positive, default=8, metavar="N",
                       help="requests in flight at once (default 8)")
    batch.add_argument("--chunk-rows", type=_positive, default=65536, metavar="ROWS",
                       help="rows per checkpointed chunk: an interruption loses at most the chunks in flight "
                       "(default 65536)")
    batch.add_argument("--output", type=Path, default=None, metavar="PATH",
                       help="output file (default <input>.<model>.out.<npz|parquet|jsonl>)")
    batch.add_argument("--restart", action="store_true",
                       help="discard the progress of an earlier, unfinished run instead of resuming it")
    batch.add_argument("--backend-config", action="append", default=[], metavar="[BACKEND,]KEY=VALUE",
                       help="with --repository: as `nereid serve --backend-config`")
    batch.add_argument("--quiet", action="store_true", help="no progress bar (the summary is still printed)")
