#!/usr/bin/env python3
"""Benchmark harness: perf_analyzer (KServe v2 gRPC, no shared memory) against servers.

For each target the server is started on a free port (asked of the OS), pinned to core 0
with `taskset -c 0`; perf_analyzer runs pinned to core 1, once per concurrency, and its CSV
is parsed. Targets:

  echo    scripts/bench_echo.py: a bare grpc.aio echo, no model, no checks; the ceiling of any
          Python gRPC frontend on one core. Every other target is reported as a % of it.
  nereid  .venv/bin/nereid serve --model-repository REPO --grpc-port PORT --metrics-port 0
  nereid-torch  the same server, with perf_analyzer on --torch-model (default mlp_torch, the
          TorchScript twin of mlp from scripts/gen_torch_models.py) instead of --model

It also measures in-process ONNX Runtime on REPO/MODEL/1/model.onnx (one intra-op thread,
in a `taskset -c 0` subprocess): microseconds per session.run and rows/s per batch size.
With the nereid-torch target it does the same for TorchScript on REPO/TORCH_MODEL/1/model.pt
(torch.jit.load, inference_mode, one intra-op thread), so the framework time of each model
stands beside its served time.

`--variants direct-1,batched-2` (or `all`: direct-1,direct-2,batched-1,batched-2) replaces the
nereid target by one server per config variant of MODEL, generated into bench-out/<timestamp>/repos/:
`direct-N` without dynamic_batching, `batched-N` with `dynamic_batching {}`, N instances each
(scripts/bench_variants.py). `--modes unary,streaming` runs every target both ways. After each
perf_analyzer run the harness reads ModelStatistics and reports the mean batch size that formed
(and the most frequent sizes); the in-process ONNX Runtime baseline then also measures those batch
sizes, and each row shows its throughput as a % of that ceiling. The issue's sweep is one command:

  scripts/bench --variants all --modes unary,streaming --concurrency 1,4,16,64

Issue 13's payload rows (scripts/bench_payloads.py): `--targets nereid-16mib-inline,nereid-16mib-shm`
(a 16 MiB input inside the message vs through system shared memory) and
`--targets nereid-cache-hit,nereid-cache-miss` (response cache hit vs miss latency).

Prints markdown tables; `--out FILE` appends them with the command line, date and commit.
Servers are killed at the end, also on errors and Ctrl-C; every perf_analyzer run is bounded
by --pa-timeout. Logs and CSVs go to bench-out/<timestamp>/.

Usage: scripts/bench [--model mlp] [--targets echo,nereid] [--concurrency 1,16,64]
                     [--streaming | --modes unary,streaming] [--variants all]
                     [--batch-sizes 1,8,64] [--unpinned | --both] [--out FILE]
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

from bench_payloads import MODELS, PAYLOAD_TARGETS, make_payload_repo, perf_analyzer_args, server_args
from bench_variants import make_variant_repo, mode_list, read_batch_counts, variant_list

ROOT = Path(__file__).resolve().parent.parent
PERF_ANALYZER = ROOT / ".tools" / "bin" / "perf_analyzer"
VENV_PY = ROOT / ".venv" / "bin" / "python"
SERVER_CORE = "0"
CLIENT_CORE = "1"
KNOWN_TARGETS = ("echo", "echo2", "nereid", "nereid-w2", "nereid-w2-hash", "nereid-torch", "baseline",
                 "nereid-nometrics", "nereid-histograms", "nereid-http",
                 *PAYLOAD_TARGETS)
# Targets perf_analyzer drives over KServe v2 HTTP/REST (`-i http`) instead of gRPC.
HTTP_TARGETS = ("nereid-http",)
# Extra server flags of the metrics variants of the nereid target (metrics on and off in one run).
TARGET_ARGS = {
    "nereid-nometrics": ["--allow-metrics", "false"],
    "nereid-histograms": ["--metrics-config", "histogram_latencies=true", "--metrics-config", "summary_latencies=true"],
    "nereid-w2": ["--workers", "2"],  # two gRPC frontend processes (server/workers/)
    # the same, connections spread by the kernel's hash instead of in turn (server/workers/balance.py)
    "nereid-w2-hash": ["--workers", "2", "--connection-balance", "hash"],
}
# Ceilings: bare grpc.aio echo servers; echo2 is two of them on one port (SO_REUSEPORT).
ECHO_TARGETS = ("echo", "echo2")


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


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of `pid` and every live descendant (from /proc)."""
    tick = os.sysconf("SC_CLK_TCK")
    children: dict[int, list[int]] = {}
    times: dict[int, float] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry))
        times[int(entry)] = (int(fields[11]) + int(fields[12])) / tick
    total, todo = 0.0, [pid]
    while todo:
        current = todo.pop()
        total += times.get(current, 0.0)
        todo += children.get(current, [])
    return total


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
    http_port: int = 0  # for HTTP_TARGETS: where perf_analyzer sends (readiness still asks gRPC)

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pa_url(self) -> str:
        return f"127.0.0.1:{self.http_port}" if self.http_port else self.url


