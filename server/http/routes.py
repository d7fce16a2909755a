"""KServe v2 REST routes over the gRPC servicer's own methods: each route builds the request
message the RPC takes, awaits the same method and writes its answer as Triton's JSON. Health,
metadata, config, statistics and repository calls share the servicer's code and errors;
inference shares the codec and `Model.infer` (server/http/infer.py)."""

from __future__ import annotations

import asyncio
import base64
import gzip
import json
import re
import zlib
from collections.abc import Awaitable, Callable, Sequence
from typing import Any
from urllib.parse import unquote

from tritonclient.grpc import service_pb2 as pb

from server.core.model import Model
from server.errors import InvalidInput, ModelNotFound, Unsupported
from server.http import settings
from server.http.access import HttpAccess
from server.http.call import HttpCall
from server.http.infer import OutputPlan, encode_infer_response, parse_infer_request
from server.http.jsonpb import to_json
from server.http.status import error_response
from server.http.transport import Request, Response
from server.protocol import handlers
from server.protocol.parameters import set_scalar
from server.protocol.servicer import InferenceServicer
from server.settings import Restriction

_MODEL = r"/v2/models/(?P<model>[^/]+)(?:/versions/(?P<version>[^/]+))?"
_REGION = r"(?:/region/(?P<region>[^/]+))?"
_SYSTEM_SHM = r"/v2/systemsharedmemory" + _REGION
_CUDA_SHM = r"/v2/cudasharedmemory" + _REGION
_TRACE = r"/v2(?:/models/(?P<model>[^/]+))?/trace/setting"
_EMPTY = b""
_HEADER_LENGTH = "inference-header-content-length"

Route = Callable[[Request, str, str], Awaitable[Response]]


def _json(value: Any, status: int = 200) -> Response:
    return Response(status, json.dumps(value, separators=(",", ":")).encode())


