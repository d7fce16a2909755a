"""Wire <-> numpy. Decoding is zero-copy for fixed-size types (`np.ndarray` over the
request's tensor bytes, which wire.py cuts out of the received message without a copy);
encoding builds the response bytes directly: a cached serialized header per set of
output shapes, then one length-prefixed field per output.

Every check a request needs happens here or in `TensorInfo.check_shape`, with Triton's
messages (server/src/grpc/infer_handler.cc and core/src/infer_request.cc), before
anything is queued.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from typing import Any

import numpy as np
from tritonclient.grpc import service_pb2 as pb

from server.core.classification import ClassifiedOutputs, class_count
from server.core.model import Model
from server.core.shm_registry import SharedMemoryRegistry
from server.core.signature import TensorInfo
from server.errors import InvalidInput
from server.protocol.parameters import encode_response_parameters, request_parameters
from server.protocol.shm_tensors import REGION, OutputSlot, output_slot, read_input, shm_params
from server.protocol.wire import encode_varint
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
# The datatype each typed field carries, for Triton's "of type 'X'" message.
_FIELD_TYPE = {"bool_contents": "BOOL", "int_contents": "INT32", "int64_contents": "INT64",
               "uint_contents": "UINT32", "uint64_contents": "UINT64", "fp32_contents": "FP32",
               "fp64_contents": "FP64", "bytes_contents": "BYTES"}


def decode_bytes_tensor(data: bytes | memoryview, count: int, name: str, model: str = "") -> np.ndarray:
    """Split 4-byte-little-endian-length-prefixed elements into an object array of bytes."""
    size = len(data)
    if count * 4 > size:  # before allocating: a huge shape with a tiny body must not cost memory
        raise InvalidInput(
            f"expected {count} string elements for inference input '{name}' for model '{model}', got fewer: "
            f"{count} elements need at least {count * 4} bytes of length prefixes, the input has {size} bytes")
    out = np.empty(count, dtype=object)
    offset = 0
    unpack = _LEN.unpack_from
    view = isinstance(data, memoryview)
    for i in range(count):
        if offset + 4 > size:
            if offset == size:  # cleanly ran out of elements
                raise InvalidInput(
                    f"expected {count} string elements for inference input '{name}' for model '{model}', got {i}")
            raise InvalidInput(f"malformed BYTES input '{name}' for model '{model}': element {i} has a "
                               f"truncated 4-byte length prefix")
        (length,) = unpack(data, offset)
        offset += 4
        end = offset + length
        if end > size:
            raise InvalidInput(
                f"malformed BYTES input '{name}' for model '{model}': element {i} claims {length} bytes but only "
                f"{size - offset} remain"
            )
        out[i] = data[offset:end].tobytes() if view else data[offset:end]  # type: ignore[union-attr]
        offset = end
    if offset != size:
        raise InvalidInput(
            f"unexpected number of string elements {count + 1} for inference input '{name}' for model '{model}', "
            f"expecting {count}"
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


def _from_contents(tensor: Any, info: TensorInfo, count: int, model: str) -> np.ndarray:
    name, datatype = info.name, info.datatype
    present = [field.name for field, _ in tensor.contents.ListFields()]
    expected = _CONTENTS_FIELD.get(datatype)
    if len(present) > 1:
        raise InvalidInput(f"unexpected explicit tensor data for input tensor '{name}' for model '{model}', "
                           f"binary data was already supplied.")
    if present and present[0] != expected:
        raise InvalidInput(f"unexpected explicit tensor data for input tensor '{name}' for model '{model}' of type "
                           f"'{_FIELD_TYPE[present[0]]}', expected datatype '{datatype}'")
    if expected is None:
        raise InvalidInput(f"{datatype} input '{name}' for model '{model}' must be sent in raw_input_contents, "
                           "not contents")
    values = getattr(tensor.contents, expected)
    if len(values) != count:
        if datatype == "BYTES":
            raise InvalidInput(f"expected {count} string elements for inference input '{name}' for model "
                               f"'{model}', got {len(values)}")
        raise InvalidInput(f"input byte size mismatch for input '{name}' for model '{model}'. Expected "
                           f"{count * info.itemsize}, got {len(values) * info.itemsize}")
    if datatype == "BYTES":
        out = np.empty(count, dtype=object)
        out[:] = list(values)
        return out
    try:
        return np.array(values, dtype=info.dtype)
    except (OverflowError, ValueError) as exc:
        raise InvalidInput(f"input '{name}': contents.{expected} values do not fit {datatype}: {exc}") from None


def _count_error(model: Model, given: list[str]) -> InvalidInput:
    """Triton's message for too few or too many inputs (core/src/infer_request.cc `Normalize`)."""
    total, required = len(model.inputs), model.required_inputs
    missing = [n for n, i in model.inputs.items() if not i.optional and n not in given]
    expected = f"{total} inputs" if total == required else f"number of inputs between {required} and {total}"
    return InvalidInput(
        f"expected {expected} but got {len(given)} inputs for model '{model.name}'. Got input(s) "
        f"[{','.join(repr(n) for n in given)}], but missing required input(s) "
        f"[{','.join(repr(n) for n in missing)}]. Please provide all required input(s)."
    )


