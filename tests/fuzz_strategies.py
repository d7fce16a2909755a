"""Hypothesis strategies for the fuzz suite (test_fuzz.py): hostile names and numbers, any
protobuf message built from its descriptor, ModelInferRequests that are almost right for a
real model, raw garbage, and mutations of valid bodies. (Load-time overrides: fuzz_overrides.py.)

Bulk data (raw tensors, large garbage) comes from a drawn seed through numpy, so that hypothesis
draws a number rather than thousands of bytes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from hypothesis import strategies as st
from tritonclient.grpc import service_pb2 as pb

Draw = Callable[[st.SearchStrategy[Any]], Any]

DATATYPES = ("BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
             "FP16", "FP32", "FP64", "BYTES", "BF16")
ITEMSIZE = {"BOOL": 1, "UINT8": 1, "UINT16": 2, "UINT32": 4, "UINT64": 8, "INT8": 1, "INT16": 2, "INT32": 4,
            "INT64": 8, "FP16": 2, "FP32": 4, "FP64": 8, "BF16": 2}
# Which InferTensorContents field carries each datatype (Triton's table; FP16/BF16 have none).
TYPED_FIELD = {"BOOL": "bool_contents", "UINT8": "uint_contents", "UINT16": "uint_contents",
               "UINT32": "uint_contents", "UINT64": "uint64_contents", "INT8": "int_contents",
               "INT16": "int_contents", "INT32": "int_contents", "INT64": "int64_contents",
               "FP32": "fp32_contents", "FP64": "fp64_contents", "BYTES": "bytes_contents"}
CONTENT_FIELDS = tuple(sorted(set(TYPED_FIELD.values())))
# Request parameters the server or Triton give a meaning to, plus shared-memory ones.
RESERVED_KEYS = ("priority", "timeout", "sequence_id", "sequence_start", "sequence_end", "binary_data_output",
                 "binary_data", "binary_data_size", "classification", "shared_memory_region",
                 "shared_memory_byte_size", "shared_memory_offset", "headers", "triton_enable_empty_final_response",
                 "triton_x", "config", "file:1/model.onnx", "file:../x")
PATH_LIKE = ("", ".", "..", "...", "..my_model", " ", "\t", "../x", "../../etc/passwd", "/etc/passwd", "a/b",
             "a\\b", "..\\..\\x", "x\x00y", "\x00", "~", "~root", "%2e%2e", "%2e%2e%2fetc", "CON", "nul:",
             "file:///etc/passwd", "/dev/zero", "/proc/self/environ", "1/model.onnx", "model.py", "-", "--help")
EDGE_INTS = (0, 1, -1, 2, 7, 8, 9, 64, 255, 256, 2**15, 2**16, 2**31 - 1, 2**31, 2**32, 2**53 + 1, 2**62,
             2**63 - 1, -(2**31), -(2**63))


# Long names, whose file name is over the 255 bytes a directory entry may have, or just under.
LONG_NAMES = ("n" * 255, "n" * 256, "n" * 1000, "n" * 6000, "\u00e9" * 128, "\U0001F600" * 64, "m" * 254 + "\u00e9")


def names() -> st.SearchStrategy[str]:
    """Names a client may send: unicode, huge, path-like. (Fixed lists come first: hypothesis
    starts with small examples, and a budget of a few dozen would rarely reach a long one.)"""
    return st.one_of(
        st.sampled_from(PATH_LIKE + LONG_NAMES),
        st.text(max_size=12),
        st.text(min_size=200, max_size=5000, alphabet=st.characters(codec="utf-8")),
        st.lists(st.sampled_from(["..", ".", "etc", "passwd", "", "x"]), min_size=2, max_size=8).map("/".join),
        st.integers(1, 6000).map(lambda n: "n" * n),
    )


def model_names(known: Sequence[str]) -> st.SearchStrategy[str]:
    return st.one_of(st.sampled_from(list(known)), st.sampled_from(list(known)), names())


def versions() -> st.SearchStrategy[str]:
    return st.one_of(
        st.just(""), st.just(""), st.sampled_from(["1", "2", "3", "0", "01", " 1", "+1", "-1", "\u0661", "1e3",
                                                  "0x1", "9" * 30, "1.0", "１"]),
        st.integers(-(2**64), 2**64).map(str), st.text(max_size=8),
    )


def edge_ints(lo: int, hi: int) -> st.SearchStrategy[int]:
    edges = [v for v in EDGE_INTS if lo <= v <= hi] + [lo, hi]
    return st.one_of(st.sampled_from(edges), st.integers(lo, hi), st.integers(max(lo, -3), min(hi, 16)))


def shapes() -> st.SearchStrategy[list[int]]:
    return st.lists(st.one_of(st.integers(-2, 9), edge_ints(-(2**63), 2**63 - 1)), max_size=6)


def datatypes() -> st.SearchStrategy[str]:
    return st.one_of(st.sampled_from(DATATYPES), st.sampled_from(DATATYPES),
                     st.sampled_from(["fp32", "STRING", "TYPE_FP32", "FP8", "INT128", ""]), st.text(max_size=8))


_INT_RANGES = {
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1), FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SFIXED32: (-(2**31), 2**31 - 1), FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1), FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SINT64: (-(2**63), 2**63 - 1), FieldDescriptor.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1), FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1),
}


def _scalar(field: FieldDescriptor) -> st.SearchStrategy[Any]:
    kind = field.type
    if kind == FieldDescriptor.TYPE_STRING:
        return names()
    if kind == FieldDescriptor.TYPE_BYTES:
        return st.binary(max_size=64)
    if kind == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if kind in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        return st.floats(width=64 if kind == FieldDescriptor.TYPE_DOUBLE else 32)
    if kind == FieldDescriptor.TYPE_ENUM:  # proto3 enums are open: unknown numbers travel too
        known = [v.number for v in field.enum_type.values]
        return st.one_of(st.sampled_from(known), st.integers(-5, 1000))
    lo, hi = _INT_RANGES[kind]
    return edge_ints(lo, hi)


Overrides = Mapping[str, st.SearchStrategy[Any]]


@st.composite
def messages(draw: Draw, descriptor: Descriptor, overrides: Overrides | None = None, depth: int = 0) -> Any:
    """Any message of `descriptor`'s type, fields set at random. `overrides` maps a field's full
    name ("inference.ModelInstanceGroup.count") to the strategy for its (scalar) values."""
    from google.protobuf import message_factory

    overrides = overrides or {}
    message = message_factory.GetMessageClass(descriptor)()
    for field in descriptor.fields:
        if not draw(st.integers(0, 2)):  # each field is set one time in three
            continue
        override = overrides.get(field.full_name)
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            entry_fields = field.message_type.fields_by_name
            key_field, value_field = entry_fields["key"], entry_fields["value"]
            keys = draw(st.lists(_scalar(key_field), max_size=3))
            target = getattr(message, field.name)
            for key in keys:
                if value_field.message_type is not None:
                    if depth < 3:
                        target[key].CopyFrom(draw(messages(value_field.message_type, overrides, depth + 1)))
                else:
                    target[key] = draw(_scalar(value_field) if override is None else override)
        elif field.message_type is not None:
            if depth >= 3:
                continue
            count = draw(st.integers(0, 3)) if _repeated(field) else 1
            for _ in range(count):
                item = draw(messages(field.message_type, overrides, depth + 1))
                if _repeated(field):
                    getattr(message, field.name).add().CopyFrom(item)
                else:
                    getattr(message, field.name).CopyFrom(item)
        else:
            values = _scalar(field) if override is None else override
            if _repeated(field):
                getattr(message, field.name).extend(draw(st.lists(values, max_size=4)))
            else:
                setattr(message, field.name, draw(values))
    return message


def _repeated(field: FieldDescriptor) -> bool:
    return bool(field.is_repeated) if hasattr(field, "is_repeated") else field.label == FieldDescriptor.LABEL_REPEATED


# ---------------------------------------------------------------------------
# ModelInferRequests: mostly almost right for a real model, with one or a few mistakes


@dataclass(frozen=True)
class TensorSig:
    name: str
    datatype: str
    shape: tuple[int, ...]  # the API shape, -1 for variable, with the batch dimension if the model batches


@dataclass(frozen=True)
class ModelSig:
    name: str
    inputs: tuple[TensorSig, ...]
    outputs: tuple[TensorSig, ...]
    max_batch_size: int


def parameter_values() -> st.SearchStrategy[tuple[str, Any]]:
    """(oneof field, value) for an InferParameter, every type."""
    return st.one_of(
        st.tuples(st.just("bool_param"), st.booleans()),
        st.tuples(st.just("int64_param"), edge_ints(-(2**63), 2**63 - 1)),
        st.tuples(st.just("uint64_param"), edge_ints(0, 2**64 - 1)),
        st.tuples(st.just("double_param"), st.floats()),
        st.tuples(st.just("string_param"), st.one_of(st.text(max_size=8), st.sampled_from(["1", "-1", "high", ""]))),
    )


def repository_parameter_values() -> st.SearchStrategy[tuple[str, Any]]:
    """(oneof field, value) for a ModelRepositoryParameter (load and unload), every type."""
    return st.one_of(
        st.tuples(st.just("bool_param"), st.booleans()),
        st.tuples(st.just("int64_param"), edge_ints(-(2**63), 2**63 - 1)),
        st.tuples(st.just("string_param"), st.text(max_size=8)),
        st.tuples(st.just("bytes_param"), st.binary(max_size=16)),
    )


def set_parameters(draw: Draw, target: Any) -> None:
    """Fill a `map<string, InferParameter>` with reserved and custom keys of every type."""
    keys = draw(st.lists(st.one_of(st.sampled_from(RESERVED_KEYS), st.text(max_size=10)), max_size=4))
    for key in keys:
        field, value = draw(parameter_values())
        setattr(target[key], field, value)


def _concrete_shape(draw: Draw, sig: TensorSig) -> list[int]:
    return [draw(st.integers(0, 4)) if d < 0 else d for d in sig.shape]


def _rng(draw: Draw) -> np.random.Generator:
    """Bulk data comes from a drawn seed: hypothesis draws a number, not thousands of bytes."""
    return np.random.default_rng(draw(st.integers(0, 2**32 - 1)))


def _raw_for(draw: Draw, datatype: str, count: int) -> bytes:
    """Raw bytes of the right size for `count` elements of `datatype`."""
    rng = _rng(draw)
    if datatype == "BYTES":
        lengths = rng.integers(0, 7, size=count)
        return b"".join(int(n).to_bytes(4, "little") + rng.bytes(int(n)) for n in lengths)
    if datatype == "BOOL":
        return rng.integers(0, 2, size=count, dtype=np.uint8).tobytes()
    return rng.bytes(ITEMSIZE.get(datatype, 4) * count)


def _bad_raw(draw: Draw, datatype: str, count: int) -> bytes:
    """Raw bytes that do not fit: wrong length, bad BYTES length prefixes, BOOL bytes not 0/1."""
    right = _raw_for(draw, datatype, count)
    return draw(st.one_of(
        st.binary(max_size=40),
        st.just(right + b"\x00"),
        st.just(right[:-1]),
        st.tuples(edge_ints(0, 2**32 - 1), st.binary(max_size=8)).map(lambda t: t[0].to_bytes(4, "little") + t[1]),
        st.just(b"\x02" * max(count, 1)),
    ))


_TYPED_RANGE = {"int_contents": (-(2**31), 2**31 - 1), "int64_contents": (-(2**63), 2**63 - 1),
                "uint_contents": (0, 2**32 - 1), "uint64_contents": (0, 2**64 - 1)}


def _typed(draw: Draw, contents: Any, field: str, count: int) -> None:
    """`count` values in typed contents field `field` (right or wrong for the tensor's datatype)."""
    target = getattr(contents, field)
    if count <= 8:  # small: every value drawn, edges included
        if field == "bytes_contents":
            target.extend(draw(st.lists(st.binary(max_size=6), min_size=count, max_size=count)))
        elif field == "bool_contents":
            target.extend(draw(st.lists(st.booleans(), min_size=count, max_size=count)))
        elif field in ("fp32_contents", "fp64_contents"):
            target.extend(draw(st.lists(st.floats(width=32), min_size=count, max_size=count)))
        else:
            target.extend(draw(st.lists(edge_ints(*_TYPED_RANGE[field]), min_size=count, max_size=count)))
        return
    rng = _rng(draw)
    if field == "bytes_contents":
        target.extend(rng.bytes(3) for _ in range(count))
    elif field == "bool_contents":
        target.extend(rng.integers(0, 2, size=count).astype(bool).tolist())
    elif field in ("fp32_contents", "fp64_contents"):
        target.extend(rng.standard_normal(count).astype(np.float32).tolist())
    else:
        lo, hi = _TYPED_RANGE[field]
        target.extend(int(v) for v in rng.integers(max(lo, -(2**62)), min(hi, 2**62), size=count))


MAX_ELEMENTS = 4096  # above this a request carries content of the wrong size, never the right one


def custom_parameters(draw: Draw, target: Any) -> None:
    """Parameters under keys that mean nothing to the server (allowed: Triton passes them on)."""
    for key in draw(st.lists(st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=8).filter(
            lambda k: k not in RESERVED_KEYS and not k.startswith("triton")), max_size=2)):
        field, value = draw(parameter_values())
        setattr(target[key], field, value)


