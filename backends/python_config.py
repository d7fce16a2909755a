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

from backends.base import Device, ModelSpec, Signature, TensorSpec
from backends.datatypes import config_to_protocol

# Request parameters Triton takes for itself: the model sees them as correlation_id() and flags().
_SEQUENCE_KEYS = ("sequence_id", "sequence_start", "sequence_end")

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


def initialize_args(spec: ModelSpec, device: Device, config_json: str) -> dict[str, str]:
    """The `args` dict `initialize(args)` receives, as Triton builds it (every value a string);
    `config_json` is `triton_config_json(spec.config_json)`."""
    return {
        "model_config": config_json,
        "model_instance_kind": "GPU" if device.kind == "GPU" else "CPU",
        "model_instance_name": spec.instance_name or spec.name,
        "model_instance_device_id": str(device.device_id),
        "model_repository": str(spec.model_dir),
        "model_version": str(spec.version),
        "model_name": spec.name,
    }


def request_parameters(parameters: Any) -> tuple[str, Any, int]:
    """A request's parameters as the model reads them: (`parameters()` JSON text, `correlation_id()`,
    `flags()`); the sequence batcher's keys become the correlation id and the sequence flags."""
    if not parameters:
        return "{}", 0, 0
    given = dict(parameters)
    correlation_id, flags = 0, 0
    if any(key in given for key in _SEQUENCE_KEYS):
        correlation_id = given.pop("sequence_id", 0)
        first, last = given.pop("sequence_start", False), given.pop("sequence_end", False)
        flags = (1 if first else 0) | (2 if last else 0)  # TRITONSERVER_REQUEST_FLAG_SEQUENCE_*
    return json.dumps(given, default=str), correlation_id, flags
