"""`--grpc-restricted-protocol`: a server interceptor that lets a call through only when it
carries the header its protocol group asks for, as tritonserver does.

Installed only when a restriction is configured, so an open server pays nothing. The check
runs once per call (once per stream for ModelStreamInfer and Watch), before the request
body is parsed; a refused call never reaches the servicer. The expected value is kept only
as a SHA-256 digest and compared with `hmac.compare_digest`, so neither the comparison time
nor any message, log line or metadata reveals it.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import grpc
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2
from tritonclient.grpc import service_pb2 as pb

from server.settings import Restriction

# Which group each RPC belongs to, as in tritonserver's grpc_server.cc (each handler's
# `restricted_keys_.Get(RestrictedCategory::...)`). Health Watch sits with Check (Triton
# serves only Check); reflection describes the server's API, so it sits with metadata.
_GROUPS: dict[str, dict[str, str]] = {
    "inference.GRPCInferenceService": {
        "ServerLive": "health",
        "ServerReady": "health",
        "ModelReady": "health",
        "ServerMetadata": "metadata",
        "ModelMetadata": "metadata",
        "ModelInfer": "inference",
        "ModelStreamInfer": "inference",
        "ModelConfig": "model-config",
        "ModelStatistics": "statistics",
        "RepositoryIndex": "model-repository",
        "RepositoryModelLoad": "model-repository",
        "RepositoryModelUnload": "model-repository",
        "SystemSharedMemoryStatus": "shared-memory",
        "SystemSharedMemoryRegister": "shared-memory",
        "SystemSharedMemoryUnregister": "shared-memory",
        "CudaSharedMemoryStatus": "shared-memory",
        "CudaSharedMemoryRegister": "shared-memory",
        "CudaSharedMemoryUnregister": "shared-memory",
        "TraceSetting": "trace",
        "LogSettings": "logging",
    },
    "grpc.health.v1.Health": {"Check": "health", "Watch": "health"},
    "grpc.reflection.v1alpha.ServerReflection": {"ServerReflectionInfo": "metadata"},
}

_SERVICES = (
    pb.DESCRIPTOR.services_by_name["GRPCInferenceService"],
    health_pb2.DESCRIPTOR.services_by_name["Health"],
    reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"],
)


def method_groups() -> dict[str, tuple[str, bool, bool]]:
    """'/package.Service/Method' -> (group, client streaming, server streaming) for every
    RPC Nereid serves; a method missing from the table above is an error, so a new RPC
    cannot be left open by accident."""
    result = {}
    for service in _SERVICES:
        groups = _GROUPS[service.full_name]
        for method in service.methods:
            group = groups[method.name]
            result[f"/{service.full_name}/{method.name}"] = (group, method.client_streaming, method.server_streaming)
    for method in ("Status", "Promote", "Abort"):  # nereid.Rollout (rollout_rpc.py): JSON, no descriptor
        result[f"/nereid.Rollout/{method}"] = ("model-repository", False, False)
    return result


class _Rule:
    """The header one method needs, and the handler that refuses a call without it."""

    __slots__ = ("header", "digest", "refusal")

    def __init__(self, header: str, digest: bytes, refusal: grpc.RpcMethodHandler) -> None:
        self.header = header
        self.digest = digest
        self.refusal = refusal

    def allows(self, metadata: Sequence[tuple[str, str | bytes]] | None) -> bool:
        # The first occurrence of the header decides, as in Triton (multimap find); a
        # client cannot send several guesses in one call.
        for key, value in metadata or ():
            if key == self.header:
                raw = value if isinstance(value, bytes) else value.encode()
                return hmac.compare_digest(hashlib.sha256(raw).digest(), self.digest)
        return False


def _refusal(message: str, client_streaming: bool, server_streaming: bool) -> grpc.RpcMethodHandler:
    """A handler that ends the call with Triton's status without reading the request: no
    deserializer, so a refused body is never parsed."""

    async def refuse(request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAVAILABLE, message)

    if client_streaming and server_streaming:
        return grpc.stream_stream_rpc_method_handler(refuse)
    if client_streaming:
        return grpc.stream_unary_rpc_method_handler(refuse)
    if server_streaming:
        return grpc.unary_stream_rpc_method_handler(refuse)
    return grpc.unary_unary_rpc_method_handler(refuse)


class RestrictedProtocolInterceptor(grpc.aio.ServerInterceptor):
    """Refuses calls to a restricted group that lack `triton-grpc-protocol-<key>: <value>`
    with UNAVAILABLE "This protocol is restricted, expecting header '<header>'" (Triton's
    text); calls to other groups pass untouched."""

    def __init__(self, restrictions: Sequence[Restriction]) -> None:
        by_group = {group: r for r in restrictions for group in r.groups}
        self._rules: dict[str, _Rule] = {}
        for method, (group, client_streaming, server_streaming) in method_groups().items():
            restriction = by_group.get(group)
            if restriction is None:
                continue
            message = f"This protocol is restricted, expecting header '{restriction.header}'"
            self._rules[method] = _Rule(
                restriction.header,
                hashlib.sha256(restriction.value.encode()).digest(),
                _refusal(message, client_streaming, server_streaming),
            )

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        rule = self._rules.get(handler_call_details.method)
        if rule is not None and not rule.allows(handler_call_details.invocation_metadata):
            return rule.refusal
        return await continuation(handler_call_details)


def interceptors(restrictions: Sequence[Restriction]) -> list[grpc.aio.ServerInterceptor]:
    """The interceptors the configuration needs: none at all when nothing is restricted."""
    return [RestrictedProtocolInterceptor(restrictions)] if restrictions else []