@st.composite
def infer_requests(draw: Draw, models: Mapping[str, ModelSig], model: str | None = None,
                   mistakes: int = 4) -> pb.ModelInferRequest:
    """A ModelInferRequest for one of `models` (or any name; or for `model` only): right, or with
    mistakes. Each place a mistake can go (the model name and version, the set of inputs, each
    tensor's datatype, shape and contents, the batch size, the raw buffers, the requested outputs,
    the parameters) gets one with probability 1 / (mistakes + 1)."""
    def oops() -> bool:
        return bool(draw(st.integers(0, mistakes)) == 0)

    name = model if model is not None else draw(model_names(sorted(models)) if oops() else
                                                 st.sampled_from(sorted(models)))
    sig = models.get(name) or draw(st.sampled_from(sorted(models.values(), key=lambda s: s.name)))
    request = pb.ModelInferRequest(model_name=name, model_version=draw(versions()) if oops() else "",
                                   id=draw(st.text(max_size=8)))
    tensors = list(sig.inputs)
    if oops():  # drop, duplicate or invent inputs
        tensors = draw(st.lists(st.sampled_from(tensors), max_size=len(tensors) + 1)) + draw(st.lists(
            st.builds(TensorSig, names(), datatypes(), shapes().map(tuple)), max_size=2))
    batch = None
    if sig.max_batch_size:
        batch = draw(st.sampled_from([0, sig.max_batch_size + 1]) if oops() else st.integers(1, sig.max_batch_size))
    typed_ok = all(t.datatype in TYPED_FIELD for t in tensors)
    raw_mode = draw(st.booleans()) if typed_ok else not oops()
    for tensor in tensors:
        # One mistake at most per tensor, so that it is the one the server has to find.
        mistake = draw(st.sampled_from(["datatype", "shape", "raw", "raw", "raw", "typed", "both", "none",
                                        "parameters"])) if oops() else None
        datatype = draw(datatypes()) if mistake == "datatype" else tensor.datatype
        shape = _concrete_shape(draw, tensor)
        if batch is not None and shape:
            shape[0] = batch
        if mistake == "shape":
            shape = draw(shapes())
        entry = request.inputs.add(name=tensor.name, datatype=datatype, shape=shape)
        if mistake == "parameters":
            set_parameters(draw, entry.parameters)
        count = math.prod(shape) if all(0 <= d for d in shape) else -1
        if not 0 <= count <= MAX_ELEMENTS:
            count = draw(st.integers(0, 3))
        mode = "raw" if raw_mode else "typed"
        if mistake == "raw":
            request.raw_input_contents.append(_bad_raw(draw, datatype, count))
        elif mistake == "typed":  # typed contents: the wrong field, or the wrong number of values
            field = draw(st.sampled_from(CONTENT_FIELDS))
            _typed(draw, entry.contents, field, draw(st.sampled_from([count, count + 1, max(count - 1, 0)])))
        elif mistake == "both":
            request.raw_input_contents.append(_raw_for(draw, datatype, count))
            _typed(draw, entry.contents, TYPED_FIELD.get(datatype, "fp32_contents"), count)
        elif mistake == "none":
            pass
        elif mode == "raw":
            request.raw_input_contents.append(_raw_for(draw, datatype, count))
        else:
            _typed(draw, entry.contents, TYPED_FIELD.get(datatype, "fp32_contents"), count)
    if oops():  # a raw buffer too many, or one too few
        if draw(st.booleans()):
            request.raw_input_contents.append(draw(st.binary(max_size=16)))
        elif request.raw_input_contents:
            del request.raw_input_contents[-1]
    outputs = st.sampled_from([o.name for o in sig.outputs] or ["x"])
    for output in draw(st.lists(st.one_of(outputs, names()) if oops() else outputs, max_size=3, unique=True)):
        requested = request.outputs.add(name=output)
        if oops():
            set_parameters(draw, requested.parameters)
    if oops():
        set_parameters(draw, request.parameters)
    else:
        custom_parameters(draw, request.parameters)
    return request