class ServerError(RuntimeError):
    pass


def server_command(target: str, args: argparse.Namespace, port: int, http_port: int = 0) -> list[str]:
    repo = Path(args.variant_repos.get(target, args.model_repository))
    if target in ECHO_TARGETS:
        cmd = [sys.executable, str(ROOT / "scripts" / "bench_echo.py"), "--port", str(port),
               "--model", args.model, "--processes", "2" if target == "echo2" else "1"]
        config = repo / args.model / "config.pbtxt"
        if config.is_file():
            cmd += ["--config", str(config)]
        return cmd
    if target == "baseline":  # another checkout's server, to compare two commits in one run
        if not args.baseline_checkout:
            raise ServerError("target 'baseline' needs --baseline-checkout DIR")
        return [sys.executable, "-m", "server.cli", "serve", "--model-repository", str(repo), "--grpc-port",
                str(port), "--metrics-port", "0", "--http-port", "0", *args.nereid_arg]
    if target in ("nereid", "nereid-torch", *HTTP_TARGETS) or target in args.variant_repos or target in TARGET_ARGS:
        exe = ROOT / ".venv" / "bin" / "nereid"
        if not exe.exists():
            raise ServerError(f"{exe} not found (run scripts/setup)")
        return [str(exe), "serve", "--model-repository", str(repo), "--grpc-port", str(port),
                "--metrics-address", "127.0.0.1", "--metrics-port", "0", "--http-address", "127.0.0.1",
                "--http-port", str(http_port), *TARGET_ARGS.get(target, []), *server_args(target), *args.nereid_arg]
    raise ServerError(f"unknown target {target!r}")


