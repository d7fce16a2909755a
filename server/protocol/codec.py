"""Wire <-> numpy. Decoding is zero-copy for fixed-size types (`np.frombuffer`
over `raw_input_contents`); encoding is one `tobytes` per output.

Every check a request needs happens here or in `TensorInfo.check_shape`, with
Triton's messages, before anything is queued.
"""

from __future__ import annotations

import math
import struct
from typing import Any

import numpy as np
from tritonclient.grpc import service_pb2 as pb

from server.core.model import Model
from server.core.signature import TensorInfo
from server.errors import InvalidInput
from server.types import InferenceRequest

_LEN = struct.Struct("<I")

# Which typed `contents` field carries each datatype (FP16/BF16 must be raw).
_CONTENTS_FIELD = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}


def decode_bytes_tensor(data: bytes, count: int, name: str) -> np.ndarray:
    """Split 4-byte-little-endian-length-prefixed elements into an object array."""
    size = len(data)
    if count * 4 > size:
        raise InvalidInput(
            f"unexpected total byte size {size} for BYTES input '{name}': {count} elements need at least "
            f"{count * 4} bytes of length prefixes"
        )
    out = np.empty(count, dtype=object)
    offset = 0
    unpack = _LEN.unpack_from
    for i in range(count):
        if offset + 4 > size:
            raise InvalidInput(f"malformed BYTES input '{name}': element {i} has no length prefix")
        (length,) = unpack(data, offset)
        offset += 4
        end = offset + length
        if end > size:
            raise InvalidInput(
                f"malformed BYTES input '{name}': element {i} claims {length} bytes but only "
                f"{size - offset} remain"
            )
        out[i] = data[offset:end]
        offset = end
    if offset != size:
        raise InvalidInput(
            f"malformed BYTES input '{name}': {size - offset} bytes left after {count} elements"
        )
    return out


def encode_bytes_tensor(arr: np.ndarray) -> bytes:
    """The inverse of `decode_bytes_tensor`; str elements are UTF-8 encoded."""
    pack = _LEN.pack
    parts: list[bytes] = []
    for value in arr.ravel():
        item = value if isinstance(value, bytes) else str(value).encode("utf-8")
        parts.append(pack(len(item)))
        parts.append(item)
    return b"".join(parts)


def _from_contents(tensor: Any, datatype: str, dtype: np.dtype, count: int, name: str) -> np.ndarray:
    field = _CONTENTS_FIELD.get(datatype)
    if field is None:
        raise InvalidInput(f"{datatype} input '{name}' must be sent in raw_input_contents, not contents")
    values = getattr(tensor.contents, field)
    if len(values) != count:
        raise InvalidInput(
            f"unexpected number of values for input '{name}': the shape needs {count}, "
            f"contents.{field} has {len(values)}"
        )
    if datatype == "BYTES":
        out = np.empty(count, dtype=object)
        out[:] = list(values)
        return out
    try:
        return np.array(values, dtype=dtype)
    except (OverflowError, ValueError) as exc:
        raise InvalidInput(f"input '{name}': contents.{field} values do not fit {datatype}: {exc}") from None