# ---------------------------------------------------------------------------
# Bodies that are not a valid message, and mutations of valid ones


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        out.append(low | (0x80 if value else 0))
        if not value:
            return bytes(out)


def garbage() -> st.SearchStrategy[bytes]:
    """Random bytes, truncated varints, huge length prefixes, deep nesting, bad wire types."""
    field = st.integers(1, 20)
    return st.one_of(
        st.binary(max_size=64),
        st.integers(0, 2**32 - 1).map(  # through wire.py's own field scanner (>= 64 KiB)
            lambda seed: np.random.default_rng(seed).bytes(64 * 1024 + seed % 8192)),
        st.just(b"\xff" * 11), st.just(b"\x0a\xff\xff\xff\xff\xff\xff\xff\xff\xff\x7f"),
        st.tuples(field, edge_ints(0, 2**64 - 1)).map(lambda t: _varint(t[0] << 3 | 2) + _varint(t[1])),
        st.tuples(field, st.integers(0, 7)).map(lambda t: _varint(t[0] << 3 | t[1])),  # a tag and nothing else
        st.integers(1, 5000).map(lambda n: b"\x0b" * n + b"\x0c" * n),  # groups nested n deep
        st.integers(1, 5000).map(lambda n: b"\x2a\x7f" * n),  # length-delimited fields nested n deep, truncated
        st.tuples(st.just(b"\x3a"), st.integers(64 * 1024, 80 * 1024)).map(  # raw_input_contents longer than sent
            lambda t: (b"\x0a\x01f" * 30000) + t[0] + _varint(t[1]) + b"\x00" * 10),
        st.tuples(field, st.sampled_from([1, 5])).map(lambda t: _varint(t[0] << 3 | t[1]) + b"\x01"),  # short fixed
        st.integers(0, 2**32).map(lambda n: b"\x00" + _varint(n)),  # field number 0
    )


@st.composite
def mutated(draw: Draw, body: bytes) -> bytes:
    """`body` with bits flipped, bytes inserted, deleted or overwritten, or cut short."""
    data = bytearray(body)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "insert", "delete", "set", "truncate"]))
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete" and data:
            del data[at:at + draw(st.integers(1, 8))]
        elif op == "set" and data:
            data[at] = draw(st.sampled_from([0x00, 0x7F, 0x80, 0xFF, 0x0A, 0x12, 0x3A]))
        elif op == "truncate":
            del data[at:]
    return bytes(data)