def target_model(target: str, args: argparse.Namespace) -> str:
    """The model perf_analyzer drives for a target (nereid-torch: the TorchScript twin)."""
    if target in MODELS:
        return MODELS[target]
    return args.torch_model if target == "nereid-torch" else args.model


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
    http_port = free_port() if target in HTTP_TARGETS else 0
    cmd = pin(server_command(target, args, port, http_port), SERVER_CORE, pinned)
    log = outdir / f"server-{target}-{'pinned' if pinned else 'unpinned'}.log"
    with log.open("w") as fh:
        fh.write(f"$ {shlex.join(cmd)}\n")
        fh.flush()
        env = None
        if target == "baseline":  # its own `server` package comes first on the path
            env = dict(os.environ, PYTHONPATH=str(Path(args.baseline_checkout).resolve()))
        proc = subprocess.Popen(cmd, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=fh, stderr=subprocess.STDOUT,
                                start_new_session=True, env=env)
    server = Server(target, proc, port, log, http_port)
    live.append(server)
    wait_ready(server, target_model(target, args), args.startup_timeout)
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
    mode: str = "unary"  # or "streaming"
    mean_batch: float | None = None  # items per execution during the run (ModelStatistics)
    batch_summary: str = ""  # most frequent batch sizes, e.g. "8×120, 7×30"
    cpu_us: float | None = None  # server CPU (all its processes) per request over the whole run


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
                      outdir: Path, mode: str = "unary") -> Row:
    pinning = "pinned" if pinned else "unpinned"
    row = Row(server.name, pinning, concurrency, mode=mode)
    stem = f"pa-{server.name}-{pinning}-c{concurrency}" + ("-streaming" if mode == "streaming" else "")
    model = target_model(server.name, args)
    counts_before = None if server.name in ECHO_TARGETS else read_batch_counts(server.url, model)
    cpu_before = tree_cpu_seconds(server.proc.pid)
    csv_path = outdir / f"{stem}.csv"
    log = outdir / f"{stem}.log"
    protocol = "http" if server.name in HTTP_TARGETS else "grpc"
    if protocol == "http" and mode == "streaming":
        row.error = "skipped (no streaming over HTTP)"
        return row
    cmd = [str(PERF_ANALYZER), "-i", protocol, "-u", server.pa_url, "-m", target_model(server.name, args), "-b", "1",
           f"--concurrency-range={concurrency}:{concurrency}",
           "--measurement-interval", str(args.measurement_interval),
           "--stability-percentage", str(args.stability_percentage),
           "--max-trials", str(args.max_trials), "--async", "-f", str(csv_path)]
    if mode == "streaming":
        cmd.append("--streaming")
    if server.name in PAYLOAD_TARGETS:
        cmd += perf_analyzer_args(server.name, Path(args.variant_repos[server.name]))
    cmd = pin(cmd, CLIENT_CORE, pinned)
    print(f"  {server.name} {mode} {pinning} c={concurrency} ...", end="", flush=True, file=sys.stderr)
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
    elif counts_before is not None:
        counts_after = read_batch_counts(server.url, model)
        if counts_after is not None:
            formed = counts_after.since(counts_before)
            row.mean_batch = formed.mean_batch
            row.batch_summary = formed.summary()
            if formed.requests:  # every process of the server: owner, frontends, stubs
                row.cpu_us = 1e6 * (tree_cpu_seconds(server.proc.pid) - cpu_before) / formed.requests
    batches = f", mean batch {row.mean_batch:.2f}" if row.mean_batch else ""
    print(f" {row.error or f'{row.infer_per_s:.0f} infer/s{batches}'}", file=sys.stderr)
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
        return [Row(target, pinning, c, error=first, mode=m) for m in args.modes for c in args.concurrency]
    scraper = Scraper(server, args.scrape_every) if args.scrape_every > 0 else None
    try:
        rows: list[Row] = []
        fatal: str | None = None  # after this, further concurrencies would fail the same way
        for mode in args.modes:
            for c in args.concurrency:
                if fatal:
                    rows.append(Row(target, pinning, c, error=f"skipped ({fatal})", mode=mode))
                    continue
                row = run_perf_analyzer(server, args, c, pinned, outdir, mode)
                rows.append(row)
                if row.error and any(k in row.error for k in ("server exited", "no request", "timed out")):
                    fatal = row.error
        return rows
    finally:
        if scraper is not None:
            scraper.stop()
        kill_group(server.proc)
        live.remove(server)


class Scraper:
    """Scrapes the server's /metrics every `every` seconds while it is measured, as Prometheus would
    (a scrape renders on the server's own thread, so it competes for the GIL with the requests)."""

    def __init__(self, server: Server, every: float) -> None:
        import re
        import threading

        found = re.search(r"Started Metrics Service at [^ ]+:(\d+)", server.log.read_text())
        self.url = f"http://127.0.0.1:{found.group(1)}/metrics" if found else ""
        self.scrapes = 0
        self._every = every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        if self.url:
            self._thread.start()

    def _run(self) -> None:
        import urllib.request

        while not self._stop.wait(self._every):
            try:
                urllib.request.urlopen(self.url, timeout=5).read()
                self.scrapes += 1
            except OSError:
                pass

    def stop(self) -> None:
        self._stop.set()
        if self.url:
            self._thread.join(10)
            print(f"  {self.scrapes} scrapes of {self.url}", file=sys.stderr)


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


