#!/usr/bin/env python3
"""Probe: how gRPC connections spread over N bare echo processes sharing one port (SO_REUSEPORT).

A measurement for the upcoming `nereid serve --workers N` design (issue 12), not a feature.
With SO_REUSEPORT the kernel picks a listening socket per *TCP connection*; every HTTP/2
stream on that connection then goes to the same process. So what a multi-process server can
spread is bounded by how many connections a client opens. This script measures that:

- `N` (default 1 and 2) copies of scripts/bench_echo.py's servicer run on one 127.0.0.1 port
  with the gRPC option `grpc.so_reuseport` = 1. Each counts the infer requests it answers per
  peer address (`context.peer()`, one per TCP connection) and writes them to a JSON file when
  it is stopped; `ss` is also sampled mid-run for the established connections per process.
- Loads: perf_analyzer (`--async`, unary and `--streaming`) at each concurrency; a Python
  tritonclient.grpc.aio client with one channel; a pool of K such clients (default channel
  arguments, so gRPC's global subchannel pool may share one connection among them); a pool
  whose channels each get `grpc.use_local_subchannel_pool` = 1.
- Every load is bounded (perf_analyzer killed at --pa-timeout, at most 60 s; Python clients
  run --client-seconds) and repeated --repeats times. Server CPU seconds (utime+stime from
  /proc) are read before and after, giving server CPU µs per request.

Prints one markdown table row per run and, with `--json FILE`, writes all runs.

Usage: scripts/probe_connections.py [--workers 1,2] [--concurrency 1,16,64] [--repeats 2]
                                    [--loads pa-unary,pa-streaming,client-one,client-pool,client-pool-local]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

PERF_ANALYZER = Path(os.environ.get("PERF_ANALYZER", ROOT / ".tools" / "bin" / "perf_analyzer"))
if not PERF_ANALYZER.exists():
    PERF_ANALYZER = Path("/work/main/.tools/bin/perf_analyzer")
HOST = "127.0.0.1"
ALL_LOADS = ("pa-unary", "pa-streaming", "client-one", "client-pool", "client-pool-local")


# --------------------------------------------------------------------------- the echo worker


def run_worker(port: int, stats_path: str) -> int:
    """One echo process: bench_echo's servicer with SO_REUSEPORT and per-peer request counts."""
    import grpc
    from bench_echo import EchoServicer, default_config, serve
    from tritonclient.grpc import service_pb2 as pb

    counts: Counter[str] = Counter()

    class CountingEcho(EchoServicer):
        async def ModelInfer(self, request: pb.ModelInferRequest,
                             context: grpc.aio.ServicerContext) -> pb.ModelInferResponse:
            counts[context.peer()] += 1
            return self.echo(request)

        async def ModelStreamInfer(self, request_iterator: AsyncIterator[pb.ModelInferRequest],
                                   context: grpc.aio.ServicerContext
                                   ) -> AsyncIterator[pb.ModelStreamInferResponse]:
            peer = context.peer()
            async for request in request_iterator:
                counts[peer] += 1
                yield pb.ModelStreamInferResponse(infer_response=self.echo(request))

    def write_counts() -> None:
        Path(stats_path).write_text(json.dumps({"pid": os.getpid(), "peers": dict(counts)}))

    cfg = default_config("mlp")
    asyncio.run(serve(HOST, port, cfg, reuse_port=True, servicer=CountingEcho(cfg), on_stop=write_counts))
    return 0


