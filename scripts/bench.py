#!/usr/bin/env python3
"""Benchmark harness: perf_analyzer (KServe v2 gRPC, no shared memory) against servers.

For each target the server is started on a free port (asked of the OS), pinned to core 0
with `taskset -c 0`; perf_analyzer runs pinned to core 1, once per concurrency, and its CSV
is parsed. Targets:

  echo    scripts/bench_echo.py: a bare grpc.aio echo, no model, no checks; the ceiling of any
          Python gRPC frontend on one core. Every other target is reported as a % of it.
  nereid  .venv/bin/nereid serve --model-repository REPO --grpc-port PORT --metrics-port 0

It also measures in-process ONNX Runtime on REPO/MODEL/1/model.onnx (one intra-op thread,
in a `taskset -c 0` subprocess): microseconds per session.run and rows/s per batch size.

Prints markdown tables; `--out FILE` appends them with the command line, date and commit.
Servers are killed at the end, also on errors and Ctrl-C; every perf_analyzer run is bounded
by --pa-timeout. Logs and CSVs go to bench-out/<timestamp>/.

Usage: scripts/bench [--model mlp] [--targets echo,nereid] [--concurrency 1,16,64]
                     [--streaming] [--batch-sizes 1,8,64] [--unpinned | --both] [--out FILE]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PERF_ANALYZER = ROOT / ".tools" / "bin" / "perf_analyzer"
VENV_PY = ROOT / ".venv" / "bin" / "python"
SERVER_CORE = "0"
CLIENT_CORE = "1"
KNOWN_TARGETS = ("echo", "nereid")


# --------------------------------------------------------------------------- helpers


def int_list(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pin(cmd: list[str], core: str, pinned: bool) -> list[str]:
    return ["taskset", "-c", core, *cmd] if pinned else cmd


def kill_group(proc: subprocess.Popen[Any], grace: float = 5.0) -> None:
    """SIGTERM the process group of `proc` (started with start_new_session), then SIGKILL."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=grace)


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def last_line(path: Path) -> str:
    found = [ln.strip() for ln in tail(path, 40).splitlines() if ln.strip()]
    return found[-1] if found else ""


def git_rev() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                             text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True,
                               text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{rev} (working tree modified)" if dirty else rev


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


# --------------------------------------------------------------------------- servers


@dataclass
class Server:
    name: str
    proc: subprocess.Popen[Any]
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.port}"


class ServerError(RuntimeError):
    pass


def server_command(target: str, args: argparse.Namespace, port: int) -> list[str]:
    repo = Path(args.model_repository)
    if target == "echo":
        cmd = [sys.executable, str(ROOT / "scripts" / "bench_echo.py"), "--port", str(port),
               "--model", args.model]
        config = repo / args.model / "config.pbtxt"
        if config.is_file():
            cmd += ["--config", str(config)]
        return cmd
    if target == "nereid":
        exe = ROOT / ".venv" / "bin" / "nereid"
        if not exe.exists():
            raise ServerError(f"{exe} not found (run scripts/setup)")
        return [str(exe), "serve", "--model-repository", str(repo), "--grpc-port", str(port),
                "--metrics-port", "0", *args.nereid_arg]
    raise ServerError(f"unknown target {target!r}")


def wait_ready(server: Server, model: str, timeout: float) -> None:
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise ServerError(f"{server.name} exited with {server.proc.returncode}: {last_line(server.log)}\n"
                              f"{tail(server.log)}")
        try:
            client = grpcclient.InferenceServerClient(server.url)
            try:
                ready = client.is_server_ready(client_timeout=2)
                if ready and client.is_model_ready(model, client_timeout=2):
                    return
                last = "server or model not ready"
            finally:
                client.close()
        except InferenceServerException as e:
            last = str(e).splitlines()[0] if str(e) else type(e).__name__
        time.sleep(0.2)
    raise ServerError(f"{server.name} not ready after {timeout:.0f}s ({last}):\n{tail(server.log)}")


