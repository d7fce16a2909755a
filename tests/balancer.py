"""A real gRPC load balancer (Debian's nginx-light or haproxy) in front of test servers.

The balancer listens on a free 127.0.0.1 port; its config, pid file, logs and temporary files
all live in a folder the test owns, so it runs without root paths and leaves nothing behind.
scripts/setup installs both packages; a missing binary fails the test (it is never skipped).

The balancer's access log has one line per request, keyed by the `x-request-id` header the
clients send, so that a test can say which replica served (or failed) each request and whether
the balancer retried it (`Balancer.passages`).
"""

from __future__ import annotations

import dataclasses
import grp
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import grpc
from util import scaled

REQUEST_ID_HEADER = "x-request-id"

# nginx as docs/DEPLOYMENT.md shows it: retry on connection errors (a replica that is gone),
# passive health only (nginx OSS has no active checks).
NGINX_NEXT_UPSTREAM = "error timeout http_502 http_503 http_504"


def free_port() -> int:
    """A 127.0.0.1 port nobody listens on right now (the balancer binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def binary(name: str) -> str:
    """The balancer's executable; fails (never skips) when scripts/setup has not installed it."""
    found = shutil.which(name) or next(
        (path for path in (f"/usr/sbin/{name}", f"/usr/local/sbin/{name}") if os.access(path, os.X_OK)), None)
    if found is None:
        raise AssertionError(f"{name} is not installed: scripts/setup installs it "
                             "(Debian: apt-get install nginx-light haproxy)")
    return found


# ---------------------------------------------------------------------------
# Configurations


