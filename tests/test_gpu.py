"""TorchScript on a real GPU: correctness against the CPU, KIND_GPU instance groups (a stream and
a copy of the weights each), dynamic batching on the GPU, and the NVML metrics.

Marked `gpu`: they skip with the reason where no CUDA device (or no CUDA build of torch) exists,
and run on the GPU machine through scripts/gpu_check (docs/GPU.md).
"""

from __future__ import annotations

import concurrent.futures
import re
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.grpc import model_config_pb2 as mc
from util import ROOT, ServerProcess, client, write_model

from server.core.placement import visible_gpus

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not visible_gpus(), reason="no CUDA device on this machine")]

WIDTH_IN, HIDDEN, WIDTH_OUT = 256, 1024, 16
STREAM_RE = re.compile(r"model mlp_gpu version 1 instance (\S+): on cuda:0, CUDA stream (0x[0-9a-f]+), "
                       r"weights (\d+) bytes on the device, (\d+) bytes allocated")


def _torch():  # type: ignore[no-untyped-def]
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("this torch build has no CUDA")
    return torch


def _save_mlp(path: Path) -> object:
    """A seeded MLP, scripted and saved on the CPU; returns the CPU module for reference results."""
    torch = _torch()
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(WIDTH_IN, HIDDEN), torch.nn.ReLU(),
                                 torch.nn.Linear(HIDDEN, HIDDEN), torch.nn.ReLU(),
                                 torch.nn.Linear(HIDDEN, WIDTH_OUT)).eval()
    scripted = torch.jit.script(module)
    path.parent.mkdir(parents=True, exist_ok=True)
    scripted.save(str(path))
    return module


def _config(count: int, batching: str = "") -> str:
    return ('platform: "pytorch_libtorch"\nmax_batch_size: 64\n'
            f'input [ {{ name: "INPUT__0" data_type: TYPE_FP32 dims: [ {WIDTH_IN} ] }} ]\n'
            f'output [ {{ name: "OUTPUT__0" data_type: TYPE_FP32 dims: [ {WIDTH_OUT} ] }} ]\n'
            f"instance_group [ {{ kind: KIND_GPU count: {count} gpus: [ 0 ] }} ]\n" + batching)