def decode_infer_request(msg: pb.ModelInferRequest, model: Model) -> InferenceRequest:
    """Check a ModelInferRequest against the model's config and view its tensors as numpy arrays."""
    raw = msg.raw_input_contents
    use_raw = len(raw) > 0
    specs = model.inputs
    tensors = msg.inputs
    if use_raw and len(raw) != len(tensors):
        raise InvalidInput(
            f"expected {len(tensors)} entries in raw_input_contents (one per input) for model "
            f"'{model.name}', got {len(raw)}"
        )
    inputs: dict[str, np.ndarray] = {}
    batch = 0
    accepted = model.wire_cache.setdefault("inputs", {})
    for index in range(len(tensors)):  # indexing a repeated field is faster than iterating it
        tensor = tensors[index]
        name = tensor.name
        shape = tuple(tensor.shape[:])  # slicing first is 2x faster than iterating the field
        key = (name, tensor.datatype, shape)
        known = accepted.get(key)
        if known is None:  # first time this (name, datatype, shape): check it against the config
            known = _accept(name, tensor.datatype, shape, model)
            if len(accepted) < _ACCEPTED_MAX:
                accepted[key] = known
        info, size, count = known
        if name in inputs:
            raise InvalidInput(f"input '{name}' appears more than once in the request")
        if batch and size != batch:
            raise InvalidInput(
                f"inputs of model '{model.name}' disagree on the batch size: '{name}' has {size}, "
                f"others have {batch}"
            )
        batch = size
        if use_raw:
            if tensor.HasField("contents"):
                raise InvalidInput(
                    f"contents field must not be specified when using raw_input_contents for '{name}' "
                    f"for model '{model.name}'"
                )
            data = raw[index]
            if info.itemsize:
                expected = count * info.itemsize
                if len(data) != expected:
                    raise InvalidInput(
                        f"unexpected total byte size {len(data)} for input '{name}', expecting {expected} "
                        f"for shape {list(shape)} of {info.datatype}"
                    )
                inputs[name] = np.ndarray(shape, info.dtype, data)  # a read-only view, no copy
            else:
                inputs[name] = decode_bytes_tensor(data, count, name).reshape(shape)
        elif tensor.HasField("contents"):
            inputs[name] = _from_contents(tensor, info.datatype, info.dtype, count, name).reshape(shape)
        else:
            raise InvalidInput(f"unable to find data for input tensor '{name}' for model '{model.name}'")
    if len(inputs) < len(specs) and (missing := [n for n, i in specs.items() if not i.optional and n not in inputs]):
        raise InvalidInput(
            f"expected {model.required_inputs} inputs but got {len(inputs)} inputs for model "
            f"'{model.name}'; missing {missing}"
        )
    outputs = msg.outputs
    wanted = _requested_outputs(outputs, model) if len(outputs) else None
    params: dict[str, Any] = {}
    if msg.parameters:
        params = {key: value.WhichOneof("parameter_choice") and getattr(value, value.WhichOneof(
            "parameter_choice")) for key, value in msg.parameters.items()}
    return InferenceRequest(inputs, batch or 1, msg.id, wanted, params)


# Per model, at most this many accepted (name, datatype, shape) triples are remembered.
_ACCEPTED_MAX = 256


def _accept(name: str, datatype: str, shape: tuple[int, ...], model: Model) -> tuple[TensorInfo, int, int]:
    """Check one input's name, datatype and shape against the config (Triton's messages);
    returns (its TensorInfo, its batch size, its element count)."""
    info = model.inputs.get(name)
    if info is None:
        raise InvalidInput(
            f"unexpected inference input '{name}' for model '{model.name}'; expected one of {list(model.inputs)}"
        )
    if datatype != info.datatype:
        raise InvalidInput(
            f"inference input '{name}' data-type is '{datatype}', but model '{model.name}' "
            f"expects '{info.datatype}'"
        )
    return info, info.check_shape(shape, model.name), math.prod(shape)


def _requested_outputs(outputs: Any, model: Model) -> tuple[str, ...]:
    names: list[str] = []
    for index in range(len(outputs)):
        out = outputs[index]
        name = out.name
        if name not in model.outputs:
            raise InvalidInput(
                f"unexpected inference output '{name}' for model '{model.name}'; "
                f"expected one of {list(model.outputs)}"
            )
        if "classification" in out.parameters:
            raise InvalidInput(f"output '{name}': the classification extension is not supported yet")
        if name in names:
            raise InvalidInput(f"output '{name}' is requested more than once")
        names.append(name)
    return tuple(names)


# Per model, at most this many response templates (one per distinct set of output shapes).
_TEMPLATES_MAX = 256


def encode_infer_response(model: Model, request_id: str, outputs: dict[str, np.ndarray]) -> pb.ModelInferResponse:
    """One raw_output_contents entry per output, in order (tritonclient relies on it).

    The metadata part (names, datatypes, shapes) is copied from a per-model template made
    the first time each set of output shapes is seen: copying a message is about twice as
    fast as building its fields one by one."""
    key: tuple[Any, ...] = ()
    for name, arr in outputs.items():
        key += (name, arr.shape)
    templates = model.wire_cache.setdefault("responses", {})
    template = templates.get(key)
    infos = model.outputs
    if template is None:
        template = pb.ModelInferResponse(model_name=model.name, model_version=model.version_str)
        for name, arr in outputs.items():
            template.outputs.add(name=name, datatype=infos[name].datatype, shape=arr.shape)
        if len(templates) < _TEMPLATES_MAX:
            templates[key] = template
    response = pb.ModelInferResponse()
    response.CopyFrom(template)
    if request_id:
        response.id = request_id
    raw = response.raw_output_contents
    for name, arr in outputs.items():
        raw.append(arr.tobytes() if infos[name].itemsize else encode_bytes_tensor(arr))
    return response
