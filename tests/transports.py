"""One set of conformance cases, two transports (issue 13: "the same conformance tests that run
over gRPC run over HTTP where the protocol has the feature").

The gRPC conformance modules build `service_pb2` request messages and call a
`GRPCInferenceServiceStub`. `HttpStub` has the same methods and the same answers, spoken over
Triton's HTTP/REST protocol instead: a `ModelInferRequest` is sent as a JSON header plus the
binary-tensor extension (raw inputs as binary, typed `contents` as JSON `data`, every output
asked for as binary), and the HTTP answer is read back into a `ModelInferResponse`, so a
test's checks read the same fields whichever transport carried it. An HTTP error becomes
`HttpRpcError` (a `grpc.RpcError`): `details()` is the `{"error": ...}` body's text and
`http_status` the status; `util.expect_rpc_error` checks that status against the one Triton
uses for the expected gRPC code (`HTTP_STATUS`, written here from Triton's
http_server.cc `HttpCodeFromError`, not imported from the server, so a wrong mapping in
server/http/status.py fails the tests).

A request that only the gRPC wire can express (a `raw_input_contents` count that disagrees
with the inputs, typed contents for FP16/BF16, non-UTF-8 typed BYTES) raises
`NotExpressible`; case tables mark such cases gRPC-only instead of skipping them.
"""

from __future__ import annotations

import base64
import http.client
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import quote

import grpc
import tritonclient.http as httpclient
from google.protobuf import json_format
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc
from util import ServerProcess, client, scaled

TRANSPORTS = ("grpc", "http")

# Triton's HttpCodeFromError: INTERNAL 500, NOT_FOUND 404, UNAVAILABLE 503, UNSUPPORTED 501,
# everything else (INVALID_ARG, UNKNOWN, ALREADY_EXISTS, ...) 400. Nereid's own additions:
# overload 429 and an execution timeout 504 (docs/HTTP.md).
HTTP_STATUS: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}


def http_status_of(code: grpc.StatusCode) -> int:
    return HTTP_STATUS.get(code, 400)


class NotExpressible(Exception):
    """The request has no HTTP/REST form (a gRPC-wire-only detail); the case is gRPC-only."""


class HttpRpcError(grpc.RpcError):
    """An HTTP error answer, read like a gRPC one: details() is Triton's `{"error": ...}` text."""

    def __init__(self, http_status: int, message: str) -> None:
        super().__init__(f"HTTP {http_status}: {message}")
        self.http_status = http_status
        self.message = message

    def details(self) -> str:
        return self.message

    def code(self) -> str:
        return f"HTTP {self.http_status}"


def _param(value: pb.InferParameter) -> Any:
    kind = value.WhichOneof("parameter_choice")
    return getattr(value, kind) if kind else None


def _params(params: Any) -> dict[str, Any]:
    return {key: _param(value) for key, value in params.items()}


_TYPED_FIELDS = ("bool_contents", "int_contents", "int64_contents", "uint_contents", "uint64_contents",
                 "fp32_contents", "fp64_contents", "bytes_contents")


def _typed_data(tensor: pb.ModelInferRequest.InferInputTensor) -> list[Any] | None:
    """The typed `contents` as JSON `data` (None when the input has none)."""
    fields = [name for name in _TYPED_FIELDS if len(getattr(tensor.contents, name))]
    if not fields:
        return None
    if len(fields) > 1 or tensor.datatype in ("FP16", "BF16"):
        raise NotExpressible(f"typed contents {fields} for {tensor.datatype} have no JSON form")
    values = list(getattr(tensor.contents, fields[0]))
    if fields[0] == "bytes_contents":
        try:
            return [v.decode("utf-8") for v in values]
        except UnicodeDecodeError:
            raise NotExpressible("non-UTF-8 BYTES have no JSON form") from None
    return values


def infer_body(request: pb.ModelInferRequest) -> tuple[bytes, dict[str, str]]:
    """A ModelInferRequest as Triton's HTTP body (JSON header + binary inputs) and its headers."""
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise NotExpressible("a raw_input_contents count that differs from the inputs' count")
    parameters = _params(request.parameters)
    parameters["binary_data_output"] = True
    doc: dict[str, Any] = {"parameters": parameters}
    if request.id:
        doc["id"] = request.id
    inputs, binaries = [], []
    for index, tensor in enumerate(request.inputs):
        entry: dict[str, Any] = {"name": tensor.name, "datatype": tensor.datatype, "shape": list(tensor.shape)}
        tensor_params = _params(tensor.parameters)
        data = _typed_data(tensor)
        if raw:
            if data is not None:
                entry["data"] = data  # both: the server must refuse it on either transport
            tensor_params["binary_data_size"] = len(raw[index])
            binaries.append(raw[index])
        elif data is not None:
            entry["data"] = data
        if tensor_params:
            entry["parameters"] = tensor_params
        inputs.append(entry)
    doc["inputs"] = inputs
    if request.outputs:
        doc["outputs"] = [{"name": o.name, "parameters": {**_params(o.parameters), "binary_data": True}}
                          for o in request.outputs]
    header = json.dumps(doc).encode()
    headers = {"Content-Type": "application/octet-stream"}
    if binaries:
        headers["Inference-Header-Content-Length"] = str(len(header))
    return header + b"".join(binaries), headers


