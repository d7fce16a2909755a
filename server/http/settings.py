"""Triton's HTTP JSON for the shared-memory, trace-setting and log-setting extensions <-> the
gRPC messages the servicer's own handlers take, so both transports share one registry, one
tracer and one log state, with the same checks and messages. The JSON shapes follow Triton's
server/src/http_server.cc (`HandleSystemSharedMemory`, `HandleTrace`, `HandleLogging`)."""

from __future__ import annotations

import base64
from typing import Any

from tritonclient.grpc import service_pb2 as pb

from server.errors import InvalidInput


def register_request(name: str, doc: dict[str, Any]) -> pb.SystemSharedMemoryRegisterRequest:
    """`{"key": str, "offset": uint (optional), "byte_size": uint}`, Triton's messages when a
    field is missing or of the wrong type."""
    if not name:
        raise InvalidInput("'region name' is necessary to register system shared memory region")
    if "key" not in doc:
        raise InvalidInput("Shared memory register request has no 'key' field")
    key = doc["key"]
    if not isinstance(key, str):
        raise InvalidInput("Shared memory register request: 'key' must be a string")
    if "byte_size" not in doc:
        raise InvalidInput("Shared memory register request has no 'byte_size' field")
    return pb.SystemSharedMemoryRegisterRequest(name=name, key=key, offset=_uint(doc, "offset", 0),
                                                byte_size=_uint(doc, "byte_size", 0))


def cuda_register_request(name: str, doc: dict[str, Any]) -> pb.CudaSharedMemoryRegisterRequest:
    """`{"raw_handle": {"b64": str}, "device_id": uint, "byte_size": uint}` (tritonclient.http's
    register_cuda_shared_memory sends the handle's 64 bytes base64-encoded)."""
    if not name:
        raise InvalidInput("'region name' is necessary to register cuda shared memory region")
    for key in ("raw_handle", "device_id", "byte_size"):
        if key not in doc:
            raise InvalidInput(f"Shared memory register request has no '{key}' field")
    handle = doc["raw_handle"]
    if not isinstance(handle, dict) or not isinstance(handle.get("b64"), str):
        raise InvalidInput("Shared memory register request: 'raw_handle' must be {\"b64\": <base64 string>}")
    try:
        raw = base64.b64decode(handle["b64"], validate=True)
    except ValueError:
        raise InvalidInput("Shared memory register request: 'raw_handle' 'b64' is not valid base64") from None
    return pb.CudaSharedMemoryRegisterRequest(name=name, raw_handle=raw, device_id=_uint(doc, "device_id", 0),
                                              byte_size=_uint(doc, "byte_size", 0))


def cuda_status_json(response: pb.CudaSharedMemoryStatusResponse) -> list[dict[str, Any]]:
    """Triton's HTTP status answer for CUDA regions: a JSON array of {name, device_id, byte_size}."""
    return [{"name": r.name, "device_id": r.device_id, "byte_size": r.byte_size}
            for r in sorted(response.regions.values(), key=lambda r: r.name)]


def _uint(doc: dict[str, Any], key: str, default: int) -> int:
    value = doc.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0 or value >= 1 << 64:
        raise InvalidInput(f"Shared memory register request: '{key}' must be an unsigned integer, got "
                           f"{value!r}")
    return value


def status_json(response: pb.SystemSharedMemoryStatusResponse) -> list[dict[str, Any]]:
    """Triton's HTTP status answer: a JSON array of {name, key, offset, byte_size}."""
    return [{"name": r.name, "key": r.key, "offset": r.offset, "byte_size": r.byte_size}
            for r in sorted(response.regions.values(), key=lambda r: r.name)]


def trace_request(model: str, doc: dict[str, Any]) -> pb.TraceSettingRequest:
    """Triton's trace JSON: `trace_level` an array of strings, the others strings; null clears
    a setting (a model's override, or a global one back to its startup value)."""
    message = pb.TraceSettingRequest(model_name=model)
    for key, value in doc.items():
        entry = message.settings[key]  # present with no values: cleared
        if value is None:
            continue
        values = value if isinstance(value, list) else [value]
        if not all(isinstance(v, str) for v in values):
            raise InvalidInput(f"trace setting '{key}' expects a string (or, for 'trace_level', an array of "
                               f"strings), got {value!r}")
        entry.value.extend(values)
    return message


def trace_json(response: pb.TraceSettingResponse) -> dict[str, Any]:
    """`trace_level` as an array, every other setting as its one string, as Triton answers."""
    out: dict[str, Any] = {}
    for key, entry in response.settings.items():
        values = list(entry.value)
        out[key] = values if key == "trace_level" or len(values) != 1 else values[0]
    return out


def log_request(doc: dict[str, Any]) -> pb.LogSettingsRequest:
    """Triton's log JSON: booleans, `log_verbose_level` an unsigned integer, `log_format` a
    string; a null value leaves that setting as it is (Triton skips it)."""
    message = pb.LogSettingsRequest()
    for key, value in doc.items():
        if value is None:
            continue
        param = message.settings[key]
        if isinstance(value, bool):
            param.bool_param = value
        elif isinstance(value, int):
            if value < 0 or value >= 1 << 32:
                raise InvalidInput(f"expect unsigned integer for '{key}', got {value}")
            param.uint32_param = value
        elif isinstance(value, str):
            param.string_param = value
        else:
            raise InvalidInput(f"log setting '{key}' expects a boolean, an unsigned integer or a string, got "
                               f"{value!r}")
    return message


def log_json(response: pb.LogSettingsResponse) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, param in response.settings.items():
        which = param.WhichOneof("parameter_choice")
        out[key] = getattr(param, which) if which else None
    return out
