"""GRPCInferenceService: decode -> core -> encode.

Each handler is a few lines; anything that knows about models lives in
`server/core` and `server/repository`. Requests arrive as raw bytes and errors
become statuses in handlers.py. RPCs not implemented yet answer UNIMPLEMENTED
with a message naming the RPC.

Shutdown (app.py) has two steps. `begin_lame_duck` turns readiness off while requests
that still arrive are served (their arrival times tell when load balancers have moved
away); `stop_accepting` then refuses new requests with UNAVAILABLE (trailers-only, so
retryable) while the ones already received finish, and streams end with UNAVAILABLE
once their own requests are answered.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from time import perf_counter_ns
from typing import Any, TypeVar

import grpc
from google.protobuf import message_factory
from tritonclient.grpc import service_pb2 as pb

from server import __version__, aio, logs
from server.core.model import Model
from server.core.shm_registry import SharedMemoryRegistry
from server.core.state import ModelState
from server.errors import InvalidInput, ModelNotFound, Overloaded, ServerUnavailable, Unsupported
from server.protocol import handlers, shm_rpc
from server.protocol.codec import decode_infer_request, encode_bytes_tensor, encode_infer_response
from server.protocol.decoupled_stream import FINAL_TRUE, stream_decoupled
from server.protocol.memory import TRIM_AFTER_BYTES, release_freed_memory, trim_later
from server.protocol.ratelimit import RateLimiter
from server.protocol.rollout_rpc import sticky_key
from server.protocol.shm_tensors import write_outputs
from server.protocol.statistics import model_statistics
from server.protocol.stream_window import StreamWindow
from server.protocol.wire import split_infer_request, wrap_stream_response
from server.repository.manager import RepositoryManager
from server.repository.registry import parse_version
from server.tracing.config import TraceConfig
from server.tracing.otel import RequestTrace, Tracer

log = logging.getLogger("nereid.protocol")

SERVICE = "inference.GRPCInferenceService"
# What ServerMetadata reports: only the extensions that really work.
EXTENSIONS = ("classification", "model_configuration", "statistics", "model_repository",
              "model_repository(unload_dependents)", "logging", "trace", "system_shared_memory")
STOPPING = "Server is stopping and has stopped accepting new requests"
STREAM_CLOSED = "Server is shutting down: this stream's requests have been answered; reconnect to another replica"

_T = TypeVar("_T")
_END = object()  # tells a stream's writer that no more responses will come


class InferenceServicer:
    def __init__(self, manager: RepositoryManager, limiter: RateLimiter | None = None,
                 tracer: Tracer | None = None, shm: SharedMemoryRegistry | None = None) -> None:
        self.manager = manager
        # System shared memory regions (docs/SHARED_MEMORY.md); another frontend may share this registry.
        self.shm = shm if shm is not None else SharedMemoryRegistry()
        self.tracer = tracer or Tracer(TraceConfig())
        # Overload (docs/SECURITY.md): inference requests beyond this many in flight are answered
        # RESOURCE_EXHAUSTED at once; 0 disables. Per-client rate limits when configured.
        self.max_inflight = manager.settings.max_inflight_requests
        self.limiter = limiter
        # (model, status code) -> requests answered with that error (metrics); unknown models count as "".
        self.rejections: dict[tuple[str, str], int] = {}
        self.loaded = False  # startup loading finished
        self.draining = False  # shutdown began: readiness is off
        self.stopping = False  # new requests are refused
        self.closing = False  # either of the two: the one flag the hot path reads
        self.inflight = 0  # requests received and not yet answered (every RPC, each stream request)
        self._idle: asyncio.Event | None = None
        self.last_call = 0.0  # monotonic time of the latest call (kept up to date only while closing)
        self._streams: set[aio.Mailbox[Any]] = set()

    # -- shutdown --

    def begin_lame_duck(self) -> None:
        """Readiness off; requests are still served, and their arrival noted for `quiet`."""
        self.draining = self.closing = True
        self.last_call = asyncio.get_running_loop().time()

    def stop_accepting(self) -> None:
        """From now on new requests are refused (UNAVAILABLE); streams end once their requests are answered."""
        if not self.draining:
            self.begin_lame_duck()
        self.stopping = True
        self.end_streams()

    def end_streams(self) -> None:
        """Open streams end (UNAVAILABLE) once the requests they already sent are answered."""
        for queue in list(self._streams):
            queue.put_nowait(_END)

    async def drained(self) -> None:
        """Wait until every request already received has been answered."""
        while self.inflight or self._streams:
            self._idle = asyncio.Event()
            await self._idle.wait()

    async def quiet(self, period: float) -> None:
        """Wait until no call has arrived for `period` seconds.

        Closing the listener while calls still arrive loses some: grpcio kills the calls its
        core has received but not yet handed to Python, and their clients see CANCELLED,
        which they do not retry. Once readiness is off, load balancers stop sending here;
        this waits for that (the caller bounds it)."""
        loop = asyncio.get_running_loop()
        while (left := self.last_call + period - loop.time()) > 0:
            await asyncio.sleep(left)

    def _rejected(self, model: str, code: grpc.StatusCode) -> None:
        key = (model if self.manager.known(model) else "", code.name)
        self.rejections[key] = self.rejections.get(key, 0) + 1

    def _full(self) -> str:
        return (f"server is at its limit of {self.max_inflight} inference requests in flight "
                "(--max-inflight-requests); retry later")

    def _arrived(self) -> bool:
        """A call arrived while closing: note when (for `quiet`); True if it is to be refused."""
        self.last_call = asyncio.get_running_loop().time()
        return self.stopping

    def _serving(self, name: str, version: str, request: Any = None, context: Any = None) -> Model:
        """The model for an inference request. Until startup loading is done, a model not
        there yet is UNAVAILABLE (retryable, like the refused connection Triton gives before
        it has loaded), not NOT_FOUND. A request naming no version of a model with a rollout
        goes where its policy sends it (sticky key from `request`'s parameters or `context`'s
        metadata; docs/ROLLOUTS.md)."""
        try:
            if not version:
                rollout = self.manager.rollouts.get(name)
                if rollout is not None:
                    key = None if request is None else sticky_key(
                        rollout, request.parameters, None if context is None else context.invocation_metadata())
                    chosen = self.manager.rollouts.choose(name, key)
                    if chosen is not None:
                        return chosen
            return self.manager.get(name, version)
        except ModelNotFound:
            if self.loaded:
                raise
        raise ServerUnavailable(f"the server is starting: model '{name}' is not loaded yet; retry")

    def _enter(self) -> None:
        if self.closing and self._arrived():
            raise ServerUnavailable(STOPPING)
        self.inflight += 1

    def _leave(self) -> None:
        self.inflight -= 1
        if not self.inflight and self._idle is not None:
            self._idle.set()

    def tracked(self, behavior: Callable[..., Awaitable[Any]], always: bool = False) -> Callable[..., Awaitable[Any]]:
        """Count a unary RPC as in flight; refuse it while stopping unless `always` (health, metadata)."""

        async def run(request: Any, context: Any) -> Any:
            if always:  # probes keep coming from balancers: they do not hold the lame duck open
                self.inflight += 1
            else:
                self._enter()
            try:
                return await behavior(request, context)
            finally:
                self._leave()

        return run

    # -- health of the server --

    async def ServerLive(self, request: pb.ServerLiveRequest, context: Any) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    def is_ready(self) -> bool:
        """Ready once startup loading finished and until shutdown begins. With --strict-readiness
        (the default) every model must be ready too; without it, as Triton, individual models
        do not count (a model that failed to load does not keep the server out of rotation)."""
        if not self.loaded or self.draining:
            return False
        return self.manager.is_ready() if self.manager.settings.strict_readiness else True

    async def ServerReady(self, request: pb.ServerReadyRequest, context: Any) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.is_ready())

    async def ModelReady(self, request: pb.ModelReadyRequest, context: Any) -> pb.ModelReadyResponse:
        entry = self.manager.entry(request.name)
        if not request.version:
            return pb.ModelReadyResponse(ready=entry.latest_ready is not None and not self.draining)
        model = entry.versions.get(parse_version(request.version, request.name))
        ready = model is not None and model.state is ModelState.READY and not self.draining
        return pb.ModelReadyResponse(ready=ready)

    # -- metadata --

    async def ServerMetadata(self, request: pb.ServerMetadataRequest, context: Any) -> pb.ServerMetadataResponse:
        extensions = EXTENSIONS + (("cuda_shared_memory",) if self.shm.cuda_available else ())
        return pb.ServerMetadataResponse(name="nereid", version=__version__, extensions=extensions)

    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: Any) -> pb.ModelMetadataResponse:
        model = self.manager.get(request.name, request.version)
        entry = self.manager.entry(request.name)
        ready = [str(v) for v, m in sorted(entry.versions.items()) if m.state is ModelState.READY]
        response = pb.ModelMetadataResponse(
            name=model.name, versions=ready, platform=model.config.platform or model.config.backend
        )
        for info in model.inputs.values():
            response.inputs.add(name=info.name, datatype=info.datatype, shape=info.api_shape)
        for info in model.outputs.values():
            response.outputs.add(name=info.name, datatype=info.datatype, shape=info.api_shape)
        return response

    async def ModelConfig(self, request: pb.ModelConfigRequest, context: Any) -> pb.ModelConfigResponse:
        model = self.manager.get(request.name, request.version)
        return pb.ModelConfigResponse(config=model.config)

    async def ModelStatistics(
        self, request: pb.ModelStatisticsRequest, context: Any
    ) -> pb.ModelStatisticsResponse:
        models: list[Model]
        if request.name:
            entry = self.manager.entry(request.name)
            if request.version:
                models = [self.manager.get(request.name, request.version)]
            else:
                models = [m for _, m in sorted(entry.versions.items()) if m.state is ModelState.READY]
        else:
            models = [m for m in self.manager.loaded_models() if m.state is ModelState.READY]
        return pb.ModelStatisticsResponse(model_stats=[model_statistics(m) for m in models])

    async def RepositoryIndex(
        self, request: pb.RepositoryIndexRequest, context: Any
    ) -> pb.RepositoryIndexResponse:
        if request.repository_name:
            raise ModelNotFound(f"unknown repository '{request.repository_name}'; leave repository_name empty")
        rows = await self.manager.index_async(ready_only=request.ready)  # lists the folders off the loop
        return pb.RepositoryIndexResponse(
            models=[
                pb.RepositoryIndexResponse.ModelIndex(name=r.name, version=r.version, state=r.state, reason=r.reason)
                for r in rows
            ]
        )

    # -- inference (the hot path) --

    async def ModelInfer(self, requests: Any, context: Any) -> bytes | None:
        """The unary hot path: `infer` with the request read from the call and encoded as protobuf.

        Registered as stream-unary (identical on the wire for a client that sends one message),
        so that this handler owns the request's bytes: grpcio's unary path would hold them until
        the response is sent, and a 300 MB request would then cost its size once more while its
        response is built and copied. Measured: no difference in calls per second."""

        async def read() -> tuple[pb.ModelInferRequest, Sequence[Any]]:
            body = await context.read()
            # bytes from grpcio; a memoryview for a large request forwarded by a --workers frontend
            if not isinstance(body, (bytes, memoryview)):  # the client closed without sending a request
                raise InvalidInput("ModelInfer: no request message was sent")
            if len(body) >= TRIM_AFTER_BYTES:  # memory.py: what grpcio's receive and send leave behind
                await release_freed_memory()
                context.add_done_callback(trim_later)
            return split_infer_request(body)

        answer = await self.infer(context, read, _encode_protobuf, "ModelInfer",
                                  "ModelInfer RPC doesn't support models with decoupled transaction policy")
        if isinstance(answer, bytes):
            return answer
        # Aborted from this frame, which holds nothing of the request (grpcio keeps the abort's
        # traceback until the call ends), and trailers-only (no headers, no empty message before
        # the status): the only kind a gRPC client's retry policy retries elsewhere.
        await context.abort(*answer)
        return None

    async def infer(self, call: Any, read: Callable[[], Awaitable[tuple[pb.ModelInferRequest, Sequence[Any]]]],
                    encode: Callable[[Model, str, Any, frozenset[str]], _T], label: str,
                    decoupled_refusal: str, name: str = "") -> _T | tuple[grpc.StatusCode, str]:
        """One unary inference for every transport (gRPC ModelInfer, HTTP infer, the platform
        routes), so admission, rate limits, tracing, statistics and errors are one code path.

        `call` is the gRPC context or an adapter with the same methods (invocation_metadata,
        auth_context, peer, add_done_callback: server/http/call.py); `read` gives the request
        message and one raw buffer per input, once admitted; `encode` turns the outputs into
        the transport's answer. Returns that answer, or the (code, message) to answer with;
        refusals and errors are counted by model and code here."""
        if self.closing and self._arrived():
            self._rejected("", grpc.StatusCode.UNAVAILABLE)
            return grpc.StatusCode.UNAVAILABLE, STOPPING
        if self.max_inflight and self.inflight >= self.max_inflight:
            self._rejected("", grpc.StatusCode.RESOURCE_EXHAUSTED)
            return grpc.StatusCode.RESOURCE_EXHAUSTED, self._full()
        self.inflight += 1
        status = None
        trace = None
        try:
            request, raw = await read()
            name = request.model_name
            if self.tracer.active:
                trace = self._trace(call, name, request.id)
            model = self._serving(name, request.model_version, request, call)
            if model.decoupled:
                raise Unsupported(decoupled_refusal)
            if self.limiter is not None:
                self.limiter.check(call, model)
            decoded = decode_infer_request(request, model, raw, self.shm)
            request_id = request.id
            del request, raw
            if trace is not None:
                trace.decoded, trace.version, decoded.trace = perf_counter_ns(), model.version_str, trace
            slots = decoded.shm_outputs
            outputs = await self.manager.rollouts.infer(model, decoded)
            del decoded  # the request's bytes go now, unless an output is a view of them
            in_shm = write_outputs(outputs, slots, model.outputs, encode_bytes_tensor) if slots else frozenset()
            del slots
            if logs.verbose():
                log.debug("%s '%s' version %s id '%s': OK", label, name, model.version_str, request_id,
                          extra={"model": name, "version": model.version_str, "request_id": request_id})
            return encode(model, request_id, outputs, in_shm)
        except (grpc.aio.AbortError, asyncio.CancelledError):
            raise
        except Exception as exc:  # a status below, once the except block (and its traceback) is gone
            status = handlers.failure(label, exc)
        finally:
            self._leave()
        self._rejected(name, status[0])
        if trace is not None:
            trace.status = status[0].name
        return status

    def _trace(self, call: Any, model: str, request_id: str) -> RequestTrace | None:
        """Start a trace if this request is sampled (server/tracing): its parent is the call's W3C
        `traceparent` (gRPC metadata or HTTP header); it is exported once the call is done."""
        trace = self.tracer.start(model, call.invocation_metadata())
        if trace is not None:
            trace.model, trace.request_id = model, request_id
            call.add_done_callback(lambda _: self.tracer.finish(trace))
        return trace

    async def ModelStreamInfer(self, requests: AsyncIterator[bytes], context: Any) -> AsyncIterator[bytes]:
        """Bidirectional stream: every request runs concurrently (so they batch together) and
        its response is written when ready, carrying the request id. A failed request answers
        with `error_message` and the stream stays open. At shutdown the stream ends with
        UNAVAILABLE once the requests it already sent are answered.
        Responses not yet handed to grpc are bounded (stream_window.py): their producers wait,
        and the client's requests are not read while the window is full."""
        responses: aio.Mailbox[Any] = aio.Mailbox()
        window = StreamWindow(responses)
        loop = asyncio.get_running_loop()
        tasks: set[asyncio.Task[None]] = set()
        ending = False  # the server is stopping: answer the requests read, then end the stream
        reading = True  # read_all has not reached its end yet

        async def run_one(body: bytes) -> None:
            response: bytes | None = None
            status = None
            try:
                if self.closing and self._arrived():
                    raise ServerUnavailable(STOPPING)
                if self.max_inflight and self.inflight > self.max_inflight:  # this request counts itself
                    raise Overloaded(self._full())
                if len(body) >= TRIM_AFTER_BYTES:
                    await release_freed_memory()
                    context.add_done_callback(trim_later)
                request, raw = split_infer_request(body)
                try:
                    model = self._serving(request.model_name, request.model_version, request, context)
                    if self.limiter is not None:
                        self.limiter.check(context, model)
                    decoded = decode_infer_request(request, model, raw, self.shm)
                    trace = self.tracer.start(model.name, context.invocation_metadata()) if self.tracer.active \
                        else None
                    if trace is not None:
                        trace.model, trace.version, trace.request_id = model.name, model.version_str, request.id
                        trace.decoded, decoded.trace = perf_counter_ns(), trace
                    if model.decoupled:  # zero or many responses, each written as it comes
                        if decoded.shm_outputs:
                            raise Unsupported("shared memory outputs are not supported for decoupled models; "
                                              "request the outputs without shared memory parameters")
                        await stream_decoupled(model, request, decoded, window.put)
                        if trace is not None:
                            self.tracer.finish(trace)
                        return
                    slots = decoded.shm_outputs
                    outputs = await self.manager.rollouts.infer(model, decoded)
                    del decoded
                    in_shm = write_outputs(outputs, slots, model.outputs, encode_bytes_tensor) if slots \
                        else frozenset()
                    parts = encode_infer_response(model, request.id, outputs, in_shm)
                    parts.append(FINAL_TRUE)  # as Triton marks every streamed response
                    response = b"".join(wrap_stream_response(parts))
                    if trace is not None:  # a stream's request is done once its response is queued
                        self.tracer.finish(trace)
                except Exception as exc:  # reported on this request only
                    status = handlers.failure("ModelStreamInfer", exc)
                if status is not None:
                    self._rejected(request.model_name, status[0])
                    response = _stream_error(request, status[1])
            except Exception as exc:  # the body itself is unreadable
                status = handlers.failure("ModelStreamInfer", exc)
                self._rejected("", status[0])
            if response is None:
                response = pb.ModelStreamInferResponse(error_message=status[1] if status else "").SerializeToString()
            await window.put(response)

        async def read_all() -> None:
            nonlocal reading
            try:
                async for body in requests:
                    self.inflight += 1
                    # Its first step runs now (aio.start): an inline model answers in it, with no
                    # Task; one that waits (batching, a busy instance) goes on in a Task.
                    task = aio.start(run_one(body), loop, done)
                    if task is not None:
                        tasks.add(task)
                    del body
                    await window.room()  # a full window: leave the client's next request to HTTP/2
            finally:  # answer what was read, even when reading failed
                reading = False
                if tasks:
                    await asyncio.gather(*tasks, return_exceptions=True)
                responses.put_nowait(None)

        def done(task: asyncio.Task[None] | None) -> None:
            if task is not None:
                tasks.discard(task)
            self._leave()
            if ending and not tasks:
                responses.put_nowait(None)  # stopping: the last request read has answered

        reader = loop.create_task(read_all())
        self._streams.add(responses)
        if self.closing and self._arrived():
            responses.put_nowait(_END)
        try:
            # The writer only drains: every producer waits on it (the window), so it waits on none.
            while True:
                response = await responses.get()
                if response is None:
                    break
                if response is _END:
                    if not ending:
                        ending = True
                        if reading:
                            reader.cancel()  # no more reads; requests already read still answer
                        if not tasks:
                            responses.put_nowait(None)  # after what is queued
                    continue
                window.taken(response)
                yield response
            if ending:
                handlers.finish_with(context, (grpc.StatusCode.UNAVAILABLE, STREAM_CLOSED))
                return
            if reader.done() and not reader.cancelled() and reader.exception() is not None:
                error = reader.exception()
                log.error("ModelStreamInfer: reading the stream failed: %r", error)
                handlers.finish_with(context, (grpc.StatusCode.INTERNAL,
                                               f"ModelStreamInfer: reading the stream failed: {error!r}"))
        finally:
            self._streams.discard(responses)
            reader.cancel()
            for task in list(tasks):
                task.cancel()
            if self._idle is not None and not self._streams and not self.inflight:
                self._idle.set()

    # -- shared memory (shm_rpc.py) --

    async def SystemSharedMemoryRegister(self, request: pb.SystemSharedMemoryRegisterRequest,
                                         context: Any) -> pb.SystemSharedMemoryRegisterResponse:
        return await shm_rpc.register(self.shm, request)

    async def SystemSharedMemoryStatus(self, request: pb.SystemSharedMemoryStatusRequest,
                                       context: Any) -> pb.SystemSharedMemoryStatusResponse:
        return shm_rpc.status(self.shm, request)

    async def SystemSharedMemoryUnregister(self, request: pb.SystemSharedMemoryUnregisterRequest,
                                           context: Any) -> pb.SystemSharedMemoryUnregisterResponse:
        return shm_rpc.unregister(self.shm, request)

    async def CudaSharedMemoryRegister(self, request: pb.CudaSharedMemoryRegisterRequest,
                                       context: Any) -> pb.CudaSharedMemoryRegisterResponse:
        return await shm_rpc.cuda_register(self.shm, request)

    async def CudaSharedMemoryStatus(self, request: pb.CudaSharedMemoryStatusRequest,
                                     context: Any) -> pb.CudaSharedMemoryStatusResponse:
        return shm_rpc.cuda_status(self.shm, request)

    async def CudaSharedMemoryUnregister(self, request: pb.CudaSharedMemoryUnregisterRequest,
                                         context: Any) -> pb.CudaSharedMemoryUnregisterResponse:
        return shm_rpc.cuda_unregister(self.shm, request)

    # -- tracing --

    async def TraceSetting(self, request: pb.TraceSettingRequest, context: Any) -> pb.TraceSettingResponse:
        """Triton's trace settings, global or for `model_name`; an empty request reads them."""
        model = request.model_name
        if model and not self.manager.known(model):
            raise ModelNotFound(f"Request for unknown model: '{model}' is not found")
        changes = {key: list(value.value) for key, value in request.settings.items()}
        if changes:
            try:
                self.tracer.update(model, changes)
            except ValueError as exc:
                raise InvalidInput(f"TraceSetting: {exc}") from None
            log.info("trace settings%s changed: %s", f" of '{model}'" if model else "",
                     ", ".join(f"{k}={v}" for k, v in sorted(changes.items())))
        current = self.tracer.settings(model)
        response = pb.TraceSettingResponse()
        response.settings["trace_level"].value.extend(current.level)
        response.settings["trace_rate"].value.append(str(current.rate))
        response.settings["trace_count"].value.append(str(current.count))
        response.settings["log_frequency"].value.append(str(current.log_frequency))
        response.settings["trace_mode"].value.append("opentelemetry")
        return response

    # -- logging --

    async def LogSettings(self, request: pb.LogSettingsRequest, context: Any) -> pb.LogSettingsResponse:
        """Triton's log settings; an empty request reads them (server/logs.py)."""
        changes = {}
        for key, value in request.settings.items():
            which = value.WhichOneof("parameter_choice")
            changes[key] = getattr(value, which) if which else None
        if changes:
            try:
                logs.update(changes)
            except ValueError as exc:
                raise InvalidInput(f"LogSettings: {exc}") from None
            log.info("log settings changed: %s", ", ".join(f"{k}={v}" for k, v in sorted(changes.items())))
        response = pb.LogSettingsResponse()
        for key, current in logs.as_settings(logs.state()).items():
            entry = response.settings[key]
            if isinstance(current, bool):
                entry.bool_param = current
            elif isinstance(current, int):
                entry.uint32_param = current
            else:
                entry.string_param = current
        return response

    # -- model repository (explicit mode); loads run on the manager's loader threads --

    async def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, context: Any
    ) -> pb.RepositoryModelLoadResponse:
        self._check_repository_call(request.repository_name)
        parameters = {key: getattr(p, p.WhichOneof("parameter_choice") or "string_param")
                      for key, p in request.parameters.items()}
        await asyncio.get_running_loop().run_in_executor(
            self.manager.loader, self.manager.load_explicit, request.model_name, parameters)
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, context: Any
    ) -> pb.RepositoryModelUnloadResponse:
        self._check_repository_call(request.repository_name)
        # tritonclient's unload_model(unload_dependents=True): a bool parameter (docs/ENSEMBLES.md).
        dependents = "unload_dependents" in request.parameters and request.parameters["unload_dependents"].bool_param
        await asyncio.get_running_loop().run_in_executor(
            self.manager.loader, self.manager.unload_explicit, request.model_name, dependents)
        return pb.RepositoryModelUnloadResponse()

    def _check_repository_call(self, repository_name: str) -> None:
        self.manager.require_explicit()
        if repository_name:
            raise ModelNotFound(f"unknown repository '{repository_name}'; leave repository_name empty")

    # -- registration --

    def method_handlers(self) -> dict[str, grpc.RpcMethodHandler]:
        """Every RPC of GRPCInferenceService, taking raw bytes (handlers.py)."""
        service = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
        out: dict[str, grpc.RpcMethodHandler] = {}
        for method in service.methods:
            name = method.name
            if name == "ModelStreamInfer":
                out[name] = grpc.stream_stream_rpc_method_handler(self.ModelStreamInfer)
                continue
            behavior = getattr(self, name, None)
            if behavior is None:
                behavior = _unimplemented(name)
            always = name in _ALWAYS_ANSWERED
            if name == "ModelInfer":
                out[name] = grpc.stream_unary_rpc_method_handler(self.ModelInfer)
                continue
            request_cls = message_factory.GetMessageClass(method.input_type)
            out[name] = handlers.unary(name, self.tracked(behavior, always),
                                       handlers.typed_parser(request_cls, name), _serialize)
        return out


# Answered during shutdown too: probes and metadata must keep telling the truth while draining.
_ALWAYS_ANSWERED = frozenset({
    "ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata", "ModelConfig",
    "ModelStatistics", "RepositoryIndex",
})


def _encode_protobuf(model: Model, request_id: str, outputs: Any, in_shm: frozenset[str]) -> bytes:
    return b"".join(encode_infer_response(model, request_id, outputs, in_shm))


def _serialize(message: Any) -> bytes:
    return message.SerializeToString()  # type: ignore[no-any-return]


def _unimplemented(rpc: str) -> Callable[..., Awaitable[Any]]:
    async def handler(request: Any, context: Any) -> Any:
        raise Unsupported(f"{rpc} is not implemented by this server (nereid {__version__})")

    return handler


def _stream_error(request: pb.ModelInferRequest, message: str) -> bytes:
    """A per-request error on the stream; the id lets the client match it to its request."""
    return pb.ModelStreamInferResponse(  # type: ignore[no-any-return]
        error_message=message,
        infer_response=pb.ModelInferResponse(
            model_name=request.model_name, model_version=request.model_version, id=request.id),
    ).SerializeToString()


__all__ = ["InferenceServicer", "InvalidInput", "SERVICE"]
