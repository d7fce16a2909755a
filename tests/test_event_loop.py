"""`--event-loop`: the same server on asyncio's own loop and on uvloop (unary, stream, shutdown).
The rest of the suite runs on the default (`auto`: uvloop where installed)."""

from __future__ import annotations

import queue
import signal
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from tests.util import ServerProcess

REPO = Path(__file__).resolve().parent.parent / "model_repository"


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_event_loop_serves_unary_and_stream(server_factory, loop: str) -> None:
    if loop == "uvloop":
        pytest.importorskip("uvloop")
    srv: ServerProcess = server_factory(REPO, "--event-loop", loop)
    client = grpcclient.InferenceServerClient(srv.url)
    assert client.is_server_ready()
    rng = np.random.default_rng(7)
    a = rng.integers(-100, 100, (2, 16), dtype=np.int32)
    b = rng.integers(-100, 100, (2, 16), dtype=np.int32)
    inputs = [grpcclient.InferInput("INPUT0", [2, 16], "INT32"), grpcclient.InferInput("INPUT1", [2, 16], "INT32")]
    inputs[0].set_data_from_numpy(a)
    inputs[1].set_data_from_numpy(b)
    result = client.infer("simple", inputs)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a + b)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), a - b)

    answers: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    for i in range(5):
        client.async_stream_infer("simple", inputs, request_id=str(i))
    got = [answers.get(timeout=10) for _ in range(5)]
    client.stop_stream()
    assert all(error is None for _, error in got)
    assert sorted(r.get_response().id for r, _ in got) == [str(i) for i in range(5)]
    for r, _ in got:
        np.testing.assert_array_equal(r.as_numpy("OUTPUT0"), a + b)

    srv.proc.send_signal(signal.SIGTERM)
    assert srv.proc.wait(timeout=30) == 0
