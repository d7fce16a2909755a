"""The link's frame parser: frames of every size, however the bytes are cut by the socket."""

from __future__ import annotations

import asyncio
import marshal
import random

from server.workers import link
from server.workers.link import LinkProtocol, frame


def _feed(protocol: LinkProtocol, data: bytes, cuts: list[int]) -> None:
    """Deliver `data` through get_buffer/buffer_updated in pieces ending at `cuts`, as a transport would."""
    pos = 0
    for end in [*cuts, len(data)]:
        while pos < end:
            buffer = protocol.get_buffer(-1)
            n = min(len(buffer), end - pos)
            buffer[:n] = data[pos:pos + n]
            protocol.buffer_updated(n)
            pos += n


def test_frames_survive_any_split() -> None:
    async def run() -> None:
        rng = random.Random(7)
        sizes = [0, 1, 12, 13, 1000, 255 * 1024, 256 * 1024, 256 * 1024 + 1, 700_000, 3_000_000, 5, 0]
        payloads = [bytes(rng.getrandbits(8) for _ in range(min(s, 64))) * (s // 64 + 1) for s in sizes]
        payloads = [p[:s] for p, s in zip(payloads, sizes, strict=True)]
        data = b"".join(b"".join(bytes(part) for part in frame(link.MESSAGE, i + 1, p))
                        for i, p in enumerate(payloads))
        for trial in range(20):
            got: list[tuple[int, int, bytes]] = []
            protocol = LinkProtocol(lambda k, c, p, got=got: got.append((k, c, p)), lambda exc: None)
            cuts = sorted(rng.sample(range(1, len(data)), trial * 3)) if trial else []
            _feed(protocol, data, cuts)
            assert [(k, c) for k, c, _ in got] == [(link.MESSAGE, i + 1) for i in range(len(sizes))]
            for (_, _, payload), expected in zip(got, payloads, strict=True):
                assert payload == expected

    asyncio.run(run())


def test_call_and_status_payloads_round_trip() -> None:
    meta = ("ipv4:127.0.0.1:5", (("user-agent", "x"), ("key-bin", b"\x00\x01")), None, 1.5)
    method, got, body = link.split_call(link.call_payload(7, meta) + b"body")
    assert (method, marshal.loads(got), body) == (7, meta, b"body")
    assert link.split_status(link.status_payload(14, "gone ✓")) == (14, "gone ✓")
