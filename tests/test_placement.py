"""GPU placement as a pure function: no GPU needed. Plus what a GPU-less server says."""

from __future__ import annotations

from pathlib import Path

import pytest
from tritonclient.grpc import model_config_pb2 as mc
from util import ServerProcess, client, identity_config, write_model

from backends.base import Device
from server.core.placement import PlacementError, place_group, place_instances, resolve_kind
from server.repository.config import _fill_instance_groups

GPU, CPU, AUTO = mc.ModelInstanceGroup.KIND_GPU, mc.ModelInstanceGroup.KIND_CPU, mc.ModelInstanceGroup.KIND_AUTO


def group(name: str = "g", kind: int = CPU, count: int = 1, gpus: tuple[int, ...] = ()) -> mc.ModelInstanceGroup:
    return mc.ModelInstanceGroup(name=name, kind=kind, count=count, gpus=list(gpus))


def test_cpu_group_count_is_the_total() -> None:
    placed = place_group(group(count=3), visible=[0, 1])
    assert [p.device for p in placed] == [Device("CPU", 0)] * 3
    assert [p.name for p in placed] == ["g_0", "g_1", "g_2"]


def test_single_instance_is_named_after_its_group() -> None:
    assert [p.name for p in place_group(group(count=1), visible=[])] == ["g"]


def test_gpu_group_count_is_per_listed_gpu() -> None:
    placed = place_group(group(kind=GPU, count=2, gpus=(1, 3)), visible=[0, 1, 2, 3])
    assert [p.device for p in placed] == [Device("GPU", 1), Device("GPU", 1), Device("GPU", 3), Device("GPU", 3)]
    assert [p.index for p in placed] == [0, 1, 2, 3]


def test_gpu_group_without_list_uses_every_visible_gpu() -> None:
    placed = place_group(group(kind=GPU, count=1), visible=[0, 1])
    assert [p.device for p in placed] == [Device("GPU", 0), Device("GPU", 1)]


def test_gpu_group_without_a_gpu_fails_with_a_reason() -> None:
    with pytest.raises(PlacementError, match="KIND_GPU but no CUDA device is visible"):
        place_group(group(kind=GPU), visible=[])


def test_listed_gpu_that_is_not_visible_fails() -> None:
    with pytest.raises(PlacementError, match=r"lists GPU\(s\) \[2\], but the visible GPUs are \[0, 1\]"):
        place_group(group(kind=GPU, gpus=(0, 2)), visible=[0, 1])


@pytest.mark.parametrize(
    ("gpus", "visible", "uses_gpu", "expected"),
    [
        ((), [0], True, GPU),
        ((), [], True, CPU),
        ((1,), [0, 1], True, GPU),
        ((3,), [0, 1], True, CPU),  # the listed GPU is not here: CPU, as in Triton
        ((), [0], False, CPU),  # a CPU-only backend (identity) stays on the CPU
    ],
)
def test_auto_kind(gpus: tuple[int, ...], visible: list[int], uses_gpu: bool, expected: int) -> None:
    assert resolve_kind(AUTO, gpus, visible, uses_gpu) == expected


def test_auto_group_is_placed_like_its_resolved_kind() -> None:
    assert [p.device for p in place_group(group(kind=AUTO, count=1), visible=[0, 1])] == [
        Device("GPU", 0), Device("GPU", 1)]
    assert [p.device for p in place_group(group(kind=AUTO, count=2), visible=[])] == [Device("CPU", 0)] * 2


def test_several_groups_in_order() -> None:
    placed = place_instances([group("a", CPU, 2), group("b", GPU, 1, (1,))], visible=[0, 1])
    assert [(p.group, p.name, p.device) for p in placed] == [
        ("a", "a_0", Device("CPU", 0)), ("a", "a_1", Device("CPU", 0)), ("b", "b", Device("GPU", 1))]


def _normalised(backend: str, groups: list[mc.ModelInstanceGroup], visible: list[int]) -> mc.ModelConfig:
    config = mc.ModelConfig(name="m", backend=backend)
    config.instance_group.extend(groups)
    _fill_instance_groups(config, visible)
    return config


def test_config_default_group_on_a_gpu_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("server.repository.config.gpu_unusable", lambda name: None)  # as with onnxruntime-gpu
    config = _normalised("onnxruntime", [], visible=[0, 1])
    (only,) = config.instance_group
    assert (only.name, only.kind, only.count, list(only.gpus)) == ("m_0", GPU, 1, [0, 1])