def _body_json(request: Request) -> dict[str, Any]:
    if not request.body:
        return {}
    try:
        doc = json.loads(request.body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidInput(f"failed to parse the request JSON buffer: {exc}") from None
    if not isinstance(doc, dict):
        raise InvalidInput("the request body must be a JSON object")
    return doc


class HttpRoutes:
    """Request -> Response for every route; errors become Triton's `{"error": ...}` bodies."""

    def __init__(self, servicer: InferenceServicer, restrictions: Sequence[Restriction] = ()) -> None:
        self.servicer = servicer
        self.access = HttpAccess(restrictions)
        # (pattern, handler, the restricted-API group it belongs to, as tritonserver's http_server.cc)
        get: list[tuple[str, Route, str]] = [
            (r"/v2/health/live", self.live, "health"),
            (r"/v2/health/ready", self.ready, "health"),
            (r"/v2", self.server_metadata, "metadata"),
            (r"/v2/models/stats", self.statistics, "statistics"),
            (_MODEL + r"/ready", self.model_ready, "health"),
            (_MODEL + r"/config", self.model_config, "model-config"),
            (_MODEL + r"/stats", self.statistics, "statistics"),
            (_MODEL, self.model_metadata, "metadata"),
            (_SYSTEM_SHM + r"/status", self.shm_status, "shared-memory"),
            (_CUDA_SHM + r"/status", self.cuda_shm, "shared-memory"),
            (_TRACE, self.trace_setting, "trace"),
            (r"/v2/logging", self.log_settings, "logging"),
        ]
        post: list[tuple[str, Route, str]] = [
            (_MODEL + r"/infer", self.infer, "inference"),
            (r"/v2/repository/index", self.repository_index, "model-repository"),
            (r"/v2/repository/models/(?P<model>[^/]+)/load", self.load, "model-repository"),
            (r"/v2/repository/models/(?P<model>[^/]+)/unload", self.unload, "model-repository"),
            (_SYSTEM_SHM + r"/register", self.shm_register, "shared-memory"),
            (_SYSTEM_SHM + r"/unregister", self.shm_unregister, "shared-memory"),
            (_CUDA_SHM + r"/(?:register|unregister)", self.cuda_shm, "shared-memory"),
            (_TRACE, self.trace_setting, "trace"),
            (r"/v2/logging", self.log_settings, "logging"),
        ]
        self.routes = {"GET": [(re.compile(p), h, g) for p, h, g in get],
                       "POST": [(re.compile(p), h, g) for p, h, g in post]}

    async def __call__(self, request: Request) -> Response:
        table = self.routes.get(request.method, [])
        for pattern, route, group in table:
            match = pattern.fullmatch(request.path)
            if match is None:
                continue
            if self.access and (refused := self.access.refusal(group, request.headers)) is not None:
                return refused
            groups = match.groupdict()
            name = unquote(groups.get("model") or groups.get("region") or "")
            version = unquote(groups.get("version") or "")
            try:
                return await route(request, name, version)
            except (asyncio.CancelledError, KeyboardInterrupt):
                raise
            except Exception as exc:
                code, message = handlers.failure(f"HTTP {request.method} {request.path}", exc)
                return error_response(code, message)
        for method, others in self.routes.items():  # a known route with another method: 405
            if method != request.method and any(p.fullmatch(request.path) for p, _, _ in others):
                return Response(405, b'{"error":"Method Not Allowed"}')
        return Response(404, b'{"error":"Not Found"}')

    # -- health and metadata --

    async def live(self, request: Request, name: str, version: str) -> Response:
        return Response(200, _EMPTY)

    async def ready(self, request: Request, name: str, version: str) -> Response:
        return Response(200 if self.servicer.is_ready() else 400, _EMPTY)

    async def model_ready(self, request: Request, name: str, version: str) -> Response:
        try:
            answer = await self.servicer.ModelReady(pb.ModelReadyRequest(name=name, version=version), None)
        except ModelNotFound:  # Triton: an unknown model is simply not ready
            return Response(400, _EMPTY)
        return Response(200 if answer.ready else 400, _EMPTY)

    async def server_metadata(self, request: Request, name: str, version: str) -> Response:
        return _json(to_json(await self.servicer.ServerMetadata(pb.ServerMetadataRequest(), None)))

    async def model_metadata(self, request: Request, name: str, version: str) -> Response:
        answer = await self.servicer.ModelMetadata(pb.ModelMetadataRequest(name=name, version=version), None)
        return _json(to_json(answer))

    async def model_config(self, request: Request, name: str, version: str) -> Response:
        answer = await self.servicer.ModelConfig(pb.ModelConfigRequest(name=name, version=version), None)
        return _json(to_json(answer.config))  # Triton's HTTP answer is the config itself

    async def statistics(self, request: Request, name: str, version: str) -> Response:
        answer = await self.servicer.ModelStatistics(pb.ModelStatisticsRequest(name=name, version=version), None)
        return _json(to_json(answer))

    # -- model repository --

    async def repository_index(self, request: Request, name: str, version: str) -> Response:
        ready = bool(_body_json(request).get("ready", False))
        answer = await self.servicer.RepositoryIndex(pb.RepositoryIndexRequest(ready=ready), None)
        rows = []
        for row in answer.models:
            entry = {"name": row.name}
            if row.version:
                entry["version"] = row.version
            if row.state:
                entry["state"] = row.state
            entry["reason"] = row.reason
            rows.append(entry)
        return _json(rows)

    async def load(self, request: Request, name: str, version: str) -> Response:
        message = pb.RepositoryModelLoadRequest(model_name=name)
        for key, value in _parameters(_body_json(request)).items():
            param = message.parameters[key]
            if key.startswith("file:"):  # Triton's HTTP carries file contents as base64
                try:
                    param.bytes_param = base64.b64decode(str(value), validate=True)
                except ValueError:
                    raise InvalidInput(f"parameter '{key}': the file content must be base64") from None
            elif isinstance(value, float) or not set_scalar(param, value):
                raise InvalidInput(f"parameter '{key}': expected a string, integer or boolean")
        await self.servicer.tracked(self.servicer.RepositoryModelLoad)(message, None)
        return Response(200, _EMPTY)

    async def unload(self, request: Request, name: str, version: str) -> Response:
        message = pb.RepositoryModelUnloadRequest(model_name=name)
        dependents = _parameters(_body_json(request)).get("unload_dependents", False)
        if dependents:
            message.parameters["unload_dependents"].bool_param = bool(dependents)
        await self.servicer.tracked(self.servicer.RepositoryModelUnload)(message, None)
        return Response(200, _EMPTY)

    # -- shared memory (the gRPC servicer's registry and handlers) --

    async def shm_register(self, request: Request, name: str, version: str) -> Response:
        message = settings.register_request(name, _body_json(request))
        await self.servicer.SystemSharedMemoryRegister(message, None)
        return Response(200, _EMPTY)

    async def shm_status(self, request: Request, name: str, version: str) -> Response:
        answer = await self.servicer.SystemSharedMemoryStatus(pb.SystemSharedMemoryStatusRequest(name=name), None)
        return _json(settings.status_json(answer))

    async def shm_unregister(self, request: Request, name: str, version: str) -> Response:
        await self.servicer.SystemSharedMemoryUnregister(pb.SystemSharedMemoryUnregisterRequest(name=name), None)
        return Response(200, _EMPTY)

    async def cuda_shm(self, request: Request, name: str, version: str) -> Response:
        """Every CUDA shared memory route, over the gRPC RPCs (UNIMPLEMENTED, 501, with the reason
        where CUDA is not available here)."""
        action = request.path.rsplit("/", 1)[-1]
        if action == "status":
            answer = await self.servicer.CudaSharedMemoryStatus(pb.CudaSharedMemoryStatusRequest(name=name), None)
            return _json(settings.cuda_status_json(answer))
        if action == "unregister":
            await self.servicer.CudaSharedMemoryUnregister(pb.CudaSharedMemoryUnregisterRequest(name=name), None)
            return Response(200, _EMPTY)
        if not self.servicer.shm.cuda_available:  # the reason before any complaint about the body
            await self.servicer.CudaSharedMemoryRegister(pb.CudaSharedMemoryRegisterRequest(name=name), None)
        message = settings.cuda_register_request(name, _body_json(request))
        await self.servicer.CudaSharedMemoryRegister(message, None)
        return Response(200, _EMPTY)

    # -- trace and log settings (GET reads, POST changes then reads) --

    async def trace_setting(self, request: Request, name: str, version: str) -> Response:
        doc = _body_json(request) if request.method == "POST" else {}
        answer = await self.servicer.TraceSetting(settings.trace_request(name, doc), None)
        return _json(settings.trace_json(answer))

    async def log_settings(self, request: Request, name: str, version: str) -> Response:
        doc = _body_json(request) if request.method == "POST" else {}
        answer = await self.servicer.LogSettings(settings.log_request(doc), None)
        return _json(settings.log_json(answer))

    # -- inference --

    async def infer(self, request: Request, name: str, version: str) -> Response:
        """The servicer's one inference path (`InferenceServicer.infer`: admission, rate limits,
        tracing, statistics, errors) with an HTTP body in and Triton's JSON (+ binary) out."""
        plans: list[OutputPlan] = []

        async def read() -> tuple[pb.ModelInferRequest, Sequence[Any]]:
            body = _decompressed(request)
            length = request.headers.get(_HEADER_LENGTH)
            try:
                header_length = None if length is None else int(length)
            except ValueError:
                raise InvalidInput(f"Inference-Header-Content-Length must be an integer, got '{length}'") from None
            message, raw, plan = parse_infer_request(body, header_length, name, version)
            plans.append(plan)
            return message, raw

        def encode(model: Model, request_id: str, outputs: Any, in_shm: frozenset[str]) -> Response:
            parts, header_length = encode_infer_response(model, request_id, outputs, plans[0], in_shm)
            response = Response(200, parts)
            if header_length is not None:
                response.content_type = "application/octet-stream"
                response.headers.append(("Inference-Header-Content-Length", str(header_length)))
            return response

        call = HttpCall(request)
        try:
            answer = await self.servicer.infer(
                call, read, encode, "HTTP infer", "HTTP infer doesn't support models with decoupled transaction policy",
                name)
        finally:
            call.done()
        if not isinstance(answer, Response):
            return error_response(*answer)
        _compress(request, answer)
        return answer


def _parameters(doc: dict[str, Any]) -> dict[str, Any]:
    params = doc.get("parameters", {})
    if not isinstance(params, dict):
        raise InvalidInput("'parameters' must be a JSON object")
    return params


def _decompressed(request: Request) -> bytes:
    """The body after its Content-Encoding (gzip or deflate, as tritonclient sends them)."""
    encoding = request.headers.get("content-encoding", "").strip().lower()
    if not encoding or encoding == "identity":
        return request.body
    try:
        if encoding == "gzip":
            return gzip.decompress(request.body)
        if encoding == "deflate":
            return zlib.decompress(request.body)
    except (OSError, zlib.error, EOFError) as exc:
        raise InvalidInput(f"failed to decompress the {encoding} request body: {exc}") from None
    raise Unsupported(f"unsupported Content-Encoding '{encoding}'; expected gzip or deflate")


def _compress(request: Request, response: Response) -> None:
    """Compress the answer when the client accepts gzip or deflate (tritonclient's
    response_compression_algorithm); the header length then counts the uncompressed JSON."""
    accepted = [part.split(";")[0].strip().lower() for part in request.headers.get("accept-encoding", "").split(",")]
    body = response.body
    joined = b"".join(body) if isinstance(body, list) else body
    if "gzip" in accepted:
        response.body = gzip.compress(joined, compresslevel=1)
        response.headers.append(("Content-Encoding", "gzip"))
    elif "deflate" in accepted:
        response.body = zlib.compress(joined, 1)
        response.headers.append(("Content-Encoding", "deflate"))
