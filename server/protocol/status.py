"""The one place where domain errors become gRPC status codes."""

from __future__ import annotations

import grpc

from server.errors import ErrorCode, NereidError

_STATUS: dict[ErrorCode, grpc.StatusCode] = {code: getattr(grpc.StatusCode, code.value) for code in ErrorCode}


def grpc_status(error: NereidError) -> grpc.StatusCode:
    return _STATUS[error.code]
