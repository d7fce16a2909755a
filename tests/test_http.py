"""KServe v2 HTTP/REST (server/http/, docs/HTTP.md) through tritonclient.http and raw HTTP:
health, metadata, config, statistics, repository, infer with JSON and binary tensors,
compression, and errors with Triton's codes and `{"error": ...}` bodies. The same server
answers gRPC, so answers are compared with the gRPC path's where both exist."""

from __future__ import annotations

import gzip
import http.client
import json
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException
from util import ServerProcess, http_request, identity_config, scaled, write_model


def raw(server: ServerProcess, method: str, path: str, body: bytes | None = None,
        headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    return http_request(server.http_port, method, path, body, headers)


def client(server: ServerProcess) -> httpclient.InferenceServerClient:
    return httpclient.InferenceServerClient(server.http_url, network_timeout=scaled(30))


# -- health, metadata, config --

def test_health_and_readiness(identity_server: ServerProcess) -> None:
    c = client(identity_server)
    assert c.is_server_live() and c.is_server_ready()
    assert c.is_model_ready("id_FP32")
    assert c.is_model_ready("id_versions", "3")
    assert not c.is_model_ready("id_versions", "2")  # not in the version policy
    assert not c.is_model_ready("no_such_model")
    assert raw(identity_server, "GET", "/v2/health/live")[0] == 200
    assert raw(identity_server, "GET", "/v2/health/ready")[0] == 200
    assert raw(identity_server, "GET", "/v2/models/id_FP32/ready")[0] == 200
    assert raw(identity_server, "GET", "/v2/models/no_such_model/ready")[0] == 400  # Triton: not ready


def test_metadata_matches_grpc(identity_server: ServerProcess) -> None:
    c = client(identity_server)
    g = grpcclient.InferenceServerClient(identity_server.url)
    assert c.get_server_metadata() == g.get_server_metadata(as_json=True)
    meta = c.get_model_metadata("id_pair")
    assert meta == {
        "name": "id_pair", "versions": ["1"], "platform": "identity",
        "inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [-1, 4]},
                   {"name": "INPUT1", "datatype": "INT32", "shape": [-1, 4]}],
        "outputs": [{"name": "OUTPUT0", "datatype": "FP32", "shape": [-1, 4]},
                    {"name": "OUTPUT1", "datatype": "INT32", "shape": [-1, 4]}],
    }
    assert c.get_model_metadata("id_versions", "3")["versions"] == ["1", "3"]
    config = c.get_model_config("id_pair")
    assert config["name"] == "id_pair" and config["max_batch_size"] == 4
    assert config["input"][0]["dims"] == [4]  # numbers, not protobuf's JSON strings
    assert config["input"][1]["data_type"] == "TYPE_INT32"


def test_errors_have_triton_codes_and_bodies(identity_server: ServerProcess) -> None:
    status, headers, body = raw(identity_server, "GET", "/v2/models/no_such_model")
    assert status == 404 and headers["content-type"] == "application/json"
    assert json.loads(body) == {"error": "Request for unknown model: 'no_such_model' is not found"}
    status, _, body = raw(identity_server, "GET", "/v2/models/no_such_model/config")
    assert status == 404 and "no_such_model" in json.loads(body)["error"]
    assert raw(identity_server, "GET", "/v2/nothing/here")[0] == 404
    assert raw(identity_server, "POST", "/v2/health/live")[0] == 405
    assert raw(identity_server, "GET", "/v2/models/id_FP32/infer")[0] == 405
    with pytest.raises(InferenceServerException) as info:
        client(identity_server).get_model_metadata("no_such_model")
    assert info.value.status() == "404"


# -- inference --

def _infer(server: ServerProcess, model: str, arr: np.ndarray, datatype: str, binary_in: bool,
           binary_out: bool) -> Any:
    inp = httpclient.InferInput("IN", list(arr.shape), datatype)
    inp.set_data_from_numpy(arr, binary_data=binary_in)
    out = httpclient.InferRequestedOutput("OUT", binary_data=binary_out)
    return client(server).infer(model, [inp], outputs=[out], request_id="req-7")