def bench_ort(args: argparse.Namespace, pinned: bool, outdir: Path,
              batch_sizes: list[int] | None = None) -> OrtResult:
    pinning = "pinned" if pinned else "unpinned"
    result = OrtResult(pinning)
    batch_sizes = batch_sizes or args.batch_sizes
    model = Path(args.onnx) if args.onnx else Path(args.model_repository) / args.model / "1" / "model.onnx"
    if not model.is_file():
        result.error = f"{model} not found"
        return result
    cmd = pin([sys.executable, str(Path(__file__).resolve()), "--ort-worker", str(model),
               "--batch-sizes", ",".join(map(str, batch_sizes)), "--ort-seconds", str(args.ort_seconds)],
              SERVER_CORE, pinned)
    print(f"onnxruntime ({pinning}): {model}, batch sizes {','.join(map(str, batch_sizes))}", file=sys.stderr)
    return run_baseline_worker(cmd, 60 + 4 * args.ort_seconds * len(batch_sizes), outdir / f"ort-{pinning}.log", result)


def formed_batch_sizes(rows: list[Row], base: list[int]) -> list[int]:
    """`base` plus the (rounded) mean batch size of every run: where the ONNX Runtime ceiling is measured."""
    formed = {max(1, round(r.mean_batch)) for r in rows if r.mean_batch}
    return sorted(set(base) | formed)


# --------------------------------------------------------------------------- TorchScript baseline


def torch_worker(model_path: str, batch_sizes: list[int], seconds: float) -> int:
    """Runs inside the (pinned) subprocess: prints one JSON object per batch size, like ort_worker.
    The input shape comes from the model's config.pbtxt (first input, FP32)."""
    import numpy as np
    import torch
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as mc

    torch.set_num_threads(1)
    config = text_format.Parse((Path(model_path).parent.parent / "config.pbtxt").read_text(), mc.ModelConfig())
    dims = [d if d > 0 else 1 for d in config.input[0].dims]
    module = torch.jit.load(model_path)
    module.eval()
    rng = np.random.default_rng(0)
    for batch in batch_sizes:
        x = torch.from_numpy(rng.standard_normal([batch, *dims]).astype(np.float32))
        with torch.inference_mode():
            for _ in range(200):
                module(x)
            t0 = time.perf_counter()
            for _ in range(100):
                module(x)
            per = (time.perf_counter() - t0) / 100
            n = max(20, int(seconds / 7 / per))
            samples = []
            for _ in range(7):
                t0 = time.perf_counter_ns()
                for _ in range(n):
                    module(x)
                samples.append((time.perf_counter_ns() - t0) / n / 1000.0)
        us = statistics.median(samples)
        print(json.dumps({"batch": batch, "us": us, "rows_per_s": batch * 1e6 / us, "runs": 7 * n}), flush=True)
    return 0


def bench_torch(args: argparse.Namespace, pinned: bool, outdir: Path) -> OrtResult:
    pinning = "pinned" if pinned else "unpinned"
    result = OrtResult(pinning)
    model = Path(args.model_repository) / args.torch_model / "1" / "model.pt"
    if not model.is_file():
        result.error = f"{model} not found (scripts/gen_torch_models.py makes mlp_torch)"
        return result
    cmd = pin([sys.executable, str(Path(__file__).resolve()), "--torch-worker", str(model),
               "--batch-sizes", ",".join(map(str, args.batch_sizes)), "--ort-seconds", str(args.ort_seconds)],
              SERVER_CORE, pinned)
    print(f"torchscript ({pinning}): {model}", file=sys.stderr)
    return run_baseline_worker(
        cmd, 90 + 4 * args.ort_seconds * len(args.batch_sizes), outdir / f"torch-{pinning}.log", result)


def run_baseline_worker(cmd: list[str], timeout: float, log_path: Path, result: Any) -> Any:
    """Run an in-process baseline subprocess; its stdout JSON lines become `result.rows`."""
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        result.error = f"timed out after {timeout:.0f}s"
        return result
    log_path.write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        result.error = f"exit {proc.returncode}: {(proc.stderr.strip().splitlines() or [''])[-1]}"
        return result
    result.rows = [json.loads(ln) for ln in proc.stdout.splitlines() if ln.startswith("{")]
    return result


# --------------------------------------------------------------------------- report


def fmt(v: float | None, spec: str) -> str:
    return "—" if v is None else format(v, spec)