class Workers:
    """N worker processes on one port; the first binds port 0, the others its port."""

    def __init__(self, n: int, tmp: Path) -> None:
        self.procs: list[subprocess.Popen[str]] = []
        self.stats: list[Path] = []
        self.port = 0
        try:
            for i in range(n):
                stats = tmp / f"worker{i}-{time.monotonic_ns()}.json"
                proc = subprocess.Popen(
                    [sys.executable, __file__, "worker", "--port", str(self.port), "--stats", str(stats)],
                    stdout=subprocess.PIPE, text=True, start_new_session=True)
                self.procs.append(proc)
                self.stats.append(stats)
                assert proc.stdout is not None
                line = proc.stdout.readline()
                m = re.match(r"port: (\d+)", line)
                if not m:
                    raise RuntimeError(f"worker {i} did not start: {line!r}")
                self.port = int(m.group(1))
        except BaseException:
            self.stop()
            raise

    def cpu_seconds(self) -> float:
        total = 0.0
        tick = os.sysconf("SC_CLK_TCK")
        for p in self.procs:
            fields = Path(f"/proc/{p.pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
        return total

    def connections(self) -> dict[int, int]:
        """Established TCP connections per worker pid, from `ss` (server side of the port)."""
        out = subprocess.run(["ss", "-Htnp", "state", "established", f"( sport = :{self.port} )"],
                             capture_output=True, text=True, timeout=10).stdout
        per: Counter[int] = Counter()
        for m in re.finditer(r"pid=(\d+)", out):
            per[int(m.group(1))] += 1
        return {p.pid: per.get(p.pid, 0) for p in self.procs}

    def stop(self) -> list[dict[str, Any]]:
        result = []
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p, stats in zip(self.procs, self.stats, strict=False):
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
            if stats.exists():
                result.append(json.loads(stats.read_text()))
                stats.unlink()
        self.procs = []
        return result


# --------------------------------------------------------------------------- loads


def run_pa(port: int, concurrency: int, streaming: bool, tmp: Path, args: argparse.Namespace,
           sample: Any) -> dict[str, Any]:
    csv_path = tmp / f"pa-{time.monotonic_ns()}.csv"
    cmd = [str(PERF_ANALYZER), "-i", "grpc", "-u", f"{HOST}:{port}", "-m", "mlp", "-b", "1",
           f"--concurrency-range={concurrency}:{concurrency}",
           "--measurement-interval", str(args.measurement_interval),
           "--stability-percentage", str(args.stability_percentage), "--max-trials", str(args.max_trials),
           "--async", "-f", str(csv_path)]
    if streaming:
        cmd.append("--streaming")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    time.sleep(min(3.0, args.measurement_interval / 1000))
    snap = sample()
    try:
        out, _ = proc.communicate(timeout=args.pa_timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return {"error": "perf_analyzer timed out", "ss": snap}
    if proc.returncode != 0 or not csv_path.exists():
        # Unstable on a busy machine: keep the last trial's throughput, marked as such.
        found = re.findall(r"Throughput: ([0-9.]+) infer/sec", out)
        if found:
            return {"infer_per_s": float(found[-1]), "unstable": True, "ss": snap}
        return {"error": f"perf_analyzer exit {proc.returncode}: {out.strip().splitlines()[-1:]}", "ss": snap}
    lines = csv_path.read_text().splitlines()
    row = dict(zip(lines[0].split(","), lines[1].split(","), strict=False))
    csv_path.unlink()
    return {"infer_per_s": float(row["Inferences/Second"]), "p50_us": float(row["p50 latency"]), "ss": snap}


async def client_load(port: int, channels: int, local_pool: bool, concurrency: int, seconds: float) -> int:
    import numpy as np
    import tritonclient.grpc.aio as grpcclient

    channel_args = None
    if local_pool:
        channel_args = [("grpc.use_local_subchannel_pool", 1),
                        ("grpc.max_send_message_length", 2**31 - 1),
                        ("grpc.max_receive_message_length", 2**31 - 1)]
    clients = [grpcclient.InferenceServerClient(f"{HOST}:{port}", channel_args=channel_args)
               for _ in range(channels)]
    inp = grpcclient.InferInput("INPUT0", [1, 64], "FP32")
    inp.set_data_from_numpy(np.ones((1, 64), dtype=np.float32))
    done = 0
    deadline = time.monotonic() + seconds

    async def worker(i: int) -> None:
        nonlocal done
        client = clients[i % channels]
        while time.monotonic() < deadline:
            await client.infer("mlp", [inp])
            done += 1

    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    for c in clients:
        await c.close()
    return done


def run_client(port: int, load: str, concurrency: int, args: argparse.Namespace, sample: Any) -> dict[str, Any]:
    channels = 1 if load == "client-one" else args.pool
    cmd = [sys.executable, __file__, "client", "--port", str(port), "--channels", str(channels),
           "--concurrency", str(concurrency), "--seconds", str(args.client_seconds)]
    if load == "client-pool-local":
        cmd.append("--local-pool")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, start_new_session=True)
    time.sleep(args.client_seconds / 2)
    snap = sample()
    try:
        out, _ = proc.communicate(timeout=args.client_seconds + 30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return {"error": "client timed out", "ss": snap}
    done = int(out.strip().splitlines()[-1])
    return {"infer_per_s": done / args.client_seconds, "ss": snap}


# --------------------------------------------------------------------------- driver


def one_run(n: int, load: str, concurrency: int, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    workers = Workers(n, tmp)
    try:
        cpu0 = workers.cpu_seconds()
        if load.startswith("pa-"):
            res = run_pa(workers.port, concurrency, load == "pa-streaming", tmp, args, workers.connections)
        else:
            res = run_client(workers.port, load, concurrency, args, workers.connections)
        cpu = workers.cpu_seconds() - cpu0
    finally:
        stats = workers.stop()
    per_proc = []
    for s in stats:
        per_proc.append({"pid": s["pid"], "connections_with_requests": len(s["peers"]),
                         "requests": sum(s["peers"].values()),
                         "ss_connections": res.get("ss", {}).get(s["pid"], 0)})
    total_req = sum(p["requests"] for p in per_proc)
    res.update(workers=n, load=load, concurrency=concurrency, per_process=per_proc,
               server_cpu_s=round(cpu, 3),
               server_cpu_us_per_req=round(cpu / total_req * 1e6, 1) if total_req else None)
    res.pop("ss", None)
    return res


def fmt_row(r: dict[str, Any]) -> str:
    procs = r["per_process"]
    conns = " + ".join(str(p["connections_with_requests"]) for p in procs)
    ss = " + ".join(str(p["ss_connections"]) for p in procs)
    total = sum(p["requests"] for p in procs) or 1
    share = " / ".join(f"{100 * p['requests'] / total:.0f}%" for p in procs)
    tput = f"{r['infer_per_s']:.0f}" if "infer_per_s" in r else r.get("error", "?")
    if r.get("unstable"):
        tput += " (unstable)"
    return (f"| {r['workers']} | {r['load']} | {r['concurrency']} | {conns} | {ss} | {share} | {tput} "
            f"| {r['server_cpu_us_per_req']} |")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd")
    w = sub.add_parser("worker")
    w.add_argument("--port", type=int, required=True)
    w.add_argument("--stats", required=True)
    c = sub.add_parser("client")
    c.add_argument("--port", type=int, required=True)
    c.add_argument("--channels", type=int, default=1)
    c.add_argument("--local-pool", action="store_true")
    c.add_argument("--concurrency", type=int, default=64)
    c.add_argument("--seconds", type=float, default=5)
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--concurrency", default="1,16,64")
    ap.add_argument("--loads", default=",".join(ALL_LOADS))
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--measurement-interval", type=int, default=2000, help="perf_analyzer ms (default 2000)")
    ap.add_argument("--max-trials", type=int, default=6)
    ap.add_argument("--stability-percentage", type=int, default=50,
                    help="perf_analyzer stability (default 50: the shared 2-core machine is noisy)")
    ap.add_argument("--pa-timeout", type=float, default=60.0, help="kill perf_analyzer after this (max 60)")
    ap.add_argument("--client-seconds", type=float, default=5.0)
    ap.add_argument("--pool", type=int, default=4, help="channels in the client-pool loads (default 4)")
    ap.add_argument("--json", help="write all runs to this file")
    args = ap.parse_args(argv)
    if args.cmd == "worker":
        return run_worker(args.port, args.stats)
    if args.cmd == "client":
        print(asyncio.run(client_load(args.port, args.channels, args.local_pool, args.concurrency, args.seconds)))
        return 0
    args.pa_timeout = min(args.pa_timeout, 60.0)
    loads = [x for x in args.loads.split(",") if x]
    unknown = set(loads) - set(ALL_LOADS)
    if unknown:
        ap.error(f"unknown loads {sorted(unknown)}")
    print(f"# {time.strftime('%Y-%m-%d %H:%M:%S')} load average {os.getloadavg()}, {os.cpu_count()} cores")
    print("| workers | load | c | conns with requests per proc | ss conns per proc | request share "
          "| infer/s | server CPU µs/req |")
    print("|---|---|---|---|---|---|---|---|")
    runs = []
    with tempfile.TemporaryDirectory(prefix="probe-conn-") as d:
        for rep in range(args.repeats):
            for load in loads:
                for conc in [int(x) for x in args.concurrency.split(",")]:
                    for n in [int(x) for x in args.workers.split(",")]:
                        r = one_run(n, load, conc, args, Path(d))
                        r["repeat"] = rep
                        runs.append(r)
                        print(fmt_row(r), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(runs, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
