"""The standard grpc.health.v1 service, driven by model and server readiness.

Service "" (and "inference.GRPCInferenceService", and "ready") follows server readiness, "live"
is SERVING while the process serves;
each model name is a service whose status follows whether that model has a
READY version. Check answers NOT_FOUND for a service it does not know, as the
standard says; Watch sends SERVICE_UNKNOWN for it and then every change.

Written here rather than taken from grpcio-health-checking so that shutdown can end
Watch streams: an open Watch must not hold the process for the whole exit timeout.
At shutdown every service turns NOT_SERVING (watchers see it), then each Watch ends
with UNAVAILABLE so the client reconnects elsewhere.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from server.protocol.handlers import HandlerCollector, guard

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICE_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
SERVER_SERVICES = ("", "inference.GRPCInferenceService", "ready")
# Kubernetes-style names for probes: "live" is SERVING while the process serves gRPC (draining
# included, so a liveness probe never kills a replica that is finishing its requests); "ready"
# follows server readiness, as "" does.
LIVE_SERVICE = "live"
HEALTH_SERVICE = "grpc.health.v1.Health"
_CLOSED = -1  # sentinel status: the watch ends


class HealthServicer:
    """Check and Watch over a status table that only the event loop changes."""

    def __init__(self) -> None:
        self._status: dict[str, int] = {}
        self._watchers: dict[str, set[asyncio.Queue[int]]] = {}
        self._closed = False

    def set(self, service: str, status: int) -> None:
        if self._status.get(service) == status:
            return
        self._status[service] = status
        for queue in self._watchers.get(service, ()):
            queue.put_nowait(status)

    def close_watches(self) -> None:
        """End every open Watch (shutdown); new ones end at once."""
        self._closed = True
        for queues in self._watchers.values():
            for queue in queues:
                queue.put_nowait(_CLOSED)

    async def Check(self, request: Any, context: Any) -> Any:
        status = self._status.get(request.service)
        if status is None:
            context.set_code(grpc.StatusCode.NOT_FOUND)
            context.set_details(f"unknown service '{request.service}'")
            return health_pb2.HealthCheckResponse()
        return health_pb2.HealthCheckResponse(status=status)

    async def Watch(self, request: Any, context: Any) -> None:
        service = request.service
        queue: asyncio.Queue[int] = asyncio.Queue()
        self._watchers.setdefault(service, set()).add(queue)
        if self._closed:
            queue.put_nowait(_CLOSED)
        try:
            last = self._status.get(service, SERVICE_UNKNOWN)
            await context.write(health_pb2.HealthCheckResponse(status=last))
            while True:  # every change queued before the close is sent before the stream ends
                status = await queue.get()
                if status == _CLOSED:
                    break
                if status != last:
                    last = status
                    await context.write(health_pb2.HealthCheckResponse(status=status))
            context.set_code(grpc.StatusCode.UNAVAILABLE)
            context.set_details("server is shutting down")
        finally:
            watchers = self._watchers.get(service)
            if watchers is not None:
                watchers.discard(queue)
                if not watchers:
                    del self._watchers[service]

    def method_handlers(self) -> dict[str, grpc.RpcMethodHandler]:
        """Check and Watch, taking raw bytes (a garbage body is INVALID_ARGUMENT, not UNKNOWN)."""
        collector = HandlerCollector()
        health_pb2_grpc.add_HealthServicer_to_server(self, collector)  # type: ignore[arg-type]
        handlers = collector.services[HEALTH_SERVICE]
        return {name: guard(HEALTH_SERVICE, name, handler) for name, handler in handlers.items()}


class HealthReporter:
    def __init__(self, ready_of: Callable[[str], bool]) -> None:
        """`ready_of(name)`: whether the model has a READY version now. Per-model health takes the
        readiness from it, read on the event loop when an update runs, rather than from the notice
        that asked for the update: notices about one model come from several threads (its own
        load or unload, a step's change that blocks an ensemble, an instance giving up), each
        reading readiness before it calls the listeners, so the last to arrive may carry a value
        that is no longer true. Read on the loop, after every change (they run on the loop too),
        the last update always tells the truth."""
        self.servicer = HealthServicer()
        self._models: set[str] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready_of = ready_of

    def bind_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    async def set_server(self, ready: bool) -> None:
        self.servicer.set(LIVE_SERVICE, SERVING)
        for service in SERVER_SERVICES:
            self.servicer.set(service, SERVING if ready else NOT_SERVING)

    async def set_model(self, name: str, ready: bool) -> None:
        self._models.add(name)
        self.servicer.set(name, SERVING if ready else NOT_SERVING)

    def model_changed_threadsafe(self, name: str, ready: bool) -> None:
        """For listeners on loader threads: schedule the update on the event loop. The notice's
        `ready` is not used: the update reads the model's readiness when it runs (__init__)."""
        loop = self._loop
        if loop is None:
            return

        def schedule() -> None:
            asyncio.ensure_future(self.set_model(name, self._ready_of(name)))

        try:
            loop.call_soon_threadsafe(schedule)
        except RuntimeError:  # the loop has closed: nobody is left to tell
            pass

    async def all_not_serving(self) -> None:
        await self.set_server(False)
        for name in list(self._models):
            self.servicer.set(name, NOT_SERVING)
