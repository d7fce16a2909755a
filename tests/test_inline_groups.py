"""In-process (no gRPC) checks of how a batched model's group runs on the event loop: a model
measured cheap that turns slow holds the loop for at most one batch, not for every batch of a
large group (server/core/gathering.py, `Gatherer._flush`)."""

from __future__ import annotations

import asyncio
import tempfile
import time
from pathlib import Path

import numpy as np
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc
from util import identity_config, scaled

from server.core.model import Model
from server.types import InferenceRequest


def _request(value: int) -> InferenceRequest:
    return InferenceRequest({"INPUT0": np.full((1, 2), value, np.float32)}, 1, str(value), None, {})


def test_slow_turn_holds_the_loop_for_one_batch_only() -> None:
    async def scenario() -> tuple[float, list[np.ndarray]]:
        folder = Path(tempfile.mkdtemp())
        text = identity_config("m", [("INPUT0", "FP32", [2])], max_batch_size=1, instance_count=1,
                               extra="dynamic_batching { }\n")
        config = text_format.Parse(text, mc.ModelConfig())
        (folder / "m" / "1").mkdir(parents=True)
        model = Model(config, folder / "m", 1)
        model.load()
        try:
            for i in range(20):  # measured cheap: groups run inline
                await model.infer(_request(i))
            model._instances[0].backend._delay = 0.05  # type: ignore[attr-defined]  # now 50 ms a batch
            gaps: list[float] = []

            async def ticker() -> None:
                last = time.perf_counter()
                while True:
                    await asyncio.sleep(0)
                    now = time.perf_counter()
                    gaps.append(now - last)
                    last = now

            tick = asyncio.ensure_future(ticker())
            await asyncio.sleep(0.01)
            results = await asyncio.gather(*[model.infer(_request(i)) for i in range(8)])
            tick.cancel()
            return max(gaps), [r["OUTPUT0"] for r in results]
        finally:
            model.unload(5.0)

    stall, outputs = asyncio.run(scenario())
    for i, out in enumerate(outputs):
        np.testing.assert_array_equal(out, np.full((1, 2), i, np.float32))
    # One 50 ms batch may run inline before the slowdown is noticed; all eight would be 400 ms.
    assert stall < scaled(0.2), f"the event loop was held for {stall * 1000:.0f} ms"
