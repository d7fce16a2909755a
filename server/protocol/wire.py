"""Protobuf wire format for the inference messages, where protobuf's own classes copy too much.

A ModelInferRequest of 300 MB parsed by protobuf is copied into the parser's arena, and
copied again each time `raw_input_contents[i]` is read (a new `bytes` per access). Here
the request's tensor bytes (field 7, `raw_input_contents`) are cut out of the received
message as memoryviews, without a copy, and only the small rest (names, shapes,
parameters) goes through protobuf. Responses go the other way: the small part is
serialized by protobuf and each output's bytes are appended as field 6
(`raw_output_contents`) in one join. Protobuf parsers accept fields in any order and
concatenate repeated fields, so the result is the same message on the wire.

Everything here is pure and synchronous; malformed input raises InvalidInput.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from google.protobuf.message import DecodeError
from tritonclient.grpc import service_pb2 as pb

from server.errors import InvalidInput

# Below this size protobuf's C parser is faster than cutting fields out in Python.
SPLIT_THRESHOLD = 64 * 1024

_RAW_INPUT_TAG = (7 << 3) | 2  # ModelInferRequest.raw_input_contents, length-delimited
_RAW_OUTPUT_TAG = bytes([(6 << 3) | 2])  # ModelInferResponse.raw_output_contents
_INFER_RESPONSE_TAG = bytes([(2 << 3) | 2])  # ModelStreamInferResponse.infer_response


def _varint(data: memoryview, pos: int, end: int) -> tuple[int, int]:
    """Decode one base-128 varint at `pos`; returns (value, next position)."""
    result = shift = 0
    while True:
        if pos >= end:
            raise InvalidInput("malformed request: truncated varint")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise InvalidInput("malformed request: varint longer than 10 bytes")


_SMALL = [bytes((n,)) for n in range(128)]  # the one-byte varints


def encode_varint(value: int) -> bytes:
    if 0 <= value < 128:  # most lengths on the hot path (a streamed response's size): ~180 -> ~50 ns
        return _SMALL[value]
    out = bytearray()
    while True:
        low = value & 0x7F
        value >>= 7
        if value:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def parse_message(parse: Callable[[Any], Any], body: bytes | memoryview, what: str) -> Any:
    """`parse(body)` (a generated `FromString`) with protobuf's errors as a one-line InvalidInput."""
    try:
        return parse(body)
    except (DecodeError, RuntimeError, ValueError) as exc:  # upb raises DecodeError; be generous
        raise InvalidInput(f"malformed {what}: the body is not a valid protobuf message ({exc})") from None


def split_infer_request(body: bytes | memoryview) -> tuple[pb.ModelInferRequest, Sequence[bytes | memoryview]]:
    """Parse a serialized ModelInferRequest; returns (message without the raw tensors, raw tensors).

    Small messages go through protobuf as a whole (its raw_input_contents are then returned).
    Large ones are scanned field by field at the top level: each `raw_input_contents` entry
    becomes a memoryview into `body`, the other fields are parsed by protobuf.
    """
    if len(body) < SPLIT_THRESHOLD:
        message = parse_message(pb.ModelInferRequest.FromString, body, "ModelInferRequest")
        return message, message.raw_input_contents
    view = memoryview(body)
    end = len(view)
    pos = 0
    raw: list[memoryview] = []
    rest: list[memoryview] = []
    while pos < end:
        start = pos
        tag, pos = _varint(view, pos, end)
        wire_type = tag & 7
        if tag >> 3 == 0:
            raise InvalidInput("malformed ModelInferRequest: field number 0")
        if wire_type == 0:
            _, pos = _varint(view, pos, end)
        elif wire_type == 1:
            pos += 8
        elif wire_type == 5:
            pos += 4
        elif wire_type == 2:
            length, pos = _varint(view, pos, end)
            if pos + length > end:
                raise InvalidInput(
                    f"malformed ModelInferRequest: a field claims {length} bytes but only {end - pos} remain")
            if tag == _RAW_INPUT_TAG:
                raw.append(view[pos:pos + length])
                pos += length
                continue
            pos += length
        else:  # groups (3, 4) and the unused types 6, 7 never appear in this message
            raise InvalidInput(f"malformed ModelInferRequest: unexpected wire type {wire_type}")
        if pos > end:
            raise InvalidInput("malformed ModelInferRequest: truncated field")
        rest.append(view[start:pos])
    message = parse_message(pb.ModelInferRequest.FromString, b"".join(rest), "ModelInferRequest")
    return message, raw


def infer_response_parts(header: bytes, raw: Sequence[bytes | memoryview]) -> list[bytes | memoryview]:
    """A ModelInferResponse as pieces to join: its serialized metadata, then one
    `raw_output_contents` field per output, in order."""
    parts: list[bytes | memoryview] = [header]
    for data in raw:
        parts.append(_RAW_OUTPUT_TAG)
        parts.append(encode_varint(len(data)))
        parts.append(data)
    return parts


def wrap_stream_response(parts: list[bytes | memoryview]) -> list[bytes | memoryview]:
    """Pieces of a ModelInferResponse -> pieces of ModelStreamInferResponse{infer_response}."""
    size = sum(map(len, parts))  # per streamed response: map is ~2x faster than a generator here
    return [_INFER_RESPONSE_TAG, encode_varint(size), *parts]
