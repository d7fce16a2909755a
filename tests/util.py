"""Helpers shared by the tests: model repositories on disk and real server subprocesses.

Every server is `python -m server.cli serve ... --grpc-port 0` on 127.0.0.1; the bound
port is parsed from the "Started GRPCInferenceService at 127.0.0.1:PORT" log line.
"""

from __future__ import annotations

import atexit
import http.client
import importlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
import weakref
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from skip_policy import ALLOW_SKIPS_ENV, skips_allowed

ROOT = Path(__file__).resolve().parent.parent
MODEL_REPOSITORY = ROOT / "model_repository"
# Servers and helper scripts run on the interpreter that runs the suite (not whatever .venv holds), so that
# `<venv>/bin/python -m pytest` under another Python version tests that version end to end.
PYTHON = sys.executable

# Set to N to start every ServerProcess with --workers N (tests/test_workers.py runs modules so).
WORKERS_ENV = "NEREID_TEST_WORKERS"
STARTED_RE = re.compile(r"Started GRPCInferenceService at 127\.0\.0\.1:(\d+)")
METRICS_RE = re.compile(r"Started Metrics Service at [^ ]+:(\d+)")
HTTP_RE = re.compile(r"Started HTTPService at [^ ]+:(\d+)")
LOADED_RE = re.compile(r"models loaded; server")

# Every time limit in the tests is multiplied by this, so that a slow or busy CI machine can
# stretch them without editing tests (docs/DEVELOPING.md). Lower bounds ("waited at least the
# queue delay") are never scaled: slowness only makes them easier to meet.
TIME_FACTOR = float(os.environ.get("NEREID_TEST_TIME_FACTOR", "1"))
if not TIME_FACTOR > 0:
    raise ValueError(f"NEREID_TEST_TIME_FACTOR must be a positive number, got {TIME_FACTOR}")


def scaled(seconds: float) -> float:
    """A time limit (how long something may take, or how long to wait for it) for this machine.
    The helpers here that take a timeout (ServerProcess, wait_for_log, stop, wait) scale it
    themselves; call this for limits written in a test's own assertions and waits."""
    return seconds * TIME_FACTOR

# Every protocol datatype, with the numpy dtype the tests generate data in (BF16 is handled apart).
NUMERIC_DATATYPES = {
    "BOOL": np.bool_,
    "UINT8": np.uint8,
    "UINT16": np.uint16,
    "UINT32": np.uint32,
    "UINT64": np.uint64,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "FP16": np.float16,
    "FP32": np.float32,
    "FP64": np.float64,
}


# Every datatype the identity backend round-trips; one model `id_<DT>` each (IN -> OUT, dims [-1], batching).
IDENTITY_DATATYPES = (
    "BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
    "FP16", "FP32", "FP64", "BYTES", "BF16",
)
ID_MAX_BATCH = 8
STATS_DELAY_MS = 5

BROKEN_CONFIG_TEXT = """name: "broken_config"
backend: "identity"
max_batch_size: 0
input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ 4 ] }
output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 4 ] } ]
"""
# The line of BROKEN_CONFIG_TEXT where protobuf's text parser notices the missing "]" (1-based).
BROKEN_CONFIG_LINE = 5

MISSING_FILE_CONFIG = """name: "missing_file"
platform: "onnxruntime_onnx"
max_batch_size: 0
input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ 4 ] } ]
output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 4 ] } ]
"""


def require(module: str) -> Any:
    """Import a framework a test module needs, at the module's top. CI installs every one of them,
    so a missing one fails the module (naming the package) instead of skipping it; with
    NEREID_ALLOW_SKIPS=1 (a local run without it) the module is skipped with the reason."""
    import pytest

    if skips_allowed():
        return pytest.importorskip(module)
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        pytest.fail(f"{module} is not installed ({exc}); CI installs it (scripts/setup). "
                    f"Set {ALLOW_SKIPS_ENV}=1 to skip these tests in a local run without it.", pytrace=False)


def config_type(datatype: str) -> str:
    """Protocol datatype -> config enum name (BYTES is TYPE_STRING)."""
    return "TYPE_STRING" if datatype == "BYTES" else f"TYPE_{datatype}"


# ---------------------------------------------------------------------------
# Model repositories


def write_model(
    repo: Path,
    name: str,
    config: str | None,
    versions: Iterable[int | str] = (1,),
    files: dict[str, bytes] | None = None,
) -> Path:
    """Create `<repo>/<name>/` with config.pbtxt text (None: no config file), version folders
    and extra files (paths relative to the model folder, e.g. {"1/model.onnx": data})."""
    model_dir = repo / name
    model_dir.mkdir(parents=True, exist_ok=True)
    if config is not None:
        (model_dir / "config.pbtxt").write_text(config, encoding="utf-8")
    for version in versions:
        (model_dir / str(version)).mkdir(exist_ok=True)
    for rel, data in (files or {}).items():
        path = model_dir / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return model_dir


