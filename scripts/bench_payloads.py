"""Payload and cache rows for scripts/bench (issue 13), each pair side by side in one run:

- `nereid-16mib-inline` / `nereid-16mib-shm`: an identity model with one 16 MiB FP32 input
  (and output), its tensors inside the gRPC message vs in system shared memory
  (perf_analyzer `--shared-memory system --output-shared-memory-size 16777216`);
- `nereid-cache-hit` / `nereid-cache-miss`: a small identity model with
  `response_cache { enable: true }` and `--cache-config local,size=65536`. Hits: perf_analyzer
  sends the same (zero) tensor every time, so all but the first request is served from the
  cache. Misses: it cycles through MISS_VARIANTS distinct tensors (an `--input-data` JSON
  file), more than the cache holds (about 340 entries of 64 bytes + 128 overhead), so LRU
  has always evicted a tensor before it comes round again: every request is a miss (lookup,
  execution and insertion).

The models are generated into bench-out/<run>/repos/payloads/ (no files in the repository).
"""

from __future__ import annotations

import json
from pathlib import Path

BIG_ELEMENTS = 4 * 1024 * 1024  # FP32: 16 MiB
BIG_BYTES = BIG_ELEMENTS * 4
SMALL_ELEMENTS = 16
CACHE_BYTES = 65536
MISS_VARIANTS = 1024

PAYLOAD_TARGETS = ("nereid-16mib-inline", "nereid-16mib-shm", "nereid-cache-hit", "nereid-cache-miss")
MODELS = {"nereid-16mib-inline": "big", "nereid-16mib-shm": "big",
          "nereid-cache-hit": "cached", "nereid-cache-miss": "cached"}


def _identity(name: str, elements: int, extra: str = "") -> str:
    return (f'name: "{name}"\nbackend: "identity"\nmax_batch_size: 0\n'
            f'input [ {{ name: "INPUT0" data_type: TYPE_FP32 dims: [ {elements} ] }} ]\n'
            f'output [ {{ name: "OUTPUT0" data_type: TYPE_FP32 dims: [ {elements} ] }} ]\n' + extra)


def make_payload_repo(directory: Path) -> Path:
    """Write the two models and the miss target's input data; return the repository."""
    repo = directory / "repos" / "payloads"
    for name, config in (("big", _identity("big", BIG_ELEMENTS)),
                         ("cached", _identity("cached", SMALL_ELEMENTS, "response_cache { enable: true }\n"))):
        (repo / name / "1").mkdir(parents=True, exist_ok=True)
        (repo / name / "config.pbtxt").write_text(config)
    data = {"data": [{"INPUT0": [float(i)] + [0.0] * (SMALL_ELEMENTS - 1)} for i in range(MISS_VARIANTS)]}
    (repo / "cache-miss-inputs.json").write_text(json.dumps(data))
    return repo


def server_args(target: str) -> list[str]:
    return ["--cache-config", f"local,size={CACHE_BYTES}"] if target.startswith("nereid-cache-") else []


def perf_analyzer_args(target: str, repo: Path) -> list[str]:
    if target == "nereid-16mib-shm":
        return ["--shared-memory", "system", "--output-shared-memory-size", str(BIG_BYTES)]
    if target == "nereid-cache-hit":
        return ["--input-data", "zero"]
    if target == "nereid-cache-miss":
        return ["--input-data", str(repo / "cache-miss-inputs.json")]
    return []
