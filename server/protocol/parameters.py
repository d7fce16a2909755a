"""Request-level and tensor-level parameters of ModelInferRequest, checked as Triton checks them.

Triton reserves a few request parameter names and insists on their types
(server/src/grpc/infer_handler.cc, `SetInferenceRequestMetadata`); everything else
is passed to the model if it is an int64, bool, string or double. The messages
below follow Triton's, so clients that match on them keep working. Tensor parameters
naming a shared memory region are read by shm_tensors.py.
"""

from __future__ import annotations

from typing import Any

from tritonclient.grpc import service_pb2 as pb

from server.errors import InvalidInput

# Keys starting with "triton_" that Triton allows in a request.
TRITON_RESERVED = ("triton_enable_empty_final_response",)


def _value(param: Any) -> tuple[str | None, Any]:
    which = param.WhichOneof("parameter_choice")
    return which, getattr(param, which) if which else None


def request_parameters(parameters: Any) -> dict[str, Any]:
    """The request's `parameters` map as plain values, after Triton's type rules."""
    out: dict[str, Any] = {}
    for key, param in parameters.items():
        which, value = _value(param)
        if key == "sequence_id":
            if which not in ("int64_param", "string_param"):
                raise InvalidInput("invalid value type for 'sequence_id' parameter, expected int64_param or "
                                   "string_param.")
        elif key in ("sequence_start", "sequence_end"):
            if which != "bool_param":
                raise InvalidInput(f"invalid value type for '{key}' parameter, expected bool_param.")
        elif key == "priority":
            if which == "int64_param":
                if value < 0:
                    raise InvalidInput("invalid value for 'priority', expected value >= 0.")
            elif which != "uint64_param":
                raise InvalidInput("invalid value type for 'priority' parameter, expected int64_param or "
                                   "uint64_param.")
        elif key == "timeout":
            if which != "int64_param":
                raise InvalidInput("invalid value type for 'timeout' parameter, expected int64_param.")
            if value < 0:
                raise InvalidInput("invalid value for 'timeout', expected value >= 0.")
        elif key.startswith("triton_"):
            if key not in TRITON_RESERVED:
                raise InvalidInput("parameter keys starting with 'triton_' are reserved for Triton usage. Only the "
                                   f"following keys starting with 'triton_' are allowed: {' '.join(TRITON_RESERVED)}")
            if which != "bool_param":
                raise InvalidInput(f"invalid value type for '{key}' parameter, expected bool_param.")
        elif which is None:
            raise InvalidInput(f"invalid value type for '{key}' parameter: no value set")
        out[key] = value
    return out


def encode_response_parameters(parameters: dict[str, Any]) -> bytes:
    """A model's response parameters as the serialized `parameters` map of a ModelInferResponse:
    appended to the response's other fields (protobuf merges a message's fields in any order).
    Values are bool, int, float or str, as Triton's python backend allows; anything else is sent as
    its str."""
    msg = pb.ModelInferResponse()
    for key, value in parameters.items():
        param = msg.parameters[str(key)]
        if not set_scalar(param, value):
            param.string_param = str(value)
    return msg.SerializeToString()


def set_scalar(param: Any, value: Any) -> bool:
    """Fill an InferParameter from a Python (or JSON) scalar; False when `value` is not a bool,
    int, float or str. bool is tested first: it is an int to Python."""
    if isinstance(value, bool):
        param.bool_param = value
    elif isinstance(value, int):
        param.int64_param = value
    elif isinstance(value, float):
        param.double_param = value
    elif isinstance(value, str):
        param.string_param = value
    else:
        return False
    return True