def nginx_config(port: int, backends: Sequence[str], workdir: Path, *, next_upstream: str = NGINX_NEXT_UPSTREAM,
                 fail_timeout_s: float = 1.0) -> str:
    """nginx in front of `backends`: grpc_pass with upstream keepalive, one retry on another
    replica for what `next_upstream` names, a replica that failed sits out `fail_timeout_s`."""
    servers = "\n".join(f"        server {b} max_fails=1 fail_timeout={fail_timeout_s:g}s;" for b in backends)
    temp = "\n".join(f"    {kind}_temp_path {workdir}/tmp/{kind};"
                     for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    # Workers run as the caller (as root, nginx would otherwise drop them to `nobody`, who cannot
    # write here); nginx ignores the directive, with a warning, when not started as root.
    user = f"{pwd.getpwuid(os.getuid()).pw_name} {grp.getgrgid(os.getgid()).gr_name}"
    header = REQUEST_ID_HEADER.replace("-", "_")
    return f"""
user {user};
worker_processes 1;
daemon off;
pid {workdir}/nginx.pid;
error_log {workdir}/error.log info;
events {{ worker_connections 1024; }}
http {{
{temp}
    log_format failover '$http_{header} "$upstream_addr" "$upstream_status" $status '
                        'grpc-status=$sent_trailer_grpc_status';
    access_log {workdir}/access.log failover;
    upstream nereid {{
{servers}
        keepalive 16;
    }}
    server {{
        listen 127.0.0.1:{port} http2;
        location / {{
            grpc_pass grpc://nereid;
            grpc_next_upstream {next_upstream};
            grpc_next_upstream_tries 2;
            grpc_connect_timeout 1s;
            grpc_read_timeout 60s;
            grpc_send_timeout 60s;
        }}
    }}
}}
"""


def _h2_frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
    return len(payload).to_bytes(3, "big") + bytes([kind, flags]) + stream.to_bytes(4, "big") + payload


def _hpack_literal(index: int, value: str) -> bytes:
    """A header field "literal without indexing", its name from HPACK's static table."""
    head = bytes([index]) if index < 15 else bytes([15, index - 15])
    return head + bytes([len(value)]) + value.encode()


def grpc_health_check_request(service: str = "") -> bytes:
    """The bytes of one grpc.health.v1 Check over cleartext HTTP/2 (client preface, SETTINGS,
    HEADERS, DATA), for HAProxy's raw `tcp-check send-binary`: HAProxy 2.6 has no gRPC health
    check, and `http-check send` cannot carry a body with NUL bytes (every gRPC message has some)."""
    headers = (b"\x83\x86"  # :method POST, :scheme http (static table entries 3 and 6)
               + _hpack_literal(4, "/grpc.health.v1.Health/Check")  # :path
               + _hpack_literal(1, "localhost")  # :authority
               + _hpack_literal(31, "application/grpc")  # content-type
               + b"\x00\x02te\x08trailers")
    message = (b"\x0a" + bytes([len(service)]) + service.encode()) if service else b""
    return (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
            + _h2_frame(0x4, 0, 0, b"")  # SETTINGS, all defaults
            + _h2_frame(0x1, 0x4, 1, headers)  # HEADERS, END_HEADERS, stream 1
            + _h2_frame(0x0, 0x1, 1, b"\x00" + len(message).to_bytes(4, "big") + message))  # DATA, END_STREAM


# The Check answer's message as framed on the wire: not compressed, 2 bytes long, field 1
# (status) = 1, SERVING. NOT_SERVING ends in 02 instead.
GRPC_SERVING_REPLY = b"\x00\x00\x00\x00\x02\x08\x01"


def haproxy_config(port: int, backends: Sequence[str], *, check_interval_ms: int = 300) -> str:
    """HAProxy in HTTP/2 mode, round robin, an active grpc.health.v1 check of every replica every
    `check_interval_ms` (one failure takes a replica out, one success brings it back), and
    retries on another replica of requests whose replica refused or dropped the connection
    before answering."""
    hex_reply = GRPC_SERVING_REPLY.hex()
    servers = "\n".join(f"    server r{i} {b} proto h2 check inter {check_interval_ms} fall 1 rise 1"
                        for i, b in enumerate(backends))
    return f"""
global
    log stdout format raw local0 info
defaults
    mode http
    log global
    log-format "%[capture.req.hdr(0)] %s %ST %rc %tsc"
    timeout connect 1s
    timeout client 60s
    timeout server 60s
    timeout check 1s
    retries 2
    option redispatch 1
    retry-on conn-failure empty-response response-timeout
frontend grpc_in
    bind 127.0.0.1:{port} proto h2
    http-request capture req.hdr({REQUEST_ID_HEADER}) len 40
    default_backend nereid
backend nereid
    balance roundrobin
    option tcp-check
    tcp-check connect
    tcp-check send-binary {grpc_health_check_request().hex()}
    # wait for the answer's message whatever its status, then require SERVING: a replica that
    # answers NOT_SERVING (draining, still loading) is taken out at once, not at the timeout
    tcp-check expect rbinary {hex_reply[:-2]}0[0-9]
    tcp-check expect min-recv 0 binary {hex_reply}
{servers}
"""


# ---------------------------------------------------------------------------
# What the balancer did with each request


@dataclasses.dataclass
class Passage:
    """One request as the balancer logged it."""

    request_id: str
    upstreams: list[str]  # the replicas tried, in order (HAProxy logs only the last one)
    upstream_status: str  # nginx: each replica's HTTP status ("502, 200"); HAProxy: termination state
    status: int  # the HTTP status the balancer sent to the client (gRPC errors ride on 200)
    retried: bool  # the balancer sent it to more than one replica

    @property
    def last(self) -> str:
        return self.upstreams[-1] if self.upstreams else ""


_NGINX_LINE = re.compile(r'^(\S+) "([^"]*)" "([^"]*)" (\d+) grpc-status=\S+$')
_HAPROXY_LINE = re.compile(r"^(\S+) (\S+) (-?\d+) (\+?\d+) (\S+)$")


# ---------------------------------------------------------------------------
# The balancer process


class Balancer:
    """nginx or haproxy in the foreground, in a subprocess; `stop()` ends it (call it in a finally)."""

    def __init__(self, kind: str, backends: Sequence[str], workdir: Path, **options: object) -> None:
        self.kind = kind
        self.workdir = workdir
        self.backends = list(backends)
        (workdir / "tmp").mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        config = workdir / f"{kind}.conf"
        if kind == "nginx":
            config.write_text(nginx_config(self.port, backends, workdir, **options))  # type: ignore[arg-type]
            cmd = [binary("nginx"), "-p", str(workdir), "-e", str(workdir / "error.log"), "-c", str(config)]
        elif kind == "haproxy":
            config.write_text(haproxy_config(self.port, backends, **options))  # type: ignore[arg-type]
            cmd = [binary("haproxy"), "-db", "-f", str(config)]
        else:
            raise ValueError(f"unknown balancer {kind!r}")
        self.lines: list[tuple[float, str]] = []  # (monotonic time read, line) of its stdout and stderr
        self._lock = threading.Lock()
        self.proc = subprocess.Popen(cmd, cwd=workdir, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, errors="replace")
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        try:
            self._wait_listening(scaled(10))
        except BaseException:
            self.stop()
            raise

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._lock:
                self.lines.append((time.monotonic(), line.rstrip("\n")))

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _wait_listening(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self._reader.join(2)
                raise RuntimeError(f"{self.kind} exited with {self.proc.returncode}:\n{self.output()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.05)
        raise TimeoutError(f"{self.kind} not listening on {self.url} after {timeout:.0f}s:\n{self.output()}")

    def wait_serving(self, timeout: float = 10.0) -> None:
        """Until every replica answers through the balancer: as many health Checks in a row as
        there are replicas answer SERVING (round robin sends them to each in turn)."""
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        deadline = time.monotonic() + scaled(timeout)
        in_a_row = 0
        with grpc.insecure_channel(self.url) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while in_a_row < 2 * len(self.backends):
                try:
                    ok = stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == 1
                except grpc.RpcError:
                    ok = False
                in_a_row = in_a_row + 1 if ok else 0
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{self.kind} on {self.url} did not answer SERVING:\n{self.output()}")
                if not ok:
                    time.sleep(0.05)

    def first_line(self, pattern: str, after: float = 0.0) -> float | None:
        """When (monotonic) the balancer first printed a line matching `pattern`, after `after`."""
        with self._lock:
            return next((t for t, line in self.lines if t >= after and re.search(pattern, line)), None)

    def output(self) -> str:
        """What the balancer printed, then its error log (what it says about the replicas)."""
        with self._lock:
            text = "\n".join(line for _, line in self.lines)
        error_log = self.workdir / "error.log"
        if error_log.exists():
            text += "\n" + error_log.read_text(errors="replace")
        return text

    def passages(self) -> dict[str, Passage]:
        """Every request the balancer logged, by its x-request-id."""
        out: dict[str, Passage] = {}
        if self.kind == "nginx":
            path = self.workdir / "access.log"
            for line in (path.read_text(errors="replace").splitlines() if path.exists() else ()):
                if m := _NGINX_LINE.match(line):
                    upstreams = [u.strip() for u in m.group(2).replace(" : ", ", ").split(",") if u.strip()]
                    out[m.group(1)] = Passage(m.group(1), upstreams, m.group(3), int(m.group(4)),
                                              len(upstreams) > 1)
            return out
        with self._lock:
            lines = [line for _, line in self.lines]
        for line in lines:
            if (m := _HAPROXY_LINE.match(line)) and m.group(2).startswith("r"):
                upstream = self.backends[int(m.group(2)[1:])]
                out[m.group(1)] = Passage(m.group(1), [upstream], m.group(5), int(m.group(3)),
                                          m.group(4) != "0")
        return out

    def stop(self) -> None:
        """Fast shutdown (SIGTERM, for both), reaped; idempotent."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(scaled(10))
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._reader.join(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
