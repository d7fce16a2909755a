"""The model config as Triton's Python models see it, and back.

Python models read `args["model_config"]` as Triton writes it: every field present
(`config["input"]` exists even when empty, `max_batch_size` even when 0) and int64
fields as JSON numbers, where protobuf's own JSON writer would give strings.
"""

from __future__ import annotations

import json
from typing import Any

from google.protobuf import json_format
from tritonclient.grpc import model_config_pb2 as mc

from backends.base import Signature, TensorSpec
from backends.datatypes import config_to_protocol

# int64 fields that protobuf's JSON writes as strings; Triton's model_config JSON has numbers.
_INT64_KEYS = frozenset({
    "dims", "shape", "max_queue_delay_microseconds", "default_timeout_microseconds", "priority_levels",
    "default_priority_level", "max_sequence_idle_microseconds", "versions", "batch_size", "count",
    "model_version", "max_candidate_sequences", "priority",
})


def _numbers(value: Any, key: str = "") -> Any:
    if isinstance(value, dict):
        return {k: _numbers(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [_numbers(v, key) for v in value]
    if key in _INT64_KEYS and isinstance(value, str) and value.lstrip("-").isdigit():
        return int(value)
    return value


def triton_config_json(config_json: str) -> str:
    """The config as Triton gives it to Python models: every field present, numbers as numbers."""
    config = mc.ModelConfig()
    json_format.Parse(config_json, config, ignore_unknown_fields=True)
    as_dict = json_format.MessageToDict(
        config, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    return json.dumps(_numbers(as_dict))


def config_signature(config: dict[str, Any]) -> Signature:
    """The auto-completed config as a Signature (batch dim -1 first when it batches)."""
    mbs = int(config.get("max_batch_size", 0))
    lead = (-1,) if mbs > 0 else ()

    def specs(entries: list[dict[str, Any]]) -> tuple[TensorSpec, ...]:
        return tuple(
            TensorSpec(e["name"], config_to_protocol(str(e["data_type"])), lead + tuple(int(d) for d in e["dims"]))
            for e in entries
        )

    return Signature(specs(config.get("input", [])), specs(config.get("output", [])), max_batch_size=mbs)
