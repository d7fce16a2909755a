#!/usr/bin/env python3
"""Does `nereid serve --workers N` help a client that holds ONE connection?

SO_REUSEPORT spreads connections, not calls, so a single tritonclient channel always lands
on one frontend (docs/ARCHITECTURE.md). With --workers that frontend still only does the
gRPC part: the owner process runs the model path on another core. This starts the server
with each --workers value, drives it from one `tritonclient.grpc.aio` client (one HTTP/2
connection) with `--concurrency` requests in flight for `--seconds`, and prints infer/s,
p50 and the server's CPU per request (every process of the server).

Example: .venv/bin/python scripts/probe_workers.py --workers 1,2 --concurrency 1,16
Traffic goes to 127.0.0.1 only; each run is bounded by --seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import tree_cpu_seconds  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
STARTED = re.compile(r"Started GRPCInferenceService at 127\.0\.0\.1:(\d+)")


def start(workers: int, repo: str) -> tuple[subprocess.Popen[str], int]:
    cmd = [sys.executable, "-m", "server.cli", "serve", "--model-repository", repo, "--grpc-address",
           "127.0.0.1", "--grpc-port", "0", "--http-port", "0", "--metrics-port", "0", "--lame-duck-secs", "0",
           "--workers", str(workers)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    port = 0
    for line in proc.stderr:
        found = STARTED.search(line)
        if found:
            port = int(found.group(1))
        if "models loaded" in line:
            break
    if not port:
        raise SystemExit(f"server did not start (workers {workers})")
    return proc, port


async def drive(port: int, model: str, concurrency: int, seconds: float) -> list[float]:
    import tritonclient.grpc.aio as aioclient

    client = aioclient.InferenceServerClient(f"127.0.0.1:{port}")
    data = np.random.default_rng(0).standard_normal((1, 64)).astype(np.float32)
    inp = aioclient.InferInput("INPUT0", [1, 64], "FP32")
    inp.set_data_from_numpy(data)
    latencies: list[float] = []
    end = time.monotonic() + seconds

    async def one() -> None:
        while time.monotonic() < end:
            t = time.perf_counter()
            await client.infer(model, [inp])
            latencies.append(time.perf_counter() - t)

    for _ in range(50):  # warm up
        await client.infer(model, [inp])
    await asyncio.gather(*(one() for _ in range(concurrency)))
    await client.close()
    return latencies


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--concurrency", default="1,16")
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--model", default="mlp")
    ap.add_argument("--model-repository", default=str(ROOT / "model_repository"))
    args = ap.parse_args()
    print("| --workers | concurrency (one connection) | infer/s | p50 ms | server CPU µs/req |")
    print("|---:|---:|---:|---:|---:|")
    for workers in [int(w) for w in args.workers.split(",")]:
        proc, port = start(workers, args.model_repository)
        try:
            for concurrency in [int(c) for c in args.concurrency.split(",")]:
                cpu = tree_cpu_seconds(proc.pid)
                latencies = asyncio.run(drive(port, args.model, concurrency, args.seconds))
                used = tree_cpu_seconds(proc.pid) - cpu
                n = len(latencies) + 50
                print(f"| {workers} | {concurrency} | {len(latencies) / args.seconds:.0f} | "
                      f"{1000 * statistics.median(latencies):.3f} | {1e6 * used / n:.0f} |", flush=True)
        finally:
            proc.terminate()
            proc.wait(30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
