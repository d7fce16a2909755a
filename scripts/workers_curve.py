#!/usr/bin/env python3
"""The scaling curve of `nereid serve --workers N` (issue 12): infer/s for N = 1, 2, 4, 8.

For each N it starts the server on the example repository with `--workers N` (N = 1: one
process), drives model `mlp` (batch 1, unary) with perf_analyzer at one high concurrency
(many connections: SO_REUSEPORT spreads connections, not calls), and, with `--echo`, the
same against N bare grpc.aio echo processes on one port as the ceiling. Prints and writes a
markdown table: infer/s, p50, N-worker / 1-worker, and whether it reaches 0.8 x N.

Meant for the 16-core GPU machine (scripts/gpu_check runs it); it runs anywhere (here:
`.venv/bin/python scripts/workers_curve.py --workers 1,2 --concurrency 64`). Unpinned: the
client shares the machine's cores, so on few cores the client is part of the limit. Traffic
goes to 127.0.0.1 only; every run is bounded.
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import tree_cpu_seconds  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
STARTED = re.compile(r"Started GRPCInferenceService at 127\.0\.0\.1:(\d+)")
METRICS = re.compile(r"Started Metrics Service at [^:]+:(\d+)")
WORKER_CALLS = re.compile(r'^nereid_worker_calls_total\{worker="(\d+)"\} ([0-9.e+]+)$', re.M)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_nereid(workers: int, repo: str, log: Path, extra: list[str]) -> tuple[subprocess.Popen[bytes], int]:
    cmd = [sys.executable, "-m", "server.cli", "serve", "--model-repository", repo, "--grpc-address", "127.0.0.1",
           "--grpc-port", "0", "--allow-http", "false", "--metrics-port", "0", "--lame-duck-secs", "0",
           "--workers", str(workers), *extra]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 180
    while True:
        text = log.read_text(errors="replace")
        if "models loaded; server" in text:
            found = STARTED.search(text)
            if found:
                return proc, int(found.group(1))
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"nereid --workers {workers} did not start:\n{text[-3000:]}")
        time.sleep(0.2)


def start_echo(processes: int, model_config: Path, log: Path) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    cmd = [sys.executable, str(ROOT / "scripts" / "bench_echo.py"), "--port", str(port), "--model", "mlp",
           "--processes", str(processes)]
    if model_config.is_file():
        cmd += ["--config", str(model_config)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    time.sleep(3 + 0.5 * processes)
    if proc.poll() is not None:
        raise RuntimeError(f"echo x{processes} did not start:\n{log.read_text(errors='replace')[-2000:]}")
    return proc, port


def worker_calls(log: Path) -> dict[int, float]:
    """Calls each frontend has forwarded so far (`nereid_worker_calls_total`; empty for N = 1)."""
    found = METRICS.search(log.read_text(errors="replace"))
    if not found:
        return {}
    with urllib.request.urlopen(f"http://127.0.0.1:{found.group(1)}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {int(w): float(v) for w, v in WORKER_CALLS.findall(text)}


def busiest_share(before: dict[int, float], after: dict[int, float]) -> str:
    """The busiest frontend's share of the run's calls, against an even 1/N ('—' for one process)."""
    moved = [after[w] - before.get(w, 0.0) for w in after]
    if len(moved) < 2 or not sum(moved):
        return "—"
    return f"{100 * max(moved) / sum(moved):.0f} % (even {100 / len(moved):.0f} %)"


def own_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of `pid` alone (the owner, without its frontends and stubs)."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def per_request(cores: float, rate: float | None) -> str:
    """CPU µs per request from cores in use and infer/s ('—' without a rate)."""
    return f"{1e6 * cores / rate:.0f}" if rate else "—"


def stop(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, 15)
        proc.wait(30)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, 9)
        except ProcessLookupError:
            pass
        proc.wait(10)


def perf(pa: str, port: int, concurrency: int, logs: Path, tag: str,
         streaming: bool = False, connections: int = 0) -> tuple[float | None, str]:
    """(infer/s, 'infer/s | p50 ms' cells) from one perf_analyzer run; retried with a looser bound.

    `connections`: the infer calls go on that many HTTP/2 connections (0: perf_analyzer's own
    choice, one per 6 in flight). The Triton client shares a channel among at most
    TRITON_CLIENT_GRPC_CHANNEL_MAX_SHARE_COUNT of its clients (6 by default), and perf_analyzer
    has one client per request in flight and one more, made first, for its metadata and
    statistics calls (counted with `ss`: a share count of 16 at concurrency 16 gave 2
    connections, 17 gave one). 1 is what a service with one tritonclient channel sends."""
    env = dict(os.environ)
    if connections:
        env["TRITON_CLIENT_GRPC_CHANNEL_MAX_SHARE_COUNT"] = str(-(-(concurrency + 1) // connections))
    for stability in (20, 50):
        csv_path = logs / f"{tag}.csv"
        cmd = [pa, "-i", "grpc", "-u", f"127.0.0.1:{port}", "-m", "mlp", "-b", "1",
               f"--concurrency-range={concurrency}:{concurrency}", "--measurement-interval", "2000",
               "--stability-percentage", str(stability), "--max-trials", "6", "--async", "-f", str(csv_path)]
        if streaming:
            cmd.append("--streaming")
        with (logs / f"{tag}-s{stability}.log").open("w") as log:
            rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, timeout=150, env=env).returncode
        if rc == 0 and csv_path.exists():
            row = list(csv.DictReader(csv_path.open()))[-1]
            rate = float(row["Inferences/Second"])
            cells = f"{rate:.0f} | {float(row['p50 latency']) / 1000:.2f}"
            return rate, cells + (" (within 50 %)" if stability != 20 else "")
    return None, "not stable within 50 % | "


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--perf-analyzer", default=str(ROOT / ".tools" / "bin" / "perf_analyzer"))
    ap.add_argument("--workers", default="1,2,4,8")
    ap.add_argument("--concurrency", type=int, default=256, help="in flight, all N (default 256)")
    ap.add_argument("--model-repository", default=str(ROOT / "model_repository"))
    ap.add_argument("--echo", action="store_true", help="also N echo processes on one port (the ceiling)")
    ap.add_argument("--streaming", action="store_true", help="ModelStreamInfer (perf_analyzer --streaming)")
    ap.add_argument("--connections", type=int, default=0,
                    help="infer calls on this many connections (default: perf_analyzer's, one per 6 in flight; "
                         "1: a one-channel client)")
    ap.add_argument("--nereid-arg", action="append", default=[],
                    help="an extra flag for every nereid server, e.g. --nereid-arg=--connection-balance=hash")
    ap.add_argument("--out", default="", help="append the markdown here")
    ap.add_argument("--logs", default="/tmp/workers_curve_logs")
    args = ap.parse_args()
    logs = Path(args.logs)
    logs.mkdir(parents=True, exist_ok=True)
    counts = [int(n) for n in args.workers.split(",")]
    config = Path(args.model_repository) / "mlp" / "config.pbtxt"
    cpu = platform.processor() or platform.machine()
    extra = "".join(" --nereid-arg=" + a for a in args.nereid_arg)
    lines = [f"`scripts/workers_curve.py --workers {args.workers} --concurrency {args.concurrency}"
             f"{' --echo' if args.echo else ''}{' --streaming' if args.streaming else ''}"
             f"{f' --connections {args.connections}' if args.connections else ''}{extra}` on "
             f"{os.cpu_count()} cores ({cpu}), Python {platform.python_version()}, unpinned, model `mlp`, batch 1, "
             f"{'streaming' if args.streaming else 'unary'}, "
             f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", "",
             "| N | nereid infer/s | p50 ms | vs N=1 | target 0.8 x N | owner cores | all server cores "
             "| owner µs/req | server µs/req | busiest frontend's calls | echo x N infer/s | p50 ms | echo µs/req "
             "| nereid % of echo |",
             "|---:|---:|---:|---:|---|---:|---:|---:|---:|---|---:|---:|---:|---:|"]
    base: float | None = None
    for n in counts:
        log = logs / f"nereid-w{n}.log"
        proc, port = start_nereid(n, args.model_repository, log, args.nereid_arg)
        try:
            # The owner runs every request's decode, checks, scheduling and encode: if it nears one
            # core while the frontends have room, it is what bounds the curve. The busiest
            # frontend bounds it too: connections, not calls, are spread (workers/balance.py).
            calls0 = worker_calls(log)
            owner0, all0, wall0 = own_cpu_seconds(proc.pid), tree_cpu_seconds(proc.pid), time.monotonic()
            rate, cells = perf(args.perf_analyzer, port, args.concurrency, logs, f"nereid-w{n}", args.streaming,
                               args.connections)
            wall = time.monotonic() - wall0
            owner_cores = (own_cpu_seconds(proc.pid) - owner0) / wall
            all_cores = (tree_cpu_seconds(proc.pid) - all0) / wall
            # Per request: cores over the whole run (warm-up trials included, at the same load)
            # divided by the measured rate: the owner's and the whole server's CPU per request.
            cores = f"{owner_cores:.2f} | {all_cores:.2f} | {per_request(owner_cores, rate)} " \
                    f"| {per_request(all_cores, rate)} | {busiest_share(calls0, worker_calls(log))}"
        finally:
            stop(proc)
        if n == 1:
            base = rate
        ratio = rate / base if rate and base else None
        met = "—" if ratio is None or n == 1 else ("met" if ratio >= 0.8 * n else f"not met ({0.8 * n:.1f})")
        echo_cells, of_echo = "— | — | —", "—"
        if args.echo:
            eproc, eport = start_echo(n, config, logs / f"echo-x{n}.log")
            try:
                ecpu0, ewall0 = tree_cpu_seconds(eproc.pid), time.monotonic()
                erate, echo_cells = perf(args.perf_analyzer, eport, args.concurrency, logs, f"echo-x{n}",
                                         args.streaming, args.connections)
                ecores = (tree_cpu_seconds(eproc.pid) - ecpu0) / (time.monotonic() - ewall0)
                echo_cells += f" | {per_request(ecores, erate)}"
            finally:
                stop(eproc)
            if erate and rate:
                of_echo = f"{100 * rate / erate:.0f} %"
        line = (f"| {n} | {cells} | {'—' if ratio is None else f'{ratio:.2f}x'} | {met} | {cores} | {echo_cells} "
                f"| {of_echo} |")
        print(line, flush=True)
        lines.append(line)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "a") as fh:
            fh.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