def _tensor_block(kind: str, tensors: Sequence[tuple[str, str, Sequence[int]]]) -> str:
    entries = []
    for name, datatype, dims in tensors:
        entries.append(
            f'  {{\n    name: "{name}"\n    data_type: {config_type(datatype)}\n'
            f"    dims: [ {', '.join(str(d) for d in dims)} ]\n  }}"
        )
    return f"{kind} [\n" + ",\n".join(entries) + "\n]\n"


def identity_config(
    name: str,
    tensors: Sequence[tuple[str, str, Sequence[int]]],
    max_batch_size: int = 0,
    execute_delay_ms: int | None = None,
    instance_count: int | None = None,
    outputs: Sequence[str] | None = None,
    extra: str = "",
) -> str:
    """config.pbtxt text for an identity model. `tensors` are (input name, datatype, dims);
    output i is named `outputs[i]` (default: the input name with INPUT -> OUTPUT, or OUT_ prefix)."""
    out_names = list(outputs) if outputs else [_default_output_name(t[0]) for t in tensors]
    text = f'name: "{name}"\nbackend: "identity"\nmax_batch_size: {max_batch_size}\n'
    text += _tensor_block("input", tensors)
    text += _tensor_block("output", [(o, t[1], t[2]) for o, t in zip(out_names, tensors, strict=True)])
    if execute_delay_ms is not None:
        text += f'parameters: {{ key: "execute_delay_ms" value: {{ string_value: "{execute_delay_ms}" }} }}\n'
    if instance_count is not None:
        text += f"instance_group [ {{ kind: KIND_CPU count: {instance_count} }} ]\n"
    return text + extra


def python_config(name: str, extra: str = "") -> str:
    """config.pbtxt of a Python model: FP32 [4] in (INPUT0) and out (OUTPUT0), one instance."""
    return (f'name: "{name}"\nbackend: "python"\nmax_batch_size: 0\n'
            'input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ 4 ] } ]\n'
            'output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 4 ] } ]\n'
            f"instance_group [ {{ kind: KIND_CPU count: 1 }} ]\n{extra}")


def _default_output_name(input_name: str) -> str:
    if "INPUT" in input_name:
        return input_name.replace("INPUT", "OUTPUT")
    if input_name.startswith("IN_"):
        return "OUT_" + input_name[3:]
    return "OUT_" + input_name


# ---------------------------------------------------------------------------
# Server subprocesses


_LIVE: weakref.WeakSet[ServerProcess] = weakref.WeakSet()


@atexit.register
def _kill_leftovers() -> None:
    """Safety net: no server outlives the test run, even if a fixture's teardown never ran."""
    for server in list(_LIVE):
        if server.proc.poll() is None:
            server.proc.kill()
            server.proc.wait(10)


def _flag(args: Sequence[str], name: str) -> str | None:
    """The value given to `name` as `name VALUE` in args, if any."""
    args = list(args)
    return args[args.index(name) + 1] if name in args[:-1] else None


