"""Wire the repository manager to the gRPC server; start, load, serve, drain, stop.

The event loop only does I/O: models load on the manager's loader threads, so
the server answers ServerLive (and health "NOT_SERVING") while it loads. Per
--model-control-mode, startup loads every model (none), every model that stays
still across two scans and then keeps polling (poll), or the --load-model list
(explicit; then the load/unload RPCs).
On SIGTERM/SIGINT readiness turns false at once and new requests are refused with
UNAVAILABLE (retryable: a client or load balancer tries another replica); every
request already received finishes (up to --exit-timeout-secs), streams and health
watches end with UNAVAILABLE once their own requests are answered, and only then
does the listener close (docs/DEPLOYMENT.md: Kubernetes preStop and grace period).
"""

from __future__ import annotations

import asyncio
import errno
import functools
import gc
import logging
import signal
import socket
import sys
from collections.abc import Callable
from typing import Any

from server import exit_guard
from server.core.cuda_runtime import CudaRuntime, probe
from server.core.shm_registry import SharedMemoryRegistry
from server.http.platforms import SageMakerRoutes, VertexAiRoutes
from server.http.routes import HttpRoutes
from server.http.transport import HttpServer
from server.metrics.endpoint import MetricsEndpoint, MetricSources
from server.metrics.rollout import RolloutCollector
from server.metrics.system import SystemMetrics
from server.protocol.bls import BlsService
from server.protocol.health import HealthReporter
from server.protocol.ratelimit import RateLimiter, parse_rate
from server.protocol.server import BindError, build_server, log_security, services_of
from server.protocol.servicer import InferenceServicer
from server.repository.manager import RepositoryManager
from server.repository.poller import Poller
from server.settings import Settings
from server.tracing.otel import Tracer
from server.workers.pool import WorkerPool, WorkerStartError

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
    if settings.load_models and settings.model_control_mode != "explicit":
        log.warning("--load-model is ignored unless --model-control-mode=explicit")

    manager = RepositoryManager(settings)
    manager.bind_loop(loop)
    bls = BlsService(manager, loop)  # Python models' calls to other models, in process
    bls.install()
    health = HealthReporter(manager.has_ready_version)
    health.bind_loop(loop)
    try:
        tracer = Tracer(settings.trace_config)
    except ValueError as exc:
        raise SystemExit(f"nereid: --trace-config: {exc}") from None
    servicer = InferenceServicer(manager, rate_limiter(settings), tracer, SharedMemoryRegistry(cuda=_probe_cuda()))
    server, port = grpc_listener(settings, servicer, health)
    metrics = start_metrics(settings, manager, servicer, server if isinstance(server, WorkerPool) else None)
    await health.set_server(False)
    manager.add_listener(health.model_changed_threadsafe)
    manager.add_listener(_server_health_follower(loop, servicer, health))
    if server is not None:
        await server.start()
        workers = f", {settings.workers} worker processes" if settings.workers > 1 else ""
        log.info("Started GRPCInferenceService at %s:%d (event loop: %s%s)", settings.grpc_address, port,
                 type(loop).__module__.split(".")[0], workers)
    kserve = await start_http(settings, servicer)
    http = ([kserve] if kserve is not None else []) + await start_platforms(settings, servicer)

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
        # Decisions other replicas sharing the repository took (docs/ROLLOUTS.md, "Replicas").
        sharing = asyncio.create_task(manager.rollouts.watch(_ROLLOUT_WATCH_S))
        await stop_wait
        sharing.cancel()

    servicer.begin_lame_duck()
    await health.all_not_serving()
    health.servicer.close_watches()
    if polling is not None:
        polling.cancel()
    manager.close()
    lame_duck = settings.lame_duck_secs
    ignored = False  # calls kept arriving through the whole lame duck
    if lame_duck > 0:
        log.info("stopping: readiness off; serving requests that still arrive until none has for %.0fs "
                 "(at most %.0fs)", _QUIET_S, lame_duck)
        try:
            await asyncio.wait_for(servicer.quiet(_QUIET_S), lame_duck)
        # asyncio.TimeoutError, not TimeoutError: the same class from Python 3.11 on, but on 3.10
        # (which pyproject.toml allows) wait_for raises asyncio's own, which TimeoutError misses.
        except asyncio.TimeoutError:
            ignored = True
            log.warning("requests still arriving %.0fs after readiness went off (a load balancer that does "
                        "not check readiness?)", lame_duck)
    deadline = loop.time() + settings.exit_timeout_secs
    if ignored:
        # They will not stop: close the listener now, since a balancer resends a request that
        # finds the port closed but not one that was refused; those in flight finish.
        log.info("stopping: listener closed, draining %d in flight (up to %.0fs)", servicer.inflight,
                 settings.exit_timeout_secs)
        closed = asyncio.ensure_future(_stop_listeners(server, http, settings.exit_timeout_secs))
        servicer.end_streams()
        await _drain(servicer, settings.exit_timeout_secs)
        await closed
    else:
        log.info("stopping: refusing new requests, draining %d in flight (up to %.0fs)", servicer.inflight,
                 settings.exit_timeout_secs)
        servicer.stop_accepting()
        await _drain(servicer, settings.exit_timeout_secs)
        try:  # a short wait for refused clients to go elsewhere before the listener closes
            await asyncio.wait_for(servicer.quiet(_QUIET_S), max(0.0, min(_REFUSE_S, deadline - loop.time())))
        except asyncio.TimeoutError:
            log.info("closing while calls still arrive: those the listener holds end CANCELLED")
        await _stop_listeners(server, http, _CLOSE_GRACE_S)
    if not loading.done():
        await loading
    if poller is not None:
        await loop.run_in_executor(None, poller.close, settings.exit_timeout_secs)
    await loop.run_in_executor(None, manager.unload_all, 5.0)
    bls.close()
    if metrics is not None:
        metrics.stop()
    await loop.run_in_executor(None, tracer.shutdown)  # exports the spans still queued
    log.info("stopped")


