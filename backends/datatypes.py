"""The one table of tensor datatypes: protocol names, config enum names, numpy dtypes.

It lives in `backends` (the lowest layer) so both the server and the backends use
the same table. BF16 has no numpy dtype; its elements travel as raw uint16 bit
patterns and only backends that understand BF16 accept it.
"""

from __future__ import annotations

import numpy as np

# protocol name -> numpy dtype (BYTES is an object array of `bytes`)
NUMPY_OF: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
    "BYTES": np.dtype(np.object_),
    "BF16": np.dtype("<u2"),
}

PROTOCOL_NAMES = frozenset(NUMPY_OF)


def config_to_protocol(type_name: str) -> str:
    """`TYPE_FP32` -> `FP32`; `TYPE_STRING` -> `BYTES` (Triton's naming)."""
    name = type_name[5:] if type_name.startswith("TYPE_") else type_name
    return "BYTES" if name == "STRING" else name


def protocol_to_config(name: str) -> str:
    """`FP32` -> `TYPE_FP32`; `BYTES` -> `TYPE_STRING`."""
    return "TYPE_STRING" if name == "BYTES" else "TYPE_" + name


def protocol_of_numpy(dtype: np.dtype) -> str:
    """The protocol name for a numpy dtype (uint16 is UINT16, never BF16)."""
    if dtype.kind in ("O", "S", "U"):
        return "BYTES"
    for name, candidate in NUMPY_OF.items():
        if name != "BF16" and candidate == dtype:
            return name
    raise ValueError(f"no protocol datatype for numpy dtype {dtype}")


def element_size(name: str) -> int:
    """Bytes per element on the wire; 0 for BYTES (variable length)."""
    return 0 if name == "BYTES" else NUMPY_OF[name].itemsize
