"""Per-answer cost of a BLS `exec(decoupled=True)` call: a Python model iterates one call of N
small answers of a decoupled Python model and times it inside its `execute`.

    .venv/bin/python scripts/bench_bls_stream.py [ROOT] [N] [ROUNDS]

ROOT is the checkout whose server runs (default: this one), so two commits compare with a
`git worktree` of the other (symlink its .venv). Prints the caller's time per answer (min,
median, max over ROUNDS calls) and the server's and its stubs' CPU per answer. With
STRACE=FILE set, strace counts the system calls of the server and its stubs during the
timed calls into FILE (slow: use few rounds).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc
import numpy as np
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc

CALLEE = '''import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        for request in requests:
            n = int(pb_utils.get_input_tensor_by_name(request, "N").as_numpy()[0])
            sender = request.get_response_sender()
            for i in range(n):
                sender.send(pb_utils.InferenceResponse([pb_utils.Tensor("OUT", np.array([i], np.int32))]))
            sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        return None
'''

CALLER = '''import time
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        answers = []
        for request in requests:
            n = pb_utils.get_input_tensor_by_name(request, "N")
            started = time.perf_counter()
            got = 0
            call = pb_utils.InferenceRequest(model_name="callee", inputs=[n], requested_output_names=["OUT"])
            for response in call.exec(decoupled=True):
                if response.has_error():
                    raise pb_utils.TritonModelException(response.error().message())
                got += len(response.output_tensors()) > 0
            took = time.perf_counter() - started
            answers.append(pb_utils.InferenceResponse([pb_utils.Tensor("T", np.array([took], np.float64)),
                                                       pb_utils.Tensor("G", np.array([got], np.int32))]))
        return answers
'''


def _config(name: str, outputs: list[tuple[str, str]], decoupled: bool) -> str:
    outs = ", ".join(f'{{ name: "{o}" data_type: {t} dims: [ 1 ] }}' for o, t in outputs)
    policy = "model_transaction_policy { decoupled: true }" if decoupled else ""
    return (f'name: "{name}"\nbackend: "python"\nmax_batch_size: 0\n{policy}\n'
            f'input [ {{ name: "N" data_type: TYPE_INT32 dims: [ 1 ] }} ]\noutput [ {outs} ]\n'
            'instance_group [ { kind: KIND_CPU count: 1 } ]\n')


def _pids(server: subprocess.Popen[str]) -> list[int]:
    children = subprocess.run(["pgrep", "-P", str(server.pid)], capture_output=True, text=True).stdout.split()
    return [server.pid, *map(int, children)]


def _cpu_s(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def main() -> None:
    root = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).resolve().parent.parent).resolve()
    count = int(sys.argv[2]) if len(sys.argv) > 2 else 2000
    rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 15
    repo = Path(tempfile.mkdtemp(prefix="bench-bls-"))
    for name, source, outputs, decoupled in (("callee", CALLEE, [("OUT", "TYPE_INT32")], True),
                                             ("caller", CALLER, [("T", "TYPE_FP64"), ("G", "TYPE_INT32")], False)):
        (repo / name / "1").mkdir(parents=True)
        (repo / name / "config.pbtxt").write_text(_config(name, outputs, decoupled))
        (repo / name / "1" / "model.py").write_text(source)
    server = subprocess.Popen(
        [str(root / ".venv/bin/python"), "-m", "server.cli", "serve", "--model-repository", str(repo),
         "--grpc-address", "127.0.0.1", "--grpc-port", "0", "--metrics-port", "0", "--http-port", "0",
         "--lame-duck-secs", "0"], cwd=root, stderr=subprocess.PIPE, text=True)
    assert server.stderr is not None
    port = 0
    for line in server.stderr:
        found = re.search(r"Started GRPCInferenceService at 127\.0\.0\.1:(\d+)", line)
        if found:
            port = int(found.group(1))
            break
    threading.Thread(target=lambda: [None for _ in server.stderr or ()], daemon=True).start()
    stub = service_pb2_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(f"127.0.0.1:{port}"))

    def call() -> float:
        request = pb.ModelInferRequest(model_name="caller")
        tensor = request.inputs.add()
        tensor.name, tensor.datatype = "N", "INT32"
        tensor.shape.append(1)
        request.raw_input_contents.append(np.array([count], np.int32).tobytes())
        answer = stub.ModelInfer(request, timeout=120)
        assert int(np.frombuffer(answer.raw_output_contents[1], np.int32)[0]) == count
        return float(np.frombuffer(answer.raw_output_contents[0], np.float64)[0])

    try:
        deadline = time.monotonic() + 60
        while not stub.ServerReady(pb.ServerReadyRequest()).ready and time.monotonic() < deadline:
            time.sleep(0.2)
        for _ in range(3):
            call()
        pids = _pids(server)
        tracer = None
        if os.environ.get("STRACE"):
            tracer = subprocess.Popen(["strace", "-f", "-c", "-o", os.environ["STRACE"],
                                       *[arg for pid in pids for arg in ("-p", str(pid))]], stderr=subprocess.DEVNULL)
            time.sleep(2)
        before = _cpu_s(pids)
        times = sorted(call() for _ in range(rounds))
        cpu = _cpu_s(pids) - before
        if tracer is not None:
            tracer.terminate()
            tracer.wait(30)
    finally:
        server.terminate()
        server.wait(30)
        shutil.rmtree(repo, ignore_errors=True)
    per = [t / count * 1e6 for t in times]
    print(f"{root.name}: N={count} per answer, us: min {per[0]:.1f} median {per[len(per) // 2]:.1f} "
          f"max {per[-1]:.1f}; server and stubs CPU per answer, us: {cpu / rounds / count * 1e6:.1f}")


if __name__ == "__main__":
    main()
