#!/usr/bin/env python3
"""Soak test: a real Nereid server on 127.0.0.1 under mixed traffic, with a model reload halfway.

Starts `python -m server.cli serve` on a temporary model repository (soak_repo.py: identity
models with and without a dynamic batcher, a slow one, the ONNX `mlp`, a Python-backend model),
bound to 127.0.0.1 only, and for --duration seconds (at most MAX_DURATION) runs client threads
(soak_traffic.py) at about --rate requests/s in all:

  valid      tritonclient sync infer and bidirectional streams; every answer is checked
  invalid    wrong shape/dtype/size, unknown model/version, bad parameters, shared memory,
             undecodable bodies, a bad request inside a stream, 1 MiB size mismatches
  cancelled  client deadlines shorter than the slow model's delay, tritonclient async_infer
             cancelled explicitly, streams cancelled while their request runs
  control    liveness, readiness, health, metadata, config, index, statistics

Halfway it reloads models: in poll mode (default) version 2 folders appear (renamed into place)
and a config.pbtxt changes; with --control explicit the same changes are loaded with
RepositoryModelLoad (the config change as a `config` override). Versions must swap without a
failed request, and the new versions must be seen serving.

It fails (exit status 1) when any request ended unexpectedly (a valid one not OK, an invalid one
with another status than its case expects, a CANCELLED or DEADLINE_EXCEEDED the client did not
cause, a wrong output, no answer), when the reload was not seen, when the server died or logged
a traceback, when it did not shut down cleanly on SIGTERM, or when its RSS grew by more than
--max-rss-growth-mb between the end of the warm-up and the end.

Usage: scripts/soak [--duration 60] [--rate 150] [--control poll|explicit] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

SCRIPTS = Path(__file__).resolve().parent
sys.path.insert(0, str(SCRIPTS))

from soak_reload import reload_models, wait_for_reload  # noqa: E402
from soak_repo import build_repository  # noqa: E402
from soak_report import render  # noqa: E402
from soak_tally import Tally  # noqa: E402
from soak_traffic import start_workers  # noqa: E402

ROOT = SCRIPTS.parent
sys.path.insert(0, str(ROOT))
from server.exit_guard import children  # noqa: E402  (the server's children: Python stubs, frontends)

PYTHON = str(ROOT / ".venv" / "bin" / "python") if (ROOT / ".venv" / "bin" / "python").exists() else sys.executable
MAX_DURATION = 3600.0  # hard cap on --duration: a soak is bounded, whatever is asked
MAX_RATE = 1000.0
# Whatever hangs (a client call, the server's shutdown), the whole soak ends by --duration plus this.
HARD_MARGIN = 300.0
JOIN_TIMEOUT = 30.0  # after the traffic stops, client threads must finish (every call has a deadline)
STARTED_RE = re.compile(r"Started GRPCInferenceService at 127\.0\.0\.1:(\d+)")
LOADED_RE = re.compile(r"models loaded; server")
EXIT_TIMEOUT = 10  # --exit-timeout-secs given to the server


class Server:
    """The Nereid server under test: a subprocess on 127.0.0.1, stderr kept in a log file."""

    def __init__(self, repo: Path, control: str, log_path: Path, startup_timeout: float,
                 extra: tuple[str, ...] = ()) -> None:
        cmd = [PYTHON, "-m", "server.cli", "serve", "--model-repository", str(repo),
               "--grpc-address", "127.0.0.1", "--grpc-port", "0",
               "--metrics-address", "127.0.0.1", "--metrics-port", "0",
               "--http-address", "127.0.0.1", "--http-port", "0",
               "--model-control-mode", control, "--exit-timeout-secs", str(EXIT_TIMEOUT)]
        cmd += ["--repository-poll-secs", "0.5"] if control == "poll" else ["--load-model", "*"]
        cmd += extra
        self.cmd = cmd
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._log = log_path.open("w", encoding="utf-8")
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=dict(os.environ, PYTHONUNBUFFERED="1"),
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     text=True, errors="replace")
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        try:
            port = self.wait_for(STARTED_RE, startup_timeout)
            self.port = int(port.group(1))
            self.wait_for(LOADED_RE, startup_timeout)
        except BaseException:
            self.proc.kill()
            self.proc.wait(10)
            self._finish()
            raise

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self._log.write(line)
            self._log.flush()
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def wait_for(self, pattern: re.Pattern[str], timeout: float) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for line in self.lines:
                    if match := pattern.search(line):
                        return match
                if self.proc.poll() is not None and not self._reader.is_alive():
                    raise RuntimeError(f"server exited with {self.proc.returncode} while starting:\n" + self.tail())
                if time.monotonic() > deadline:
                    raise TimeoutError(f"server did not log {pattern.pattern!r} in {timeout:.0f}s:\n" + self.tail())
                self._cond.wait(0.2)

    def tail(self, n: int = 30) -> str:
        return "\n".join(self.lines[-n:])

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.port}"

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> tuple[int | None, float]:
        """SIGTERM and wait (SIGKILL after the exit timeout and a margin): (exit code, seconds)."""
        start = time.monotonic()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(EXIT_TIMEOUT + 15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
                self._finish()
                return None, time.monotonic() - start
        self._finish()
        return self.proc.returncode, time.monotonic() - start

    def _finish(self) -> None:
        self._reader.join(5)
        self._log.close()


# ---------------------------------------------------------------------------
# Memory of the server process (and of its Python-backend stubs)


def proc_status_kb(pid: int, field: str) -> int | None:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def children_rss_kb(pid: int) -> int:
    return sum(proc_status_kb(child, "VmRSS") or 0 for child in children(pid))


class MemoryMonitor(threading.Thread):
    """Samples the server's VmRSS every `period` seconds; notices when the process is gone."""

    def __init__(self, pid: int, period: float = 0.25) -> None:
        super().__init__(name="soak-memory", daemon=True)
        self.pid = pid
        self.period = period
        self.samples: list[tuple[float, int]] = []
        self.stop_event = threading.Event()
        self.died_at: float | None = None

    def run(self) -> None:
        start = time.monotonic()
        while not self.stop_event.wait(self.period):
            rss = proc_status_kb(self.pid, "VmRSS")
            if rss is None:
                self.died_at = time.monotonic() - start
                return
            self.samples.append((time.monotonic() - start, rss))

    def rss_kb(self) -> int | None:
        return proc_status_kb(self.pid, "VmRSS")