@pytest.mark.parametrize("datatype,values", [
    ("FP32", np.array([[1.5, -2.0, 3.25]], np.float32)),
    ("INT64", np.array([[2**40, -1]], np.int64)),
    ("UINT8", np.array([[0, 255, 7]], np.uint8)),
    ("BOOL", np.array([[True, False, True]])),
    ("FP16", np.array([[0.5, -1.0]], np.float16)),
    ("BYTES", np.array([[b"hello", b"", b"w\xc3\xb6rld"]], dtype=object)),
])
@pytest.mark.parametrize("binary_in,binary_out", [(True, True), (False, False), (True, False), (False, True)])
def test_infer_roundtrip(identity_server: ServerProcess, datatype: str, values: np.ndarray,
                         binary_in: bool, binary_out: bool) -> None:
    result = _infer(identity_server, f"id_{datatype}", values, datatype, binary_in, binary_out)
    got = result.as_numpy("OUT")
    assert got.shape == values.shape
    if datatype == "BYTES":
        assert [bytes(v) if isinstance(v, bytes) else str(v).encode() for v in got.ravel()] == list(values.ravel())
    else:
        np.testing.assert_array_equal(got, values)
    response = result.get_response()
    assert response["id"] == "req-7" and response["model_name"] == f"id_{datatype}"
    assert response["model_version"] == "1"
    output = response["outputs"][0]
    assert ("parameters" in output) == binary_out and ("data" in output) == (not binary_out)


def test_infer_raw_json_and_binary(identity_server: ServerProcess) -> None:
    """Triton's wire format by hand: a JSON-only request and answer, then the binary extension."""
    request = {"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [1, 4], "data": [[1, 2, 3, 4]]},
                          {"name": "INPUT1", "datatype": "INT32", "shape": [1, 4], "data": [5, 6, 7, 8]}]}
    status, headers, body = raw(identity_server, "POST", "/v2/models/id_pair/infer", json.dumps(request).encode())
    assert status == 200 and headers["content-type"] == "application/json", body
    doc = json.loads(body)
    assert doc["outputs"] == [
        {"name": "OUTPUT0", "datatype": "FP32", "shape": [1, 4], "data": [1.0, 2.0, 3.0, 4.0]},
        {"name": "OUTPUT1", "datatype": "INT32", "shape": [1, 4], "data": [5, 6, 7, 8]},
    ]
    a = np.array([[1, 2, 3, 4]], np.float32)
    header = json.dumps({
        "inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [1, 4], "parameters": {"binary_data_size": 16}},
                   {"name": "INPUT1", "datatype": "INT32", "shape": [1, 4], "data": [5, 6, 7, 8]}],
        "outputs": [{"name": "OUTPUT1", "parameters": {"binary_data": True}}],
    }).encode()
    status, headers, body = raw(identity_server, "POST", "/v2/models/id_pair/versions/1/infer", header + a.tobytes(),
                                {"Inference-Header-Content-Length": str(len(header))})
    assert status == 200, body
    assert headers["content-type"] == "application/octet-stream"
    length = int(headers["inference-header-content-length"])
    doc = json.loads(body[:length])
    assert doc["outputs"] == [{"name": "OUTPUT1", "datatype": "INT32", "shape": [1, 4],
                               "parameters": {"binary_data_size": 16}}]
    np.testing.assert_array_equal(np.frombuffer(body[length:], np.int32), [5, 6, 7, 8])
    # binary_data_output: every output binary unless it says otherwise
    request["parameters"] = {"binary_data_output": True}
    status, headers, body = raw(identity_server, "POST", "/v2/models/id_pair/infer", json.dumps(request).encode())
    length = int(headers["inference-header-content-length"])
    assert [o["parameters"]["binary_data_size"] for o in json.loads(body[:length])["outputs"]] == [16, 16]
    assert len(body) == length + 32


