"""The one place where errors become HTTP status codes, as Triton maps them
(server/src/http_server.cc `HttpCodeFromError`): errors are first given their gRPC code by
`server/protocol/handlers.failure` (so both transports log and word them alike), then that
code picks the HTTP status. Codes Triton has no HTTP status for are Nereid's own choice."""

from __future__ import annotations

import json

import grpc

from server.http.transport import Response

_HTTP: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    # Triton: UNKNOWN, INVALID_ARG, ALREADY_EXISTS, CANCELLED and anything else -> 400.
    # Nereid's own: overload (in-flight cap, per-client rate) and an execution timeout.
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}


def http_status(code: grpc.StatusCode) -> int:
    return _HTTP.get(code, 400)


def error_response(code: grpc.StatusCode, message: str) -> Response:
    """Triton's error body: `{"error": "<message>"}`."""
    return Response(http_status(code), json.dumps({"error": message}).encode())