class ServerProcess:
    """A real Nereid server in a subprocess. Use `stop()` (or the fixtures) to end it."""

    def __init__(self, repos: Sequence[Path], extra_args: Sequence[str] = (), startup_timeout: float = 60.0,
                 prefix: Sequence[str] = ()):
        # `prefix`: a command the server runs under (e.g. setpriv with fewer capabilities)
        cmd = [*prefix, PYTHON, "-m", "server.cli", "serve"]
        for repo in repos:
            cmd += ["--model-repository", str(repo)]
        cmd += ["--grpc-address", "127.0.0.1", "--grpc-port", "0"]
        if not any(arg.startswith(("--metrics-port", "--metrics-address")) for arg in extra_args):
            cmd += ["--metrics-address", "127.0.0.1", "--metrics-port", "0"]  # a free port, never 8002
        if not any(arg.startswith(("--http-port", "--http-address")) for arg in extra_args):
            cmd += ["--http-address", "127.0.0.1", "--http-port", "0"]  # a free port, never 8000
        if not any(arg.startswith("--lame-duck-secs") for arg in extra_args):
            # No lame duck (Triton's shutdown): it would add a second to every server's stop.
            # The tests of shutdown itself (test_shutdown.py, test_failover.py) set it.
            cmd += ["--lame-duck-secs", "0"]
        workers = os.environ.get(WORKERS_ENV)
        if workers and not any(arg.startswith("--workers") for arg in extra_args):
            cmd += ["--workers", workers]  # run a test module against --workers N (test_workers.py)
        cmd += list(extra_args)
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.cmd = cmd
        self.proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, text=True, errors="replace",
        )
        _LIVE.add(self)
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.port = 0
        self.metrics_port = 0  # 0 when metrics are off
        self.http_port = 0  # 0 when HTTP is off (--allow-http false)
        try:
            if "--allow-grpc=false" in extra_args or _flag(extra_args, "--allow-grpc") == "false":
                self.wait_for_log(HTTP_RE, startup_timeout)
            else:
                self.port = int(self.wait_for_log(STARTED_RE, startup_timeout).group(1))
            metrics = [METRICS_RE.search(line) for line in self.lines]
            self.metrics_port = next((int(m.group(1)) for m in metrics if m), 0)
            self.wait_for_log(LOADED_RE, startup_timeout)
            https = [HTTP_RE.search(line) for line in self.lines]  # logged before loading ends
            self.http_port = next((int(m.group(1)) for m in https if m), 0)
        except BaseException:
            self.stop()
            raise

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    @property
    def log(self) -> str:
        with self._cond:
            return "\n".join(self.lines)

    def wait_for_log(self, pattern: re.Pattern[str], timeout: float) -> re.Match[str]:
        """Block until a stderr line matches `pattern` (for up to `timeout` seconds, scaled);
        fail if the process exits first."""
        timeout = scaled(timeout)
        deadline = time.monotonic() + timeout
        seen = 0
        with self._cond:
            while True:
                for line in self.lines[seen:]:
                    match = pattern.search(line)
                    if match:
                        return match
                seen = len(self.lines)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(
                        f"no log line matching {pattern.pattern!r} in {timeout}s; log:\n{self.log_unlocked()}"
                    )
                if self.proc.poll() is not None and not self._reader.is_alive():
                    raise RuntimeError(
                        f"server exited with {self.proc.returncode} before logging {pattern.pattern!r}; "
                        f"log:\n{self.log_unlocked()}"
                    )
                self._cond.wait(min(remaining, 0.2))

    def log_unlocked(self) -> str:
        return "\n".join(self.lines)

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def http_url(self) -> str:
        """host:port of the KServe v2 HTTP endpoint (tritonclient.http's `url`)."""
        return f"127.0.0.1:{self.http_port}"

    def channel(self) -> grpc.Channel:
        limit = 2**31 - 1
        return grpc.insecure_channel(
            self.url,
            options=[("grpc.max_send_message_length", limit), ("grpc.max_receive_message_length", limit)],
        )

    def terminate(self) -> None:
        """Send SIGTERM (the graceful-shutdown signal)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def wait(self, timeout: float) -> int:
        """The exit code, waiting up to `timeout` seconds (scaled)."""
        return self.proc.wait(scaled(timeout))

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM, then SIGKILL if it does not exit in `timeout` seconds (scaled). Always reaps the process."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(scaled(timeout))
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._reader.join(5)
        if self.proc.stderr is not None:
            self.proc.stderr.close()
        return self.proc.returncode


def proc_status_mb(pid: int, key: str = "VmRSS") -> float:
    """A memory figure of a process from /proc/PID/status, in MB (VmRSS now, VmHWM its peak)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    raise AssertionError(f"no {key} in /proc/{pid}/status")


# ---------------------------------------------------------------------------
# Clients


def client(srv: ServerProcess):
    """A tritonclient.grpc client for `srv` (tritonclient sets the message limits to INT32_MAX)."""
    import tritonclient.grpc as grpcclient

    return grpcclient.InferenceServerClient(srv.url)


