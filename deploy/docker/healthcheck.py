"""Container health check: one grpc.health.v1 Check against the server in this container.

Exits 0 when the answer is SERVING and 1 otherwise (NOT_SERVING, an unknown service, an
RPC error, nothing listening, or no answer within the timeout), which is what Docker's
HEALTHCHECK and compose's `service_healthy` expect. A script rather than a `python -c`
one-liner: some engines split exec-form arguments on spaces (podman's compat API does).

Environment (all optional):
  NEREID_HEALTH_ADDRESS    host:port to call (default 127.0.0.1:8001)
  NEREID_HEALTH_SERVICE    health service name (default "": server readiness, SERVING once
                           every model loaded and until a drain starts; a model name checks
                           that model only)
  NEREID_HEALTH_TIMEOUT_S  deadline of the call in seconds (default 3)

Plaintext only: with --grpc-use-ssl or a restricted `health` protocol, replace the
image's HEALTHCHECK with one that presents the certificate or header.
"""

from __future__ import annotations

import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def check(address: str, service: str, timeout: float) -> tuple[bool, str]:
    """One Check call; (healthy, what was seen)."""
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError as exc:
            return False, f"{exc.code().name}: {exc.details()}"
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    return reply.status == health_pb2.HealthCheckResponse.SERVING, status


def main() -> int:
    address = os.environ.get("NEREID_HEALTH_ADDRESS", "127.0.0.1:8001")
    service = os.environ.get("NEREID_HEALTH_SERVICE", "")
    timeout = float(os.environ.get("NEREID_HEALTH_TIMEOUT_S", "3"))
    healthy, seen = check(address, service, timeout)
    print(f"{address} service {service!r}: {seen}")
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main())
