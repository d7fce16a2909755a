#!/usr/bin/env python
"""In-process cost of `Model.infer` on the identity backend (no gRPC, no codec).

Measures the core's request path alone: a model version built and loaded as the repository
does, then awaited from one event loop. Three shapes of traffic:

- `direct`: no dynamic batching, one request at a time (runs inline once measured cheap);
- `batched`: `dynamic_batching {}`, one request at a time (each leads a group of one);
- `batched16`: `dynamic_batching {}`, 16 requests gathered per round (groups form).

Short blocks of each are repeated and the median per-request time reported, so drift on a
shared machine shows up as spread rather than as a difference. `--tree DIR` imports the
server from another checkout (e.g. an extracted copy of an older commit) to compare
before and after in the same conditions.

Usage: .venv/bin/python scripts/bench_model_infer.py [--tree DIR] [--calls N] [--blocks B]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

CONFIG = """name: "m"
backend: "identity"
max_batch_size: {mbs}
input [ {{ name: "INPUT0" data_type: TYPE_FP32 dims: [ 16 ] }} ]
output [ {{ name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 16 ] }} ]
instance_group [ {{ kind: KIND_CPU count: 1 }} ]
{extra}"""

VARIANTS = {
    "direct": (0, "", 1),
    "batched": (8, "dynamic_batching { }\n", 1),
    "batched16": (8, "dynamic_batching { }\n", 16),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tree", type=Path, default=Path(__file__).resolve().parent.parent,
                        help="checkout whose server/ and backends/ to import")
    parser.add_argument("--calls", type=int, default=2000, help="requests per block")
    parser.add_argument("--blocks", type=int, default=15, help="blocks per variant")
    args = parser.parse_args()
    sys.path.insert(0, str(args.tree.resolve()))
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as mc

    import server.core.model as model_module
    from server.core.model import Model
    from server.types import InferenceRequest
    print(f"server from {Path(model_module.__file__).resolve().parent.parent.parent}")

    async def bench(name: str, mbs: int, extra: str, width: int) -> list[float]:
        folder = Path(tempfile.mkdtemp())
        (folder / "m" / "1").mkdir(parents=True)
        config = text_format.Parse(CONFIG.format(mbs=mbs, extra=extra), mc.ModelConfig())
        model = Model(config, folder / "m", 1)
        model.load()
        shape = (1, 16) if mbs else (16,)
        data = np.ones(shape, np.float32)

        def request(i: int) -> InferenceRequest:
            return InferenceRequest({"INPUT0": data}, 1, str(i), None, {})

        try:
            for i in range(500):  # warm: the cost tracker learns the model is cheap
                await model.infer(request(i))
            blocks = []
            rounds = args.calls // width
            for _ in range(args.blocks):
                start = time.perf_counter_ns()
                if width == 1:
                    for i in range(rounds):
                        await model.infer(request(i))
                else:
                    for _ in range(rounds):
                        await asyncio.gather(*[model.infer(request(j)) for j in range(width)])
                blocks.append((time.perf_counter_ns() - start) / (rounds * width) / 1000.0)
            return blocks
        finally:
            model.unload(5.0)

    for name, (mbs, extra, width) in VARIANTS.items():
        blocks = asyncio.run(bench(name, mbs, extra, width))
        print(f"{name:10s} median {statistics.median(blocks):6.2f} us/request  "
              f"min {min(blocks):6.2f}  max {max(blocks):6.2f}  ({len(blocks)} blocks of {args.calls})")


if __name__ == "__main__":
    main()
