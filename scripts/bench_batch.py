"""Throughput of `nereid batch` on model_repository/mlp (docs/BATCH.md), remote and in process.

Usage: .venv/bin/python scripts/bench_batch.py [--rows N] [--batch-size B] [--concurrency C]

It writes a random FP32 [N, 64] .npy in a temporary folder, starts `nereid serve` on 127.0.0.1
(free ports) with model_repository/, runs `nereid batch mlp` through it (--url), then in
process (--repository), and prints each run's summary line (rows, seconds, rows/s).
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
STARTED = re.compile(r"Started GRPCInferenceService at [^:]+:(\d+)")


def start_server(repo: Path) -> tuple[subprocess.Popen[str], int]:
    proc = subprocess.Popen([PYTHON, "-m", "server.cli", "serve", "--model-repository", str(repo),
                             "--model-control-mode", "explicit", "--load-model", "mlp",
                             "--grpc-address", "127.0.0.1", "--grpc-port", "0", "--http-port", "0",
                             "--http-address", "127.0.0.1", "--allow-metrics", "false", "--lame-duck-secs", "0"],
                            cwd=ROOT, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    assert proc.stderr is not None
    port = 0
    for line in proc.stderr:
        match = STARTED.search(line)
        if match:
            port = int(match.group(1))
        if "models loaded" in line:
            break
    if not port:
        proc.kill()
        raise SystemExit("the server did not start")
    return proc, port


def run_batch(source: Path, where: list[str], batch_size: int, concurrency: int) -> str:
    done = subprocess.run([PYTHON, "-m", "server.cli", "batch", "mlp", str(source), *where, "--quiet", "--restart",
                           "--batch-size", str(batch_size), "--concurrency", str(concurrency)],
                          cwd=ROOT, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(done.stderr)
    return done.stderr.strip().splitlines()[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args()
    repo = ROOT / "model_repository"
    with tempfile.TemporaryDirectory(prefix="nereid-bench-batch-") as folder:
        source = Path(folder) / "mlp_input.npy"
        np.save(source, np.random.default_rng(0).standard_normal((args.rows, 64)).astype(np.float32))
        server, port = start_server(repo)
        try:
            print("remote:    ", run_batch(source, ["--url", f"127.0.0.1:{port}"], args.batch_size, args.concurrency))
        finally:
            server.terminate()
            server.wait(30)
        print("in-process:", run_batch(source, ["--repository", str(repo)], args.batch_size, args.concurrency))


if __name__ == "__main__":
    main()
