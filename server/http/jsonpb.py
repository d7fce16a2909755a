"""Protobuf messages as Triton's HTTP JSON: field names as in the .proto, every field printed,
and 64-bit integers as JSON numbers (protobuf's JSON mapping writes them as strings; Triton's
HTTP answers, and tritonclient.http's users, expect numbers: `"dims": [16]`)."""

from __future__ import annotations

from typing import Any

from google.protobuf import json_format
from google.protobuf.descriptor import FieldDescriptor

_INT64 = {FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_SINT64,
          FieldDescriptor.TYPE_FIXED64, FieldDescriptor.TYPE_SFIXED64}


def to_json(message: Any) -> dict[str, Any]:
    out = json_format.MessageToDict(message, preserving_proto_field_name=True,
                                    always_print_fields_with_no_presence=True)
    _fix(message.DESCRIPTOR, out)
    return out


def _fix(descriptor: Any, data: dict[str, Any]) -> None:
    """Turn the 64-bit integers protobuf wrote as strings back into numbers, walking the descriptor."""
    for field in descriptor.fields:
        value = data.get(field.name)
        if value is None:
            continue
        if field.type in _INT64:
            if isinstance(value, list):
                data[field.name] = [int(v) for v in value]
            elif isinstance(value, str):
                data[field.name] = int(value)
        elif field.type == FieldDescriptor.TYPE_MESSAGE:
            sub = field.message_type
            if sub.GetOptions().map_entry:
                value_field = sub.fields_by_name["value"]
                for key in list(value):
                    if value_field.type == FieldDescriptor.TYPE_MESSAGE:
                        _fix(value_field.message_type, value[key])
                    elif value_field.type in _INT64:
                        value[key] = int(value[key])
            elif isinstance(value, list):
                for item in value:
                    if isinstance(item, dict):
                        _fix(sub, item)
            elif isinstance(value, dict):
                _fix(sub, value)
