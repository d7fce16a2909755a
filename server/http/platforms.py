"""The managed-platform contracts Triton speaks (docs/PLATFORMS.md): SageMaker (`GET /ping`,
`POST /invocations`, `--allow-sagemaker`) and Vertex AI (the `AIP_HEALTH_ROUTE` and
`AIP_PREDICT_ROUTE` routes, `--allow-vertex-ai`). Each is one more listener of
server/http/transport.py on the same loop, whose routes are thin renamings of the KServe v2
handlers in server/http/routes.py: the same readiness, the same inference path (codec checks,
statistics, in-flight accounting), so a platform sees exactly what `/v2/...` would answer.

What differs from `/v2` is only what the platforms (and Triton's servers for them) fix:
the route names, the model the predict route serves (a default model, not one in the path),
the binary-tensor framing (the JSON header length travels in the Content-Type, as
`application/vnd.<platform>-triton.binary+json;json-header-size=N`), and, for SageMaker,
Triton's one error status for a failed invocation (400)."""

from __future__ import annotations

import dataclasses
import re

from server.errors import InvalidInput
from server.http.routes import HttpRoutes
from server.http.status import error_response
from server.http.transport import Request, Response
from server.protocol import handlers

_HEADER_LENGTH = "inference-header-content-length"
SAGEMAKER_MIME = "application/vnd.sagemaker-triton.binary+json;json-header-size="
VERTEX_MIME = "application/vnd.vertex-ai-triton.binary+json;json-header-size="
VERTEX_REDIRECT = "x-vertex-ai-triton-redirect"
_EMPTY = b""


def _with_header_length(request: Request, mime: str) -> Request:
    """The request as the KServe handler takes it: the platform's binary Content-Type becomes
    `Inference-Header-Content-Length` (Triton's GetInferenceHeaderLength, same checks)."""
    content_type = request.headers.get("content-type", "")
    pos = content_type.find(mime)
    if pos < 0:
        return request
    if pos != 0:
        raise InvalidInput(f"expect MIME type for binary data starts with '{mime}', got: {content_type}")
    text = content_type[len(mime):].split(";")[0].strip()
    try:
        length = int(text)
    except ValueError:
        raise InvalidInput(f"Unable to parse inference header size, got: {text}") from None
    if length < 0 or length > len(request.body):
        raise InvalidInput(f"inference header size should be in range (0, {len(request.body)}), got: {text}")
    headers = dict(request.headers)
    headers[_HEADER_LENGTH] = str(length)
    return dataclasses.replace(request, headers=headers)


def _binary_answer(response: Response, mime: str) -> Response:
    """A binary answer names its JSON header's length in the platform's Content-Type."""
    for key, value in response.headers:
        if key.lower() == _HEADER_LENGTH:
            response.content_type = mime + value
    return response


def _failure(where: str, exc: Exception) -> Response:
    code, message = handlers.failure(where, exc)
    return error_response(code, message)


class PlatformRoutes:
    """Shared by both platforms: health in Triton's "ready" mode and infer on a default model."""

    mime = ""

    def __init__(self, routes: HttpRoutes, default_model: str) -> None:
        self.routes = routes
        self.default_model = default_model

    def model_name(self) -> str:
        """The configured default model, or (none configured) the only model the server has,
        as Triton's SageMaker `serve` script and Vertex AI server pick it."""
        if self.default_model:
            return self.default_model
        names = sorted({row.name for row in self.routes.servicer.manager.index(ready_only=True)})
        if len(names) != 1:
            raise InvalidInput("Expect the model repository contains only a single model if default model is "
                               f"not specified (models ready: {', '.join(names) or 'none'})")
        return names[0]

    async def health(self, request: Request) -> Response:
        if request.method != "GET":
            return Response(405, b'{"error":"Method Not Allowed"}')
        return await self.routes.ready(request, "", "")

    async def predict(self, request: Request, name: str | None = None, version: str = "") -> Response:
        if request.method != "POST":
            return Response(405, b'{"error":"Method Not Allowed"}')
        try:
            model = name if name is not None else self.model_name()
            request = _with_header_length(request, self.mime)
        except Exception as exc:
            return _failure(f"{type(self).__name__} {request.path}", exc)
        return _binary_answer(await self.routes.infer(request, model, version), self.mime)


class SageMakerRoutes(PlatformRoutes):
    """`GET /ping` (200 ready, 400 not) and `POST /invocations` (infer on
    SAGEMAKER_TRITON_DEFAULT_MODEL_NAME). Triton answers every failed invocation and every
    other route with 400; so does this."""

    mime = SAGEMAKER_MIME

    async def __call__(self, request: Request) -> Response:
        if request.path == "/ping":
            return await self.health(request)
        if request.path == "/invocations":
            response = await self.predict(request)
            if response.status >= 400 and response.status != 405:
                response.status = 400  # Triton's SageMaker server: one status for every infer error
            return response
        return Response(400, _EMPTY)


class VertexAiRoutes(PlatformRoutes):
    """AIP_HEALTH_ROUTE (GET: ready) and AIP_PREDICT_ROUTE (POST: infer on the default model,
    or, with `X-Vertex-Ai-Triton-Redirect: <v2 path>`, any KServe v2 route as a POST)."""

    mime = VERTEX_MIME

    def __init__(self, routes: HttpRoutes, default_model: str, predict_route: str, health_route: str) -> None:
        super().__init__(routes, default_model)
        self.predict_route = re.compile(re.escape(predict_route))
        self.health_route = re.compile(re.escape(health_route))

    async def __call__(self, request: Request) -> Response:
        if self.health_route.fullmatch(request.path):
            return await self.health(request)
        if self.predict_route.fullmatch(request.path):
            redirect = request.headers.get(VERTEX_REDIRECT)
            if redirect is None:
                return await self.predict(request)
            if request.method != "POST":
                return Response(405, b'{"error":"Method Not Allowed"}')
            return await self._redirect(request, "/" + redirect.lstrip("/"))
        return Response(400, _EMPTY)

    async def _redirect(self, request: Request, path: str) -> Response:
        """Vertex AI only sends POST: the redirected route runs with the method it expects."""
        method = "GET"
        for pattern, _, _ in self.routes.routes["POST"]:
            if pattern.fullmatch(path):
                method = "POST"
        target = dataclasses.replace(request, method=method, path=path)
        if method == "POST" and path.endswith("/infer"):
            try:
                target = _with_header_length(target, self.mime)
            except Exception as exc:
                return _failure("Vertex AI redirect", exc)
            return _binary_answer(await self.routes(target), self.mime)
        return await self.routes(target)

