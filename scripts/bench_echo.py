#!/usr/bin/env python3
"""The ceiling: a bare grpc.aio KServe v2 server that echoes its inputs.

No model, no checks: ModelInfer answers each request with its own input tensors,
renamed to the configured output names (OUTPUT0, ...), in raw_output_contents;
ModelStreamInfer does the same for every request on the stream. ModelMetadata,
ModelConfig and ServerMetadata say just enough for perf_analyzer to run against a
model that looks like `mlp` (INPUT0 FP32 [64] -> OUTPUT0 FP32 [16], max_batch_size 64),
or like the model described by `--config config.pbtxt`.

One process, default asyncio loop: whatever this reaches is the most any Python
gRPC frontend can do on the same core.

Usage: bench_echo.py [--port 0] [--host 127.0.0.1] [--model mlp] [--config PATH]
Prints the bound port ("port: N") on stdout once it is serving.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

MAX_MESSAGE = 2**31 - 1


def default_config(name: str) -> mc.ModelConfig:
    """A config that looks like the `mlp` model."""
    cfg = mc.ModelConfig(name=name, platform="onnxruntime_onnx", backend="onnxruntime", max_batch_size=64)
    cfg.input.add(name="INPUT0", data_type=mc.TYPE_FP32, dims=[64])
    cfg.output.add(name="OUTPUT0", data_type=mc.TYPE_FP32, dims=[16])
    return cfg


def load_config(name: str, path: str | None) -> mc.ModelConfig:
    if path is None:
        return default_config(name)
    cfg = mc.ModelConfig()
    text_format.Parse(
        Path(path).read_text(), cfg, allow_unknown_field=True, allow_unknown_extension=True
    )
    cfg.name = name
    if not cfg.input or not cfg.output:
        # The echo needs declared tensors to describe; fall back to the mlp shape.
        default = default_config(name)
        if not cfg.input:
            cfg.input.extend(default.input)
        if not cfg.output:
            cfg.output.extend(default.output)
    return cfg


def tensor_metadata(cfg: mc.ModelConfig, tensors: list[mc.ModelInput] | list[mc.ModelOutput]
                    ) -> list[pb.ModelMetadataResponse.TensorMetadata]:
    batch = [-1] if cfg.max_batch_size > 0 else []
    return [
        pb.ModelMetadataResponse.TensorMetadata(
            name=t.name, datatype=mc.DataType.Name(t.data_type).removeprefix("TYPE_"),
            shape=batch + list(t.dims),
        )
        for t in tensors
    ]


class EchoServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, cfg: mc.ModelConfig) -> None:
        self.cfg = cfg
        self.model = cfg.name
        self.output_names = [o.name for o in cfg.output]
        self.metadata = pb.ModelMetadataResponse(
            name=cfg.name, versions=["1"], platform=cfg.platform or "echo",
            inputs=tensor_metadata(cfg, list(cfg.input)), outputs=tensor_metadata(cfg, list(cfg.output)),
        )
        self.config = pb.ModelConfigResponse(config=cfg)

    def echo(self, req: pb.ModelInferRequest) -> pb.ModelInferResponse:
        resp = pb.ModelInferResponse(model_name=req.model_name, model_version=req.model_version or "1",
                                     id=req.id)
        names = self.output_names
        for i, inp in enumerate(req.inputs):
            out = resp.outputs.add()
            out.name = names[i] if i < len(names) else f"OUTPUT{i}"
            out.datatype = inp.datatype
            out.shape.extend(inp.shape)
            if inp.HasField("contents"):
                out.contents.CopyFrom(inp.contents)
        resp.raw_output_contents.extend(req.raw_input_contents)
        return resp

    async def ModelInfer(self, request: pb.ModelInferRequest,
                         context: grpc.aio.ServicerContext) -> pb.ModelInferResponse:
        return self.echo(request)

    async def ModelStreamInfer(self, request_iterator: AsyncIterator[pb.ModelInferRequest],
                               context: grpc.aio.ServicerContext
                               ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        async for request in request_iterator:
            yield pb.ModelStreamInferResponse(infer_response=self.echo(request))

    async def ServerLive(self, request: pb.ServerLiveRequest,
                         context: grpc.aio.ServicerContext) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: pb.ServerReadyRequest,
                          context: grpc.aio.ServicerContext) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=True)

    async def ModelReady(self, request: pb.ModelReadyRequest,
                         context: grpc.aio.ServicerContext) -> pb.ModelReadyResponse:
        return pb.ModelReadyResponse(ready=request.name == self.model)

    async def ServerMetadata(self, request: pb.ServerMetadataRequest,
                             context: grpc.aio.ServicerContext) -> pb.ServerMetadataResponse:
        # No "statistics" extension, so perf_analyzer does not ask for ModelStatistics.
        return pb.ServerMetadataResponse(name="bench-echo", version="0", extensions=[])

    async def ModelMetadata(self, request: pb.ModelMetadataRequest,
                            context: grpc.aio.ServicerContext) -> pb.ModelMetadataResponse:
        if request.name != self.model:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown model '{request.name}'")
        return self.metadata

    async def ModelConfig(self, request: pb.ModelConfigRequest,
                          context: grpc.aio.ServicerContext) -> pb.ModelConfigResponse:
        if request.name != self.model:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown model '{request.name}'")
        return self.config


async def serve(host: str, port: int, cfg: mc.ModelConfig, reuse_port: bool = False,
                servicer: EchoServicer | None = None, on_stop: Callable[[], None] | None = None) -> None:
    """Serve `servicer` (an EchoServicer for `cfg` by default) until SIGINT/SIGTERM, then run
    `on_stop` (scripts/probe_connections.py writes its per-peer counts there)."""
    server = grpc.aio.server(options=[
        ("grpc.max_send_message_length", MAX_MESSAGE),
        ("grpc.max_receive_message_length", MAX_MESSAGE),
        ("grpc.so_reuseport", 1 if reuse_port else 0),
    ])
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer or EchoServicer(cfg), server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise SystemExit(f"bench_echo: cannot bind {host}:{port}")
    await server.start()
    print(f"port: {bound}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    if on_stop is not None:
        on_stop()
    await server.stop(grace=0.5)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0, help="0: let the OS choose (default)")
    ap.add_argument("--model", default="mlp", help="model name to answer for (default mlp)")
    ap.add_argument("--config", help="a config.pbtxt to describe instead of the mlp-like default")
    ap.add_argument("--reuse-port", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--processes", type=int, default=1,
                    help="N > 1: N echo processes on one port with SO_REUSEPORT, the ceiling for "
                    "`nereid serve --workers N` (needs --port; the others are children of this one)")
    args = ap.parse_args(argv)
    children = []
    if args.processes > 1:
        if not args.port:
            raise SystemExit("bench_echo: --processes needs a --port")
        import subprocess

        one = ["--host", args.host, "--port", str(args.port), "--model", args.model, "--reuse-port",
               *(["--config", args.config] if args.config else [])]
        children = [subprocess.Popen([sys.executable, __file__, *one]) for _ in range(args.processes - 1)]
    asyncio.run(serve(args.host, args.port, load_config(args.model, args.config),
                      reuse_port=args.processes > 1 or args.reuse_port))
    for child in children:
        child.terminate()
        child.wait(10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
