"""The RPCs a frontend forwards, numbered identically in every process of one server.

Built from the protocol descriptors and the names of Nereid's own rollout service, never
from the servicer's handlers.
"""

from __future__ import annotations

from dataclasses import dataclass

from grpc_health.v1 import health_pb2
from tritonclient.grpc import service_pb2 as pb

from server.protocol.rollout_rpc import ROLLOUT_METHODS, ROLLOUT_SERVICE

INFERENCE_SERVICE = "inference.GRPCInferenceService"
HEALTH_SERVICE = "grpc.health.v1.Health"


@dataclass(frozen=True)
class Method:
    service: str
    name: str
    client_streaming: bool
    server_streaming: bool


def method_table() -> list[Method]:
    """Every forwarded method; a method's index in this list is its number on the link."""
    table = []
    for descriptor, service in ((pb.DESCRIPTOR, "GRPCInferenceService"), (health_pb2.DESCRIPTOR, "Health")):
        for method in descriptor.services_by_name[service].methods:
            table.append(Method(method.containing_service.full_name, method.name, method.client_streaming,
                                method.server_streaming))
    table += [Method(ROLLOUT_SERVICE, name, False, False) for name in ROLLOUT_METHODS]
    return table