def start_server(target: str, args: argparse.Namespace, pinned: bool, outdir: Path,
                 live: list[Server]) -> Server:
    port = free_port()
    cmd = pin(server_command(target, args, port), SERVER_CORE, pinned)
    log = outdir / f"server-{target}-{'pinned' if pinned else 'unpinned'}.log"
    with log.open("w") as fh:
        fh.write(f"$ {shlex.join(cmd)}\n")
        fh.flush()
        proc = subprocess.Popen(cmd, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=fh, stderr=subprocess.STDOUT,
                                start_new_session=True)
    server = Server(target, proc, port, log)
    live.append(server)
    wait_ready(server, args.model, args.startup_timeout)
    return server


# --------------------------------------------------------------------------- perf_analyzer


@dataclass
class Row:
    target: str
    pinning: str
    concurrency: int
    infer_per_s: float | None = None
    p50_us: float | None = None
    p99_us: float | None = None
    error: str | None = None


def ensure_perf_analyzer() -> Path:
    if not os.access(PERF_ANALYZER, os.X_OK):
        print("perf_analyzer missing: running scripts/install_perf_analyzer", file=sys.stderr)
        subprocess.run([str(ROOT / "scripts" / "install_perf_analyzer")], check=True, timeout=900,
                       stdout=subprocess.DEVNULL)
    return PERF_ANALYZER


def parse_pa_csv(path: Path) -> dict[str, float]:
    with path.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows:
        raise ValueError(f"{path}: no rows")
    row = rows[-1]
    return {k.strip(): float(v) for k, v in row.items() if k and v not in (None, "")}


class PerfAnalyzerStuck(RuntimeError):
    pass


NO_REQUESTS = "No valid requests recorded"


def wait_perf_analyzer(proc: subprocess.Popen[Any], log: Path, timeout: float) -> int:
    """Wait for perf_analyzer; give up at `timeout`, or soon after it reports that no request
    completed (it then hangs instead of exiting, e.g. when a stream never answers)."""
    deadline = time.monotonic() + timeout
    stuck_since: float | None = None
    while True:
        try:
            return proc.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            pass
        now = time.monotonic()
        if stuck_since is None and NO_REQUESTS in log.read_text(errors="replace"):
            stuck_since = now
        if stuck_since is not None and now - stuck_since > 5:
            raise PerfAnalyzerStuck("no request completed in a measurement window (no responses?)")
        if now > deadline:
            raise PerfAnalyzerStuck(f"perf_analyzer timed out after {timeout:.0f}s")