def test_infer_errors_match_grpc(identity_server: ServerProcess) -> None:
    """The same checks and messages as gRPC (the codec's), with Triton's HTTP codes."""
    bad = np.zeros((1, 3), np.float32)
    g = grpcclient.InferenceServerClient(identity_server.url)
    ginputs = [grpcclient.InferInput("INPUT0", [1, 3], "FP32"), grpcclient.InferInput("INPUT1", [1, 4], "INT32")]
    ginputs[0].set_data_from_numpy(bad)
    ginputs[1].set_data_from_numpy(np.zeros((1, 4), np.int32))
    with pytest.raises(InferenceServerException) as grpc_error:
        g.infer("id_pair", ginputs)
    hinputs = [httpclient.InferInput("INPUT0", [1, 3], "FP32"), httpclient.InferInput("INPUT1", [1, 4], "INT32")]
    hinputs[0].set_data_from_numpy(bad)
    hinputs[1].set_data_from_numpy(np.zeros((1, 4), np.int32))
    with pytest.raises(InferenceServerException) as http_error:
        client(identity_server).infer("id_pair", hinputs)
    assert http_error.value.status() == "400"
    assert http_error.value.message() == grpc_error.value.message()
    assert "unexpected shape for input 'INPUT0'" in http_error.value.message()

    def post(doc: dict[str, Any], model: str = "id_pair") -> tuple[int, str]:
        status, _, body = raw(identity_server, "POST", f"/v2/models/{model}/infer", json.dumps(doc).encode())
        return status, json.loads(body)["error"]

    one = {"name": "INPUT0", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}
    two = {"name": "INPUT1", "datatype": "INT32", "shape": [1, 4], "data": [1, 2, 3, 4]}
    assert post({"inputs": [one, two]}, "no_such_model") == (
        404, "Request for unknown model: 'no_such_model' is not found")
    status, message = post({"inputs": [one, dict(two, data=[1, 2, 3])]})
    assert status == 400 and message == ("input byte size mismatch for input 'INPUT1' for model 'id_pair'. "
                                         "Expected 16, got 12")
    status, message = post({"inputs": [one, dict(two, datatype="FP32")]})
    assert status == 400 and "data-type is 'FP32', but model 'id_pair' expects 'INT32'" in message
    status, message = post({"inputs": [one]})
    assert status == 400 and message.startswith("expected 2 inputs but got 1 inputs for model 'id_pair'")
    status, message = post({"inputs": [one, two], "outputs": [{"name": "NOPE"}]})
    assert status == 400 and message.startswith("unexpected inference output 'NOPE'")
    status, message = post({"inputs": [one, {"name": "INPUT1", "datatype": "INT32", "shape": [1, 4]}]})
    assert status == 400 and message.startswith("unable to find data for input tensor 'INPUT1'")
    status, message = post({"inputs": [one, two], "parameters": {"priority": "high"}})
    assert status == 400 and "invalid value type for 'priority' parameter" in message
    status, _, body = raw(identity_server, "POST", "/v2/models/id_pair/infer", b"{not json")
    assert status == 400 and json.loads(body)["error"].startswith("failed to parse the request JSON buffer")
    header = json.dumps({"inputs": [dict(one, data=None, parameters={"binary_data_size": 64}), two]})
    header = header.replace('"data": null, ', "").encode()
    status, _, body = raw(identity_server, "POST", "/v2/models/id_pair/infer", header + b"\0" * 16,
                          {"Inference-Header-Content-Length": str(len(header))})
    assert status == 400 and "'binary_data_size' 64 exceeds the 16 binary bytes left" in json.loads(body)["error"]