def decode_infer_request(
    msg: pb.ModelInferRequest, model: Model, raw: Sequence[bytes | memoryview] | None = None,
    shm: SharedMemoryRegistry | None = None,
) -> InferenceRequest:
    """Check a ModelInferRequest against the model's config and view its tensors as numpy arrays.

    `raw` is the request's raw_input_contents (wire.split_infer_request cuts them out of large
    messages as memoryviews); None reads them from `msg`. `shm` holds the registered shared
    memory regions that tensors may name (shm_tensors.py). Inputs are checked last to first:
    when several are wrong, Triton names the last one, and clients' tests expect that.
    """
    if raw is None:
        raw = msg.raw_input_contents
    params: dict[str, Any] = request_parameters(msg.parameters) if msg.parameters else {}
    tensors = msg.inputs
    count_in = len(tensors)
    if count_in > len(model.inputs) or count_in < model.required_inputs:
        raise _count_error(model, [t.name for t in tensors])
    use_raw = len(raw) > 0
    raw_at: list[int] | None = None  # each input's raw entry, when some inputs are in shared memory
    if use_raw and len(raw) != count_in:
        raw_at = _raw_positions(tensors, len(raw), model.name)
    regions = shm or _NO_REGIONS
    inputs: dict[str, np.ndarray] = {}
    batch = 0
    accepted = model.wire_cache.setdefault("inputs", {})
    plain = model.wire_cache.setdefault("plain_inputs", {})
    for index in range(count_in - 1, -1, -1):  # indexing a repeated field is faster than iterating it
        tensor = tensors[index]
        # An input already accepted that has no parameters and no contents (the common case) is
        # found by its serialized bytes: one protobuf call instead of reading its name, datatype,
        # shape, parameters and contents one by one (measured ~600 -> ~250 ns per input).
        serialized = tensor.SerializeToString()
        seen = plain.get(serialized)
        if seen is not None:
            name, shape, info, size, count = seen
        else:
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
            raise InvalidInput(f"input '{name}' already exists in request")
        if batch and size != batch:
            raise InvalidInput(f"input '{name}' batch size does not match other inputs for '{model.name}'")
        batch = size
        if seen is None and tensor.parameters and (where := shm_params(tensor.parameters, name)) is not None:
            if tensor.HasField("contents"):
                raise InvalidInput(f"unexpected 'content' provided when using shared memory for input tensor "
                                   f"'{name}' for model '{model.name}'")
            if use_raw and raw_at is None:  # every input had a raw entry: one too many
                raw_at = _raw_positions(tensors, len(raw), model.name)
            inputs[name] = read_input(regions, where, info, shape, count, model.name, decode_bytes_tensor)
        elif use_raw:
            if seen is None:
                if tensor.HasField("contents"):
                    raise InvalidInput(
                        f"contents field must not be specified when using raw_input_contents for '{name}' "
                        f"for model '{model.name}'"
                    )
                if not tensor.parameters and len(serialized) <= _PLAIN_MAX_BYTES and len(plain) < _ACCEPTED_MAX:
                    plain[serialized] = (name, shape, info, size, count)
            data = raw[index if raw_at is None else raw_at[index]]
            if info.itemsize:
                expected = count * info.itemsize
                if len(data) != expected:
                    raise InvalidInput(
                        f"input byte size mismatch for input '{name}' for model '{model.name}'. Expected "
                        f"{expected}, got {len(data)}"
                    )
                if info.datatype == "BOOL" and expected and np.frombuffer(data, np.uint8).max() > 1:
                    raise InvalidInput(
                        f"input '{name}' for model '{model.name}': BOOL elements must be bytes 0 or 1")
                inputs[name] = np.ndarray(shape, info.dtype, data)  # a read-only view, no copy
            else:
                inputs[name] = decode_bytes_tensor(data, count, name, model.name).reshape(shape)
        elif seen is None and tensor.HasField("contents"):
            inputs[name] = _from_contents(tensor, info, count, model.name).reshape(shape)
        else:
            raise InvalidInput(f"unable to find data for input tensor '{name}' for model '{model.name}' in request.")
    if len(inputs) < len(model.inputs):
        if any(not i.optional and n not in inputs for n, i in model.inputs.items()):
            raise _count_error(model, [t.name for t in tensors])
    if count_in > 1:  # back to request order (some Python models look at the order)
        inputs = dict(reversed(inputs.items()))
    outputs = msg.outputs
    wanted, classes, slots = _requested_outputs(outputs, model, regions) if len(outputs) else (None, None, None)
    request = InferenceRequest(inputs, batch or 1, msg.id, wanted, params)
    if classes:
        request.classification = classes
    if slots:
        request.shm_outputs = slots
    return request