def run_perf_analyzer(server: Server, args: argparse.Namespace, concurrency: int, pinned: bool,
                      outdir: Path) -> Row:
    pinning = "pinned" if pinned else "unpinned"
    row = Row(server.name, pinning, concurrency)
    stem = f"pa-{server.name}-{pinning}-c{concurrency}"
    csv_path = outdir / f"{stem}.csv"
    log = outdir / f"{stem}.log"
    cmd = [str(PERF_ANALYZER), "-i", "grpc", "-u", server.url, "-m", args.model, "-b", "1",
           f"--concurrency-range={concurrency}:{concurrency}",
           "--measurement-interval", str(args.measurement_interval),
           "--stability-percentage", str(args.stability_percentage),
           "--max-trials", str(args.max_trials), "--async", "-f", str(csv_path)]
    if args.streaming:
        cmd.append("--streaming")
    cmd = pin(cmd, CLIENT_CORE, pinned)
    print(f"  {server.name} {pinning} c={concurrency} ...", end="", flush=True, file=sys.stderr)
    with log.open("w") as fh:
        fh.write(f"$ {shlex.join(cmd)}\n")
        fh.flush()
        proc = subprocess.Popen(cmd, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=fh, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            rc = wait_perf_analyzer(proc, log, args.pa_timeout)
        except PerfAnalyzerStuck as e:
            row.error = str(e)
        finally:
            kill_group(proc, grace=2)
    if row.error is None and rc != 0:
        lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
        errors = [ln for ln in lines if "fail" in ln.lower() or "error" in ln.lower()]
        msg = (errors or lines or [""])[0 if errors else -1]
        row.error = f"perf_analyzer exit {rc}: {msg.strip()}"
    if row.error is None:
        try:
            data = parse_pa_csv(csv_path)
            row.infer_per_s = data["Inferences/Second"]
            row.p50_us = data["p50 latency"]
            row.p99_us = data["p99 latency"]
        except (OSError, ValueError, KeyError) as e:
            row.error = f"cannot parse {csv_path.name}: {e}"
    if server.proc.poll() is not None:
        row.error = (row.error or "") + f" (server exited with {server.proc.returncode})"
    print(f" {row.error or f'{row.infer_per_s:.0f} infer/s'}", file=sys.stderr)
    return row


def bench_target(target: str, args: argparse.Namespace, pinned: bool, outdir: Path,
                 live: list[Server]) -> list[Row]:
    pinning = "pinned" if pinned else "unpinned"
    print(f"{target} ({pinning}):", file=sys.stderr)
    try:
        server = start_server(target, args, pinned, outdir, live)
    except ServerError as e:
        print(f"  {e}", file=sys.stderr)
        first = str(e).splitlines()[0]
        return [Row(target, pinning, c, error=first) for c in args.concurrency]
    try:
        rows: list[Row] = []
        fatal: str | None = None  # after this, further concurrencies would fail the same way
        for c in args.concurrency:
            if fatal:
                rows.append(Row(target, pinning, c, error=f"skipped ({fatal})"))
                continue
            row = run_perf_analyzer(server, args, c, pinned, outdir)
            rows.append(row)
            if row.error and any(k in row.error for k in ("server exited", "no request", "timed out")):
                fatal = row.error
        return rows
    finally:
        kill_group(server.proc)
        live.remove(server)


# --------------------------------------------------------------------------- ONNX Runtime baseline

ORT_DTYPES = {
    "tensor(float)": "float32", "tensor(double)": "float64", "tensor(float16)": "float16",
    "tensor(int8)": "int8", "tensor(int16)": "int16", "tensor(int32)": "int32", "tensor(int64)": "int64",
    "tensor(uint8)": "uint8", "tensor(bool)": "bool",
}


def ort_worker(model_path: str, batch_sizes: list[int], seconds: float) -> int:
    """Runs inside the (pinned) subprocess: prints one JSON object per batch size."""
    import numpy as np
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    sess = ort.InferenceSession(model_path, sess_options=opts, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    for batch in batch_sizes:
        feed: dict[str, Any] = {}
        skip = None
        for inp in sess.get_inputs():
            shape = []
            for i, d in enumerate(inp.shape):
                if isinstance(d, int) and d > 0:
                    if i == 0 and d != batch:
                        skip = f"input {inp.name} has fixed leading dim {d}"
                    shape.append(d)
                else:
                    shape.append(batch if i == 0 else 1)
            dtype = ORT_DTYPES.get(inp.type)
            if dtype is None:
                skip = f"input {inp.name}: unsupported type {inp.type}"
                break
            feed[inp.name] = rng.standard_normal(shape).astype(dtype)
        if skip:
            print(json.dumps({"batch": batch, "error": skip}), flush=True)
            continue
        run = sess.run
        for _ in range(200):
            run(None, feed)
        t0 = time.perf_counter()
        for _ in range(100):
            run(None, feed)
        per = (time.perf_counter() - t0) / 100
        n = max(20, int(seconds / 7 / per))
        samples = []
        for _ in range(7):
            t0 = time.perf_counter_ns()
            for _ in range(n):
                run(None, feed)
            samples.append((time.perf_counter_ns() - t0) / n / 1000.0)
        us = statistics.median(samples)
        result = {"batch": batch, "us": us, "rows_per_s": batch * 1e6 / us, "runs": 7 * n}
        print(json.dumps(result), flush=True)
    return 0


@dataclass
class OrtResult:
    pinning: str
    rows: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None


def bench_ort(args: argparse.Namespace, pinned: bool, outdir: Path) -> OrtResult:
    pinning = "pinned" if pinned else "unpinned"
    result = OrtResult(pinning)
    model = Path(args.onnx) if args.onnx else Path(args.model_repository) / args.model / "1" / "model.onnx"
    if not model.is_file():
        result.error = f"{model} not found"
        return result
    cmd = pin([sys.executable, str(Path(__file__).resolve()), "--ort-worker", str(model),
               "--batch-sizes", ",".join(map(str, args.batch_sizes)), "--ort-seconds", str(args.ort_seconds)],
              SERVER_CORE, pinned)
    print(f"onnxruntime ({pinning}): {model}", file=sys.stderr)
    timeout = 60 + 4 * args.ort_seconds * len(args.batch_sizes)
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        result.error = f"timed out after {timeout:.0f}s"
        return result
    (outdir / f"ort-{pinning}.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        result.error = f"exit {proc.returncode}: {(proc.stderr.strip().splitlines() or [''])[-1]}"
        return result
    result.rows = [json.loads(ln) for ln in proc.stdout.splitlines() if ln.startswith("{")]
    return result


# --------------------------------------------------------------------------- report


def fmt(v: float | None, spec: str) -> str:
    return "—" if v is None else format(v, spec)


def perf_table(rows: list[Row]) -> str:
    ceiling = {(r.pinning, r.concurrency): r.infer_per_s
               for r in rows if r.target == "echo" and r.infer_per_s}
    out = ["| target | pinning | concurrency | infer/s | p50 ms | p99 ms | % of echo |",
           "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        if r.error:
            out.append(f"| {r.target} | {r.pinning} | {r.concurrency} | error: {r.error.replace('|', '/')} "
                       "| | | |")
            continue
        echo = ceiling.get((r.pinning, r.concurrency))
        pct = f"{100 * r.infer_per_s / echo:.0f} %" if echo and r.infer_per_s is not None else "—"
        p50 = None if r.p50_us is None else r.p50_us / 1000
        p99 = None if r.p99_us is None else r.p99_us / 1000
        out.append(f"| {r.target} | {r.pinning} | {r.concurrency} | {fmt(r.infer_per_s, '.0f')} "
                   f"| {fmt(p50, '.3f')} | {fmt(p99, '.3f')} | {pct} |")
    return "\n".join(out)


def ort_table(results: list[OrtResult]) -> str:
    out = ["| in-process ONNX Runtime, 1 intra-op thread | batch | µs per run | rows/s |",
           "|---|---:|---:|---:|"]
    for res in results:
        if res.error:
            out.append(f"| {res.pinning} | | error: {res.error.replace('|', '/')} | |")
        for r in res.rows:
            if "error" in r:
                out.append(f"| {res.pinning} | {r['batch']} | error: {r['error']} | |")
            else:
                out.append(f"| {res.pinning} | {r['batch']} | {r['us']:.1f} | {r['rows_per_s']:,.0f} |")
    return "\n".join(out)


def command_line(argv: list[str]) -> str:
    prog = "scripts/bench" if os.environ.get("NEREID_BENCH_WRAPPER") else "scripts/bench.py"
    return shlex.join([prog, *argv])


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="mlp", help="model name (default mlp)")
    ap.add_argument("--model-repository", default=str(ROOT / "model_repository"))
    ap.add_argument("--targets", default="echo,nereid",
                    help=f"comma-separated, from {','.join(KNOWN_TARGETS)} (default echo,nereid)")
    ap.add_argument("--concurrency", type=int_list, default=[1, 16, 64], help="default 1,16,64")
    ap.add_argument("--streaming", action="store_true", help="ModelStreamInfer (perf_analyzer --streaming)")
    ap.add_argument("--batch-sizes", type=int_list, default=[1, 8, 64],
                    help="ONNX Runtime baseline batch sizes (default 1,8,64)")
    ap.add_argument("--no-ort", action="store_true", help="skip the in-process ONNX Runtime baseline")
    ap.add_argument("--onnx", help="ONNX file for the baseline (default REPO/MODEL/1/model.onnx)")
    ap.add_argument("--ort-seconds", type=float, default=2.0, help="timed seconds per batch size (default 2)")
    pinning = ap.add_mutually_exclusive_group()
    pinning.add_argument("--unpinned", action="store_true", help="run without taskset")
    pinning.add_argument("--both", action="store_true", help="run pinned, then unpinned")
    ap.add_argument("--out", help="append the report (markdown) to this file, e.g. docs/BENCHMARKS.md")
    ap.add_argument("--measurement-interval", type=int, default=3000, help="ms (default 3000)")
    ap.add_argument("--stability-percentage", type=int, default=20)
    ap.add_argument("--max-trials", type=int, default=10)
    ap.add_argument("--pa-timeout", type=float,
                    help="seconds per perf_analyzer run (default: 3 x max-trials x measurement-interval, >= 60)")
    ap.add_argument("--startup-timeout", type=float, default=60.0, help="seconds for a server to be ready")
    ap.add_argument("--nereid-arg", action="append", default=[],
                    help="extra argument for `nereid serve` (repeatable; use --nereid-arg=--flag)")
    ap.add_argument("--ort-worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.pa_timeout is None:
        args.pa_timeout = max(60.0, 3 * args.max_trials * args.measurement_interval / 1000)
    args.target_list = [t.strip() for t in args.targets.split(",") if t.strip()]
    bad = [t for t in args.target_list if t not in KNOWN_TARGETS]
    if bad:
        ap.error(f"unknown target(s) {','.join(bad)}; known: {','.join(KNOWN_TARGETS)}")
    return args


def on_signal(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.ort_worker:
        return ort_worker(args.ort_worker, args.batch_sizes, args.ort_seconds)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)
    pinnings = [True, False] if args.both else [not args.unpinned]
    if any(pinnings) and (os.cpu_count() or 1) < 2:
        print("warning: fewer than 2 cores; pinning server and client to cores 0 and 1 will fail",
              file=sys.stderr)
    if args.target_list:
        ensure_perf_analyzer()
    started = datetime.now(timezone.utc)
    outdir = ROOT / "bench-out" / started.strftime("%Y%m%d-%H%M%S")
    outdir.mkdir(parents=True, exist_ok=True)

    rows: list[Row] = []
    ort_results: list[OrtResult] = []
    live: list[Server] = []
    try:
        for pinned in pinnings:
            if not args.no_ort:
                ort_results.append(bench_ort(args, pinned, outdir))
            # echo first: the others are reported against it.
            for target in sorted(args.target_list, key=lambda t: t != "echo"):
                rows.extend(bench_target(target, args, pinned, outdir, live))
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    finally:
        for server in live:
            kill_group(server.proc)

    mode = "ModelStreamInfer (--streaming)" if args.streaming else "unary ModelInfer"
    pin_note = ("server on core 0, perf_analyzer on core 1 (taskset)" if pinnings == [True] else
                "no taskset" if pinnings == [False] else "pinned (server core 0, client core 1) and unpinned")
    header = [
        f"## {started.strftime('%Y-%m-%d %H:%M UTC')}: model `{args.model}`, {mode}, batch 1 per request",
        "",
        f"- command: `{command_line(argv)}`",
        f"- commit: {git_rev()}",
        f"- machine: {os.cpu_count()} cores, {cpu_model()}; {pin_note}",
        f"- perf_analyzer 2.51.0: `-i grpc -b 1 --async --measurement-interval {args.measurement_interval} "
        f"--stability-percentage {args.stability_percentage} --max-trials {args.max_trials}`"
        + (" `--streaming`" if args.streaming else ""),
        f"- logs: `{outdir.relative_to(ROOT)}/`",
        "",
    ]
    parts = ["\n".join(header)]
    if rows:
        parts.append(perf_table(rows))
    if ort_results:
        parts.append(ort_table(ort_results))
    report = "\n\n".join(parts) + "\n"
    print()
    print(report)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("a") as fh:
            if out.stat().st_size > 0:
                fh.write("\n")
            fh.write(report)
        print(f"appended to {out}", file=sys.stderr)
    return 1 if any(r.error for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