def perf_table(rows: list[Row], ort_results: list[OrtResult] | None = None) -> str:
    """One row per run. With batch statistics: the mean batch size that formed (most frequent sizes)
    and, where the ONNX Runtime baseline measured that size, the run as a % of that ceiling."""
    ceiling = {(r.pinning, r.concurrency, r.mode): r.infer_per_s
               for r in rows if r.target == "echo" and r.infer_per_s}
    ceiling2 = {(r.pinning, r.concurrency, r.mode): r.infer_per_s
                for r in rows if r.target == "echo2" and r.infer_per_s}
    with_cpu = any(r.cpu_us for r in rows)
    ort = {res.pinning: {o["batch"]: o["rows_per_s"] for o in res.rows if "rows_per_s" in o}
           for res in ort_results or []}
    with_mode = len({r.mode for r in rows}) > 1
    with_batches = any(r.mean_batch for r in rows)
    head = "| target |" + (" mode |" if with_mode else "") + " pinning | concurrency | infer/s | p50 ms | p99 ms " \
        "| % of echo |"
    rule = "|---|" + ("---|" if with_mode else "") + "---|---:|---:|---:|---:|---:|"
    if ceiling2:
        head += " % of echo2 |"
        rule += "---:|"
    if with_cpu:
        head += " server CPU µs/req |"
        rule += "---:|"
    if with_batches:
        head += " mean batch (top sizes) | ORT rows/s at that batch | % of ORT |"
        rule += "---|---:|---:|"
    out = [head, rule]
    for r in rows:
        lead = f"| {r.target} |" + (f" {r.mode} |" if with_mode else "") + f" {r.pinning} | {r.concurrency} |"
        if r.error:
            out.append(f"{lead} error: {r.error.replace('|', '/')} | | | |" + (" |" if ceiling2 else "")
                       + (" |" if with_cpu else "") + (" | | |" if with_batches else ""))
            continue
        echo = ceiling.get((r.pinning, r.concurrency, r.mode))
        pct = f"{100 * r.infer_per_s / echo:.0f} %" if echo and r.infer_per_s is not None else "—"
        p50 = None if r.p50_us is None else r.p50_us / 1000
        p99 = None if r.p99_us is None else r.p99_us / 1000
        line = f"{lead} {fmt(r.infer_per_s, '.0f')} | {fmt(p50, '.3f')} | {fmt(p99, '.3f')} | {pct} |"
        if ceiling2:
            echo2 = ceiling2.get((r.pinning, r.concurrency, r.mode))
            line += f" {100 * r.infer_per_s / echo2:.0f} % |" if echo2 and r.infer_per_s is not None else " — |"
        if with_cpu:
            line += f" {fmt(r.cpu_us, '.0f')} |"
        if with_batches:
            batch = max(1, round(r.mean_batch)) if r.mean_batch else None
            rows_per_s = ort.get(r.pinning, {}).get(batch) if batch else None
            of_ort = f"{100 * r.infer_per_s / rows_per_s:.0f} %" if rows_per_s and r.infer_per_s else "—"
            mean = f"{r.mean_batch:.2f} ({r.batch_summary})" if r.mean_batch else "—"
            line += f" {mean} | {fmt(rows_per_s, ',.0f')} | {of_ort} |"
        out.append(line)
    return "\n".join(out)


