"""TorchScript models through a real server and tritonclient, on CPU.

The models are scripted or traced here into a temporary repository, so the tests need
only the `torch` package (CI installs it; without it the module fails, see `util.require`).
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from util import (
    NUMERIC_DATATYPES,
    ServerProcess,
    client,
    config_type,
    expect_error,
    random_array,
    raw_request,
    require,
    write_model,
)

torch = require("torch")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit is deprecated upstream

from typing import Dict  # noqa: E402,UP035 - TorchScript wants typing.Dict

TORCH_DATATYPES = [dt for dt in NUMERIC_DATATYPES]  # every numeric type; BF16 separately


class AddSub(torch.nn.Module):
    def forward(self, x: torch.Tensor, y: torch.Tensor):
        return x + y, x - y


class Sub(torch.nn.Module):
    def forward(self, a: torch.Tensor, b: torch.Tensor):
        return a - b


class DictIn(torch.nn.Module):
    def forward(self, inputs: Dict[str, torch.Tensor]):  # noqa: UP006
        return inputs["scale"] * inputs["value"]


class InPlace(torch.nn.Module):
    def forward(self, x: torch.Tensor):
        x.add_(1.0)
        return x


class Mlp(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Clone(torch.nn.Module):
    def forward(self, x: torch.Tensor):
        return x.clone()


def _save(module: torch.nn.Module, path: Path, example: tuple | None = None) -> bytes:
    scripted = torch.jit.trace(module, example) if example is not None else torch.jit.script(module)
    path.parent.mkdir(parents=True, exist_ok=True)
    scripted.save(str(path))
    return path.read_bytes()


def _io(kind: str, entries: list[tuple[str, str, list[int]]]) -> str:
    body = ", ".join(f'{{ name: "{n}" data_type: {config_type(dt)} dims: [ {", ".join(map(str, d))} ] }}'
                     for n, dt, d in entries)
    return f"{kind} [ {body} ]\n"


def _config(name: str, inputs, outputs, max_batch_size: int = 0, extra: str = "") -> str:
    return (f'name: "{name}"\nplatform: "pytorch_libtorch"\nmax_batch_size: {max_batch_size}\n'
            + _io("input", inputs) + _io("output", outputs) + extra)


def _model(repo: Path, name: str, module: torch.nn.Module, config: str, example: tuple | None = None) -> None:
    write_model(repo, name, config)
    _save(module, repo / name / "1" / "model.pt", example)


@pytest.fixture(scope="module")
def ts_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("torch_repo")
    f4 = [4]
    _model(repo, "ts_index", AddSub(), _config(
        "ts_index", [("INPUT__1", "FP32", f4), ("INPUT__0", "FP32", f4)],
        [("OUTPUT__1", "FP32", f4), ("OUTPUT__0", "FP32", f4)], max_batch_size=8))
    _model(repo, "ts_argnames", Sub(), _config(
        "ts_argnames", [("b", "FP32", f4), ("a", "FP32", f4)], [("diff", "FP32", f4)]))
    _model(repo, "ts_broadcast", Sub(), _config(
        "ts_broadcast", [("a", "FP32", [-1]), ("b", "FP32", [-1])], [("diff", "FP32", [-1])]))
    _model(repo, "ts_order", Sub(), _config(
        "ts_order", [("first", "FP32", f4), ("second", "FP32", f4)], [("out", "FP32", f4)]))
    _model(repo, "ts_dict", DictIn(), _config(
        "ts_dict", [("value", "FP32", f4), ("scale", "FP32", f4)], [("OUTPUT__0", "FP32", f4)]))
    _model(repo, "ts_inplace", InPlace(), _config("ts_inplace", [("x", "FP32", f4)], [("y", "FP32", f4)]))
    _model(repo, "ts_mlp", Mlp(), _config(
        "ts_mlp", [("INPUT__0", "FP32", [8])], [("OUTPUT__0", "FP32", [4])], max_batch_size=16,
        extra="instance_group [ { kind: KIND_CPU count: 2 } ]\n"
              'parameters: { key: "INTRA_OP_THREAD_COUNT" value: { string_value: "1" } }\n'),
        example=(torch.zeros(1, 8),))
    for dt in [*TORCH_DATATYPES, "BF16"]:
        name = f"ts_id_{dt}"
        _model(repo, name, Clone(), _config(name, [("INPUT__0", dt, [-1])], [("OUTPUT__0", dt, [-1])]))
    # Failures: no I/O in config (TorchScript cannot auto-complete), strings into a Tensor argument, wrong arity.
    write_model(repo, "ts_no_io", 'platform: "pytorch_libtorch"\n')
    _save(Clone(), repo / "ts_no_io" / "1" / "model.pt")
    _model(repo, "ts_bytes", Clone(), _config("ts_bytes", [("INPUT__0", "BYTES", [-1])],
                                              [("OUTPUT__0", "BYTES", [-1])]))
    _model(repo, "ts_arity", Clone(), _config(
        "ts_arity", [("INPUT__0", "FP32", f4), ("INPUT__1", "FP32", f4)], [("OUTPUT__0", "FP32", f4)]))
    return repo


@pytest.fixture(scope="module")
def ts_server(ts_repo: Path):
    server = ServerProcess([ts_repo])
    yield server
    server.stop()


def _inp(name: str, arr: np.ndarray, datatype: str = "FP32") -> grpcclient.InferInput:
    inp = grpcclient.InferInput(name, list(arr.shape), datatype)
    inp.set_data_from_numpy(arr)
    return inp


def test_index_naming_binds_inputs_and_outputs_by_index(ts_server: ServerProcess) -> None:
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    y = np.full((2, 4), 10, dtype=np.float32)
    result = client(ts_server).infer("ts_index", [_inp("INPUT__0", x), _inp("INPUT__1", y)])
    np.testing.assert_array_equal(result.as_numpy("OUTPUT__0"), x + y)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT__1"), x - y)


def test_forward_argument_names_bind_by_name(ts_server: ServerProcess) -> None:
    a = np.full((4,), 5, dtype=np.float32)
    b = np.arange(4, dtype=np.float32)
    result = client(ts_server).infer("ts_argnames", [_inp("a", a), _inp("b", b)])
    np.testing.assert_array_equal(result.as_numpy("diff"), a - b)  # config lists b first; names win


def test_other_names_bind_in_config_order(ts_server: ServerProcess) -> None:
    first = np.full((4,), 5, dtype=np.float32)
    second = np.arange(4, dtype=np.float32)
    result = client(ts_server).infer("ts_order", [_inp("second", second), _inp("first", first)])
    np.testing.assert_array_equal(result.as_numpy("out"), first - second)


def test_single_dict_input_gets_every_input_by_name(ts_server: ServerProcess) -> None:
    value = np.arange(4, dtype=np.float32)
    scale = np.full((4,), 3, dtype=np.float32)
    result = client(ts_server).infer("ts_dict", [_inp("value", value), _inp("scale", scale)])
    np.testing.assert_array_equal(result.as_numpy("OUTPUT__0"), value * scale)


def test_in_place_model_gets_a_writable_copy(ts_server: ServerProcess) -> None:
    x = np.arange(4, dtype=np.float32)
    c = client(ts_server)
    for _ in range(3):  # the wire buffer is never modified, so every call answers the same
        np.testing.assert_array_equal(c.infer("ts_inplace", [_inp("x", x)]).as_numpy("y"), x + 1)


@pytest.mark.parametrize("datatype", TORCH_DATATYPES)
def test_every_torch_datatype_round_trips(ts_server: ServerProcess, datatype: str) -> None:
    data = random_array(datatype, [6], np.random.default_rng(7))
    out = client(ts_server).infer(f"ts_id_{datatype}", [_inp("INPUT__0", data, datatype)]).as_numpy("OUTPUT__0")
    assert out.dtype == data.dtype
    assert out.tobytes() == data.tobytes()


def test_bf16_round_trips_as_bit_patterns(ts_server: ServerProcess) -> None:
    from tritonclient.grpc import service_pb2_grpc

    bits = np.array([0x3F80, 0x4000, 0xC040, 0x7F80, 0x8000], dtype=np.uint16)  # 1, 2, -3, inf, -0
    stub = service_pb2_grpc.GRPCInferenceServiceStub(ts_server.channel())
    response = stub.ModelInfer(raw_request("ts_id_BF16", [("INPUT__0", "BF16", bits)]), timeout=10)
    assert response.outputs[0].datatype == "BF16"
    assert response.raw_output_contents[0] == bits.astype("<u2").tobytes()


def test_batched_mlp_two_instances_matches_torch(ts_server: ServerProcess) -> None:
    module = Mlp().eval()
    rng = np.random.default_rng(3)
    errors: list[str] = []

    def worker(seed: int) -> None:
        c = client(ts_server)
        local = np.random.default_rng(seed)
        for _ in range(10):
            x = local.standard_normal((int(local.integers(1, 17)), 8)).astype(np.float32)
            got = c.infer("ts_mlp", [_inp("INPUT__0", x)]).as_numpy("OUTPUT__0")
            with torch.no_grad():
                want = module(torch.from_numpy(x)).numpy()
            if not np.allclose(got, want, atol=1e-5):
                errors.append(f"mismatch for batch {x.shape[0]}")

    threads = [threading.Thread(target=worker, args=(int(rng.integers(1 << 30)),)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    stats = client(ts_server).get_inference_statistics("ts_mlp").model_stats[0]
    assert stats.inference_stats.success.count == 40


def test_load_failures_say_why(ts_server: ServerProcess) -> None:
    rows = {r.name: r for r in client(ts_server).get_model_repository_index().models}
    assert rows["ts_no_io"].state == "UNAVAILABLE"
    assert "list every input and output" in rows["ts_no_io"].reason
    assert rows["ts_bytes"].state == "UNAVAILABLE"
    # A string input reaches forward() as List[str]; this model's forward() takes a Tensor.
    assert "gets it as List[str], but the argument it binds to is Tensor" in rows["ts_bytes"].reason
    assert rows["ts_arity"].state == "UNAVAILABLE"
    assert "forward() takes" in rows["ts_arity"].reason
    assert rows["ts_index"].state == "READY"


def test_torch_runtime_error_is_reported(ts_server: ServerProcess) -> None:
    # dims [-1] let through shapes that torch then refuses to broadcast: the torch message comes back.
    err = expect_error("INVALID_ARGUMENT", client(ts_server).infer, "ts_broadcast",
                       [_inp("a", np.ones((3,), np.float32)), _inp("b", np.ones((5,), np.float32))])
    assert "torch error" in err.message() and "size of tensor" in err.message()


def test_thread_count_is_per_calling_thread(ts_repo: Path) -> None:
    """INTRA_OP_THREAD_COUNT applies to the thread that runs the instance, not the whole process."""
    from backends.base import Device, ModelSpec, TensorSpec
    from backends.torchscript import TorchScriptBackend

    model_dir = ts_repo / "ts_mlp"
    spec = ModelSpec(
        name="ts_mlp", version=1, model_dir=model_dir, version_dir=model_dir / "1",
        model_file=model_dir / "1" / "model.pt", max_batch_size=16,
        inputs=(TensorSpec("INPUT__0", "FP32", (8,)),), outputs=(TensorSpec("OUTPUT__0", "FP32", (4,)),),
        parameters={"INTRA_OP_THREAD_COUNT": "1"},
    )
    backend = TorchScriptBackend()
    backend.load(spec, Device())
    seen: list[int] = []

    def run() -> None:
        backend.execute({"INPUT__0": np.zeros((2, 8), np.float32)})
        seen.append(torch.get_num_threads())

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    assert seen == [1]
    backend.close()


def test_example_mlp_torch_matches_the_onnx_mlp(onnx_server: ServerProcess, mlp_session) -> None:
    x = np.random.default_rng(11).standard_normal((6, 64)).astype(np.float32)
    got = client(onnx_server).infer("mlp_torch", [_inp("INPUT__0", x)]).as_numpy("OUTPUT__0")
    np.testing.assert_allclose(got, mlp_session.run(None, {"INPUT0": x})[0], rtol=1e-4, atol=1e-5)
