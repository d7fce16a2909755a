#!/usr/bin/env python3
"""Probe: the cost of handing requests from a frontend process to an instance-owner process.

A measurement for the upcoming `nereid serve --workers N` design (issue 12), not a feature.
A frontend process (this one) sends K requests (K = --batches, 1 = one request per wake-up),
each carrying one tensor of --sizes bytes, to an owner process, which "executes" them (copies
each input into a fresh output, like an identity model) and sends the K responses back in one
message / one wake-up. One round trip is timed; µs per request = round trip / K.

Mechanisms (--mechanisms):
  inproc       the reference: one copy of each tensor as a function call in this process
  mp-pipe      multiprocessing.Pipe: conn.send(list of (id, bytes)) / conn.recv() (pickle)
  unix-pickle  AF_UNIX stream socketpair, length-prefixed pickle (protocol 5) of the same list
  shm-eventfd  multiprocessing.shared_memory ring of request and response slots; descriptors
               (lengths) in the segment; an eventfd per direction carries "K new items"
  shm-pipe     the same ring, woken through an os.pipe carrying K as 4 bytes

Reported per (mechanism, size, K): the median over --repeats runs of the wall µs per request,
and the frontend's CPU µs per request (time.process_time of this process: what the gRPC
frontend would pay), with the spread (min–max of the wall figure) as the noise.
Each run lasts about --seconds; everything is bounded and local (no network).

Usage: scripts/probe_handoff.py [--sizes 64,65536] [--batches 1,8,32] [--repeats 3] [--seconds 0.7]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import pickle
import socket
import statistics
import struct
import sys
import time
from collections.abc import Callable
from multiprocessing import shared_memory
from typing import Any

SLOTS = 64
HDR = 8 * SLOTS * 2 + 8  # request lengths, response lengths, stop flag (int64 each)


# --------------------------------------------------------------------------- wake-up channels


class EventFd:
    """An eventfd pair (one per direction): write K adds K; a read returns the sum and resets."""

    def __init__(self) -> None:
        self.to_owner = os.eventfd(0)
        self.to_front = os.eventfd(0)

    def post(self, fd: int, k: int) -> None:
        os.eventfd_write(fd, k)

    def take(self, fd: int) -> int:
        return os.eventfd_read(fd)


class PipeWake:
    """os.pipe per direction; each post writes K as 4 bytes; take sums what is there."""

    def __init__(self) -> None:
        self.owner_r, self.owner_w = os.pipe()
        self.front_r, self.front_w = os.pipe()
        self.to_owner = self.owner_w
        self.to_front = self.front_w
        self._read = {self.owner_w: self.owner_r, self.front_w: self.front_r}

    def post(self, fd: int, k: int) -> None:
        os.write(fd, struct.pack("<I", k))

    def take(self, fd: int) -> int:
        data = os.read(self._read[fd], 4096)
        return sum(struct.unpack(f"<{len(data) // 4}I", data))


# --------------------------------------------------------------------------- owners


def owner_pipe(conn: Any) -> None:
    while True:
        reqs = conn.recv()
        if reqs is None:
            return
        conn.send([(rid, bytes(memoryview(buf))) for rid, buf in reqs])


def recv_exact(sock: socket.socket, n: int) -> bytearray:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        r = sock.recv_into(view[got:])
        if r == 0:
            raise EOFError
        got += r
    return buf


def send_msg(sock: socket.socket, obj: Any) -> None:
    data = pickle.dumps(obj, protocol=5)
    sock.sendall(struct.pack("<I", len(data)) + data)


def recv_msg(sock: socket.socket) -> Any:
    (n,) = struct.unpack("<I", recv_exact(sock, 4))
    return pickle.loads(recv_exact(sock, n))


def owner_unix(sock: socket.socket) -> None:
    while True:
        reqs = recv_msg(sock)
        if reqs is None:
            return
        send_msg(sock, [(rid, bytes(memoryview(buf))) for rid, buf in reqs])


def shm_views(shm: shared_memory.SharedMemory, slot: int) -> tuple[Any, Any, memoryview, memoryview]:
    import numpy as np
    lens = np.ndarray((SLOTS,), dtype=np.int64, buffer=shm.buf, offset=0)
    rlens = np.ndarray((SLOTS,), dtype=np.int64, buffer=shm.buf, offset=8 * SLOTS)
    buf = shm.buf
    assert buf is not None  # None only once closed
    req = buf[HDR:HDR + SLOTS * slot]
    resp = buf[HDR + SLOTS * slot:HDR + 2 * SLOTS * slot]
    return lens, rlens, req, resp


def owner_shm(name: str, slot: int, wake: Any) -> None:
    shm = shared_memory.SharedMemory(name=name)
    lens, rlens, req, resp = shm_views(shm, slot)
    tail = 0
    while True:
        k = wake.take(wake.to_owner)
        for _ in range(k):
            i = tail % SLOTS
            n = int(lens[i])
            if n < 0:
                del lens, rlens, req, resp
                shm.close()
                return
            off = i * slot
            resp[off:off + n] = req[off:off + n]  # the "model": output = copy of input
            rlens[i] = n
            tail += 1
        wake.post(wake.to_front, k)


# --------------------------------------------------------------------------- frontends


def bench(rt: Callable[[list[bytes]], list[bytes]], size: int, k: int, seconds: float) -> tuple[float, float]:
    """Round trips of k requests for `seconds`; returns (wall µs, frontend CPU µs) per request.

    The k payloads are distinct objects: pickle memoizes repeated objects, and a batch of one
    object k times would be serialized once."""
    batch = [os.urandom(size) for _ in range(k)]
    for _ in range(50):
        out = rt(batch)
    assert out == batch
    n = 0
    w0, c0 = time.perf_counter(), time.process_time()
    end = w0 + seconds
    while True:
        rt(batch)
        n += 1
        if n % 16 == 0 and time.perf_counter() > end:
            break
    w1, c1 = time.perf_counter(), time.process_time()
    return (w1 - w0) / (n * k) * 1e6, (c1 - c0) / (n * k) * 1e6


def run_mechanism(mech: str, sizes: list[int], batches: list[int], repeats: int, seconds: float
                  ) -> list[dict[str, Any]]:
    ctx = mp.get_context("fork")
    slot = max(sizes)
    cleanup: Callable[[], None]
    if mech == "inproc":
        def rt(batch: list[bytes]) -> list[bytes]:
            return [bytes(memoryview(b)) for b in batch]
        cleanup = lambda: None  # noqa: E731
    elif mech == "mp-pipe":
        a, b = ctx.Pipe()
        proc = ctx.Process(target=owner_pipe, args=(b,), daemon=True)
        proc.start()

        def rt(batch: list[bytes]) -> list[bytes]:
            a.send(list(enumerate(batch)))
            return [buf for _, buf in a.recv()]

        def cleanup() -> None:
            a.send(None)
            proc.join(5)
    elif mech == "unix-pickle":
        s1, s2 = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        proc = ctx.Process(target=owner_unix, args=(s2,), daemon=True)
        proc.start()

        def rt(batch: list[bytes]) -> list[bytes]:
            send_msg(s1, list(enumerate(batch)))
            return [buf for _, buf in recv_msg(s1)]

        def cleanup() -> None:
            send_msg(s1, None)
            proc.join(5)
    elif mech in ("shm-eventfd", "shm-pipe"):
        wake = EventFd() if mech == "shm-eventfd" else PipeWake()
        shm = shared_memory.SharedMemory(create=True, size=HDR + 2 * SLOTS * slot)
        lens, rlens, req, resp = shm_views(shm, slot)
        proc = ctx.Process(target=owner_shm, args=(shm.name, slot, wake), daemon=True)
        proc.start()
        head = 0

        def rt(batch: list[bytes]) -> list[bytes]:
            nonlocal head
            start = head
            for b in batch:
                i = head % SLOTS
                off = i * slot
                req[off:off + len(b)] = b
                lens[i] = len(b)
                head += 1
            wake.post(wake.to_owner, len(batch))
            got = 0
            while got < len(batch):
                got += wake.take(wake.to_front)
            out = []
            for j in range(start, head):
                i = j % SLOTS
                off = i * slot
                out.append(bytes(resp[off:off + int(rlens[i])]))
            return out

        def cleanup() -> None:
            nonlocal lens, rlens, req, resp
            lens[head % SLOTS] = -1
            wake.post(wake.to_owner, 1)
            proc.join(5)
            del lens, rlens, req, resp
            shm.close()
            shm.unlink()
    else:
        raise SystemExit(f"unknown mechanism {mech}")
    rows = []
    try:
        for size in sizes:
            for k in batches:
                walls, cpus = [], []
                for _ in range(repeats):
                    w, c = bench(rt, size, k, seconds)
                    walls.append(w)
                    cpus.append(c)
                rows.append({"mechanism": mech, "size": size, "batch": k,
                             "wall_us": statistics.median(walls), "wall_min": min(walls), "wall_max": max(walls),
                             "front_cpu_us": statistics.median(cpus)})
    finally:
        cleanup()
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mechanisms", default="inproc,mp-pipe,unix-pickle,shm-eventfd,shm-pipe")
    ap.add_argument("--sizes", default="64,65536", help="tensor bytes (64 = 16 floats; 65536 = 64 KiB)")
    ap.add_argument("--batches", default="1,8,32", help="requests per wake-up")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=0.7)
    args = ap.parse_args(argv)
    sizes = [int(x) for x in args.sizes.split(",")]
    batches = [int(x) for x in args.batches.split(",")]
    if max(batches) > SLOTS:
        ap.error(f"batches above {SLOTS} do not fit the ring")
    print(f"# {time.strftime('%Y-%m-%d %H:%M:%S')} load average {os.getloadavg()}, {os.cpu_count()} cores, "
          f"Python {sys.version.split()[0]}")
    print("| mechanism | tensor | requests per wake-up | wall µs/request (median; min–max) | frontend CPU µs/request |")
    print("|---|---|---|---|---|")
    for mech in args.mechanisms.split(","):
        for r in run_mechanism(mech, sizes, batches, args.repeats, args.seconds):
            size = f"{r['size'] // 4} floats" if r["size"] < 1024 else f"{r['size'] // 1024} KiB"
            print(f"| {r['mechanism']} | {size} | {r['batch']} | {r['wall_us']:.1f} "
                  f"({r['wall_min']:.1f}–{r['wall_max']:.1f}) | {r['front_cpu_us']:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