def infer_response(body: bytes, header_length: int | None) -> pb.ModelInferResponse:
    """Triton's HTTP inference answer as the ModelInferResponse gRPC would have sent."""
    header = body if header_length is None else body[:header_length]
    doc = json.loads(header)
    response = pb.ModelInferResponse(model_name=doc["model_name"], model_version=doc["model_version"],
                                     id=doc.get("id", ""))
    offset = header_length or 0
    for item in doc["outputs"]:
        out = response.outputs.add(name=item["name"], datatype=item["datatype"], shape=item["shape"])
        size = item.get("parameters", {}).get("binary_data_size")
        for key, value in item.get("parameters", {}).items():
            if key != "binary_data_size":
                _set(out.parameters[key], value)
        if size is not None:
            response.raw_output_contents.append(body[offset:offset + size])
            offset += size
        elif "data" in item:
            raise AssertionError(f"output {item['name']} came back as JSON though binary was asked for")
    for key, value in doc.get("parameters", {}).items():
        _set(response.parameters[key], value)
    return response


def _set(param: pb.InferParameter, value: Any) -> None:
    if isinstance(value, bool):
        param.bool_param = value
    elif isinstance(value, int):
        param.int64_param = value
    elif isinstance(value, float):
        param.double_param = value
    else:
        param.string_param = str(value)


def _model_path(name: str, version: str) -> str:
    path = f"/v2/models/{quote(name, safe='')}"
    return path + (f"/versions/{quote(version, safe='')}" if version else "")


class HttpStub:
    """The methods of GRPCInferenceServiceStub the conformance modules call, over HTTP/REST."""

    def __init__(self, server: ServerProcess) -> None:
        self.port = server.http_port

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None,
                timeout: float | None = None) -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=max(timeout or 0, scaled(30)))
        try:
            conn.request(method, path, body=body, headers=headers or {})
            answer = conn.getresponse()
            return answer.status, {k.lower(): v for k, v in answer.getheaders()}, answer.read()
        finally:
            conn.close()

    def checked(self, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None,
                timeout: float | None = None) -> tuple[dict[str, str], bytes]:
        status, answer_headers, answer = self.request(method, path, body, headers, timeout)
        if status != 200:
            try:
                message = json.loads(answer)["error"]
            except (ValueError, KeyError, TypeError):
                raise AssertionError(f"HTTP {status} without Triton's error body: {answer[:300]!r}") from None
            raise HttpRpcError(status, message)
        return answer_headers, answer

    def ModelStatistics(self, request: pb.ModelStatisticsRequest,
                        timeout: float | None = None) -> pb.ModelStatisticsResponse:
        """`GET /v2/models[/NAME[/versions/V]]/stats`, parsed strictly into the gRPC message (a field
        the HTTP answer names differently from the protobuf's fails the parse)."""
        path = (_model_path(request.name, request.version) if request.name else "/v2/models") + "/stats"
        _, answer = self.checked("GET", path, timeout=timeout)
        return json_format.ParseDict(json.loads(answer), pb.ModelStatisticsResponse())

    def RepositoryModelLoad(self, request: pb.RepositoryModelLoadRequest,
                            timeout: float | None = None) -> pb.RepositoryModelLoadResponse:
        """`POST /v2/repository/models/NAME/load`: parameters as JSON, file contents as base64."""
        parameters = {key: base64.b64encode(v).decode() if isinstance(v := _param(value), bytes) else v
                      for key, value in request.parameters.items()}
        self._repository(request.repository_name, request.model_name, "load", parameters, timeout)
        return pb.RepositoryModelLoadResponse()

    def RepositoryModelUnload(self, request: pb.RepositoryModelUnloadRequest,
                              timeout: float | None = None) -> pb.RepositoryModelUnloadResponse:
        self._repository(request.repository_name, request.model_name, "unload", _params(request.parameters), timeout)
        return pb.RepositoryModelUnloadResponse()

    def _repository(self, repository: str, model: str, action: str, parameters: dict[str, Any],
                    timeout: float | None) -> None:
        if repository:
            raise NotExpressible("Triton's HTTP repository routes name no repository")
        body = json.dumps({"parameters": parameters}).encode()
        self.checked("POST", f"/v2/repository/models/{quote(model, safe='')}/{action}", body,
                     {"Content-Type": "application/json"}, timeout)

    def ModelInfer(self, request: pb.ModelInferRequest, timeout: float | None = None) -> pb.ModelInferResponse:
        body, headers = infer_body(request)
        answer_headers, answer = self.checked(
            "POST", _model_path(request.model_name, request.model_version) + "/infer", body, headers, timeout)
        length = answer_headers.get("inference-header-content-length")
        return infer_response(answer, int(length) if length is not None else None)


def transport_client(server: ServerProcess, transport: str) -> Any:
    """tritonclient.grpc's or tritonclient.http's client on `server` (one API for load/unload,
    shared memory and infer)."""
    if transport == "http":
        return httpclient.InferenceServerClient(server.http_url, network_timeout=scaled(60))
    return client(server)


@contextmanager
def open_stub(server: ServerProcess, transport: str) -> Iterator[Any]:
    """A GRPCInferenceServiceStub, or its HTTP twin, on `server`."""
    if transport == "http":
        yield HttpStub(server)
        return
    channel = server.channel()
    try:
        yield service_pb2_grpc.GRPCInferenceServiceStub(channel)
    finally:
        channel.close()


StubFactory = Callable[[str], Any]