def ort_table(results: list[OrtResult], title: str = "in-process ONNX Runtime, 1 intra-op thread") -> str:
    out = [f"| {title} | batch | µs per run | rows/s |",
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
    ap.add_argument("--scrape-every", type=float, default=0.0, metavar="S",
                    help="scrape each Nereid target's /metrics every S seconds while it is measured (0: never)")
    ap.add_argument("--baseline-checkout", default="", metavar="DIR",
                    help="for target 'baseline': a checkout of another commit (git worktree add DIR REV), "
                    "served with this environment, to compare two commits in one run")
    ap.add_argument("--targets", default="echo,nereid",
                    help=f"comma-separated, from {','.join(KNOWN_TARGETS)} (default echo,nereid)")
    ap.add_argument("--concurrency", type=int_list, default=[1, 16, 64], help="default 1,16,64")
    ap.add_argument("--streaming", action="store_true", help="ModelStreamInfer (perf_analyzer --streaming)")
    ap.add_argument("--modes", type=mode_list,
                    help="comma-separated from unary,streaming: run every target in each (default unary, "
                         "or streaming with --streaming)")
    ap.add_argument("--variants", type=variant_list,
                    help="replace the nereid target by MODEL under config variants: direct-N (no dynamic "
                         "batching) / batched-N (dynamic_batching {}), N instances; `all` = "
                         "direct-1,direct-2,batched-1,batched-2")
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
    ap.add_argument("--torch-model", default="mlp_torch",
                    help="TorchScript model for the nereid-torch target and its in-process baseline "
                         "(default mlp_torch)")
    ap.add_argument("--no-torch", action="store_true",
                    help="skip the in-process TorchScript baseline of the nereid-torch target")
    ap.add_argument("--ort-worker", help=argparse.SUPPRESS)
    ap.add_argument("--torch-worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.pa_timeout is None:
        args.pa_timeout = max(60.0, 3 * args.max_trials * args.measurement_interval / 1000)
    args.target_list = [t.strip() for t in args.targets.split(",") if t.strip()]
    bad = [t for t in args.target_list if t not in KNOWN_TARGETS]
    if bad:
        ap.error(f"unknown target(s) {','.join(bad)}; known: {','.join(KNOWN_TARGETS)}")
    if args.modes is None:
        args.modes = ["streaming"] if args.streaming else ["unary"]
    elif args.streaming and "streaming" not in args.modes:
        ap.error("--streaming contradicts --modes " + ",".join(args.modes))
    args.streaming = args.modes == ["streaming"]
    args.variant_repos = {}  # target name -> generated repository (filled in main)
    if args.variants:
        args.target_list = [t for t in args.target_list if t != "nereid"] + [f"nereid-{v}" for v in args.variants]
    return args


def on_signal(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.ort_worker:
        return ort_worker(args.ort_worker, args.batch_sizes, args.ort_seconds)
    if args.torch_worker:
        return torch_worker(args.torch_worker, args.batch_sizes, args.ort_seconds)

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
    torch_results: list[OrtResult] = []
    live: list[Server] = []
    try:
        for variant in args.variants or []:
            args.variant_repos[f"nereid-{variant}"] = str(make_variant_repo(
                Path(args.model_repository), args.model, variant, outdir / "repos" / variant))
        if any(t in PAYLOAD_TARGETS for t in args.target_list):
            payloads = str(make_payload_repo(outdir))
            args.variant_repos.update({t: payloads for t in PAYLOAD_TARGETS})
        for pinned in pinnings:
            if "nereid-torch" in args.target_list and not args.no_torch:
                torch_results.append(bench_torch(args, pinned, outdir))
            # echo first: the others are reported against it.
            pinned_rows: list[Row] = []
            for target in sorted(args.target_list, key=lambda t: t not in ECHO_TARGETS):
                pinned_rows.extend(bench_target(target, args, pinned, outdir, live))
            rows.extend(pinned_rows)
            if not args.no_ort:  # after the servers: also at the batch sizes that formed
                ort_results.append(bench_ort(args, pinned, outdir, formed_batch_sizes(pinned_rows, args.batch_sizes)))
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    finally:
        for server in live:
            kill_group(server.proc)

    mode = " and ".join("ModelStreamInfer (--streaming)" if m == "streaming" else "unary ModelInfer"
                        for m in args.modes)
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
        + (" `--streaming`" if args.modes == ["streaming"] else
           " (and `--streaming` for the streaming rows)" if "streaming" in args.modes else ""),
        f"- logs: `{outdir.relative_to(ROOT)}/`",
        "",
    ]
    parts = ["\n".join(header)]
    if rows:
        parts.append(perf_table(rows, ort_results))
    if ort_results:
        parts.append(ort_table(ort_results))
    if torch_results:
        parts.append(ort_table(torch_results, f"in-process TorchScript `{args.torch_model}`, 1 intra-op thread"))
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
