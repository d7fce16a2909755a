#!/usr/bin/env python3
"""Generate `mlp_heavy`, the compute-bound benchmark model, into a repository folder.

FP32 MLP 256 -> 4096 -> 4096 -> 256 (about 72 MB of weights, larger than this machine's
cache, so a batch of 8 costs far less than 8 batches of 1: ~4 ms at batch 1, ~7 ms at
batch 8 on one thread here). Too large to commit; generate it where you benchmark:

    .venv/bin/python scripts/gen_heavy_model.py --out /tmp/heavy [--delay-us 5000]
    scripts/bench --model mlp_heavy --model-repository /tmp/heavy --targets nereid ...

`--width 8192 --name mlp_wide` makes the heavier twin (~260 MB; ~15 ms at batch 1, ~24 ms
at batch 8, ~1.7 ms per row at batch 64), whose compute per row is several times the
frontend's per-request cost.

ONNX IR version 10 and opset 17 are pinned (the onnx package writes an IR version newer
than onnxruntime reads).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

WIDTH = 4096
FEATURES = 256


def build(width: int = WIDTH, name: str = "mlp_heavy") -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    weights = {
        "W0": (rng.standard_normal((FEATURES, width)) * 0.05).astype(np.float32),
        "W1": (rng.standard_normal((width, width)) * 0.01).astype(np.float32),
        "W2": (rng.standard_normal((width, FEATURES)) * 0.01).astype(np.float32),
    }
    nodes = [
        helper.make_node("MatMul", ["INPUT0", "W0"], ["h0"]),
        helper.make_node("Relu", ["h0"], ["r0"]),
        helper.make_node("MatMul", ["r0", "W1"], ["h1"]),
        helper.make_node("Relu", ["h1"], ["r1"]),
        helper.make_node("MatMul", ["r1", "W2"], ["OUTPUT0"]),
    ]
    graph = helper.make_graph(
        nodes, name,
        [helper.make_tensor_value_info("INPUT0", TensorProto.FLOAT, ["batch", FEATURES])],
        [helper.make_tensor_value_info("OUTPUT0", TensorProto.FLOAT, ["batch", FEATURES])],
        [numpy_helper.from_array(w, name) for name, w in weights.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    return model


def config(delay_us: int, instances: int, width: int = WIDTH, name: str = "mlp_heavy") -> str:
    batching = f"dynamic_batching {{ max_queue_delay_microseconds: {delay_us} }}\n" if delay_us >= 0 else ""
    return (
        f"# {name}: compute-bound FP32 MLP {FEATURES} -> {width} -> {width} -> {FEATURES} (gen_heavy_model.py)\n"
        f'name: "{name}"\nplatform: "onnxruntime_onnx"\nmax_batch_size: 64\n'
        f'input [ {{ name: "INPUT0" data_type: TYPE_FP32 dims: [ {FEATURES} ] }} ]\n'
        f'output [ {{ name: "OUTPUT0" data_type: TYPE_FP32 dims: [ {FEATURES} ] }} ]\n'
        f"instance_group [ {{ count: {instances} kind: KIND_CPU }} ]\n" + batching
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="repository folder to write mlp_heavy into")
    parser.add_argument("--delay-us", type=int, default=-1,
                        help="add dynamic_batching with this max_queue_delay_microseconds (default: none)")
    parser.add_argument("--instances", type=int, default=1)
    parser.add_argument("--width", type=int, default=WIDTH,
                        help=f"hidden width (default {WIDTH}); 8192 makes mlp_wide, ~260 MB, ~15 ms at batch 1")
    parser.add_argument("--name", default="mlp_heavy", help="model name (default mlp_heavy)")
    args = parser.parse_args()
    model_dir = args.out / args.name
    (model_dir / "1").mkdir(parents=True, exist_ok=True)
    onnx.save(build(args.width, args.name), str(model_dir / "1" / "model.onnx"))
    (model_dir / "config.pbtxt").write_text(config(args.delay_us, args.instances, args.width, args.name),
                                            encoding="utf-8")
    print(f"wrote {model_dir}")


if __name__ == "__main__":
    main()
