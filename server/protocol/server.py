"""Build the grpc.aio server: inference service, health, reflection, message limits, and
the edge security (TLS credentials, restricted-protocol interceptor; docs/SECURITY.md).

Every service's handlers take raw bytes (handlers.py): grpcio parses nothing itself.
"""

from __future__ import annotations

import logging

import grpc
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc
from grpc_reflection.v1alpha._async import ReflectionServicer
from tritonclient.grpc import service_pb2 as pb

from server.protocol import tls
from server.protocol.access import interceptors
from server.protocol.handlers import HandlerCollector, guard
from server.protocol.health import HEALTH_SERVICE, HealthReporter
from server.protocol.rollout_rpc import ROLLOUT_SERVICE, RolloutService
from server.protocol.servicer import SERVICE, InferenceServicer
from server.settings import Settings

log = logging.getLogger("nereid")

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
    return grpc_server(settings, services_of(servicer, health))


def services_of(servicer: InferenceServicer, health: HealthReporter) -> dict[str, dict[str, grpc.RpcMethodHandler]]:
    """Every service the server answers, by name (reflection aside): the listener of a single
    process registers them, and with --workers the owner runs them for the frontends."""
    return {SERVICE: servicer.method_handlers(), HEALTH_SERVICE: health.servicer.method_handlers(),
            ROLLOUT_SERVICE: RolloutService(servicer.manager).method_handlers()}


def grpc_server(
    settings: Settings, services: dict[str, dict[str, grpc.RpcMethodHandler]], reuse_port: bool = False,
    announce: bool = True,
) -> tuple[grpc.aio.Server, int]:
    """The listener with these services (plus reflection), bound; `reuse_port` for the frontends
    of --workers, which share the port (server/workers/); `announce` logs the security setup."""
    limit = settings.grpc_max_message_bytes
    options = [
        ("grpc.max_send_message_length", limit),
        ("grpc.max_receive_message_length", limit),
        # Never share a port with another process silently; --workers shares it on purpose.
        ("grpc.so_reuseport", 1 if reuse_port else 0),
    ]
    credentials = tls.server_credentials(settings)  # TLSConfigError before anything is bound
    server = grpc.aio.server(options=options, interceptors=interceptors(settings.grpc_restricted_protocols))
    for service, handlers in services.items():
        server.add_registered_method_handlers(service, handlers)
    server.add_registered_method_handlers(REFLECTION_SERVICE, _reflection_handlers())
    address = settings.grpc_address
    host = f"[{address}]" if ":" in address else address
    target = f"{host}:{settings.grpc_port}"
    try:
        if credentials is None:
            port = server.add_insecure_port(target)
        else:
            port = server.add_secure_port(target, credentials)
    except RuntimeError as exc:  # grpcio raises RuntimeError("Failed to bind to address ...")
        raise BindError(f"could not bind {target}: {exc}") from None
    if port == 0:
        raise BindError(f"could not bind {target}")
    if announce:
        log_security(settings)
    return server, port


def log_security(settings: Settings) -> None:
    """Say how the listener is protected: TLS mode and which groups need which header
    (header names only; the values are secrets)."""
    log.info("gRPC transport: %s", tls.describe(settings))
    for flag in tls.ignored_files(settings):
        log.warning("%s is ignored: TLS is off (set --grpc-use-ssl=true)", flag)
    for restriction in settings.grpc_restricted_protocols:
        log.info("restricted protocols %s: calls need header '%s'", ",".join(restriction.groups), restriction.header)