def test_statistics_counted_once_per_http_request(identity_server: ServerProcess) -> None:
    g = grpcclient.InferenceServerClient(identity_server.url)

    def count() -> int:
        stats = g.get_inference_statistics("id_INT32", as_json=True)["model_stats"][0]
        return int(stats.get("inference_count", 0))

    before = count()
    for _ in range(3):
        _infer(identity_server, "id_INT32", np.array([[1, 2]], np.int32), "INT32", True, True)
    assert count() == before + 3
    http_stats = client(identity_server).get_inference_statistics("id_INT32")["model_stats"][0]
    assert http_stats["inference_count"] == before + 3  # a number, as Triton's HTTP answer has it
    assert http_stats["inference_stats"]["success"]["count"] >= 3


@pytest.mark.parametrize("request_algorithm,response_algorithm", [("gzip", "gzip"), ("deflate", None),
                                                                  (None, "deflate")])
def test_compression(identity_server: ServerProcess, request_algorithm: str | None,
                     response_algorithm: str | None) -> None:
    arr = np.arange(64, dtype=np.float32).reshape(1, 64)
    inp = httpclient.InferInput("IN", [1, 64], "FP32")
    inp.set_data_from_numpy(arr)
    result = client(identity_server).infer("id_FP32", [inp], request_compression_algorithm=request_algorithm,
                                           response_compression_algorithm=response_algorithm)
    np.testing.assert_array_equal(result.as_numpy("OUT"), arr)


def test_compression_raw(identity_server: ServerProcess) -> None:
    doc = json.dumps({"inputs": [{"name": "IN", "datatype": "INT32", "shape": [1, 2], "data": [3, 4]}]}).encode()
    status, headers, body = raw(identity_server, "POST", "/v2/models/id_INT32/infer", gzip.compress(doc),
                                {"Content-Encoding": "gzip", "Accept-Encoding": "deflate"})
    assert status == 200 and headers["content-encoding"] == "deflate"
    assert json.loads(zlib.decompress(body))["outputs"][0]["data"] == [3, 4]
    status, _, body = raw(identity_server, "POST", "/v2/models/id_INT32/infer", b"not gzip",
                          {"Content-Encoding": "gzip"})
    assert status == 400 and "failed to decompress the gzip request body" in json.loads(body)["error"]


def test_keep_alive_serves_several_requests(identity_server: ServerProcess) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", identity_server.http_port, timeout=scaled(30))
    try:
        for _ in range(3):
            conn.request("GET", "/v2/health/ready")
            response = conn.getresponse()
            response.read()
            assert response.status == 200
    finally:
        conn.close()


# -- repository, flags --

def test_repository_load_unload_over_http(tmp_path: Path, server_factory: Any) -> None:
    write_model(tmp_path, "m", identity_config("m", [("INPUT0", "FP32", [2])]))
    server = server_factory(tmp_path, "--model-control-mode", "explicit")
    c = client(server)
    assert c.get_model_repository_index() == [{"name": "m", "reason": ""}]
    c.load_model("m")
    assert c.is_model_ready("m")
    assert c.get_model_repository_index() == [{"name": "m", "version": "1", "state": "READY", "reason": ""}]
    c.unload_model("m")
    assert not c.is_model_ready("m")
    with pytest.raises(InferenceServerException) as info:
        c.load_model("no_such_model")
    assert info.value.status() in ("400", "404")


def test_http_only_and_grpc_only(tmp_path: Path, server_factory: Any) -> None:
    write_model(tmp_path, "m", identity_config("m", [("INPUT0", "FP32", [2])]))
    http_only = server_factory(tmp_path, "--allow-grpc", "false")
    assert http_only.port == 0 and http_only.http_port
    assert not any("Started GRPCInferenceService" in line for line in http_only.lines)
    assert client(http_only).is_model_ready("m")
    grpc_only = server_factory(tmp_path, "--allow-http", "false")
    assert grpc_only.http_port == 0 and grpc_only.port
    assert not any("HTTPService" in line for line in grpc_only.lines)
