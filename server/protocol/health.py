"""The standard grpc.health.v1 service, driven by model and server readiness.

Service "" (and "inference.GRPCInferenceService") follows server readiness;
each model name is a service whose status follows whether that model has a
READY version. Check and Watch both come from grpcio-health-checking.
"""

from __future__ import annotations

import asyncio

from grpc_health.v1 import health_pb2
from grpc_health.v1._async import HealthServicer

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVER_SERVICES = ("", "inference.GRPCInferenceService")


class HealthReporter:
    def __init__(self) -> None:
        self.servicer = HealthServicer()
        self._models: set[str] = set()
        self._loop: asyncio.AbstractEventLoop | None = None

    def bind_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    async def set_server(self, ready: bool) -> None:
        for service in SERVER_SERVICES:
            await self.servicer.set(service, SERVING if ready else NOT_SERVING)

    async def set_model(self, name: str, ready: bool) -> None:
        self._models.add(name)
        await self.servicer.set(name, SERVING if ready else NOT_SERVING)

    def model_changed_threadsafe(self, name: str, ready: bool) -> None:
        """For listeners on loader threads: schedule the update on the event loop."""
        loop = self._loop
        if loop is None:
            return

        def schedule() -> None:
            asyncio.ensure_future(self.set_model(name, ready))

        loop.call_soon_threadsafe(schedule)

    async def all_not_serving(self) -> None:
        await self.set_server(False)
        for name in list(self._models):
            await self.servicer.set(name, NOT_SERVING)
