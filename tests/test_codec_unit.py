"""Unit tests (no server) for the BYTES wire codec in server/protocol/codec.py."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from tritonclient.utils import deserialize_bytes_tensor, serialize_byte_tensor

from server.errors import ErrorCode, InvalidInput
from server.protocol.codec import decode_bytes_tensor, encode_bytes_tensor


def wire(items: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(i)) + i for i in items)


SAMPLES = [b"", b"a", b"\xff\xfe\x00", "h\u00e9llo".encode(), b"x" * 1000, b"", b"\x00"]


def test_roundtrip_known_items() -> None:
    arr = np.empty(len(SAMPLES), dtype=np.object_)
    arr[:] = SAMPLES
    data = encode_bytes_tensor(arr)
    assert data == wire(SAMPLES)
    decoded = decode_bytes_tensor(data, len(SAMPLES), "X")
    assert decoded.dtype == np.object_
    assert decoded.shape == (len(SAMPLES),)
    assert list(decoded) == SAMPLES
    assert all(isinstance(v, bytes) for v in decoded)


@pytest.mark.parametrize("seed", range(5))
def test_roundtrip_random(seed: int) -> None:
    rng = np.random.default_rng(seed)
    items = [rng.bytes(int(n)) for n in rng.integers(0, 300, size=int(rng.integers(1, 50)))]
    arr = np.empty(len(items), dtype=np.object_)
    arr[:] = items
    data = encode_bytes_tensor(arr)
    assert len(data) == 4 * len(items) + sum(len(i) for i in items)
    assert list(decode_bytes_tensor(data, len(items), "X")) == items


def test_matches_tritonclient_serialization() -> None:
    arr = np.array([[b"ab", b""], [b"\x80", b"zzz"]], dtype=np.object_)
    ours = encode_bytes_tensor(arr)
    theirs = serialize_byte_tensor(arr).item()
    assert ours == theirs
    assert list(deserialize_bytes_tensor(ours)) == [b"ab", b"", b"\x80", b"zzz"]
    assert list(decode_bytes_tensor(theirs, 4, "X")) == [b"ab", b"", b"\x80", b"zzz"]


def test_encode_flattens_row_major_and_encodes_str_as_utf8() -> None:
    arr = np.array([["a", "\u00e9"], ["c", ""]], dtype=np.object_)
    assert encode_bytes_tensor(arr) == wire([b"a", "\u00e9".encode(), b"c", b""])


def test_empty_tensor() -> None:
    assert encode_bytes_tensor(np.empty(0, dtype=np.object_)) == b""
    decoded = decode_bytes_tensor(b"", 0, "X")
    assert decoded.shape == (0,)


MALFORMED = {
    "truncated_length_prefix": (wire([b"ab"]) + b"\x01\x00", 2),
    "prefix_only_partial": (b"\x03\x00", 1),
    "no_data": (b"", 1),
    "length_beyond_end": (struct.pack("<I", 10) + b"abc", 1),
    "max_length": (struct.pack("<I", 2**32 - 1) + b"abc", 1),
    "trailing_bytes": (wire([b"abc"]) + b"xyz", 1),
    "trailing_full_element": (wire([b"a", b"b"]), 1),
    "data_for_zero_elements": (wire([b"a"]), 0),
    "too_few_elements": (wire([b"a", b"b"]), 3),
}


@pytest.mark.parametrize("data,count", MALFORMED.values(), ids=list(MALFORMED))
def test_malformed_raises_invalid_input_naming_the_tensor(data: bytes, count: int) -> None:
    with pytest.raises(InvalidInput) as info:
        decode_bytes_tensor(data, count, "MY_INPUT")
    assert "MY_INPUT" in str(info.value)
    assert info.value.code is ErrorCode.INVALID_ARGUMENT
