"""A small HTTP/1.1 server on the running asyncio (uv)loop: httptools parses, this module
frames. No framework layer: a request is (method, path, query, headers, body) handed to one
coroutine, which returns (status, headers, body). Keep-alive and pipelining are honoured
(requests on one connection are answered in order); bodies are bounded.

Chosen over an ASGI server (uvicorn) by measurement (docs/HTTP.md): the ASGI layer's
per-request dicts, scope and send/receive callbacks cost more than the parsing itself.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import httptools

log = logging.getLogger("nereid.http")


@dataclass(slots=True)
class Request:
    method: str
    path: str
    query: str
    headers: dict[str, str]  # lower-case names
    body: bytes = b""
    peer: str = ""  # the client, as grpcio names a peer ("ipv4:127.0.0.1:50312")


@dataclass(slots=True)
class Response:
    status: int
    body: bytes | list[bytes] = b""
    content_type: str = "application/json"
    headers: list[tuple[str, str]] = field(default_factory=list)


Handler = Callable[[Request], Awaitable[Response]]

_REASONS = {200: "OK", 400: "Bad Request", 403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed",
            413: "Payload Too Large",
            429: "Too Many Requests", 500: "Internal Server Error", 501: "Not Implemented",
            503: "Service Unavailable", 504: "Gateway Timeout"}


def encode_head(response: Response, length: int, keep_alive: bool) -> bytes:
    lines = [f"HTTP/1.1 {response.status} {_REASONS.get(response.status, 'Unknown')}",
             f"Content-Type: {response.content_type}", f"Content-Length: {length}"]
    lines += [f"{k}: {v}" for k, v in response.headers]
    if not keep_alive:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def peer_name(address: Any) -> str:
    """grpcio's peer form for a socket address (the transport's `peername`)."""
    if isinstance(address, tuple) and len(address) >= 2:
        host, port = address[0], address[1]
        return f"ipv6:[{host}]:{port}" if ":" in str(host) else f"ipv4:{host}:{port}"
    return f"unix:{address}" if address else ""


class _Connection(asyncio.Protocol):
    """One client connection: parse requests, answer them in order."""

    def __init__(self, handler: Handler, max_body: int, connections: set[_Connection]) -> None:
        self.handler = handler
        self.max_body = max_body
        self.connections = connections
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.queue: asyncio.Queue[tuple[Request, bool] | None] = asyncio.Queue()
        self.worker: asyncio.Task[None] | None = None
        self._url = b""
        self._headers: dict[str, str] = {}
        self._body: list[bytes] = []
        self._size = 0
        self._too_large = False
        self.peer = ""

    # -- asyncio.Protocol --

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.peer = peer_name(transport.get_extra_info("peername"))
        self.connections.add(self)
        self.worker = asyncio.get_running_loop().create_task(self._answer())

    def connection_lost(self, exc: Exception | None) -> None:
        self.connections.discard(self)
        self.queue.put_nowait(None)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(400, "protocol upgrades are not supported")
        except httptools.HttpParserError as exc:
            self._fail(400, f"malformed HTTP request: {exc}")

    # -- httptools callbacks --

    def on_message_begin(self) -> None:
        self._url, self._headers, self._body, self._size, self._too_large = b"", {}, [], 0, False

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_body(self, body: bytes) -> None:
        self._size += len(body)
        if self._size > self.max_body:
            self._too_large = True
            self._body = []
        elif not self._too_large:
            self._body.append(body)

    def on_message_complete(self) -> None:
        url = httptools.parse_url(self._url)
        path = url.path.decode("latin-1")
        query = url.query.decode("latin-1") if url.query else ""
        request = Request(self.parser.get_method().decode("latin-1"), path, query, self._headers,
                          b"".join(self._body) if len(self._body) != 1 else self._body[0], self.peer)
        if self._too_large:
            request.method = "!TOO_LARGE"
        self.queue.put_nowait((request, self.parser.should_keep_alive()))

    # -- answering --

    async def _answer(self) -> None:
        while True:
            item = await self.queue.get()
            if item is None or self.transport is None or self.transport.is_closing():
                return
            request, keep_alive = item
            if request.method == "!TOO_LARGE":
                response = Response(413, b'{"error":"request body exceeds the server limit '
                                    + str(self.max_body).encode() + b' bytes"}')
                keep_alive = False
            else:
                try:
                    response = await self.handler(request)
                except Exception:  # the handler maps every error; this is a bug
                    log.exception("HTTP %s %s failed", request.method, request.path)
                    response = Response(500, b'{"error":"internal error"}')
            del request
            body = response.body
            parts = body if isinstance(body, list) else [body]
            length = sum(len(p) for p in parts)
            if self.transport.is_closing():
                return
            self.transport.writelines([encode_head(response, length, keep_alive), *parts])
            if not keep_alive:
                self.transport.close()
                return

    def _fail(self, status: int, message: str) -> None:
        if self.transport is not None and not self.transport.is_closing():
            import json
            body = json.dumps({"error": message}).encode()
            self.transport.write(encode_head(Response(status), len(body), False) + body)
            self.transport.close()


class HttpServer:
    """Listens on (address, port) on the running loop; `port` is the bound one (0 picks a free one)."""

    def __init__(self, handler: Handler, max_body: int) -> None:
        self.handler = handler
        self.max_body = max_body
        self.server: asyncio.base_events.Server | None = None
        self.connections: set[_Connection] = set()
        self.port = 0

    async def start(self, address: str, port: int) -> int:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(
            lambda: _Connection(self.handler, self.max_body, self.connections), address, port,
            reuse_port=False, backlog=1024)
        self.port = self.server.sockets[0].getsockname()[1]
        return self.port

    async def stop(self, grace: float) -> None:
        """Stop listening; let the answers being written go out, then close the connections."""
        if self.server is None:
            return
        self.server.close()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        while any(not c.queue.empty() for c in self.connections) and loop.time() < deadline:
            await asyncio.sleep(0.05)
        for connection in list(self.connections):
            if connection.transport is not None:
                connection.transport.close()
        await self.server.wait_closed()