def _infer(c: grpcclient.InferenceServerClient, x: np.ndarray) -> np.ndarray:
    inp = grpcclient.InferInput("INPUT__0", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    return c.infer("mlp_gpu", [inp]).as_numpy("OUTPUT__0")


def _reference(module: object, x: np.ndarray) -> np.ndarray:
    torch = _torch()
    with torch.inference_mode():
        return module(torch.from_numpy(x)).numpy()  # type: ignore[operator]


def test_gpu_results_match_the_cpu(tmp_path: Path) -> None:
    module = _save_mlp(tmp_path / "mlp_gpu" / "1" / "model.pt")
    write_model(tmp_path, "mlp_gpu", _config(1))
    server = ServerProcess([tmp_path])
    try:
        c = client(server)
        rng = np.random.default_rng(1)
        for rows in (1, 7, 64):
            x = rng.standard_normal((rows, WIDTH_IN)).astype(np.float32)
            np.testing.assert_allclose(_infer(c, x), _reference(module, x), rtol=1e-3, atol=1e-4)
    finally:
        server.stop()


@pytest.mark.parametrize("count", [1, 2, 4])
def test_kind_gpu_instances_each_have_a_stream_and_weights(tmp_path: Path, count: int) -> None:
    """`count` instances on cuda:0: each loads its own weights onto the device and runs on its
    own CUDA stream; 64 concurrent requests spread over them all come back right."""
    module = _save_mlp(tmp_path / "mlp_gpu" / "1" / "model.pt")
    write_model(tmp_path, "mlp_gpu", _config(count))
    server = ServerProcess([tmp_path])
    try:
        loads = [m for m in (STREAM_RE.search(line) for line in server.lines) if m]
        assert len(loads) == count, server.log
        assert len({m.group(1) for m in loads}) == count  # instance names
        assert len({m.group(2) for m in loads}) == count  # a stream each
        weights = int(loads[0].group(3))
        expected = 4 * (WIDTH_IN * HIDDEN + HIDDEN + HIDDEN * HIDDEN + HIDDEN + HIDDEN * WIDTH_OUT + WIDTH_OUT)
        assert weights == expected
        # Instances load one after another: the last one sees every copy of the weights allocated.
        assert int(loads[-1].group(4)) >= count * weights, loads[-1].group(0)

        c = client(server)
        rng = np.random.default_rng(2)
        xs = [rng.standard_normal((1 + i % 5, WIDTH_IN)).astype(np.float32) for i in range(64)]
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            got = list(pool.map(lambda x: _infer(client(server), x), xs))
        for x, y in zip(xs, got, strict=True):
            np.testing.assert_allclose(y, _reference(module, x), rtol=1e-3, atol=1e-4)
        stats = c.get_inference_statistics("mlp_gpu").model_stats[0]
        assert stats.inference_count == sum(len(x) for x in xs)
    finally:
        server.stop()


def test_dynamic_batching_on_the_gpu(tmp_path: Path) -> None:
    """32 single-row requests at once into one GPU instance with a 50 ms queue delay: fewer
    executions than requests (they were batched), and every row is its own request's answer."""
    module = _save_mlp(tmp_path / "mlp_gpu" / "1" / "model.pt")
    write_model(tmp_path, "mlp_gpu", _config(1, "dynamic_batching { max_queue_delay_microseconds: 50000 }\n"))
    server = ServerProcess([tmp_path])
    try:
        rng = np.random.default_rng(3)
        xs = [rng.standard_normal((1, WIDTH_IN)).astype(np.float32) for _ in range(32)]
        with concurrent.futures.ThreadPoolExecutor(32) as pool:
            got = list(pool.map(lambda x: _infer(client(server), x), xs))
        for x, y in zip(xs, got, strict=True):
            np.testing.assert_allclose(y, _reference(module, x), rtol=1e-3, atol=1e-4)
        stats = client(server).get_inference_statistics("mlp_gpu").model_stats[0]
        assert stats.inference_count == 32
        assert stats.execution_count < 32, stats
    finally:
        server.stop()


def test_nvml_gpu_metrics(tmp_path: Path) -> None:
    """The nv_gpu_* families, one sample per GPU labelled by its UUID, with real readings."""
    pytest.importorskip("pynvml")
    _save_mlp(tmp_path / "mlp_gpu" / "1" / "model.pt")
    write_model(tmp_path, "mlp_gpu", _config(1))
    server = ServerProcess([tmp_path], ["--metrics-interval-ms", "200"])
    try:
        _infer(client(server), np.ones((8, WIDTH_IN), np.float32))
        text = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10).read().decode()
        samples = {}
        for line in text.splitlines():
            m = re.match(r'(nv_gpu_\w+|nv_energy_consumption)\{gpu_uuid="(GPU-[0-9a-f-]+)"\} (\S+)', line)
            if m:
                samples[(m.group(1), m.group(2))] = float(m.group(3))
        uuids = {u for _, u in samples}
        assert len(uuids) == len(visible_gpus()), text
        for uuid in uuids:
            total = samples[("nv_gpu_memory_total_bytes", uuid)]
            used = samples[("nv_gpu_memory_used_bytes", uuid)]
            assert total > 1e9 and 0 < used <= total
            assert 0.0 <= samples[("nv_gpu_utilization", uuid)] <= 1.0
            if ("nv_gpu_power_usage", uuid) in samples:
                assert 0 < samples[("nv_gpu_power_usage", uuid)] <= samples[("nv_gpu_power_limit", uuid)] * 1.5
        print("GPU metrics:", {k[0]: v for k, v in samples.items()})
    finally:
        server.stop()


