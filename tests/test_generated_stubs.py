"""Stubs generated from protos/ by scripts/gen_stubs talk to Nereid unchanged.

The generated `inference` modules would clash with tritonclient's in this process's
descriptor pool, so the client runs in a subprocess with only the generated code.
"""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest
from util import PYTHON, ROOT, ServerProcess, scaled

CLIENT_SCRIPT = r"""
import json, sys
import grpc
import numpy as np
import grpc_service_pb2 as pb
import grpc_service_pb2_grpc as pb_grpc
import health_pb2, health_pb2_grpc

assert "tritonclient" not in sys.modules
args = json.load(sys.stdin)
a = np.array(args["a"], dtype="<i4")
b = np.array(args["b"], dtype="<i4")
out = {}
with grpc.insecure_channel(args["url"]) as channel:
    stub = pb_grpc.GRPCInferenceServiceStub(channel)
    out["live"] = stub.ServerLive(pb.ServerLiveRequest(), timeout=10).live
    out["ready"] = stub.ModelReady(pb.ModelReadyRequest(name="simple"), timeout=10).ready
    meta = stub.ModelMetadata(pb.ModelMetadataRequest(name="simple"), timeout=10)
    out["inputs"] = [[t.name, t.datatype, list(t.shape)] for t in meta.inputs]
    request = pb.ModelInferRequest(model_name="simple", id="stubs")
    for name, arr in (("INPUT0", a), ("INPUT1", b)):
        request.inputs.add(name=name, datatype="INT32", shape=list(arr.shape))
        request.raw_input_contents.append(arr.tobytes())
    response = stub.ModelInfer(request, timeout=10)
    out["id"] = response.id
    out["outputs"] = {
        o.name: {"shape": list(o.shape), "datatype": o.datatype,
                 "values": np.frombuffer(response.raw_output_contents[i], "<i4").tolist()}
        for i, o in enumerate(response.outputs)
    }
    typed = pb.ModelInferRequest(model_name="simple")
    for name, arr in (("INPUT0", a), ("INPUT1", b)):
        typed.inputs.add(name=name, datatype="INT32", shape=list(arr.shape)).contents.int_contents.extend(
            arr.ravel().tolist())
    typed_response = stub.ModelInfer(typed, timeout=10)
    out["typed_output0"] = np.frombuffer(typed_response.raw_output_contents[0], "<i4").tolist()
    try:
        stub.ModelInfer(pb.ModelInferRequest(model_name="no_such_model"), timeout=10)
    except grpc.RpcError as exc:
        out["error"] = [exc.code().name, exc.details()]
    health = health_pb2_grpc.HealthStub(channel)
    out["health"] = health_pb2.HealthCheckResponse.ServingStatus.Name(
        health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10).status)
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def stubs_dir(tmp_path_factory):
    pytest.importorskip("grpc_tools")
    out = tmp_path_factory.mktemp("stubs")
    proc = subprocess.run([str(ROOT / "scripts" / "gen_stubs"), str(out)], capture_output=True, text=True,
                          timeout=scaled(120), cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    for name in ("grpc_service_pb2.py", "grpc_service_pb2_grpc.py", "model_config_pb2.py", "health_pb2_grpc.py"):
        assert (out / name).exists(), name
    return out


def test_generated_stubs_infer_simple(stubs_dir, onnx_server: ServerProcess) -> None:
    rng = np.random.default_rng(8)
    a = rng.integers(-(2**30), 2**30, size=(4, 16), dtype=np.int32)
    b = rng.integers(-(2**30), 2**30, size=(4, 16), dtype=np.int32)
    payload = json.dumps({"url": onnx_server.url, "a": a.tolist(), "b": b.tolist()})
    proc = subprocess.run(
        [PYTHON, "-c", CLIENT_SCRIPT], input=payload, capture_output=True, text=True, timeout=scaled(60),
        env={"PYTHONPATH": str(stubs_dir), "PATH": "/usr/bin:/bin"}, cwd=stubs_dir,
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["live"] is True
    assert out["ready"] is True
    assert out["inputs"] == [["INPUT0", "INT32", [-1, 16]], ["INPUT1", "INT32", [-1, 16]]]
    assert out["id"] == "stubs"
    assert list(out["outputs"]) == ["OUTPUT0", "OUTPUT1"]
    for name, expected in (("OUTPUT0", a + b), ("OUTPUT1", a - b)):
        got = out["outputs"][name]
        assert got["shape"] == [4, 16] and got["datatype"] == "INT32"
        np.testing.assert_array_equal(np.array(got["values"], dtype=np.int32).reshape(4, 16), expected)
    np.testing.assert_array_equal(np.array(out["typed_output0"], dtype=np.int32).reshape(4, 16), a + b)
    assert out["error"][0] == "NOT_FOUND" and "no_such_model" in out["error"][1]
    assert out["health"] == "SERVING"
