"""Wire the repository manager to the gRPC server; start, load, serve, drain, stop.

The event loop only does I/O: models load on a worker thread, so the server
answers ServerLive (and health "NOT_SERVING") while it loads.
On SIGTERM/SIGINT readiness turns false first, then the listener stops taking
new calls and in-flight requests get up to --exit-timeout-secs to finish.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal

from server.protocol.health import HealthReporter
from server.protocol.server import build_server
from server.protocol.servicer import InferenceServicer
from server.repository.manager import RepositoryManager
from server.settings import Settings

log = logging.getLogger("nereid")


async def serve(settings: Settings, stop: asyncio.Event | None = None) -> None:
    loop = asyncio.get_running_loop()
    stop = stop or asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):  # not the main thread
            pass
    for repository in settings.model_repositories:
        if not repository.is_dir():
            raise SystemExit(f"nereid: model repository '{repository}' is not a directory")
    if settings.metrics_port:
        log.warning("--metrics-port %d ignored: Prometheus metrics are not implemented yet", settings.metrics_port)

    manager = RepositoryManager(settings)
    health = HealthReporter()
    health.bind_loop(loop)
    servicer = InferenceServicer(manager)
    server, port = build_server(settings, servicer, health)
    await health.set_server(False)
    manager.add_listener(health.model_changed_threadsafe)
    await server.start()
    log.info("Started GRPCInferenceService at %s:%d", settings.grpc_address, port)

    loading: asyncio.Future[None] = loop.run_in_executor(None, manager.load_all)
    stop_wait: asyncio.Future[bool] = asyncio.ensure_future(stop.wait())
    await asyncio.wait([loading, stop_wait], return_when=asyncio.FIRST_COMPLETED)  # type: ignore[misc,type-var]
    if loading.done():
        loading.result()
        # Everything alive now (modules, configs, sessions) lives as long as the server:
        # keep it out of the garbage collector's scans so per-request collections stay cheap.
        gc.collect()
        gc.freeze()
        servicer.loaded = True
        ready = servicer.is_ready()
        await health.set_server(ready)
        log.info("models loaded; server %s", "ready" if ready else "NOT ready (see the errors above)")
        await stop_wait

    log.info("stopping: readiness off, draining in-flight requests (up to %.0fs)", settings.exit_timeout_secs)
    servicer.stopping = True
    await health.all_not_serving()
    await server.stop(grace=settings.exit_timeout_secs)
    if not loading.done():
        await loading
    await loop.run_in_executor(None, manager.unload_all, 5.0)
    log.info("stopped")


def run(settings: Settings) -> int:
    try:
        asyncio.run(serve(settings))
    except KeyboardInterrupt:
        return 130
    return 0