def test_config_auto_group_stays_on_cpu_where_onnxruntime_has_no_cuda(caplog: pytest.LogCaptureFixture) -> None:
    # This machine's onnxruntime is the CPU build: on a GPU machine the default group (and any
    # KIND_AUTO group) runs on the CPU with a warning instead of failing every ONNX model's load.
    pytest.importorskip("onnxruntime")
    from backends.onnxruntime import OnnxRuntimeBackend
    if OnnxRuntimeBackend.gpu_unusable() is None:
        pytest.skip("this onnxruntime has CUDAExecutionProvider")
    with caplog.at_level("WARNING", logger="nereid.config"):
        (default,) = _normalised("onnxruntime", [], visible=[0]).instance_group
        auto, gpu = _normalised("onnxruntime", [mc.ModelInstanceGroup(kind=AUTO, count=3),
                                                mc.ModelInstanceGroup(kind=GPU)], visible=[0]).instance_group
    assert (default.kind, default.count, list(default.gpus)) == (CPU, 2, [])
    assert (auto.kind, auto.count) == (CPU, 3)
    assert (gpu.kind, list(gpu.gpus)) == (GPU, [0])  # asked for by name: the load refuses it with the reason
    assert "CUDAExecutionProvider" in caplog.text and "model 'm'" in caplog.text


def test_config_default_group_without_gpu_keeps_triton_cpu_counts() -> None:
    (ort,) = _normalised("onnxruntime", [], visible=[]).instance_group
    (torch_group,) = _normalised("pytorch", [], visible=[]).instance_group
    assert (ort.kind, ort.count) == (CPU, 2)
    assert (torch_group.kind, torch_group.count) == (CPU, 1)


def test_config_identity_backend_stays_on_cpu_with_gpus() -> None:
    (only,) = _normalised("identity", [], visible=[0]).instance_group
    assert only.kind == CPU


def test_config_gpu_group_without_gpus_is_left_for_the_load_to_refuse() -> None:
    (only,) = _normalised("onnxruntime", [group("", GPU, 0)], visible=[]).instance_group
    assert (only.kind, only.count, list(only.gpus)) == (GPU, 1, [])


def test_onnxruntime_providers_follow_device_and_accelerators() -> None:
    pytest.importorskip("onnxruntime")
    from backends.base import BackendError
    from backends.onnxruntime import execution_providers

    gpu_all = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    trt = {"gpu_execution_accelerator": [{"name": "tensorrt", "parameters": {"precision_mode": "FP16"}}]}
    assert execution_providers({}, Device("CPU", 0), ["CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    assert execution_providers({}, Device("GPU", 1), gpu_all) == [
        ("CUDAExecutionProvider", {"device_id": 1}), "CPUExecutionProvider"]
    providers = execution_providers(trt, Device("GPU", 1), gpu_all)
    assert providers[0][0] == "TensorrtExecutionProvider"
    assert providers[0][1]["device_id"] == 1 and providers[0][1]["trt_fp16_enable"] is True
    assert providers[1] == ("CUDAExecutionProvider", {"device_id": 1})
    assert execution_providers(trt, Device("CPU", 0), gpu_all) == ["CPUExecutionProvider"]  # ignored on CPU
    with pytest.raises(BackendError, match="onnxruntime-gpu"):
        execution_providers({}, Device("GPU", 0), ["CPUExecutionProvider"])
    with pytest.raises(BackendError, match="TensorrtExecutionProvider is absent"):
        execution_providers(trt, Device("GPU", 0), ["CUDAExecutionProvider", "CPUExecutionProvider"])
    openvino = {"cpu_execution_accelerator": [{"name": "openvino"}]}
    assert execution_providers(openvino, Device("CPU", 0), ["OpenVINOExecutionProvider", "CPUExecutionProvider"]) \
        == [("OpenVINOExecutionProvider", {}), "CPUExecutionProvider"]
    with pytest.raises(BackendError, match="pip install onnxruntime-openvino"):
        execution_providers(openvino, Device("CPU", 0), ["CPUExecutionProvider"])
    with pytest.raises(BackendError, match="unknown gpu_execution_accelerator 'tvm'"):
        execution_providers({"gpu_execution_accelerator": [{"name": "tvm"}]}, Device("GPU", 0), gpu_all)


@pytest.mark.nogpu
def test_server_without_gpu_refuses_kind_gpu_and_serves_the_rest(tmp_path: Path) -> None:
    write_model(tmp_path, "wants_gpu", identity_config(
        "wants_gpu", [("INPUT0", "FP32", [4])], extra="instance_group [ { kind: KIND_GPU } ]\n"))
    write_model(tmp_path, "fine", identity_config("fine", [("INPUT0", "FP32", [4])]))
    server = ServerProcess([tmp_path], ["--strict-readiness", "false"])
    try:
        from server.core.placement import visible_gpus

        if visible_gpus():
            pytest.skip("this machine has a GPU; the refusal is for GPU-less machines")
        rows = {r.name: r for r in client(server).get_model_repository_index().models}
        assert rows["wants_gpu"].state == "UNAVAILABLE"
        assert "KIND_GPU but no CUDA device is visible" in rows["wants_gpu"].reason
        assert rows["fine"].state == "READY"
    finally:
        server.stop()
