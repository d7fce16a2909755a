"""TensorRT plans, ONNX Runtime's CUDA and TensorRT providers, and torch on cuda:N.

Everywhere: a plan the machine cannot run (no `tensorrt` package, or no GPU) makes that
model UNAVAILABLE with the reason, and every other model serves. The GPU tests build
their engines at test time from the example ONNX model; they are marked `gpu` and skip
with the reason where no CUDA device exists (the check for machines without them is marked
`nogpu`: those are the only tests here that may skip, tests/skip_policy.py).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from util import MODEL_REPOSITORY, ServerProcess, client, identity_config, write_model

from server.core.placement import visible_gpus

MLP_ONNX = MODEL_REPOSITORY / "mlp" / "1" / "model.onnx"
MLP_IO = """max_batch_size: 64
input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ 64 ] } ]
output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 16 ] } ]
"""

no_gpu = pytest.mark.skipif(not visible_gpus(), reason="no CUDA device on this machine")


def _mlp_input(x: np.ndarray) -> list[grpcclient.InferInput]:
    inp = grpcclient.InferInput("INPUT0", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    return [inp]


def _reference(x: np.ndarray) -> np.ndarray:
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(str(MLP_ONNX), providers=["CPUExecutionProvider"])
    return session.run(None, {"INPUT0": x})[0]


@pytest.mark.nogpu
def test_plan_without_tensorrt_or_gpu_is_unavailable_and_the_rest_serves(tmp_path: Path) -> None:
    write_model(tmp_path, "plan_model", 'platform: "tensorrt_plan"\n' + MLP_IO,
                files={"1/model.plan": b"not a real engine"})
    write_model(tmp_path, "plan_auto", None, files={"1/model.plan": b"not a real engine"})
    write_model(tmp_path, "fine", identity_config("fine", [("INPUT0", "FP32", [4])]))
    has_trt = importlib.util.find_spec("tensorrt") is not None
    if has_trt and visible_gpus():
        pytest.skip("TensorRT and a GPU are present; this checks machines without them")
    server = ServerProcess([tmp_path], ["--strict-readiness", "false"])
    try:
        c = client(server)
        rows = {r.name: r for r in c.get_model_repository_index().models}
        for name in ("plan_model", "plan_auto"):
            assert rows[name].state == "UNAVAILABLE", name
            if has_trt:
                assert "GPU" in rows[name].reason, rows[name].reason
            else:
                assert 'pip install "nereid[tensorrt]"' in rows[name].reason, rows[name].reason
        assert rows["fine"].state == "READY"
        x = np.ones((4,), dtype=np.float32)
        inp = grpcclient.InferInput("INPUT0", [4], "FP32")
        inp.set_data_from_numpy(x)
        np.testing.assert_array_equal(c.infer("fine", [inp]).as_numpy("OUTPUT0"), x)
    finally:
        server.stop()


def _build_engine(onnx_path: Path, plan_path: Path, max_batch: int) -> None:
    trt = pytest.importorskip("tensorrt")
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    assert parser.parse(onnx_path.read_bytes()), [parser.get_error(i) for i in range(parser.num_errors)]
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    profile.set_shape("INPUT0", (1, 64), (8, 64), (max_batch, 64))
    config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    assert plan is not None, "TensorRT could not build the engine"
    plan_path.parent.mkdir(parents=True, exist_ok=True)
    plan_path.write_bytes(bytes(plan))


@pytest.mark.gpu
@no_gpu
@pytest.mark.parametrize("with_config", [True, False])
def test_tensorrt_engine_serves_the_mlp(tmp_path: Path, with_config: bool) -> None:
    pytest.importorskip("tensorrt")
    config = ('platform: "tensorrt_plan"\n' + MLP_IO + "instance_group [ { kind: KIND_GPU count: 2 } ]\n"
              if with_config else None)
    model_dir = write_model(tmp_path, "mlp_trt", config)
    _build_engine(MLP_ONNX, model_dir / "1" / "model.plan", max_batch=32)
    server = ServerProcess([tmp_path])
    try:
        c = client(server)
        if not with_config:  # auto-completed from the engine
            cfg = c.get_model_config("mlp_trt").config
            assert cfg.max_batch_size == 32
            assert [i.name for i in cfg.input] == ["INPUT0"] and list(cfg.input[0].dims) == [64]
        x = np.random.default_rng(0).standard_normal((5, 64)).astype(np.float32)
        got = c.infer("mlp_trt", _mlp_input(x)).as_numpy("OUTPUT0")
        np.testing.assert_allclose(got, _reference(x), rtol=1e-3, atol=1e-3)
    finally:
        server.stop()


@pytest.mark.gpu
@no_gpu
@pytest.mark.parametrize("accelerator", ["", "tensorrt"])
def test_onnxruntime_on_gpu(tmp_path: Path, accelerator: str) -> None:
    ort = pytest.importorskip("onnxruntime")
    wanted = "TensorrtExecutionProvider" if accelerator else "CUDAExecutionProvider"
    if wanted not in ort.get_available_providers():
        pytest.skip(f"this onnxruntime has no {wanted}")
    extra = ("optimization { execution_accelerators { gpu_execution_accelerator: [ { name: \"tensorrt\" } ] } }\n"
             if accelerator else "")
    gpus = ", ".join(str(g) for g in visible_gpus())
    write_model(tmp_path, "mlp_gpu", 'platform: "onnxruntime_onnx"\n' + MLP_IO
                + f"instance_group [ {{ kind: KIND_GPU count: 2 gpus: [ {gpus} ] }} ]\n" + extra,
                files={"1/model.onnx": MLP_ONNX.read_bytes()})
    server = ServerProcess([tmp_path])
    try:
        x = np.random.default_rng(1).standard_normal((3, 64)).astype(np.float32)
        got = client(server).infer("mlp_gpu", _mlp_input(x)).as_numpy("OUTPUT0")
        np.testing.assert_allclose(got, _reference(x), rtol=1e-3, atol=1e-3)
    finally:
        server.stop()


@pytest.mark.gpu
@no_gpu
def test_torchscript_on_each_gpu(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("this torch build has no CUDA")

    class Double(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * 2

    gpus = ", ".join(str(g) for g in visible_gpus())
    model_dir = write_model(tmp_path, "double", 'platform: "pytorch_libtorch"\nmax_batch_size: 8\n'
                            'input [ { name: "INPUT__0" data_type: TYPE_FP32 dims: [ 4 ] } ]\n'
                            'output [ { name: "OUTPUT__0" data_type: TYPE_FP32 dims: [ 4 ] } ]\n'
                            f"instance_group [ {{ kind: KIND_GPU gpus: [ {gpus} ] }} ]\n")
    torch.jit.script(Double()).save(str(model_dir / "1" / "model.pt"))
    server = ServerProcess([tmp_path])
    try:
        x = np.arange(8, dtype=np.float32).reshape(2, 4)
        inp = grpcclient.InferInput("INPUT__0", [2, 4], "FP32")
        inp.set_data_from_numpy(x)
        np.testing.assert_array_equal(client(server).infer("double", [inp]).as_numpy("OUTPUT__0"), x * 2)
    finally:
        server.stop()


def test_openvino_accelerator_without_the_provider_says_how_to_install(tmp_path: Path) -> None:
    ort = pytest.importorskip("onnxruntime")
    has_openvino = "OpenVINOExecutionProvider" in ort.get_available_providers()
    write_model(tmp_path, "mlp_ov", 'platform: "onnxruntime_onnx"\n' + MLP_IO
                + "instance_group [ { kind: KIND_CPU count: 1 } ]\n"
                + 'optimization { execution_accelerators { cpu_execution_accelerator: [ { name: "openvino" } ] } }\n',
                files={"1/model.onnx": MLP_ONNX.read_bytes()})
    server = ServerProcess([tmp_path], ["--strict-readiness", "false"])
    try:
        (row,) = client(server).get_model_repository_index().models
        if has_openvino:  # an onnxruntime built with it: the accelerator is simply used
            assert row.state == "READY", row.reason
        else:
            assert row.state == "UNAVAILABLE"
            assert "pip install onnxruntime-openvino" in row.reason
    finally:
        server.stop()