# ---------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").rsplit("\nUsage:", 1)[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=60.0,
                        help=f"seconds of traffic (default 60, at most {MAX_DURATION:.0f})")
    parser.add_argument("--rate", type=float, default=150.0,
                        help="requests per second over all client threads (default 150; fits a 2-core machine)")
    parser.add_argument("--control", choices=("poll", "explicit"), default="poll",
                        help="how the mid-run reload happens: poll (new version folders, changed config.pbtxt, "
                             "picked up by the poller) or explicit (RepositoryModelLoad) (default poll)")
    parser.add_argument("--max-rss-growth-mb", type=float, default=64.0,
                        help="fail if the server's RSS grows by more than this from the end of the warm-up "
                             "to the end (default 64)")
    parser.add_argument("--warmup", type=float, default=None,
                        help="seconds of traffic before the RSS baseline is taken (default: 15%% of --duration, "
                             "at least 1 s and at most 10 s)")
    parser.add_argument("--server-arg", action="append", default=[],
                        help="an extra server flag, e.g. --server-arg=--workers=2 (repeatable)")
    parser.add_argument("--json", type=Path, default=None, help="also write every number to this file")
    parser.add_argument("--keep", action="store_true", help="keep the temporary repository and server log")
    args = parser.parse_args(argv)
    if not 0 < args.duration <= MAX_DURATION:
        parser.error(f"--duration must be in (0, {MAX_DURATION:.0f}] seconds")
    if not 0 < args.rate <= MAX_RATE:
        parser.error(f"--rate must be in (0, {MAX_RATE:.0f}]")
    if args.warmup is None:
        args.warmup = min(10.0, max(1.0, 0.15 * args.duration))
    args.warmup = min(args.warmup, args.duration / 3)
    return args


_servers: list[Server] = []  # for the watchdog


def _out_of_time(limit: float) -> None:
    """The watchdog: the soak ran past its hard limit. Kill the server and exit at once."""
    print(f"soak: still running {limit:.0f}s after it started (hard limit); killing the server", file=sys.stderr)
    for server in _servers:
        if server.proc.poll() is None:
            server.proc.kill()
    os._exit(2)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    limit = args.duration + HARD_MARGIN
    watchdog = threading.Timer(limit, _out_of_time, args=(limit,))
    watchdog.daemon = True
    watchdog.start()
    workdir = Path(tempfile.mkdtemp(prefix="nereid-soak-"))
    repo = workdir / "repo"
    repo.mkdir()
    build_repository(repo)
    log_path = workdir / "server.log"
    try:
        result = run(args, repo, log_path)
    finally:
        watchdog.cancel()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    if args.keep:
        result["workdir"] = str(workdir)
    print(render(result))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0 if result["passed"] else 1


