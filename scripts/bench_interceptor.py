#!/usr/bin/env python
"""Per-call cost of the --grpc-restricted-protocol interceptor (docs/SECURITY.md).

1. The interceptor alone: `intercept_service` on a call that carries the right header,
   and on a method of an open group, against awaiting the continuation directly.
2. End to end, in one process (wall and process CPU time): sequential unary calls from a
   grpc.aio client to two grpc.aio echo servers at /inference.GRPCInferenceService/ModelInfer,
   one with no interceptor and one with `inference` restricted (the client sends the
   header). Short blocks alternate between the two so drift on a shared machine hits
   both alike; the paired per-block difference is reported.

Usage: .venv/bin/python scripts/bench_interceptor.py [--calls N] [--blocks B]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from server.protocol.access import RestrictedProtocolInterceptor  # noqa: E402
from server.settings import parse_restricted_protocols  # noqa: E402

METHOD = "/inference.GRPCInferenceService/ModelInfer"
OPEN_METHOD = "/inference.GRPCInferenceService/ModelConfig"
HEADER = ("triton-grpc-protocol-infer-key", "0123456789abcdef0123456789abcdef")
RESTRICTIONS = parse_restricted_protocols([f"inference:infer-key={HEADER[1]}"])


class _Details:
    def __init__(self, method: str, metadata: tuple[tuple[str, str], ...]) -> None:
        self.method = method
        self.invocation_metadata = metadata


async def _micro(calls: int) -> dict[str, float]:
    handler = grpc.unary_unary_rpc_method_handler(lambda request, context: request)

    async def continuation(details: object) -> grpc.RpcMethodHandler:
        return handler

    interceptor = RestrictedProtocolInterceptor(RESTRICTIONS)
    metadata = (("user-agent", "grpc-python/1.x"), HEADER)
    cases = {
        "direct continuation": (None, _Details(METHOD, metadata)),
        "restricted, right header": (interceptor, _Details(METHOD, metadata)),
        "open group": (interceptor, _Details(OPEN_METHOD, metadata)),
    }
    result = {}
    for name, (icpt, details) in cases.items():
        start = time.perf_counter()
        if icpt is None:
            for _ in range(calls):
                await continuation(details)
        else:
            for _ in range(calls):
                assert await icpt.intercept_service(continuation, details) is handler
        result[name] = (time.perf_counter() - start) / calls * 1e6
    return result


async def _start_echo(restricted: bool) -> tuple[grpc.aio.Server, int]:
    async def echo(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return request

    handlers = grpc.method_handlers_generic_handler(
        "inference.GRPCInferenceService", {"ModelInfer": grpc.unary_unary_rpc_method_handler(echo)})
    server = grpc.aio.server(interceptors=[RestrictedProtocolInterceptor(RESTRICTIONS)] if restricted else [])
    server.add_generic_rpc_handlers((handlers,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port


async def _block(call: grpc.aio.UnaryUnaryMultiCallable, calls: int) -> tuple[float, float]:
    start, cpu = time.perf_counter(), time.process_time()
    for _ in range(calls):
        await call(b"x", metadata=(HEADER,))
    return time.perf_counter() - start, time.process_time() - cpu


async def _end_to_end(blocks: int, calls: int) -> dict[str, list[tuple[float, float]]]:
    """Both servers up at once; blocks of calls alternate between them."""
    servers = {name: await _start_echo(name == "restricted") for name in ("open", "restricted")}
    channels = {name: grpc.aio.insecure_channel(f"127.0.0.1:{port}") for name, (_, port) in servers.items()}
    result: dict[str, list[tuple[float, float]]] = {name: [] for name in servers}
    try:
        stubs = {name: channel.unary_unary(METHOD) for name, channel in channels.items()}
        for stub in stubs.values():
            await _block(stub, 300)  # warm up
        for index in range(blocks):
            order = ("open", "restricted") if index % 2 == 0 else ("restricted", "open")
            for name in order:
                wall, cpu = await _block(stubs[name], calls)
                result[name].append((wall / calls * 1e6, cpu / calls * 1e6))
    finally:
        for channel in channels.values():
            await channel.close()
        for server, _ in servers.values():
            await server.stop(None)
    return result


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=500, help="calls per end-to-end block (default 500)")
    parser.add_argument("--blocks", type=int, default=40, help="blocks for each server (default 40)")
    args = parser.parse_args()

    for name, micros in (await _micro(200_000)).items():
        print(f"interceptor alone, {name:26s} {micros:6.2f} µs/call")
    blocks = await _end_to_end(args.blocks, args.calls)
    for index, what in ((0, "wall"), (1, "CPU (all threads)")):
        p = statistics.median(b[index] for b in blocks["open"])
        g = statistics.median(b[index] for b in blocks["restricted"])
        diffs = sorted(r[index] - o[index] for o, r in zip(blocks["open"], blocks["restricted"], strict=True))
        quart = diffs[len(diffs) // 4], diffs[3 * len(diffs) // 4]
        print(f"echo round trip {what}: no interceptor {p:6.1f} µs/call, inference restricted {g:6.1f} µs/call; "
              f"paired difference median {statistics.median(diffs):+5.1f} µs "
              f"(quartiles {quart[0]:+.1f} .. {quart[1]:+.1f}) over {args.blocks} blocks of {args.calls}")

if __name__ == "__main__":
    asyncio.run(main())