_NO_REGIONS = SharedMemoryRegistry()  # for callers without a registry: every region is unknown


def _raw_positions(tensors: Any, given: int, model: str) -> list[int]:
    """Which raw_input_contents entry each input reads: inputs in shared memory have none
    (as in Triton, the entries belong to the other inputs, in order)."""
    positions: list[int] = []
    at = 0
    for index in range(len(tensors)):
        tensor = tensors[index]
        in_shm = bool(tensor.parameters) and REGION in tensor.parameters
        positions.append(-1 if in_shm else at)
        at += not in_shm
    if at != given:
        raise InvalidInput(
            f"expected {at} entries in raw_input_contents (one per input not in shared memory) for model "
            f"'{model}', got {given}"
        )
    return positions


# Per model, at most this many accepted (name, datatype, shape) triples are remembered (and as many
# serialized inputs without parameters or contents).
_ACCEPTED_MAX = 256
# A serialized input or output is remembered only up to this size: a name, a datatype and a few
# dimensions take far less, and what is longer carries unknown fields a client added, which must
# not stay in memory after its request.
_PLAIN_MAX_BYTES = 256


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


def _requested_outputs(
    outputs: Any, model: Model, regions: SharedMemoryRegistry
) -> tuple[tuple[str, ...], dict[str, int] | None, dict[str, OutputSlot] | None]:
    """The requested outputs' names, the class count of those asking for classification, and
    where those to be written to shared memory go.

    One output asked for plainly (no classification, no shared memory: the common case) is
    remembered by its serialized bytes, as inputs are (~640 -> ~400 ns)."""
    serialized = b""
    if len(outputs) == 1:
        serialized = outputs[0].SerializeToString()
        known = model.wire_cache.get("plain_outputs", _NO_OUTPUTS).get(serialized)
        if known is not None:
            return known, None, None
    names: list[str] = []
    classes: dict[str, int] | None = None
    slots: dict[str, OutputSlot] | None = None
    for index in range(len(outputs)):
        out = outputs[index]
        name = out.name
        if name not in model.outputs:
            raise InvalidInput(
                f"unexpected inference output '{name}' for model '{model.name}'; "
                f"expected one of {list(model.outputs)}"
            )
        if out.parameters:
            where = shm_params(out.parameters, name)
            if where is not None:
                if "classification" in out.parameters:
                    raise InvalidInput("output can't set both 'shared_memory_region' and 'classification'")
                slots = slots or {}
                slots[name] = output_slot(regions, where)
            if "classification" in out.parameters:
                classes = classes or {}
                classes[name] = class_count(out.parameters["classification"], model.outputs[name], model.name)
        if name in names:
            raise InvalidInput(f"output '{name}' is requested more than once")
        names.append(name)
    wanted = tuple(names)
    if serialized and classes is None and slots is None and len(serialized) <= _PLAIN_MAX_BYTES:
        plain = model.wire_cache.setdefault("plain_outputs", {})
        if len(plain) < _ACCEPTED_MAX:
            plain[serialized] = wanted
    return wanted, classes, slots