def health_status(srv: ServerProcess, service: str) -> int:
    """grpc.health.v1 Check for `service` ("" for the server, a model name for that model)."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with srv.channel() as channel:
        return health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=10).status


def expect_error(code: str, fn, *args, **kwargs):
    """Call `fn`, which must raise tritonclient's InferenceServerException with gRPC status `code`
    (from tritonclient.grpc), or with the HTTP status Triton gives that code (tritonclient.http)."""
    import pytest
    from tritonclient.utils import InferenceServerException

    with pytest.raises(InferenceServerException) as info:
        fn(*args, **kwargs)
    status = info.value.status()
    if status is not None and status.isdigit():  # tritonclient.http: the HTTP status Triton uses for `code`
        from transports import http_status_of

        expected = str(http_status_of(getattr(grpc.StatusCode, code)))
        assert status == expected, f"HTTP {status} for {code}: {info.value.message()}"
        return info.value
    assert status == f"StatusCode.{code}", f"{status}: {info.value.message()}"
    return info.value


def expect_rpc_error(code: grpc.StatusCode, fn, *args, **kwargs) -> grpc.RpcError:
    """Call a raw stub method (gRPC, or its HTTP twin in transports.py), which must fail with `code`."""
    import pytest

    with pytest.raises(grpc.RpcError) as info:
        fn(*args, **kwargs)
    http_status = getattr(info.value, "http_status", None)
    if http_status is not None:  # transports.HttpStub: the HTTP status Triton uses for `code`
        from transports import http_status_of

        assert http_status == http_status_of(code), f"HTTP {http_status} for {code}: {info.value.details()}"
        return info.value
    assert info.value.code() == code, f"{info.value.code()}: {info.value.details()}"
    return info.value


# ---------------------------------------------------------------------------
# Raw protocol helpers (tritonclient's generated messages, no client wrapper)


def raw_request(model: str, tensors: Sequence[tuple[str, str, np.ndarray]], version: str = "", request_id: str = ""):
    """A ModelInferRequest with every input in raw_input_contents. Tensors are (name, datatype, array)."""
    from tritonclient.grpc import service_pb2

    request = service_pb2.ModelInferRequest(model_name=model, model_version=version, id=request_id)
    for name, datatype, array in tensors:
        request.inputs.add(name=name, datatype=datatype, shape=list(array.shape))
        request.raw_input_contents.append(serialize(array, datatype))
    return request


def serialize(array: np.ndarray, datatype: str) -> bytes:
    if datatype == "BYTES":
        return encode_bytes(array.ravel().tolist())
    return np.ascontiguousarray(array).tobytes()


def encode_bytes(items: Iterable[bytes]) -> bytes:
    """Triton's BYTES wire form: each element as a 4-byte little-endian length plus its bytes."""
    parts = []
    for item in items:
        parts.append(len(item).to_bytes(4, "little"))
        parts.append(item)
    return b"".join(parts)


def decode_bytes(data: bytes) -> list[bytes]:
    items, offset = [], 0
    while offset < len(data):
        length = int.from_bytes(data[offset:offset + 4], "little")
        offset += 4
        items.append(data[offset:offset + length])
        offset += length
    return items


def output_array(response, index: int) -> np.ndarray:
    """Decode output `index` of a ModelInferResponse from raw_output_contents."""
    from tritonclient.utils import triton_to_np_dtype

    out = response.outputs[index]
    data = response.raw_output_contents[index]
    if out.datatype == "BYTES":
        arr = np.empty(len(decode_bytes(data)), dtype=object)
        arr[:] = decode_bytes(data)
    else:
        arr = np.frombuffer(data, dtype=triton_to_np_dtype(out.datatype))
    return arr.reshape(list(out.shape))


def random_array(datatype: str, shape: Sequence[int], rng: np.random.Generator) -> np.ndarray:
    """Random data covering each type's range (including extremes) for round-trip tests."""
    dtype = np.dtype(NUMERIC_DATATYPES[datatype])
    if dtype == np.bool_:
        return rng.integers(0, 2, size=shape).astype(np.bool_)
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        arr = rng.integers(info.min, info.max, size=shape, dtype=dtype, endpoint=True)
        flat = arr.reshape(-1)
        if flat.size >= 2:
            flat[0], flat[-1] = info.min, info.max
        return arr
    arr = (rng.standard_normal(size=shape) * 1000).astype(dtype)
    flat = arr.reshape(-1)
    if flat.size >= 3:
        flat[0], flat[1], flat[2] = np.finfo(dtype).max, np.finfo(dtype).tiny, -0.0
    return arr


def http_request(port: int, method: str, path: str, body: bytes | None = None,
                 headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    """One plain HTTP/1.1 request to 127.0.0.1:port: (status, headers with lower-case names, body)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=scaled(30))
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def shm_key() -> str:
    """A fresh POSIX shared-memory key for a test region (conftest's `shm_region` uses it)."""
    return f"/nereid_test_{uuid.uuid4().hex[:12]}"


_CUDA_PROBE: list[Any] = []


def cuda_unavailable_reason() -> str:
    """Why CUDA shared memory cannot work here, as the server decides it at startup
    (server/core/cuda_runtime.py `probe`); a `nogpu` test skips where CUDA does work."""
    import pytest

    from server.core.cuda_runtime import probe

    if not _CUDA_PROBE:
        _CUDA_PROBE.append(probe())
    reason = _CUDA_PROBE[0]
    if not isinstance(reason, str):
        pytest.skip(f"CUDA shared memory works on this machine ({reason.how})")
    return reason