# How often each rollout's shared decision file is looked at (a stat per model with a rollout).
_ROLLOUT_WATCH_S = 0.5
# Once every request has been answered, how long the listener may take to flush the last
# responses and statuses before the connections close.
_CLOSE_GRACE_S = 1.0
# Quiet means no call for this long: the lame duck ends, and after the drain the listener
# closes (InferenceServicer.quiet). A second, not less: on a busy machine clients that are
# still sending can pause for a quarter of one (seen under load: 12 CANCELLED with 0.25 s).
_QUIET_S = 1.0
# After the drain, how long new calls are refused at most while waiting for quiet before the
# listener closes, when the lame duck ended in quiet (or there was none): a straggler is then
# refused (UNAVAILABLE, which a retry policy retries) rather than cut (CANCELLED). When calls
# kept arriving through the whole lame duck, the listener closes at once instead and nothing
# is refused: a balancer that ignores readiness (nginx) resends what finds the port closed,
# but not a refusal. Measured through nginx: 204 of 1,752 requests failed with a 1 s refusal
# after the drain, 3-6 of about 570 when closing right after it, 0-1 closing before it.
# Clients sending directly lose the few calls grpcio holds at the close (CANCELLED).
_REFUSE_S = 1.0


def _probe_cuda() -> CudaRuntime | str:
    """Whether CUDA shared memory can work here, decided once and logged once (its RPCs answer
    UNIMPLEMENTED with the reason otherwise: docs/SHARED_MEMORY.md)."""
    cuda = probe()
    if isinstance(cuda, str):
        log.info("CUDA shared memory unavailable: %s", cuda)
    else:
        log.info("CUDA shared memory available through %s", cuda.how)
    return cuda


def grpc_listener(settings: Settings, servicer: InferenceServicer, health: HealthReporter) -> tuple[Any, int]:
    """The gRPC listener: a grpc.aio server in this process, or with --workers N the pool of
    frontend processes that forward to this one (server/workers/); (None, 0) without gRPC."""
    if not settings.allow_grpc:
        return None, 0
    if settings.workers > 1:
        pool = WorkerPool(settings, services_of(servicer, health))
        log_security(settings)  # the frontends apply it; said once, here
        return pool, pool.port
    return build_server(settings, servicer, health)


async def _stop_listeners(server: Any, http: list[HttpServer], grace: float) -> None:
    """Close the gRPC and HTTP listeners (any may be off), letting answers in progress go out."""
    for listener in http:
        await listener.stop(grace)
    if server is not None:
        await server.stop(grace=grace)


async def start_http(settings: Settings, servicer: InferenceServicer) -> HttpServer | None:
    """KServe v2 HTTP/REST on this event loop (--allow-http), over the same servicer and models."""
    if not settings.allow_http:
        return None
    http = HttpServer(HttpRoutes(servicer, settings.http_restricted_apis), settings.grpc_max_message_bytes)
    try:
        port = await http.start(settings.http_address, settings.http_port)
    except OSError as exc:
        why = "address already in use" if exc.errno == errno.EADDRINUSE else (exc.strerror or str(exc))
        raise BindError(f"could not bind the HTTP endpoint {settings.http_address}:{settings.http_port}: "
                        f"{why}") from None
    log.info("Started HTTPService at %s:%d", settings.http_address, port)
    return http


