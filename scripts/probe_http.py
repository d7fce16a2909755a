#!/usr/bin/env python3
"""Which HTTP stack for server/http/ (docs/HTTP.md): Nereid's httptools-based transport vs
uvicorn (httptools parser, ASGI), both on uvloop in one process, each answering a POST of a
small JSON body with a small JSON answer. Clients are separate processes with keep-alive
connections on 127.0.0.1 (bounded: --seconds per run). Prints requests/s per stack and
client count."""

from __future__ import annotations

import argparse
import asyncio
import http.client
import multiprocessing as mp
import multiprocessing.synchronize
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

BODY = b'{"inputs":[{"name":"IN","datatype":"FP32","shape":[1,4],"data":[1,2,3,4]}]}'
ANSWER = (b'{"model_name":"m","model_version":"1",'
          b'"outputs":[{"name":"OUT","datatype":"FP32","shape":[1,4],"data":[1,2,3,4]}]}')


def serve(stack: str, ready: mp.Queue, stop: multiprocessing.synchronize.Event) -> None:
    import uvloop

    async def main() -> None:
        if stack == "nereid":
            from server.http.transport import HttpServer, Request, Response

            async def handler(request: Request) -> Response:
                return Response(200, ANSWER)

            ours = HttpServer(handler, 1 << 20)
            ready.put(await ours.start("127.0.0.1", 0))
            while not stop.is_set():
                await asyncio.sleep(0.1)
            await ours.stop(1.0)
        else:
            import socket

            import uvicorn

            async def app(scope, receive, send):  # type: ignore[no-untyped-def]
                if scope["type"] != "http":
                    return
                more = True
                while more:
                    message = await receive()
                    more = message.get("more_body", False)
                await send({"type": "http.response.start", "status": 200,
                            "headers": [(b"content-type", b"application/json")]})
                await send({"type": "http.response.body", "body": ANSWER})

            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            sock.listen(1024)  # clients may connect before uvicorn starts accepting
            config = uvicorn.Config(app, http="httptools", loop="none", log_level="warning", access_log=False,
                                    lifespan="off")
            server = uvicorn.Server(config)
            task = asyncio.ensure_future(server.serve(sockets=[sock]))
            ready.put(sock.getsockname()[1])
            while not stop.is_set():
                await asyncio.sleep(0.1)
            server.should_exit = True
            await task

    uvloop.run(main())


def client(port: int, seconds: float, out: mp.Queue) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port)
    count = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        conn.request("POST", "/v2/models/m/infer", BODY, {"Content-Type": "application/json"})
        response = conn.getresponse()
        response.read()
        count += 1
    out.put(count)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--clients", default="1,4")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    for n in [int(c) for c in args.clients.split(",")]:
        for repeat in range(args.repeats):
            for stack in ("nereid", "uvicorn"):
                ready: mp.Queue = mp.Queue()
                stop = mp.Event()
                server = mp.Process(target=serve, args=(stack, ready, stop))
                server.start()
                port = ready.get(timeout=30)
                out: mp.Queue = mp.Queue()
                clients = [mp.Process(target=client, args=(port, args.seconds, out)) for _ in range(n)]
                for c in clients:
                    c.start()
                total = sum(out.get(timeout=args.seconds + 30) for _ in clients)
                for c in clients:
                    c.join()
                stop.set()
                server.join(10)
                print(f"{stack:8s} clients={n} run={repeat + 1}: {total / args.seconds:8.0f} req/s", flush=True)


if __name__ == "__main__":
    main()
