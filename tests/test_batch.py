"""`nereid batch` (docs/BATCH.md): every dataset kind through a real server and in process,
results identical to per-row inference, interruption and resume, a million rows, bad inputs."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tritonclient.grpc as grpcclient
from lifecycle_util import IR_VERSION, OPSET
from util import PYTHON, ROOT, ServerProcess, identity_config, scaled, write_model

# affine: OUTPUT0 = INPUT0 * 3 + 1 (INT32 [4]), OUTPUT1 = INPUT1 + INPUT1 (FP32 [2]): exact in
# both numpy and ONNX Runtime, so results can be compared bit for bit with a numpy computation.
AFFINE_CONFIG = """name: "affine"
platform: "onnxruntime_onnx"
max_batch_size: 4096
input [ { name: "INPUT0" data_type: TYPE_INT32 dims: [ 4 ] },
        { name: "INPUT1" data_type: TYPE_FP32 dims: [ 2 ] } ]
output [ { name: "OUTPUT0" data_type: TYPE_INT32 dims: [ 4 ] },
         { name: "OUTPUT1" data_type: TYPE_FP32 dims: [ 2 ] } ]
dynamic_batching { }
instance_group [ { kind: KIND_CPU count: 1 } ]
"""


def _affine_onnx() -> bytes:
    from onnx import TensorProto, helper, numpy_helper

    three = numpy_helper.from_array(np.full(4, 3, dtype=np.int32), "THREE")
    one = numpy_helper.from_array(np.full(4, 1, dtype=np.int32), "ONE")
    graph = helper.make_graph(
        [helper.make_node("Mul", ["INPUT0", "THREE"], ["T"]),
         helper.make_node("Add", ["T", "ONE"], ["OUTPUT0"]),
         helper.make_node("Add", ["INPUT1", "INPUT1"], ["OUTPUT1"])],
        "affine",
        [helper.make_tensor_value_info("INPUT0", TensorProto.INT32, ["N", 4]),
         helper.make_tensor_value_info("INPUT1", TensorProto.FLOAT, ["N", 2])],
        [helper.make_tensor_value_info("OUTPUT0", TensorProto.INT32, ["N", 4]),
         helper.make_tensor_value_info("OUTPUT1", TensorProto.FLOAT, ["N", 2])],
        initializer=[three, one],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="nereid-tests")
    model.ir_version = IR_VERSION
    return model.SerializeToString()


def expected(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {"OUTPUT0": inputs["INPUT0"] * np.int32(3) + np.int32(1), "OUTPUT1": inputs["INPUT1"] + inputs["INPUT1"]}


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("batch_repo")
    write_model(root, "affine", AFFINE_CONFIG, files={"1/model.onnx": _affine_onnx()})
    # one input, no batching: every row is a request of its own
    write_model(root, "single", identity_config("single", [("INPUT0", "FP32", [3])]))
    # dims [1]: a column of plain scalars feeds it
    write_model(root, "scalar", identity_config("scalar", [("INPUT0", "INT64", [1])], max_batch_size=16))
    write_model(root, "wide", identity_config("wide", [("INPUT0", "FP32", [64])], max_batch_size=1024))
    # slow, to interrupt a job part way
    write_model(root, "slow", identity_config("slow", [("INPUT0", "FP32", [4])], max_batch_size=100,
                                              execute_delay_ms=20))
    return root


@pytest.fixture(scope="module")
def server(repo: Path) -> Iterator[ServerProcess]:
    srv = ServerProcess([repo])
    yield srv
    srv.stop()


def make_inputs(rows: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"INPUT0": rng.integers(-1000, 1000, (rows, 4), dtype=np.int32),
            "INPUT1": rng.standard_normal((rows, 2)).astype(np.float32)}


def write_dataset(path: Path, inputs: dict[str, np.ndarray]) -> Path:
    kind = path.suffix
    if kind == ".npz":
        np.savez(path, **inputs)
    elif kind == ".npy":
        (array,) = inputs.values()
        np.save(path, array)
    elif kind == ".parquet":
        columns = {name: pa.FixedSizeListArray.from_arrays(pa.array(a.reshape(-1)), a.shape[1])
                   for name, a in inputs.items()}
        pq.write_table(pa.table(columns), path, row_group_size=700)  # several row groups
    else:
        names = list(inputs)
        with open(path, "w", encoding="utf-8") as handle:
            for row in zip(*(inputs[n].tolist() for n in names), strict=True):
                handle.write(json.dumps(dict(zip(names, row, strict=True))) + "\n")
    return path


def read_output(path: Path, names: list[str]) -> dict[str, np.ndarray]:
    if path.suffix == ".npz":
        with np.load(path) as data:
            return {n: data[n] for n in names}
    if path.suffix == ".parquet":
        table = pq.read_table(path)
        return {n: np.array(table.column(n).to_pylist()) for n in names}
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    return {n: np.array([r[n] for r in rows]) for n in names}


def batch(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PYTHON, "-m", "server.cli", "batch", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=scaled(timeout), stdin=subprocess.DEVNULL)


def where(mode: str, server: ServerProcess, repo: Path) -> list[str]:
    return ["--url", server.url] if mode == "remote" else ["--repository", str(repo)]


def per_row(server: ServerProcess, model: str, inputs: dict[str, np.ndarray], rows: list[int],
            outputs: list[str], batching: bool = True) -> dict[str, np.ndarray]:
    """Each row as its own request through the server."""
    client = grpcclient.InferenceServerClient(server.url)
    got: dict[str, list[np.ndarray]] = {n: [] for n in outputs}
    for i in rows:
        wire = []
        for name, array in inputs.items():
            row = array[i:i + 1] if batching else array[i]
            tensor = grpcclient.InferInput(name, list(row.shape), "INT32" if array.dtype == np.int32 else "FP32")
            tensor.set_data_from_numpy(row)
            wire.append(tensor)
        result = client.infer(model, wire)
        for n in outputs:
            out = result.as_numpy(n)
            got[n].append(out[0] if batching else out)
    client.close()
    return {n: np.stack(v) for n, v in got.items()}


@pytest.mark.parametrize("mode", ["remote", "inprocess"])
@pytest.mark.parametrize("kind", [".npz", ".parquet", ".jsonl"])
def test_each_format_matches_per_row_inference(tmp_path: Path, server: ServerProcess, repo: Path,
                                               mode: str, kind: str) -> None:
    inputs = make_inputs(2500, seed=len(kind))
    source = write_dataset(tmp_path / f"data{kind}", inputs)
    done = batch("affine", str(source), *where(mode, server, repo), "--batch-size", "128", "--chunk-rows", "1000")
    assert done.returncode == 0, done.stderr
    out_ext = {".npz": "npz", ".parquet": "parquet", ".jsonl": "jsonl"}[kind]
    dest = tmp_path / f"data{kind}.affine.out.{out_ext}"
    assert dest.exists() and not (tmp_path / f"{dest.name}.parts").exists()
    assert "rows/s" in done.stderr and "2500 rows in" in done.stderr
    got = read_output(dest, ["OUTPUT0", "OUTPUT1"])
    sample = list(range(0, 2500, 25))
    rows = per_row(server, "affine", inputs, sample, ["OUTPUT0", "OUTPUT1"])
    for name in ("OUTPUT0", "OUTPUT1"):
        assert got[name].shape[0] == 2500
        np.testing.assert_array_equal(got[name][sample], rows[name])
        np.testing.assert_array_equal(got[name], expected(inputs)[name])


@pytest.mark.parametrize("mode", ["remote", "inprocess"])
def test_npy_into_a_model_that_does_not_batch(tmp_path: Path, server: ServerProcess, repo: Path, mode: str) -> None:
    data = np.random.default_rng(3).standard_normal((300, 3)).astype(np.float32)
    source = tmp_path / "single.npy"
    np.save(source, data)
    done = batch("single", str(source), *where(mode, server, repo), "--chunk-rows", "64")
    assert done.returncode == 0, done.stderr
    with np.load(tmp_path / "single.npy.single.out.npz") as result:
        got = result["OUTPUT0"]
    rows = per_row(server, "single", {"INPUT0": data}, list(range(0, 300, 7)), ["OUTPUT0"], batching=False)
    np.testing.assert_array_equal(got[::7], rows["OUTPUT0"])
    np.testing.assert_array_equal(got, data)


@pytest.mark.parametrize("kind", [".parquet", ".jsonl"])
def test_scalar_columns_feed_a_dims_1_input(tmp_path: Path, repo: Path, kind: str) -> None:
    values = np.arange(100, dtype=np.int64) * 7
    source = tmp_path / f"s{kind}"
    if kind == ".parquet":
        pq.write_table(pa.table({"INPUT0": values, "other": values.astype(str)}), source)
    else:
        source.write_text("".join(json.dumps({"INPUT0": int(v), "other": "x"}) + "\n" for v in values))
    done = batch("scalar", str(source), "--repository", str(repo))
    assert done.returncode == 0, done.stderr
    got = read_output(tmp_path / f"s{kind}.scalar.out.{kind[1:]}", ["OUTPUT0"])["OUTPUT0"]
    np.testing.assert_array_equal(got, values.reshape(-1, 1))


def test_connection_refused_is_one_line(tmp_path: Path) -> None:
    source = write_dataset(tmp_path / "x.npz", make_inputs(5))
    done = batch("affine", str(source), "--url", "127.0.0.1:1")
    assert done.returncode == 1 and "127.0.0.1:1" in done.stderr and "Traceback" not in done.stderr


def test_compressed_npz_is_streamed_and_scored(tmp_path: Path, repo: Path) -> None:
    inputs = make_inputs(3000, seed=9)
    source = tmp_path / "c.npz"
    np.savez_compressed(source, **inputs)
    done = batch("affine", str(source), "--repository", str(repo), "--chunk-rows", "700")
    assert done.returncode == 0, done.stderr
    got = read_output(tmp_path / "c.npz.affine.out.npz", ["OUTPUT0", "OUTPUT1"])
    for name, want in expected(inputs).items():
        np.testing.assert_array_equal(got[name], want)


def _wait_for_progress(manifest: Path, proc: subprocess.Popen[str], timeout: float) -> None:
    deadline = time.monotonic() + scaled(timeout)
    while time.monotonic() < deadline:
        if manifest.exists() and json.loads(manifest.read_text())["done"]:
            return
        assert proc.poll() is None, proc.communicate()[1]
        time.sleep(0.05)
    raise AssertionError("no chunk finished in time")


@pytest.mark.parametrize(("kind", "mode", "stop"), [
    (".npz", "remote", signal.SIGKILL), (".jsonl", "remote", signal.SIGKILL), (".parquet", "remote", signal.SIGKILL),
    (".npz", "inprocess", signal.SIGINT)])
def test_killed_job_resumes_to_the_same_result(tmp_path: Path, server: ServerProcess, repo: Path, kind: str,
                                               mode: str, stop: signal.Signals) -> None:
    rows = 6000
    data = {"INPUT0": np.random.default_rng(5).standard_normal((rows, 4)).astype(np.float32)}
    source = write_dataset(tmp_path / f"d{kind}", data)
    ext = kind.lstrip(".")
    dest = tmp_path / f"d{kind}.slow.out.{ext}"
    manifest = tmp_path / f"{dest.name}.parts" / "manifest.json"
    args = ["slow", str(source), *where(mode, server, repo), "--batch-size", "100", "--concurrency", "2",
            "--chunk-rows", "500"]
    proc = subprocess.Popen([PYTHON, "-m", "server.cli", "batch", *args], cwd=ROOT, text=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    try:
        _wait_for_progress(manifest, proc, 30)
        proc.send_signal(stop)
        proc.wait(scaled(10))
    finally:
        if proc.poll() is None:
            proc.kill()
        err = proc.communicate()[1]
    if stop == signal.SIGINT:  # Ctrl-C: a clean stop that says how to go on
        assert proc.returncode == 130 and "run the same command again to resume" in err, err
    assert not dest.exists()
    saved = json.loads(manifest.read_text())["done"]
    finished = sum(stop - start for start, stop in saved)
    assert 0 < finished < rows, saved
    resumed = batch(*args)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming: {finished} of {rows} rows already done" in resumed.stderr
    assert f"{rows - finished} rows in" in resumed.stderr
    first = dest.read_bytes()
    # The same job run without interruption writes the same bytes.
    dest.unlink()
    whole = batch(*args)
    assert whole.returncode == 0, whole.stderr
    assert "resuming" not in whole.stderr
    if kind != ".parquet":  # Parquet's footer may differ; compare values there
        assert dest.read_bytes() == first
    got = read_output(dest, ["OUTPUT0"])["OUTPUT0"]
    np.testing.assert_array_equal(got, data["INPUT0"])


def test_a_manifest_of_another_job_is_refused_until_restart(tmp_path: Path, repo: Path) -> None:
    inputs = make_inputs(100)
    source = write_dataset(tmp_path / "m.npz", inputs)
    parts = tmp_path / "m.npz.affine.out.npz.parts"
    parts.mkdir()
    stale = {"format": 1, "input": str(source.resolve()), "input_bytes": 1, "input_mtime_ns": 1, "model": "affine",
             "version": "", "chunk_rows": 65536, "rows": 100, "done": [[0, 100]]}
    (parts / "manifest.json").write_text(json.dumps(stale))
    refused = batch("affine", str(source), "--repository", str(repo))
    assert refused.returncode == 1 and "input_bytes, input_mtime_ns" in refused.stderr and "--restart" in refused.stderr
    done = batch("affine", str(source), "--repository", str(repo), "--restart")
    assert done.returncode == 0, done.stderr
    np.testing.assert_array_equal(read_output(tmp_path / "m.npz.affine.out.npz", ["OUTPUT0"])["OUTPUT0"],
                                  expected(inputs)["OUTPUT0"])
    assert not parts.exists()


def test_a_million_rows_match_per_row_inference(tmp_path: Path, server: ServerProcess) -> None:
    rows = 1_000_000
    inputs = make_inputs(rows, seed=11)
    source = write_dataset(tmp_path / "million.npz", inputs)
    started = time.monotonic()
    done = batch("affine", str(source), "--url", server.url, "--batch-size", "4096", "--concurrency", "4",
                 "--chunk-rows", "131072", timeout=120)
    elapsed = time.monotonic() - started
    assert done.returncode == 0, done.stderr
    assert elapsed < scaled(60), done.stderr
    got = read_output(tmp_path / "million.npz.affine.out.npz", ["OUTPUT0", "OUTPUT1"])
    for name, want in expected(inputs).items():
        np.testing.assert_array_equal(got[name], want)
    sample = sorted(np.random.default_rng(1).choice(rows, 200, replace=False).tolist()) + [0, rows - 1]
    rows_out = per_row(server, "affine", inputs, sample, ["OUTPUT0", "OUTPUT1"])
    for name in ("OUTPUT0", "OUTPUT1"):
        np.testing.assert_array_equal(got[name][sample], rows_out[name])


def test_a_large_npy_is_streamed_not_loaded(tmp_path: Path, repo: Path) -> None:
    """256 MB of input scored with a peak resident size well under the file's size."""
    source = tmp_path / "big.npy"
    rows = 1_000_000
    big = np.lib.format.open_memmap(source, mode="w+", dtype=np.float32, shape=(rows, 64))
    for start in range(0, rows, 250_000):
        big[start:start + 250_000] = np.arange(start, start + 250_000, dtype=np.float32)[:, None]
    big.flush()
    del big
    # VmHWM, not ru_maxrss: the latter keeps the forking parent's (this test's) size across exec.
    code = ("import re\nfrom server.cli import main\n"
            f"rc = main(['batch', 'wide', {str(source)!r}, '--repository', {str(repo)!r}, '--quiet', "
            "'--chunk-rows', '16384', '--batch-size', '1024'])\n"
            "hwm = re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1)\n"
            "print('peak', int(hwm) // 1024, 'rc', rc)")
    done = subprocess.run([PYTHON, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=scaled(120))
    assert done.returncode == 0 and "rc 0" in done.stdout, done.stderr
    peak_mb = int(done.stdout.split()[1])
    assert peak_mb < 200, f"peak resident size {peak_mb} MB for a 256 MB input: {done.stderr}"
    with np.load(tmp_path / "big.npy.wide.out.npz") as result:
        out = result["OUTPUT0"]
        np.testing.assert_array_equal(out[::997, 0], np.arange(0, rows, 997, dtype=np.float32))
        np.testing.assert_array_equal(out[-1], np.full(64, rows - 1, dtype=np.float32))


@pytest.mark.parametrize("mode", ["remote", "inprocess"])
def test_bad_inputs_fail_with_a_clear_message(tmp_path: Path, server: ServerProcess, repo: Path, mode: str) -> None:
    place = where(mode, server, repo)
    good = make_inputs(10)

    def fails(model: str, source: Path, *message: str) -> None:
        done = batch(model, str(source), *place)
        assert done.returncode == 1, done.stderr
        for part in message:
            assert part in done.stderr, done.stderr
        assert "Traceback" not in done.stderr

    fails("affine", write_dataset(tmp_path / "missing.npz", {"INPUT0": good["INPUT0"]}),
          "no column for input 'INPUT1'", "['INPUT0']")
    fails("affine", write_dataset(tmp_path / "dtype.npz", {**good, "INPUT0": good["INPUT0"].astype(np.float64)}),
          "input 'INPUT0'", "float64", "INT32")
    fails("affine", write_dataset(tmp_path / "shape.npz", {**good, "INPUT1": np.zeros((10, 3), np.float32)}),
          "input 'INPUT1'", "[3]", "[2]")
    fails("affine", write_dataset(tmp_path / "shape.jsonl", {**good, "INPUT1": np.zeros((10, 3), np.float32)}),
          "input 'INPUT1'", "[3]", "[2]")
    fails("nosuchmodel", write_dataset(tmp_path / "unknown.npz", good), "nosuchmodel")
    fails("affine", write_dataset(tmp_path / "one.npy", {"INPUT0": good["INPUT0"]}), ".npy", "2 inputs")
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"INPUT0": [1,2,3,4], "INPUT1": [1,2]}\n{"INPUT0": [1,2,3,4]}\n')
    fails("affine", bad_json, "row 2", "'INPUT1'")
    fails("affine", tmp_path / "absent.npz", "no such file")
