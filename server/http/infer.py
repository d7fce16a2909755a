"""Triton's HTTP inference body <-> the gRPC request message the codec already checks.

A JSON (or JSON + binary) request becomes a `ModelInferRequest` plus one raw buffer per
input, so `codec.decode_infer_request` applies every check and message the gRPC path has
(names, datatypes, shapes, byte sizes, parameters, classification, shared-memory
parameters): nothing is validated twice or differently. JSON `data` is packed into raw
bytes here (flattened, in the input's datatype); binary inputs are views into the body.

The binary-tensor extension: `Inference-Header-Content-Length: N` says the first N bytes are
the JSON header and the rest are the inputs' bytes, in input order, each
`parameters.binary_data_size` long. Outputs go back as binary when asked for
(`outputs[i].parameters.binary_data` or the request's `binary_data_output`), else as JSON
`data`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from tritonclient.grpc import service_pb2 as pb

from backends.datatypes import NUMPY_OF
from server.core.model import Model
from server.errors import InvalidInput
from server.protocol.codec import encode_bytes_tensor
from server.protocol.parameters import set_scalar
from server.protocol.shm_tensors import REGION

# Parameters only the HTTP framing uses; they never reach the model.
_BINARY_SIZE = "binary_data_size"
_BINARY = "binary_data"
_BINARY_OUTPUT = "binary_data_output"


@dataclass(slots=True)
class OutputPlan:
    """How the client wants the outputs back: binary per name, and the default for the rest."""

    binary: dict[str, bool] = field(default_factory=dict)
    default_binary: bool = False

    def is_binary(self, name: str) -> bool:
        return self.binary.get(name, self.default_binary)


def _set_param(param: Any, key: str, value: Any) -> None:
    if not set_scalar(param, value):
        raise InvalidInput(f"parameter '{key}' has invalid type. It should be either 'int', 'bool', or 'string'.")


def _object(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise InvalidInput(f"{what} must be a JSON object")
    return value


def parse_infer_request(body: bytes, header_length: int | None, model_name: str,
                        model_version: str) -> tuple[pb.ModelInferRequest, list[Any], OutputPlan]:
    """The request message, one raw buffer per input (views into `body`), and the output plan."""
    if header_length is None:
        header, binary = body, memoryview(b"")
    else:
        if header_length < 0 or header_length > len(body):
            raise InvalidInput(f"Inference-Header-Content-Length {header_length} is outside the request body "
                               f"of {len(body)} bytes")
        header, binary = body[:header_length], memoryview(body)[header_length:]
    try:
        doc = json.loads(header) if header else {}
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidInput(f"failed to parse the request JSON buffer: {exc}") from None
    doc = _object(doc, "the inference request")
    msg = pb.ModelInferRequest(model_name=model_name, model_version=model_version)
    request_id = doc.get("id", "")
    if not isinstance(request_id, str):
        raise InvalidInput("the request's 'id' must be a string")
    msg.id = request_id
    plan = OutputPlan()
    for key, value in _object(doc.get("parameters", {}), "'parameters'").items():
        if key == _BINARY_OUTPUT:
            plan.default_binary = bool(value)
        else:
            _set_param(msg.parameters[key], key, value)
    raw: list[Any] = []
    offset = 0
    inputs = doc.get("inputs", [])
    if not isinstance(inputs, list):
        raise InvalidInput("'inputs' must be a JSON array")
    for item in inputs:
        item = _object(item, "each input")
        name, datatype, shape = item.get("name"), item.get("datatype"), item.get("shape")
        if not isinstance(name, str) or not isinstance(datatype, str) or not isinstance(shape, list) \
                or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
            raise InvalidInput("each input needs 'name' (string), 'datatype' (string) and 'shape' (array of "
                               f"integers); got {json.dumps(item)[:200]}")
        tensor = msg.inputs.add(name=name, datatype=datatype, shape=shape)
        size = None
        for key, value in _object(item.get("parameters", {}), f"parameters of input '{name}'").items():
            if key == _BINARY_SIZE:
                if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                    raise InvalidInput(f"input '{name}': '{_BINARY_SIZE}' must be a non-negative integer")
                size = value
            else:
                _set_param(tensor.parameters[key], key, value)
        if REGION in tensor.parameters and (size is not None or "data" in item):
            # gRPC's "unexpected 'content'" check, worded with HTTP's field names: left to the
            # codec, the data would be blamed on raw_input_contents, which HTTP clients never see.
            field = _BINARY_SIZE if size is not None else "data"
            raise InvalidInput(f"unexpected '{field}' provided when using shared memory for input tensor '{name}'")
        if size is not None:
            if "data" in item:
                raise InvalidInput(f"input '{name}' has both '{_BINARY_SIZE}' and 'data'")
            if offset + size > len(binary):
                raise InvalidInput(f"input '{name}': '{_BINARY_SIZE}' {size} exceeds the {len(binary) - offset} "
                                   "binary bytes left in the request")
            raw.append(binary[offset:offset + size])
            offset += size
        elif "data" in item:
            raw.append(_json_data(item["data"], name, datatype, model_name))
        elif REGION in tensor.parameters:
            pass  # no raw entry, as over gRPC: the codec reads the region
        else:
            raise InvalidInput(f"unable to find data for input tensor '{name}' for model '{model_name}' in request.")
    if offset != len(binary):
        raise InvalidInput(f"the request has {len(binary) - offset} binary bytes after its inputs' data "
                           f"(their '{_BINARY_SIZE}' sum to {offset})")
    outputs = doc.get("outputs", [])
    if not isinstance(outputs, list):
        raise InvalidInput("'outputs' must be a JSON array")
    for item in outputs:
        item = _object(item, "each requested output")
        name = item.get("name")
        if not isinstance(name, str):
            raise InvalidInput("each requested output needs a 'name' (string)")
        out = msg.outputs.add(name=name)
        for key, value in _object(item.get("parameters", {}), f"parameters of output '{name}'").items():
            if key == _BINARY:
                plan.binary[name] = bool(value)
            else:
                _set_param(out.parameters[key], key, value)
    return msg, raw, plan


def _json_data(data: Any, name: str, datatype: str, model: str) -> bytes:
    """JSON `data` (flat or nested, row-major) as the raw bytes the gRPC path receives."""
    if datatype == "BYTES":
        flat = np.asarray(data, dtype=object).ravel() if isinstance(data, list) else np.asarray([data], object)
        for value in flat:
            if not isinstance(value, str):
                raise InvalidInput(f"input '{name}' for model '{model}': BYTES data must be strings, got "
                                   f"{type(value).__name__}")
        return encode_bytes_tensor(flat)
    dtype = NUMPY_OF.get(datatype)
    if dtype is None or datatype == "BF16":
        # An unknown datatype is reported by the codec with Triton's message; BF16 has no JSON form.
        if datatype == "BF16":
            raise InvalidInput(f"input '{name}' for model '{model}': BF16 data must be sent as binary data")
        return b""
    try:
        arr = np.asarray(data, dtype=dtype)
    except (ValueError, TypeError, OverflowError) as exc:
        raise InvalidInput(f"input '{name}' for model '{model}': 'data' does not fit {datatype}: {exc}") from None
    return arr.tobytes()


def encode_infer_response(model: Model, request_id: str, outputs: dict[str, np.ndarray], plan: OutputPlan,
                          in_shm: frozenset[str] = frozenset()) -> tuple[list[bytes], int | None]:
    """The response body's parts and the JSON header's length when binary parts follow it (None: all JSON).
    Outputs written to shared memory (`in_shm`) carry only name, datatype and shape, as Triton's."""
    classified: frozenset[str] = getattr(outputs, "classified", frozenset())
    entries = []
    binaries: list[bytes] = []
    for name, arr in outputs.items():
        info = model.outputs[name]
        is_bytes = name in classified or not info.itemsize
        entry: dict[str, Any] = {"name": name, "datatype": "BYTES" if name in classified else info.datatype,
                                 "shape": list(arr.shape)}
        if name in in_shm:
            pass
        elif plan.is_binary(name):
            data = encode_bytes_tensor(arr) if is_bytes else np.ascontiguousarray(arr).tobytes()
            entry["parameters"] = {_BINARY_SIZE: len(data)}
            binaries.append(data)
        elif is_bytes:
            entry["data"] = [v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in arr.ravel()]
        elif info.datatype == "BF16":
            raise InvalidInput(f"output '{name}' is BF16, which has no JSON form: request it as binary data")
        else:
            entry["data"] = arr.ravel().tolist()
        entries.append(entry)
    doc: dict[str, Any] = {"model_name": model.name, "model_version": model.version_str}
    if request_id:
        doc["id"] = request_id
    parameters = getattr(outputs, "parameters", None)
    if parameters:
        doc["parameters"] = {str(k): v if isinstance(v, (bool, int, float, str)) else str(v)
                             for k, v in parameters.items()}
    doc["outputs"] = entries
    header = json.dumps(doc, separators=(",", ":")).encode()
    if not binaries:
        return [header], None
    return [header, *binaries], len(header)
