"""TorchScript string tensors (TYPE_STRING / BYTES as List[str]) through a real server and tritonclient.

The repository is the one scripts/gen_triton_compat.py writes (run as a user would run it), plus
one model of the test's own that returns the wrong number of strings.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Dict, List  # noqa: UP035 - TorchScript reads the annotations

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.grpc import service_pb2_grpc
from util import PYTHON, ROOT, ServerProcess, client, expect_error, output_array, raw_request, require, write_model

torch = require("torch")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit is deprecated upstream

GENERATOR = ROOT / "scripts" / "gen_triton_compat.py"


class OneString(torch.nn.Module):
    """A batching model that wrongly returns one string whatever the batch."""

    def forward(self, text: List[str]) -> List[str]:  # noqa: UP006
        return [text[0]]


class DictIn(torch.nn.Module):
    def forward(self, inputs: Dict[str, torch.Tensor]) -> torch.Tensor:  # noqa: UP006
        return inputs["x"]


class TakesStrings(torch.nn.Module):
    def forward(self, text: List[str]) -> torch.Tensor:  # noqa: UP006
        return torch.tensor([len(text)])


@pytest.fixture(scope="module")
def string_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("string_repo")
    proc = subprocess.run([PYTHON, str(GENERATOR), str(repo), "--only", "strings", "--invalid"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    scalar = 'dims: [ 1 ] reshape: { shape: [ ] }'
    write_model(repo, "ts_one_string", f'platform: "pytorch_libtorch"\nmax_batch_size: 4\n'
                f'input [ {{ name: "INPUT__0" data_type: TYPE_STRING {scalar} }} ]\n'
                f'output [ {{ name: "OUTPUT__0" data_type: TYPE_STRING {scalar} }} ]\n')
    torch.jit.script(OneString()).save(str(repo / "ts_one_string" / "1" / "model.pt"))
    # Refused at load: strings into a Dict[str, Tensor] forward(), a tensor into a List[str] argument.
    write_model(repo, "ts_dict_strings", 'platform: "pytorch_libtorch"\nmax_batch_size: 0\n'
                'input [ { name: "x" data_type: TYPE_STRING dims: [ -1 ] } ]\n'
                'output [ { name: "y" data_type: TYPE_INT64 dims: [ -1 ] } ]\n')
    torch.jit.script(DictIn()).save(str(repo / "ts_dict_strings" / "1" / "model.pt"))
    write_model(repo, "ts_tensor_into_strings", 'platform: "pytorch_libtorch"\nmax_batch_size: 0\n'
                'input [ { name: "text" data_type: TYPE_INT32 dims: [ -1 ] } ]\n'
                'output [ { name: "n" data_type: TYPE_INT64 dims: [ 1 ] } ]\n')
    torch.jit.script(TakesStrings()).save(str(repo / "ts_tensor_into_strings" / "1" / "model.pt"))
    return repo


@pytest.fixture(scope="module")
def string_server(string_repo: Path):
    server = ServerProcess([string_repo])
    yield server
    server.stop()


def _bytes_input(name: str, arr: np.ndarray) -> grpcclient.InferInput:
    inp = grpcclient.InferInput(name, list(arr.shape), "BYTES")
    inp.set_data_from_numpy(arr)
    return inp


def _strings(*items: bytes, shape: tuple[int, ...] | None = None) -> np.ndarray:
    arr = np.empty(len(items), dtype=object)
    arr[:] = list(items)
    return arr.reshape(shape) if shape is not None else arr


def test_generated_models_load(string_server: ServerProcess) -> None:
    rows = {r.name: r for r in client(string_server).get_model_repository_index().models}
    for name in ("libtorch_string_batch", "libtorch_string_nobatch", "libtorch_string_scalar",
                 "libtorch_string_mixed", "libtorch_string_length", "ts_one_string"):
        assert rows[name].state == "READY", (name, rows[name].reason)


def test_batched_strings_in_and_out(string_server: ServerProcess) -> None:
    """[N, 1] strings in (dims [1], reshape []): forward() gets N strings; OUTPUT__0 is [N, 1] BYTES,
    OUTPUT__1 the byte lengths the model saw, [N, 1] INT64."""
    text = _strings(b"ab", "h\u00e9llo".encode(), b"", b"Mixed Case 42", shape=(4, 1))
    result = client(string_server).infer("libtorch_string_batch", [_bytes_input("INPUT__0", text)])
    upper = result.as_numpy("OUTPUT__0")
    assert upper.shape == (4, 1)
    assert upper.ravel().tolist() == [b"AB", "H\u00e9LLO".encode(), b"", b"MIXED CASE 42"]
    lengths = result.as_numpy("OUTPUT__1")
    assert lengths.shape == (4, 1) and lengths.dtype == np.int64
    assert lengths.ravel().tolist() == [2, 6, 0, 13]  # bytes, as libtorch counts them
    out = result.get_output("OUTPUT__0")
    assert out.datatype == "BYTES" and list(out.shape) == [4, 1]


def test_requests_batched_together_get_their_own_strings(string_server: ServerProcess) -> None:
    """Several requests in one execution: the List[str] result is split by each request's batch size
    (Triton's backend hands every request the first elements; Nereid gives each its own)."""
    c = client(string_server)
    before = c.get_inference_statistics("libtorch_string_batch").model_stats[0]
    sizes = [1, 3, 2, 1]
    done: dict[int, object] = {}
    requests = []
    for index, size in enumerate(sizes):
        text = _strings(*[f"r{index}-{i}".encode() for i in range(size)], shape=(size, 1))
        requests.append(text)
        c.async_infer("libtorch_string_batch", [_bytes_input("INPUT__0", text)],
                      callback=lambda result, error, index=index: done.__setitem__(index, error or result))
    import time

    from util import scaled
    deadline = time.monotonic() + scaled(30)
    while len(done) < len(sizes) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(done) == len(sizes), done
    for index, text in enumerate(requests):
        result = done[index]
        assert isinstance(result, grpcclient.InferResult), result
        assert result.as_numpy("OUTPUT__0").ravel().tolist() == [s.upper() for s in text.ravel()]
        assert result.as_numpy("OUTPUT__0").shape == (sizes[index], 1)
    after = c.get_inference_statistics("libtorch_string_batch").model_stats[0]
    executions = after.execution_count - before.execution_count
    # The 50 ms queue delay gathers the four requests into fewer executions: the split was exercised.
    assert executions < len(sizes), f"{executions} executions for {len(sizes)} requests: nothing was batched"


def test_unbatched_list_keeps_its_order(string_server: ServerProcess) -> None:
    c = client(string_server)
    text = _strings(b"one", b"two", b"three")
    result = c.infer("libtorch_string_nobatch", [_bytes_input("INPUT__0", text)])
    assert result.as_numpy("OUTPUT__0").tolist() == [b"three", b"two", b"one"]
    assert list(result.get_output("OUTPUT__0").shape) == [3]


def test_empty_list(string_server: ServerProcess) -> None:
    """dims [-1] with zero elements: forward() gets [] and returns []."""
    result = client(string_server).infer("libtorch_string_nobatch", [_bytes_input("INPUT__0", _strings())])
    assert list(result.get_output("OUTPUT__0").shape) == [0]
    assert result.as_numpy("OUTPUT__0").size == 0


def test_scalar_string_without_batching(string_server: ServerProcess) -> None:
    """dims [1] with an empty reshape, no batching: a list of one string, shaped [1] on the wire."""
    result = client(string_server).infer("libtorch_string_scalar", [_bytes_input("INPUT__0", _strings(b"solo"))])
    assert result.as_numpy("OUTPUT__0").tolist() == [b"solo"]
    assert list(result.get_output("OUTPUT__0").shape) == [1]


def test_string_and_tensor_inputs_bound_by_name(string_server: ServerProcess) -> None:
    count = grpcclient.InferInput("count", [1], "INT64")
    count.set_data_from_numpy(np.array([3], dtype=np.int64))
    result = client(string_server).infer(
        "libtorch_string_mixed", [count, _bytes_input("text", _strings(b"ab", b"c"))])
    assert result.as_numpy("repeated").tolist() == [b"ab-ab-ab", b"c-c-c"]


def test_invalid_utf8_input_reaches_the_model_unchanged(string_server: ServerProcess) -> None:
    """As in Triton, the model gets the client's bytes as they are (len() counts bytes)."""
    text = _strings(b"\xff\xfe", b"ok", "\u20ac".encode())
    result = client(string_server).infer("libtorch_string_length", [_bytes_input("INPUT__0", text)])
    assert result.as_numpy("OUTPUT__0").tolist() == [2, 2, 3]


def test_invalid_utf8_output_is_a_clear_error(string_server: ServerProcess) -> None:
    """An output string torch cannot hand back (not UTF-8) fails that request only, with INVALID_ARGUMENT."""
    c = client(string_server)
    error = expect_error("INVALID_ARGUMENT", c.infer, "libtorch_string_nobatch",
                         [_bytes_input("INPUT__0", _strings(b"fine", b"\xffbad"))])
    assert "not valid UTF-8" in error.message()
    # The instance is fine: the next request succeeds, the model stays ready.
    ok = c.infer("libtorch_string_nobatch", [_bytes_input("INPUT__0", _strings(b"x"))])
    assert ok.as_numpy("OUTPUT__0").tolist() == [b"x"]
    assert c.is_model_ready("libtorch_string_nobatch")


def test_wrong_shapes_and_types_are_invalid_argument(string_server: ServerProcess) -> None:
    c = client(string_server)
    # The batching model wants [N, 1]; [N] is a shape error, not a crash.
    error = expect_error("INVALID_ARGUMENT", c.infer, "libtorch_string_batch",
                         [_bytes_input("INPUT__0", _strings(b"a", b"b"))])
    assert "unexpected shape for input 'INPUT__0'" in error.message()
    error = expect_error("INVALID_ARGUMENT", c.infer, "libtorch_string_nobatch",
                         [_bytes_input("INPUT__0", _strings(b"a", b"b", b"c", b"d", shape=(2, 2)))])
    assert "unexpected shape" in error.message()
    numbers = grpcclient.InferInput("INPUT__0", [2], "FP32")
    numbers.set_data_from_numpy(np.zeros(2, dtype=np.float32))
    error = expect_error("INVALID_ARGUMENT", c.infer, "libtorch_string_nobatch", [numbers])
    assert "data-type is 'FP32'" in error.message()


def test_malformed_bytes_body_is_invalid_argument(string_server: ServerProcess) -> None:
    request = raw_request("libtorch_string_nobatch", [("INPUT__0", "BYTES", _strings(b"a", b"b"))])
    request.raw_input_contents[0] = request.raw_input_contents[0][:-1]  # cut the last element short
    with string_server.channel() as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        import grpc

        with pytest.raises(grpc.RpcError) as info:
            stub.ModelInfer(request, timeout=30)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
        # The same request whole works, and answers BYTES on the wire.
        good = raw_request("libtorch_string_nobatch", [("INPUT__0", "BYTES", _strings(b"a", b"b"))])
        response = stub.ModelInfer(good, timeout=30)
        assert response.outputs[0].datatype == "BYTES"
        assert output_array(response, 0).tolist() == [b"b", b"a"]


def test_wrong_string_count_from_a_batching_model(string_server: ServerProcess) -> None:
    error = expect_error("INTERNAL", client(string_server).infer, "ts_one_string",
                         [_bytes_input("INPUT__0", _strings(b"a", b"b", shape=(2, 1)))])
    assert "returned 1 strings for a batch of 2" in error.message()


def test_shapes_triton_refuses_fail_the_load(string_server: ServerProcess) -> None:
    rows = {r.name: r for r in client(string_server).get_model_repository_index().models}
    expected = {
        "libtorch_string_bad_batch_dims": "Triton only supports 1 dimensional List of String as input for 'INPUT__0'",
        "libtorch_string_bad_2d": "Triton only supports 1 dimensional List of String as input for 'INPUT__0'",
        "libtorch_string_tensor_arg": "gets it as List[str], but the argument it binds to is Tensor",
        "ts_dict_strings": "cannot hold the TYPE_STRING inputs ['x']",
        "ts_tensor_into_strings": "input 'text' is INT32, but the forward() argument it binds to is List[str]",
    }
    for name, text in expected.items():
        assert rows[name].state == "UNAVAILABLE", name
        assert text in rows[name].reason, (name, rows[name].reason)
    # A model that failed to load has no version to serve (the server's usual answer for it).
    error = expect_error("NOT_FOUND", client(string_server).infer, "libtorch_string_bad_2d",
                         [_bytes_input("INPUT__0", _strings(b"a", b"b", b"c", b"d", shape=(2, 2)))])
    assert "libtorch_string_bad_2d" in error.message()