def test_string_and_classification_models_on_the_gpu(tmp_path: Path) -> None:
    """The generated libtorch string and classifier models (scripts/gen_triton_compat.py) with
    their instances on cuda:0: strings stay on the host, tensors go to the GPU and back."""
    _torch()
    subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_triton_compat.py"), str(tmp_path)], check=True,
                   capture_output=True, timeout=300)
    for name in ("libtorch_string_batch", "libtorch_string_mixed", "image_classifier"):
        config = tmp_path / name / "config.pbtxt"
        config.write_text(config.read_text() + "instance_group [ { kind: KIND_GPU count: 1 gpus: [ 0 ] } ]\n")
    for other in tmp_path.iterdir():
        if other.name not in ("libtorch_string_batch", "libtorch_string_mixed", "image_classifier"):
            shutil.rmtree(other)
    server = ServerProcess([tmp_path])
    try:
        assert sum("on cuda:0, CUDA stream" in line for line in server.lines) == 3, server.log
        c = client(server)
        text = np.array([[b"ab"], [b"xyz"]], dtype=object)
        inp = grpcclient.InferInput("INPUT__0", [2, 1], "BYTES")
        inp.set_data_from_numpy(text)
        result = c.infer("libtorch_string_batch", [inp])
        assert result.as_numpy("OUTPUT__0").reshape(-1).tolist() == [b"AB", b"XYZ"]
        assert result.as_numpy("OUTPUT__1").reshape(-1).tolist() == [2, 3]
        count = grpcclient.InferInput("count", [1], "INT64")
        count.set_data_from_numpy(np.array([3], dtype=np.int64))
        words = grpcclient.InferInput("text", [1], "BYTES")
        words.set_data_from_numpy(np.array([b"go"], dtype=object))
        assert c.infer("libtorch_string_mixed", [count, words]).as_numpy("repeated").tolist() == [b"go-go-go"]
        image = np.random.default_rng(4).standard_normal((2, 3, 8, 8)).astype(np.float32)
        pixels = grpcclient.InferInput("INPUT__0", list(image.shape), "FP32")
        pixels.set_data_from_numpy(image)
        scores = c.infer("image_classifier", [pixels]).as_numpy("OUTPUT__0")
        top = c.infer("image_classifier", [pixels],
                      outputs=[grpcclient.InferRequestedOutput("OUTPUT__0", class_count=3)]).as_numpy("OUTPUT__0")
        assert top.shape == (2, 3)
        for row, classes in zip(scores, top, strict=True):
            value, index, _label = classes[0].decode().split(":", 2)
            assert int(index) == int(np.argmax(row)) and abs(float(value) - row.max()) < 1e-4
    finally:
        server.stop()


def test_onnx_default_group_serves_on_the_cpu_where_onnxruntime_has_no_cuda(tmp_path: Path) -> None:
    """The example `mlp` (no instance_group) on a GPU machine with the CPU onnxruntime: its
    default group runs on the CPU, with a warning, instead of failing the load (which made
    every example ONNX model unavailable on the GPU machine, 2026-11-27)."""
    ort = pytest.importorskip("onnxruntime")
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA: the default group goes to the GPU")
    shutil.copytree(ROOT / "model_repository" / "mlp", tmp_path / "mlp")
    server = ServerProcess([tmp_path])
    try:
        assert "its KIND_AUTO instances run on the CPU although a GPU is visible" in server.log, server.log
        c = client(server)
        (group,) = c.get_model_config("mlp").config.instance_group
        assert group.kind == mc.ModelInstanceGroup.KIND_CPU and group.count == 2, group
        x = np.random.default_rng(5).standard_normal((3, 64)).astype(np.float32)
        inp = grpcclient.InferInput("INPUT0", [3, 64], "FP32")
        inp.set_data_from_numpy(x)
        want = ort.InferenceSession(str(tmp_path / "mlp" / "1" / "model.onnx")).run(None, {"INPUT0": x})[0]
        np.testing.assert_allclose(c.infer("mlp", [inp]).as_numpy("OUTPUT0"), want, rtol=1e-5, atol=1e-6)
    finally:
        server.stop()