_NO_OUTPUTS: dict[bytes, tuple[str, ...]] = {}


# Per model, at most this many serialized response headers (one per distinct set of output shapes).
_TEMPLATES_MAX = 256
_ID_TAG = b"\x1a"  # ModelInferResponse.id, length-delimited
_RAW_TAG = b"\x32"  # ModelInferResponse.raw_output_contents
def encode_infer_response(model: Model, request_id: str, outputs: dict[str, np.ndarray],
                          in_shm: frozenset[str] = frozenset()) -> list[Any]:
    """The serialized ModelInferResponse as pieces for one `b"".join`: the metadata (names,
    datatypes, shapes; serialized once per set of output shapes and cached), the id, then one
    raw_output_contents entry per output, in order (tritonclient relies on it). Protobuf
    accepts fields in any order. Large outputs are passed as memoryviews, so the join is
    their only copy. Outputs named in `in_shm` were written to shared memory: their entry
    is empty, as Triton sends them."""
    key: tuple[Any, ...] = ()
    for name, arr in outputs.items():
        key += (name, arr.shape)
    classified: frozenset[str] = frozenset()
    if type(outputs) is ClassifiedOutputs:  # classification.py: these outputs are BYTES now
        classified = outputs.classified
        key += (classified,)
    templates = model.wire_cache.setdefault("responses", {})
    header = templates.get(key)
    infos = model.outputs
    if header is None:
        template = pb.ModelInferResponse(model_name=model.name, model_version=model.version_str)
        for name, arr in outputs.items():
            datatype = "BYTES" if name in classified else infos[name].datatype
            template.outputs.add(name=name, datatype=datatype, shape=arr.shape)
        header = template.SerializeToString()
        if len(templates) < _TEMPLATES_MAX:
            templates[key] = header
    parts: list[Any] = [header]
    if request_id:
        rid = request_id.encode("utf-8")
        parts += (_ID_TAG, encode_varint(len(rid)), rid)
    for name, arr in outputs.items():
        data: Any
        if in_shm and name in in_shm:
            data = b""
        elif not infos[name].itemsize or name in classified:
            data = encode_bytes_tensor(arr)
        elif arr.nbytes < 65536:
            data = arr.tobytes()
        else:
            data = np.ascontiguousarray(arr).reshape(-1).view(np.uint8).data
        parts += (_RAW_TAG, encode_varint(len(data)), data)
    parameters = getattr(outputs, "parameters", None)  # backends.base.ResponseOutputs
    if parameters:
        parts.append(encode_response_parameters(parameters))
    return parts
