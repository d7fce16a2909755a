"""Build the grpc.aio server: inference service, health, reflection, message limits.

Every service's handlers take raw bytes (handlers.py): grpcio parses nothing itself.
"""

from __future__ import annotations

import grpc
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc
from grpc_reflection.v1alpha._async import ReflectionServicer
from tritonclient.grpc import service_pb2 as pb

from server.protocol.handlers import HandlerCollector, guard
from server.protocol.health import HEALTH_SERVICE, HealthReporter
from server.protocol.servicer import SERVICE, InferenceServicer
from server.settings import Settings

REFLECTION_SERVICE = "grpc.reflection.v1alpha.ServerReflection"


class BindError(OSError):
    """The listening address could not be bound (in use, not local, no permission)."""


def _reflection_handlers() -> dict[str, grpc.RpcMethodHandler]:
    names = (
        pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name,
        health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
        reflection.SERVICE_NAME,
    )
    collector = HandlerCollector()
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(ReflectionServicer(names), collector)  # type: ignore[arg-type]
    return {name: guard(REFLECTION_SERVICE, name, h) for name, h in collector.services[REFLECTION_SERVICE].items()}


def build_server(
    settings: Settings, servicer: InferenceServicer, health: HealthReporter
) -> tuple[grpc.aio.Server, int]:
    """Create the server and bind its port; returns (server, bound port). Not started yet."""
    limit = settings.grpc_max_message_bytes
    options = [
        ("grpc.max_send_message_length", limit),
        ("grpc.max_receive_message_length", limit),
        # Never share a port with another process silently.
        ("grpc.so_reuseport", 0),
    ]
    server = grpc.aio.server(options=options)
    server.add_registered_method_handlers(SERVICE, servicer.method_handlers())
    server.add_registered_method_handlers(HEALTH_SERVICE, health.servicer.method_handlers())
    server.add_registered_method_handlers(REFLECTION_SERVICE, _reflection_handlers())
    address = settings.grpc_address
    host = f"[{address}]" if ":" in address else address
    try:
        port = server.add_insecure_port(f"{host}:{settings.grpc_port}")
    except RuntimeError as exc:  # grpcio raises RuntimeError("Failed to bind to address ...")
        raise BindError(f"could not bind {host}:{settings.grpc_port}: {exc}") from None
    if port == 0:
        raise BindError(f"could not bind {host}:{settings.grpc_port}")
    return server, port
