"""Wire the repository manager to the gRPC server; start, load, serve, drain, stop.

The event loop only does I/O: models load on the manager's loader threads, so
the server answers ServerLive (and health "NOT_SERVING") while it loads. Per
--model-control-mode, startup loads every model (none), every model that stays
still across two scans and then keeps polling (poll), or the --load-model list
(explicit; then the load/unload RPCs).
On SIGTERM/SIGINT readiness turns false first, then the listener stops taking
new calls and in-flight requests get up to --exit-timeout-secs to finish.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import logging
import signal
from collections.abc import Callable

from server.protocol.health import HealthReporter
from server.protocol.server import build_server
from server.protocol.servicer import InferenceServicer
from server.repository.manager import RepositoryManager
from server.repository.poller import Poller
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

    if settings.load_models and settings.model_control_mode != "explicit":
        log.warning("--load-model is ignored unless --model-control-mode=explicit")

    manager = RepositoryManager(settings)
    manager.bind_loop(loop)
    health = HealthReporter()
    health.bind_loop(loop)
    servicer = InferenceServicer(manager)
    server, port = build_server(settings, servicer, health)
    await health.set_server(False)
    manager.add_listener(health.model_changed_threadsafe)
    manager.add_listener(_server_health_follower(loop, servicer, health))
    await server.start()
    log.info("Started GRPCInferenceService at %s:%d (event loop: %s)", settings.grpc_address, port,
             type(loop).__module__.split(".")[0])

    poller = Poller(manager) if settings.model_control_mode == "poll" else None
    startup = manager.load_startup if poller is None else functools.partial(
        poller.start, min(settings.repository_poll_secs, 1.0))
    loading: asyncio.Future[None] = loop.run_in_executor(None, startup)
    stop_wait: asyncio.Future[bool] = asyncio.ensure_future(stop.wait())
    polling: asyncio.Task[None] | None = None
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
        if poller is not None:
            polling = asyncio.create_task(_poll_forever(poller, settings.repository_poll_secs))
        await stop_wait

    log.info("stopping: readiness off, draining in-flight requests (up to %.0fs)", settings.exit_timeout_secs)
    servicer.stopping = True
    await health.all_not_serving()
    if polling is not None:
        polling.cancel()
    manager.close()
    await server.stop(grace=settings.exit_timeout_secs)
    if not loading.done():
        await loading
    if poller is not None:
        await loop.run_in_executor(None, poller.close, settings.exit_timeout_secs)
    await loop.run_in_executor(None, manager.unload_all, 5.0)
    log.info("stopped")


async def _poll_forever(poller: Poller, interval: float) -> None:
    """Scan every --repository-poll-secs; the scan (file stats) runs off the event loop."""
    loop = asyncio.get_running_loop()
    while True:
        await asyncio.sleep(interval)
        try:
            await loop.run_in_executor(None, poller.poll)
        except Exception:
            log.exception("repository poll failed; trying again in %.1fs", interval)


def _server_health_follower(
    loop: asyncio.AbstractEventLoop, servicer: InferenceServicer, health: HealthReporter
) -> Callable[[str, bool], None]:
    """A manager listener that keeps the server-level health status in step with readiness
    after startup (a model added, failed or removed by polling or the load API)."""

    async def refresh() -> None:
        if servicer.loaded and not servicer.stopping:
            await health.set_server(servicer.is_ready())

    def changed(name: str, ready: bool) -> None:
        try:
            loop.call_soon_threadsafe(lambda: asyncio.ensure_future(refresh()))
        except RuntimeError:  # the loop has closed: nobody is left to tell
            pass

    return changed


def run(settings: Settings) -> int:
    if settings.event_loop != "asyncio":
        try:
            import uvloop
        except ImportError:
            if settings.event_loop == "uvloop":
                raise SystemExit("nereid: --event-loop uvloop needs uvloop: pip install uvloop") from None
        else:
            asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    try:
        asyncio.run(serve(settings))
    except KeyboardInterrupt:
        return 130
    return 0
