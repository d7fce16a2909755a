#!/usr/bin/env python3
"""TorchScript on a GPU: throughput against batch size, instance count and dynamic batching,
next to in-process torch on the same GPU in the same run (the ceiling).

The model is a wide FP32 MLP generated here (1024 -> 8192 x5 -> 1024, 1.1 GB of weights,
~0.57 GFLOP a row), heavy enough that large batches keep the GPU busy. perf_analyzer drives
the server over gRPC on 127.0.0.1 (`-b` rows a request); the in-process figure is one Python
thread doing what an instance does: numpy in, copy to the GPU, forward, copy back.

    python scripts/gpu_bench.py --perf-analyzer PATH --out results.md

Run by scripts/gpu_check on the GPU machine; results go to docs/BENCHMARKS.md with the card.
"""

from __future__ import annotations

import argparse
import csv
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
IN, HIDDEN, OUT, HIDDEN_LAYERS = 1024, 8192, 1024, 4
MODEL = "mlp_gpu_bench"
DEVICE = "cuda:0"  # --smoke-cpu: a small model on the CPU, to check this script without a GPU


def make_model(repo: Path, count: int, dynamic: bool) -> Path:
    model_dir = repo / MODEL
    (model_dir / "1").mkdir(parents=True, exist_ok=True)
    pt = model_dir / "1" / "model.pt"
    if not pt.exists():
        torch.manual_seed(0)
        layers: list[torch.nn.Module] = [torch.nn.Linear(IN, HIDDEN), torch.nn.ReLU()]
        for _ in range(HIDDEN_LAYERS):
            layers += [torch.nn.Linear(HIDDEN, HIDDEN), torch.nn.ReLU()]
        layers.append(torch.nn.Linear(HIDDEN, OUT))
        torch.jit.script(torch.nn.Sequential(*layers).eval()).save(str(pt))
    batching = "dynamic_batching { max_queue_delay_microseconds: 2000 }\n" if dynamic else ""
    (model_dir / "config.pbtxt").write_text(
        'platform: "pytorch_libtorch"\nmax_batch_size: 128\n'
        f'input [ {{ name: "INPUT__0" data_type: TYPE_FP32 dims: [ {IN} ] }} ]\n'
        f'output [ {{ name: "OUTPUT__0" data_type: TYPE_FP32 dims: [ {OUT} ] }} ]\n'
        + (f"instance_group [ {{ kind: KIND_GPU count: {count} gpus: [ 0 ] }} ]\n" if DEVICE != "cpu"
         else f"instance_group [ {{ kind: KIND_CPU count: {count} }} ]\n") + batching)
    return pt