def run(args: argparse.Namespace, repo: Path, log_path: Path) -> dict[str, Any]:
    problems: list[str] = []
    started = time.monotonic()
    server = Server(repo, args.control, log_path, startup_timeout=120, extra=tuple(args.server_arg))
    _servers.append(server)
    startup_s = time.monotonic() - started
    stubs_start = children(server.proc.pid)
    stubs_start_kb = children_rss_kb(server.proc.pid)
    time.sleep(0.3)  # let the loader threads settle before the idle baseline
    rss_start = proc_status_kb(server.proc.pid, "VmRSS") or 0
    monitor = MemoryMonitor(server.proc.pid)
    monitor.start()
    tally = Tally()
    stop = threading.Event()
    rss_warm = rss_start
    reload_info: dict[str, Any] = {"mode": args.control}
    try:
        t0 = time.monotonic()
        workers = start_workers(server.url, tally, stop, args.rate)
        time.sleep(args.warmup)
        rss_warm = monitor.rss_kb() or rss_warm
        midpoint = t0 + args.duration / 2
        time.sleep(max(0.0, midpoint - time.monotonic()))
        reload_at = time.monotonic() - t0
        try:
            reload_models(server.url, repo, args.control)
            seen = wait_for_reload(server.url, timeout=max(20.0, args.duration / 2))
            reload_info.update(at_s=round(reload_at, 1), observed_after_s=round(seen, 2))
        except Exception as exc:  # the reload RPC failed, or the new versions never served
            problems.append(f"reload: {exc}")
            reload_info.update(at_s=round(reload_at, 1), error=str(exc))
        time.sleep(max(0.0, t0 + args.duration - time.monotonic()))
        stop.set()
        join_until = time.monotonic() + JOIN_TIMEOUT
        for worker in workers:
            worker.join(max(0.0, join_until - time.monotonic()))
        hung = [w.name for w in workers if w.is_alive()]
        if hung:
            problems.append(f"client threads still waiting {JOIN_TIMEOUT:.0f}s after the end: {', '.join(hung)}")
        traffic_s = time.monotonic() - t0
        time.sleep(0.5)  # let the server release what the last requests held
        alive = server.alive()
        rss_end = proc_status_kb(server.proc.pid, "VmRSS") if alive else None
        rss_peak = proc_status_kb(server.proc.pid, "VmHWM") if alive else None
        stubs_end = children(server.proc.pid) if alive else []
        stubs_end_kb = children_rss_kb(server.proc.pid) if alive else 0
    finally:
        stop.set()
        monitor.stop_event.set()
        exit_code, stop_s = server.stop()
    if not alive:
        problems.append(f"server died during the soak (exit code {server.proc.returncode}, "
                        f"after {monitor.died_at or 0:.1f}s)")
    elif exit_code != 0:
        problems.append(f"server exit code {exit_code} after SIGTERM (took {stop_s:.1f}s)")
    if len(stubs_end) > len(stubs_start):
        problems.append(f"{len(stubs_end)} child processes (Python stubs) at the end, {len(stubs_start)} at the start: "
                        "the reload left old stubs running")
    tracebacks = sum(1 for line in server.lines if line.startswith("Traceback"))
    if tracebacks:
        problems.append(f"server logged {tracebacks} traceback(s)")
    counts = tally.snapshot()
    if counts["failed"]:
        problems.append(f"{counts['failed']} request(s) failed: {counts['failed_by_status']}")
    growth_mb = None
    if rss_end is not None:
        growth_mb = (rss_end - rss_warm) / 1024
        if growth_mb > args.max_rss_growth_mb:
            problems.append(f"server RSS grew {growth_mb:.1f} MB after warm-up (bound {args.max_rss_growth_mb} MB)")
    samples = [kb for _, kb in monitor.samples]
    step = max(1, len(monitor.samples) // 12)
    timeline = [[round(t, 1), round(kb / 1024, 1)] for t, kb in monitor.samples[::step]]
    return {
        "passed": not problems,
        "problems": problems,
        "duration_s": args.duration,
        "traffic_s": round(traffic_s, 1),
        "rate_target": args.rate,
        "startup_s": round(startup_s, 1),
        "reload": reload_info,
        "server": {
            "alive_at_end": alive,
            "exit_code": exit_code,
            "shutdown_s": round(stop_s, 2),
            "tracebacks_in_log": tracebacks,
            "log_lines": len(server.lines),
            "log_tail": server.tail(15) if problems else "",
        },
        "rss_mb": {
            "start": round(rss_start / 1024, 1),
            "after_warmup": round(rss_warm / 1024, 1),
            "end": None if rss_end is None else round(rss_end / 1024, 1),
            "peak_sampled": round(max(samples) / 1024, 1) if samples else None,
            "peak_vmhwm": None if rss_peak is None else round(rss_peak / 1024, 1),
            "growth_after_warmup": None if growth_mb is None else round(growth_mb, 1),
            "growth_bound": args.max_rss_growth_mb,
            "python_stubs_start": round(stubs_start_kb / 1024, 1),
            "python_stubs_end": round(stubs_end_kb / 1024, 1),
            "python_stub_processes_start": len(stubs_start),
            "python_stub_processes_end": len(stubs_end),
            "timeline": timeline,
        },
        **counts,
    }


if __name__ == "__main__":
    sys.exit(main())
