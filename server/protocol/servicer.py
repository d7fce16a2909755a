"""GRPCInferenceService: decode -> core -> encode, and errors mapped in one place.

Each handler is a few lines; anything that knows about models lives in
`server/core` and `server/repository`. RPCs not implemented yet answer
UNIMPLEMENTED with a message naming the RPC.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from server import __version__
from server.core.model import Model
from server.core.state import ModelState
from server.errors import InvalidInput, ModelNotFound, NereidError, ServerUnavailable, Unsupported
from server.protocol.codec import decode_infer_request, encode_infer_response
from server.protocol.statistics import model_statistics
from server.protocol.status import grpc_status
from server.repository.manager import RepositoryManager

log = logging.getLogger("nereid.protocol")

# What ServerMetadata reports: only the extensions that really work.
EXTENSIONS = ("model_configuration", "statistics", "model_repository", "model_repository(unload_dependents)")

Req = TypeVar("Req")
Resp = TypeVar("Resp")
Handler = Callable[[Any, Req, grpc.aio.ServicerContext], Awaitable[Resp]]


def _mapped(handler: Handler[Req, Resp]) -> Handler[Req, Resp]:
    """Turn a NereidError raised by `handler` into the matching gRPC status."""

    @functools.wraps(handler)
    async def wrapper(self: Any, request: Req, context: grpc.aio.ServicerContext) -> Resp:
        try:
            return await handler(self, request, context)
        except NereidError as exc:
            await context.abort(grpc_status(exc), str(exc))
            raise  # unreachable: abort raises
        except Exception as exc:  # a bug, not the client's fault: say so, keep serving
            log.exception("%s failed", handler.__name__)
            await context.abort(grpc.StatusCode.INTERNAL, f"{handler.__name__}: internal error: {exc!r}")
            raise

    return wrapper


def _unimplemented(rpc: str) -> Callable[..., Awaitable[Any]]:
    async def handler(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        raise Unsupported(f"{rpc} is not implemented by this server (nereid {__version__})")

    handler.__name__ = rpc
    return _mapped(handler)


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, manager: RepositoryManager) -> None:
        self.manager = manager
        self.loaded = False  # startup loading finished
        self.stopping = False

    # -- health of the server --

    @_mapped
    async def ServerLive(self, request: pb.ServerLiveRequest, context: Any) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    def is_ready(self) -> bool:
        return self.loaded and not self.stopping and self.manager.is_ready()

    @_mapped
    async def ServerReady(self, request: pb.ServerReadyRequest, context: Any) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.is_ready())

    @_mapped
    async def ModelReady(self, request: pb.ModelReadyRequest, context: Any) -> pb.ModelReadyResponse:
        entry = self.manager.entry(request.name)
        if not request.version:
            return pb.ModelReadyResponse(ready=entry.latest_ready is not None and not self.stopping)
        try:
            model = entry.versions.get(int(request.version))
        except ValueError:
            raise InvalidInput(f"invalid model version '{request.version}': expected an integer") from None
        ready = model is not None and model.state is ModelState.READY and not self.stopping
        return pb.ModelReadyResponse(ready=ready)

    # -- metadata --

    @_mapped
    async def ServerMetadata(self, request: pb.ServerMetadataRequest, context: Any) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name="nereid", version=__version__, extensions=EXTENSIONS)

    @_mapped
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

    @_mapped
    async def ModelConfig(self, request: pb.ModelConfigRequest, context: Any) -> pb.ModelConfigResponse:
        model = self.manager.get(request.name, request.version)
        return pb.ModelConfigResponse(config=model.config)

    @_mapped
    async def ModelStatistics(
        self, request: pb.ModelStatisticsRequest, context: Any
    ) -> pb.ModelStatisticsResponse:
        models: list[Model]
        if request.name:
            entry = self.manager.entry(request.name)
            if request.version:
                model = self.manager.get(request.name, request.version)
                models = [model]
            else:
                models = [m for _, m in sorted(entry.versions.items()) if m.state is ModelState.READY]
        else:
            models = [m for m in self.manager.loaded_models() if m.state is ModelState.READY]
        return pb.ModelStatisticsResponse(model_stats=[model_statistics(m) for m in models])

    @_mapped
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

    async def ModelInfer(self, request: pb.ModelInferRequest, context: Any) -> pb.ModelInferResponse:
        try:
            if self.stopping:
                raise ServerUnavailable("Server is stopping and has stopped accepting new requests")
            model = self.manager.get(request.model_name, request.model_version)
            outputs = await model.infer(decode_infer_request(request, model))
            return encode_infer_response(model, request.id, outputs)
        except NereidError as exc:
            await context.abort(grpc_status(exc), str(exc))
            raise
        except (grpc.aio.AbortError, asyncio.CancelledError):
            raise
        except Exception as exc:  # a bug, not the client's fault: say so, keep serving
            log.exception("ModelInfer failed")
            await context.abort(grpc.StatusCode.INTERNAL, f"ModelInfer: internal error: {exc!r}")
            raise

    async def ModelStreamInfer(
        self, request_iterator: AsyncIterator[pb.ModelInferRequest], context: Any
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """Bidirectional stream: every request runs concurrently (so they batch together) and
        its response is written when ready, carrying the request id. A failed request answers
        with `error_message` and the stream stays open."""
        responses: asyncio.Queue[pb.ModelStreamInferResponse | None] = asyncio.Queue()
        loop = asyncio.get_running_loop()
        tasks: set[asyncio.Task[None]] = set()

        async def run_one(request: pb.ModelInferRequest) -> None:
            try:
                if self.stopping:
                    raise ServerUnavailable("Server is stopping and has stopped accepting new requests")
                model = self.manager.get(request.model_name, request.model_version)
                outputs = await model.infer(decode_infer_request(request, model))
                response = pb.ModelStreamInferResponse(
                    infer_response=encode_infer_response(model, request.id, outputs))
            except NereidError as exc:
                response = _stream_error(request, str(exc))
            except Exception as exc:  # a bug: report it on this request only
                log.exception("ModelStreamInfer request failed")
                response = _stream_error(request, f"internal error: {exc!r}")
            responses.put_nowait(response)

        async def read_all() -> None:
            try:
                async for request in request_iterator:
                    task = loop.create_task(run_one(request))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
            finally:  # answer what was read, even when reading failed
                if tasks:
                    await asyncio.gather(*tasks, return_exceptions=True)
                responses.put_nowait(None)

        reader = loop.create_task(read_all())
        try:
            while (response := await responses.get()) is not None:
                yield response
            if reader.done() and not reader.cancelled() and reader.exception() is not None:
                log.error("ModelStreamInfer: reading the stream failed: %r", reader.exception())
                await context.abort(
                    grpc.StatusCode.INTERNAL, f"ModelStreamInfer: reading the stream failed: {reader.exception()!r}")
        finally:
            reader.cancel()
            for task in list(tasks):
                task.cancel()

    # -- model repository (explicit mode); loads run on the manager's loader threads --

    @_mapped
    async def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, context: Any
    ) -> pb.RepositoryModelLoadResponse:
        self._check_repository_call(request.repository_name)
        parameters = {key: getattr(p, p.WhichOneof("parameter_choice") or "string_param")
                      for key, p in request.parameters.items()}
        await asyncio.get_running_loop().run_in_executor(
            self.manager.loader, self.manager.load_explicit, request.model_name, parameters)
        return pb.RepositoryModelLoadResponse()

    @_mapped
    async def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, context: Any
    ) -> pb.RepositoryModelUnloadResponse:
        # `unload_dependents` is accepted and has nothing to do: there are no ensembles yet.
        self._check_repository_call(request.repository_name)
        await asyncio.get_running_loop().run_in_executor(
            self.manager.loader, self.manager.unload_explicit, request.model_name)
        return pb.RepositoryModelUnloadResponse()

    def _check_repository_call(self, repository_name: str) -> None:
        if self.stopping:
            raise ServerUnavailable("Server is stopping and has stopped accepting new requests")
        self.manager.require_explicit()
        if repository_name:
            raise ModelNotFound(f"unknown repository '{repository_name}'; leave repository_name empty")

    # -- not implemented yet --

    SystemSharedMemoryStatus = _unimplemented("SystemSharedMemoryStatus")
    SystemSharedMemoryRegister = _unimplemented("SystemSharedMemoryRegister")
    SystemSharedMemoryUnregister = _unimplemented("SystemSharedMemoryUnregister")
    CudaSharedMemoryStatus = _unimplemented("CudaSharedMemoryStatus")
    CudaSharedMemoryRegister = _unimplemented("CudaSharedMemoryRegister")
    CudaSharedMemoryUnregister = _unimplemented("CudaSharedMemoryUnregister")
    TraceSetting = _unimplemented("TraceSetting")
    LogSettings = _unimplemented("LogSettings")


def _stream_error(request: pb.ModelInferRequest, message: str) -> pb.ModelStreamInferResponse:
    """A per-request error on the stream; the id lets the client match it to its request."""
    return pb.ModelStreamInferResponse(
        error_message=message,
        infer_response=pb.ModelInferResponse(
            model_name=request.model_name, model_version=request.model_version, id=request.id),
    )
