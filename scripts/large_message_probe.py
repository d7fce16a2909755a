#!/usr/bin/env python3
"""How a server copes with one large request: peak memory and how long other calls wait.

Starts the server (Nereid on an identity model, or a bare grpc.aio echo with a raw-bytes
handler as the floor any grpcio server shares), sends `--mb` MB requests one at a time,
and meanwhile a separate process calls ServerLive every 10 ms. Reports, per request: the
time it took, the server's peak RSS above its idle RSS as a multiple of the payload, its
RSS after, and the longest ServerLive wait.

    .venv/bin/python scripts/large_message_probe.py --mb 300 --target both --repeat 3
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import multiprocessing.synchronize
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
LIMIT = 2**31 - 1
OPTIONS = [("grpc.max_send_message_length", LIMIT), ("grpc.max_receive_message_length", LIMIT)]
LIVE = "/inference.GRPCInferenceService/ServerLive"
INFER = "/inference.GRPCInferenceService/ModelInfer"


def _status_mb(pid: int, key: str) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(key):
                return int(line.split()[1]) / 1024
    return 0.0


def _echo_server(port_queue: mp.Queue) -> None:
    """The floor: grpcio receiving the message and sending it back, nothing else."""
    import uvloop

    async def main() -> None:
        async def echo(body: bytes, context: grpc.aio.ServicerContext) -> bytes:
            return body

        async def live(body: bytes, context: grpc.aio.ServicerContext) -> bytes:
            return b""

        server = grpc.aio.server(options=OPTIONS)
        server.add_registered_method_handlers("inference.GRPCInferenceService", {
            "ModelInfer": grpc.unary_unary_rpc_method_handler(echo),
            "ServerLive": grpc.unary_unary_rpc_method_handler(live),
        })
        port_queue.put(server.add_insecure_port("127.0.0.1:0"))
        await server.start()
        await server.wait_for_termination()

    uvloop.run(main())


def _probe(url: str, stop: multiprocessing.synchronize.Event, result: mp.Queue) -> None:
    with grpc.insecure_channel(url) as channel:
        live = channel.unary_unary(LIVE)
        worst = 0.0
        while not stop.is_set():
            started = time.perf_counter()
            live(b"", timeout=60)
            worst = max(worst, time.perf_counter() - started)
            time.sleep(0.01)
    result.put(worst)


def _request(mb: int) -> bytes:
    from tritonclient.grpc import service_pb2 as pb

    data = np.zeros(mb * 1024 * 1024, np.uint8)
    request = pb.ModelInferRequest(model_name="big")
    request.inputs.add(name="INPUT0", datatype="UINT8", shape=[data.size])
    request.raw_input_contents.append(data.tobytes())
    return request.SerializeToString()


def _start_nereid(repo: Path) -> tuple[subprocess.Popen, str]:
    (repo / "big" / "1").mkdir(parents=True)
    (repo / "big" / "config.pbtxt").write_text(
        'name: "big"\nbackend: "identity"\nmax_batch_size: 0\n'
        'input [ { name: "INPUT0" data_type: TYPE_UINT8 dims: [ -1 ] } ]\n'
        'output [ { name: "OUTPUT0" data_type: TYPE_UINT8 dims: [ -1 ] } ]\n')
    proc = subprocess.Popen(
        [sys.executable, "-m", "server.cli", "serve", "--model-repository", str(repo), "--grpc-address",
         "127.0.0.1", "--grpc-port", "0", "--grpc-max-message-bytes", str(LIMIT), "--metrics-port", "0",
         "--http-port", "0"],
        cwd=ROOT, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    port = ""
    for line in proc.stderr:
        found = re.search(r"Started GRPCInferenceService at [^ ]+:(\d+)", line)
        if found:
            port = found.group(1)
        if "models loaded" in line:
            break
    return proc, f"127.0.0.1:{port}"


def run(target: str, mb: int, repeat: int) -> None:
    body = _request(mb)
    with tempfile.TemporaryDirectory() as tmp:
        proc: subprocess.Popen | mp.Process
        if target == "nereid":
            proc, url = _start_nereid(Path(tmp))
        else:
            ports: mp.Queue = mp.Queue()
            proc = mp.Process(target=_echo_server, args=(ports,), daemon=True)
            proc.start()
            url = f"127.0.0.1:{ports.get(timeout=30)}"
        pid = proc.pid
        assert pid is not None
        try:
            with grpc.insecure_channel(url, options=OPTIONS) as channel:
                infer = channel.unary_unary(INFER)
                channel.unary_unary(LIVE)(b"", timeout=30)
                idle = _status_mb(pid, "VmRSS")
                for _ in range(repeat):
                    stop = mp.Event()
                    result: mp.Queue = mp.Queue()
                    prober = mp.Process(target=_probe, args=(url, stop, result))
                    prober.start()
                    time.sleep(0.3)
                    started = time.perf_counter()
                    answer = infer(body, timeout=300)
                    took = time.perf_counter() - started
                    time.sleep(0.3)
                    stop.set()
                    worst = result.get(timeout=60)
                    prober.join()
                    peak = _status_mb(pid, "VmHWM")
                    print(f"{target:6s} {mb} MB: {took:5.2f} s, answer {len(answer) >> 20} MB, peak RSS idle + "
                          f"{(peak - idle) / mb:.2f} x payload, RSS after idle + {_status_mb(pid, 'VmRSS') - idle:.0f} "
                          f"MB, longest ServerLive {worst:.3f} s", flush=True)
        finally:
            proc.terminate()
            if isinstance(proc, subprocess.Popen):
                proc.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=int, default=300)
    parser.add_argument("--target", choices=("nereid", "echo", "both"), default="both")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    for target in (("echo", "nereid") if args.target == "both" else (args.target,)):
        run(target, args.mb, args.repeat)


if __name__ == "__main__":
    main()