def in_process(pt: Path, batches: list[int], seconds: float) -> dict[int, float]:
    """Rows/s of one thread: numpy -> cuda -> forward -> numpy, as an instance does it."""
    module = torch.jit.load(str(pt), map_location=DEVICE).eval()
    out: dict[int, float] = {}
    for b in batches:
        x = np.random.default_rng(0).standard_normal((b, IN)).astype(np.float32)
        with torch.inference_mode():
            for _ in range(3):
                module(torch.from_numpy(x).to(DEVICE)).cpu().numpy()
            n, start = 0, time.perf_counter()
            while time.perf_counter() - start < seconds:
                module(torch.from_numpy(x).to(DEVICE)).cpu().numpy()
                n += 1
            out[b] = n * b / (time.perf_counter() - start)
        print(f"in-process b={b}: {out[b]:.0f} rows/s", file=sys.stderr, flush=True)
    del module
    if DEVICE != "cpu":
        torch.cuda.empty_cache()
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    def __init__(self, repo: Path, log: Path) -> None:
        self.port = free_port()
        cmd = [sys.executable, "-m", "server.cli", "serve", "--model-repository", str(repo),
               "--grpc-address", "127.0.0.1", "--grpc-port", str(self.port), "--metrics-port", "0", "--http-port", "0",
               "--lame-duck-secs", "0"]
        self.log = log
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log.open("w"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 180
        while "models loaded; server" not in log.read_text(errors="replace"):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"server did not start:\n{log.read_text(errors='replace')[-3000:]}")
            time.sleep(0.2)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def perf(pa: str, port: int, batch: int, concurrency: int, outdir: Path, tag: str) -> str:
    """' rows/s | p50 ms | p99 ms' cells from one perf_analyzer run (retried once with a looser
    stability bound; a run that never settles says so instead of a number)."""
    for stability in (20, 50):
        csv_path = outdir / f"{tag}.csv"
        cmd = [pa, "-i", "grpc", "-u", f"127.0.0.1:{port}", "-m", MODEL, "-b", str(batch),
               f"--concurrency-range={concurrency}:{concurrency}", "--measurement-interval", "2000",
               "--stability-percentage", str(stability), "--max-trials", "6", "--async", "-f", str(csv_path)]
        with (outdir / f"{tag}-s{stability}.log").open("w") as log:
            rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, timeout=150).returncode
        if rc == 0 and csv_path.exists():
            row = list(csv.DictReader(csv_path.open()))[-1]
            # perf_analyzer's inferences count rows: -b of them a request
            cells = (f"{float(row['Inferences/Second']):.0f} | {float(row['p50 latency']) / 1000:.1f} | "
                     f"{float(row['p99 latency']) / 1000:.1f}")
            if stability != 20:
                cells += " (within 50 %)"
            break
    else:
        cells = "not stable within 50 % | | "
    print(f"{tag}: {cells}", file=sys.stderr, flush=True)
    return cells


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--perf-analyzer", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--logs", default="", help="folder for server and perf_analyzer logs (default: a temp one)")
    parser.add_argument("--seconds", type=float, default=3.0, help="in-process measuring time per batch size")
    parser.add_argument("--smoke-cpu", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.smoke_cpu:
        global DEVICE, HIDDEN
        DEVICE, HIDDEN = "cpu", 64
    batches = [1, 8, 32, 128]
    work = Path(tempfile.mkdtemp(prefix="gpu_bench_"))
    repo, logs = work / "repo", Path(args.logs or work / "logs")
    logs.mkdir(parents=True, exist_ok=True)
    card = torch.cuda.get_device_name(0) if DEVICE != "cpu" else "none (CPU smoke run)"
    lines = [f"GPU: {card}; torch {torch.__version__}; {os.cpu_count()} CPU cores; "
             f"model {IN} -> {HIDDEN} x{HIDDEN_LAYERS + 1} -> {OUT} FP32 MLP, TorchScript", ""]

    pt = make_model(repo, 1, False)
    ceiling = in_process(pt, batches, args.seconds)

    lines += ["| batch rows | in-process torch rows/s | Nereid rows/s (1 instance, c=2) | Nereid / in-process "
              "| p50 ms | p99 ms |", "|---|---|---|---|---|---|"]
    server = Server(repo, logs / "server-sweep.log")
    try:
        for b in batches:
            cells = perf(args.perf_analyzer, server.port, b, 2, logs, f"sweep-b{b}")
            rows = cells.split(" ")[0]
            ratio = f"{float(rows) / ceiling[b]:.2f}" if rows.isdigit() else "-"
            lines.append(f"| {b} | {ceiling[b]:.0f} | {cells.split(' | ')[0]} | {ratio} | "
                         f"{' | '.join(cells.split(' | ')[1:])} |")
    finally:
        server.stop()

    lines += ["", "| KIND_GPU instances on cuda:0 | batch rows | concurrency | rows/s | p50 ms | p99 ms |",
              "|---|---|---|---|---|---|"]
    for count in (1, 2, 4):
        make_model(repo, count, False)
        server = Server(repo, logs / f"server-count{count}.log")
        try:
            lines.append(f"| {count} | 8 | 8 | {perf(args.perf_analyzer, server.port, 8, 8, logs, f'count{count}')} |")
        finally:
            server.stop()

    lines += ["", "| 1-row requests, c=64, 1 instance | rows/s | p50 ms | p99 ms |", "|---|---|---|---|"]
    for dynamic in (False, True):
        make_model(repo, 1, dynamic)
        server = Server(repo, logs / f"server-dyn{int(dynamic)}.log")
        try:
            cells = perf(args.perf_analyzer, server.port, 1, 64, logs, f"dyn{int(dynamic)}")
            label = "dynamic batching (2 ms delay)" if dynamic else "no batching"
            lines.append(f"| {label} | {cells} |")
        finally:
            server.stop()
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
