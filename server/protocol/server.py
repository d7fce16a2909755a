"""Build the grpc.aio server: inference service, health, reflection, message limits, and
the edge security (TLS credentials, restricted-protocol interceptor; docs/SECURITY.md)."""

from __future__ import annotations

import logging

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from server.protocol import tls
from server.protocol.access import interceptors
from server.protocol.health import HealthReporter
from server.protocol.servicer import InferenceServicer
from server.settings import Settings

log = logging.getLogger("nereid")


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
    credentials = tls.server_credentials(settings)  # TLSConfigError before anything is bound
    server = grpc.aio.server(options=options, interceptors=interceptors(settings.grpc_restricted_protocols))
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
    health_pb2_grpc.add_HealthServicer_to_server(health.servicer, server)
    reflection.enable_server_reflection(
        (
            pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ),
        server,
    )
    address = settings.grpc_address
    host = f"[{address}]" if ":" in address else address
    target = f"{host}:{settings.grpc_port}"
    if credentials is None:
        port = server.add_insecure_port(target)
    else:
        port = server.add_secure_port(target, credentials)
    if port == 0:
        raise OSError(f"could not bind {host}:{settings.grpc_port}")
    _log_security(settings)
    return server, port


def _log_security(settings: Settings) -> None:
    """Say how the listener is protected: TLS mode and which groups need which header
    (header names only; the values are secrets)."""
    log.info("gRPC transport: %s", tls.describe(settings))
    for flag in tls.ignored_files(settings):
        log.warning("%s is ignored: TLS is off (set --grpc-use-ssl=true)", flag)
    for restriction in settings.grpc_restricted_protocols:
        log.info("restricted protocols %s: calls need header '%s'", ",".join(restriction.groups), restriction.header)
