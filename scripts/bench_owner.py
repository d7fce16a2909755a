#!/usr/bin/env python3
"""The --workers owner's CPU per forwarded ModelInfer call, without gRPC or perf_analyzer.

Why: the owner's cost per request bounds `nereid serve --workers N` (docs/ARCHITECTURE.md),
and perf_analyzer runs on this shared machine measure it to ±10 %. This runs the owner's real
path in one process — `OwnerLink` over a socket pair, the servicer's handlers, model `mlp`
batch 1 loaded from `model_repository/` — and a forked client that keeps `--inflight` CALL
frames in flight (a new one per answer), and prints the owner process's CPU (user + system,
all its threads) per call. `--inflight 1` is a lightly loaded owner (one call per wake-up),
32 a busy one (many calls per read). `--echo` replaces ModelInfer with a handler that returns
its request: the link's own cost. `--streams S` sends the calls as messages of S open
ModelStreamInfer streams instead (the frontend stand-in returns the SEND credit as a frontend
does): the owner's cost per streamed request. `--in-process` leaves out the socket and the
client process (frames are fed straight into the owner's link, `--inflight` per read): the
owner's Python per call, which varies less run to run on a shared machine, since how many
calls a read brings no longer depends on how the two processes share the cores. Measures the
tree it runs from:
`cd <tree> && .venv/bin/python scripts/bench_owner.py --inflight 1,4,32`.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import resource
import socket
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
from tritonclient.grpc import service_pb2 as pb  # noqa: E402

from server.app import rate_limiter  # noqa: E402
from server.cli import build_parser, settings_from_args  # noqa: E402
from server.core.shm_registry import SharedMemoryRegistry  # noqa: E402
from server.protocol.health import HealthReporter  # noqa: E402
from server.protocol.server import services_of  # noqa: E402
from server.protocol.servicer import InferenceServicer  # noqa: E402
from server.repository.manager import RepositoryManager  # noqa: E402
from server.tracing.otel import Tracer  # noqa: E402
from server.workers import link  # noqa: E402
from server.workers.methods import method_table  # noqa: E402
from server.workers.owner import OwnerLink, handler_table  # noqa: E402

METHOD = next(i for i, m in enumerate(method_table()) if m.name == "ModelInfer")
STREAM = next(i for i, m in enumerate(method_table()) if m.name == "ModelStreamInfer")
# What a frontend forwards for a perf_analyzer call: peer, metadata, no TLS, no deadline.
META = ("ipv4:127.0.0.1:45678", (("user-agent", "grpc-c++/1.67.0 grpc-c/44.0.0 (linux; chttp2)"),), None, None)


def request_body() -> bytes:
    request = pb.ModelInferRequest(model_name="mlp")
    tensor = request.inputs.add(name="INPUT0", datatype="FP32")
    tensor.shape.extend([1, 64])
    request.outputs.add(name="OUTPUT0")
    request.raw_input_contents.append(np.random.default_rng(0).random((1, 64), np.float32).tobytes())
    return request.SerializeToString()  # type: ignore[no-any-return]


def client(sock: socket.socket, payload: bytes, calls: int, inflight: int, streams: int) -> None:
    """The forked frontend stand-in: `inflight` calls out, one more per answer, until `calls`.
    With `streams`, each call is a MESSAGE on one of the open streams (round robin) and every
    SEND is credited back in one CREDIT frame per 32, as a frontend does once grpc took it."""
    body = link.split_call(payload)[2]
    credits = [0] * (streams + 1)
    credited = []

    def call(call_id: int) -> bytes:
        if streams:
            stream = 1 + call_id % streams
            return link.HEADER.pack(len(body), link.MESSAGE, stream) + bytes(body)
        return link.HEADER.pack(len(payload), link.CALL, call_id) + payload

    if streams:
        head = link.call_payload(STREAM, META)
        sock.sendall(b"".join(link.HEADER.pack(len(head), link.OPEN, i + 1) + head for i in range(streams)))
    sent = min(inflight, calls)
    sock.sendall(b"".join(call(i + 1) for i in range(sent)))
    got, buffer = 0, bytearray()
    while got < calls:
        data = sock.recv(1 << 20)
        if not data:
            break
        buffer += data
        pos, more = 0, []
        while len(buffer) - pos >= link.HEADER.size:
            size, kind, call_id = link.HEADER.unpack_from(buffer, pos)
            if len(buffer) - pos - link.HEADER.size < size:
                break
            if kind == link.CREDIT_MESSAGES:
                pos += link.HEADER.size + size
                continue
            # a streamed answer must be an infer_response (field 2), not an error_message (field 1)
            if kind != (link.SEND if streams else link.REPLY) or (streams and buffer[pos + link.HEADER.size] != 0x12):
                print(f"unexpected frame kind {kind}: {bytes(buffer[pos:pos + 200])!r}", file=sys.stderr)
                os._exit(1)
            if streams:
                credits[call_id] += 1
                if credits[call_id] == 32:
                    credited.append(link.HEADER.pack(link.CREDIT_HEAD.size, link.CREDIT_SENDS, call_id)
                                    + link.CREDIT_HEAD.pack(32, 32 * size))
                    credits[call_id] = 0
            pos += link.HEADER.size + size
            got += 1
            if sent < calls:
                sent += 1
                more.append(call(sent))
        del buffer[:pos]
        if more or credited:
            sock.sendall(b"".join(credited + more))
            credited.clear()
    sock.close()
    os._exit(0)


async def measure(handlers: list[Any], payload: bytes, calls: int, inflight: int,
                  streams: int = 0) -> tuple[float, float, float]:
    """(owner CPU µs per call, of which system, calls/s) for one run."""
    loop = asyncio.get_running_loop()
    ours, theirs = socket.socketpair()
    pid = os.fork()
    if pid == 0:
        ours.close()
        client(theirs, payload, calls, inflight, streams)
    theirs.close()
    done: asyncio.Future[None] = loop.create_future()  # the client closes its end when it has all
    def closed(_worker: int) -> None:
        if not done.done():
            done.set_result(None)

    owner = OwnerLink(0, handlers, lambda i, p: None, closed, [0])
    before, started = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    await loop.connect_accepted_socket(lambda: owner.protocol, ours)
    await done
    after, wall = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter() - started
    os.waitpid(pid, 0)
    user, system = after.ru_utime - before.ru_utime, after.ru_stime - before.ru_stime
    return 1e6 * (user + system) / calls, 1e6 * system / calls, calls / wall


async def measure_in_process(handlers: list[Any], payload: bytes, calls: int, inflight: int,
                             streams: int = 0) -> tuple[float, float, float]:
    """`measure` without the socket and the client process: `inflight` frames written straight
    into the owner's LinkProtocol per read, answers counted as it sends them (and each stream's
    SEND credit returned once a read's answers are in). What is left is the owner's Python per
    call; its batching no longer depends on how the two processes share the cores."""
    body = link.split_call(payload)[2]
    owner = OwnerLink(0, handlers, lambda i, p: None, lambda i: None, [0])
    protocol = owner.protocol
    answered = [0] * (streams + 1)  # unary: [count]; streams: per stream id

    def send(parts: list[Any]) -> None:
        _, kind, call_id = link.HEADER.unpack(parts[0])
        if kind == link.REPLY:
            answered[0] += 1
        elif kind == link.SEND:
            answered[call_id] += 1

    protocol.send = send  # type: ignore[method-assign]

    def feed(data: bytes) -> None:
        protocol.get_buffer(len(data))[:len(data)] = data
        protocol.buffer_updated(len(data))

    if streams:
        head = link.call_payload(STREAM, META)
        feed(b"".join(link.HEADER.pack(len(head), link.OPEN, i + 1) + head for i in range(streams)))
        frames = b"".join(link.HEADER.pack(len(body), link.MESSAGE, 1 + i % streams) + bytes(body)
                          for i in range(inflight))
    else:
        frames = b"".join(link.HEADER.pack(len(payload), link.CALL, i + 1) + payload for i in range(inflight))
    rounds = max(1, calls // inflight)
    before, started = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for _ in range(rounds):
        feed(frames)
        while sum(answered) < inflight:
            await asyncio.sleep(0)  # streamed calls (and calls queued for an instance) take loop passes
        if streams:
            feed(b"".join(link.HEADER.pack(link.CREDIT_HEAD.size, link.CREDIT_SENDS, i)
                          + link.CREDIT_HEAD.pack(answered[i], 0) for i in range(1, streams + 1) if answered[i]))
        answered[:] = [0] * len(answered)
    after, wall = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter() - started
    for task in list(owner._tasks.values()):  # the streams' handlers
        task.cancel()
    user, system = after.ru_utime - before.ru_utime, after.ru_stime - before.ru_stime
    done = rounds * inflight
    return 1e6 * (user + system) / done, 1e6 * system / done, done / wall


async def main(args: argparse.Namespace) -> None:
    settings = settings_from_args(build_parser().parse_args(
        ["serve", "--model-repository", str(ROOT / "model_repository"), "--model-control-mode", "explicit",
         "--load-model", "mlp", "--allow-http", "false"]))
    loop = asyncio.get_running_loop()
    manager = RepositoryManager(settings)
    manager.bind_loop(loop)
    health = HealthReporter(manager.has_ready_version)
    health.bind_loop(loop)
    servicer = InferenceServicer(manager, rate_limiter(settings), Tracer(settings.trace_config), SharedMemoryRegistry())
    await loop.run_in_executor(None, manager.load_startup)
    gc.collect()
    gc.freeze()  # as app.serve does once loaded
    servicer.loaded = True
    handlers = handler_table(services_of(servicer, health))
    if args.echo:
        import grpc

        async def echo(requests: Any, context: Any) -> Any:
            return await context.read()

        handlers[METHOD] = grpc.stream_unary_rpc_method_handler(echo)
    payload = link.call_payload(METHOD, META) + request_body()
    run = measure_in_process if args.in_process else measure
    for inflight in (int(n) for n in args.inflight.split(",")):
        await run(handlers, payload, 2000, inflight, args.streams)  # warm-up: inline-cost estimate, caches
        for _ in range(args.repeat):
            cpu, system, rate = await run(handlers, payload, args.calls, inflight, args.streams)
            what = "echo" if args.echo else f"mlp streamed on {args.streams}" if args.streams else "mlp"
            what += " in process" if args.in_process else ""
            print(f"{what} inflight {inflight:3d}: owner {cpu:6.1f} us CPU per call "
                  f"(system {system:4.1f}), {rate:6.0f} calls/s, load {os.getloadavg()[0]:.2f}", flush=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--inflight", default="1,4,32", help="calls in flight, comma-separated (default 1,4,32)")
    ap.add_argument("--calls", type=int, default=20000, help="calls per measurement (default 20000)")
    ap.add_argument("--repeat", type=int, default=1, help="measurements per inflight value (default 1)")
    ap.add_argument("--streams", type=int, default=0,
                    help="send the calls as messages of this many open ModelStreamInfer streams (default 0: unary)")
    ap.add_argument("--echo", action="store_true", help="an echo handler instead of ModelInfer (the link alone)")
    ap.add_argument("--in-process", action="store_true",
                    help="no socket and no client process: frames fed straight into the owner's link, "
                         "--inflight per read (the owner's Python per call, steadier run to run)")
    ap.add_argument("--event-loop", choices=("uvloop", "asyncio"), default="uvloop",
                    help="the owner's event loop (the server's default is uvloop when installed)")
    arguments = ap.parse_args()
    if arguments.event_loop == "uvloop":
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    asyncio.run(main(arguments))