async def start_platforms(settings: Settings, servicer: InferenceServicer) -> list[HttpServer]:
    """SageMaker and Vertex AI listeners (--allow-sagemaker, --allow-vertex-ai) on this loop,
    on --http-address, over the KServe v2 handlers (server/http/platforms.py)."""
    listeners: list[tuple[str, Any, int]] = []
    if settings.allow_sagemaker:
        routes: Any = SageMakerRoutes(HttpRoutes(servicer, settings.http_restricted_apis),
                                      settings.sagemaker_default_model)
        listeners.append(("Sagemaker", routes, settings.sagemaker_port))
    if settings.allow_vertex_ai:
        routes = VertexAiRoutes(HttpRoutes(servicer, settings.http_restricted_apis), settings.vertex_ai_default_model,
                                settings.vertex_ai_predict_route, settings.vertex_ai_health_route)
        listeners.append(("Vertex AI", routes, settings.vertex_ai_port))
    started: list[HttpServer] = []
    for name, routes, port in listeners:
        listener = HttpServer(routes, settings.grpc_max_message_bytes)
        try:
            bound = await listener.start(settings.http_address, port)
        except OSError as exc:
            for other in started:
                await other.stop(0)
            why = "address already in use" if exc.errno == errno.EADDRINUSE else (exc.strerror or str(exc))
            raise BindError(f"could not bind the {name} endpoint {settings.http_address}:{port}: {why}") from None
        log.info("Started %s HTTPService at %s:%d", name, settings.http_address, bound)
        started.append(listener)
    return started


async def _drain(servicer: InferenceServicer, timeout: float) -> None:
    """Wait for every request already received to be answered, up to the exit timeout."""
    try:
        await asyncio.wait_for(servicer.drained(), timeout)
    except asyncio.TimeoutError:
        log.warning("exit timeout (%.0fs): closing with %d request(s) in flight (cancelled)", timeout,
                    servicer.inflight)


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
        if servicer.loaded and not servicer.draining:
            await health.set_server(servicer.is_ready())

    def changed(name: str, ready: bool) -> None:
        try:
            loop.call_soon_threadsafe(lambda: asyncio.ensure_future(refresh()))
        except RuntimeError:  # the loop has closed: nobody is left to tell
            pass

    return changed


def start_metrics(settings: Settings, manager: RepositoryManager, servicer: InferenceServicer,
                  workers: WorkerPool | None = None) -> MetricsEndpoint | None:
    """The Prometheus endpoint (--allow-metrics), reading the registry and the servicer when scraped."""
    if not settings.allow_metrics:
        return None
    sources = MetricSources(
        models=manager.loaded_models,
        inflight=lambda: servicer.inflight,
        rejections=lambda: dict(servicer.rejections),
        states=manager.states,
        load_failures=lambda: dict(manager.load_failures),
        workers=workers.snapshot if workers is not None else None,
    )
    system = SystemMetrics(settings.metrics_interval_ms / 1000.0, settings.allow_cpu_metrics,
                           settings.allow_gpu_metrics)
    try:
        endpoint = MetricsEndpoint(settings.metrics_address, settings.metrics_port, settings.metrics_config,
                                   sources, system)
    except OSError as exc:
        why = "address already in use" if exc.errno == errno.EADDRINUSE else (exc.strerror or str(exc))
        raise BindError(f"could not bind the metrics endpoint {settings.metrics_address}:{settings.metrics_port}: "
                        f"{why}") from None
    endpoint.registry.register(RolloutCollector(manager.rollouts))  # type: ignore[arg-type]
    endpoint.start()
    log.info("Started Metrics Service at %s:%d", settings.metrics_address, endpoint.port)
    return endpoint


def rate_limiter(settings: Settings) -> RateLimiter:
    """Per-client limits: the server default, if any; a model's `rate_limit_per_client` parameter
    applies either way (for a model without a limit, a request costs one dict lookup)."""
    default = parse_rate(settings.rate_limit_per_client) if settings.rate_limit_per_client else None
    return RateLimiter(default, settings.rate_limit_client_header)


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
        if settings.allow_grpc:
            check_port_free(settings.grpc_address, settings.grpc_port)
        if not settings.allow_grpc and not settings.allow_http:
            log.warning("--allow-grpc and --allow-http are both false: only metrics are served")
        asyncio.run(serve(settings))
    except (BindError, WorkerStartError) as exc:
        print(f"nereid: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        exit_guard.arm(130)
        return 130
    exit_guard.arm(0)  # a model still busy in execute must not keep the stopped server alive
    return 0


def check_port_free(address: str, port: int) -> None:
    """Fail with one line when the port is taken, before grpcio logs its own multi-line error."""
    if port == 0:
        return
    try:
        infos = socket.getaddrinfo(address, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError as exc:
        raise BindError(f"could not bind {address}:{port}: {exc.strerror or exc}") from None
    for family, kind, proto, _, sockaddr in infos[:1]:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(sockaddr)
            except OSError as exc:
                why = "address already in use" if exc.errno == errno.EADDRINUSE else (exc.strerror or str(exc))
                raise BindError(f"could not bind {address}:{port}: {why}") from None
