"""String tensors for TorchScript models, as Triton's pytorch backend passes them.

Torch has no string tensor. Triton's libtorch backend (src/libtorch.cc) therefore hands a
`TYPE_STRING` (BYTES on the wire) input to forward() as a `List[str]` and turns a `List[str]`
that forward() returns into a BYTES output. It accepts them only as one-dimensional lists:
the input's dims (its `reshape` when it has one) plus the batch dimension, if the model batches,
may count at most one. So a batching model declares `dims: [ 1 ]` with `reshape: { shape: [ ] }`
(clients send `[N, 1]`, forward() gets N strings); a model without batching declares
`dims: [ -1 ]` (or `[ K ]`, or `[ 1 ]` with an empty reshape) and gets all the elements as one
list. Other shapes fail the load with Triton's message.

Bytes: the elements reach forward() as Python `bytes`, which torch stores unchanged in its C++
strings, as Triton does: a model sees exactly the client's bytes, valid UTF-8 or not, and
`len(s)` counts bytes. Strings coming back are UTF-8 encoded. Torch can only return a string to
Python by decoding it as UTF-8, so an output string that is not valid UTF-8 (Triton would pass
its bytes through) fails that request with INVALID_ARGUMENT and says so.

The batch: a batching model must return one string per batch item (the requests' batch sizes
added up); the list is split between the requests like any other output.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from backends.base import BackendError, BackendInputError, ModelSpec


def check_string_shapes(spec: ModelSpec) -> None:
    """Refuse string tensors that are not 1-D lists (Triton's rule and its message)."""
    batching = spec.max_batch_size > 0
    for kind, tensors in (("input", spec.inputs), ("output", spec.outputs)):
        for tensor in tensors:
            if tensor.datatype != "BYTES":
                continue
            dims = tensor.reshape if tensor.reshape is not None else tensor.dims
            if len(dims) + (1 if batching else 0) > 1:
                shape = f"dims {list(tensor.dims)}" + (f" reshape {list(tensor.reshape)}" if tensor.reshape else "")
                hint = ("a batching model declares dims: [ 1 ] with reshape: { shape: [ ] }" if batching
                        else "declare dims: [ -1 ]")
                raise BackendError(
                    f"Triton only supports 1 dimensional List of String as {kind} for '{tensor.name}' for model "
                    f"'{spec.name}' ({shape}{', plus the batch dimension' if batching else ''}; {hint})"
                )


def check_argument_types(spec: ModelSpec, arg_types: dict[str, str]) -> None:
    """A BYTES input must go to a `List[str]` argument and a tensor input must not: said at load,
    instead of as torch's cast error on every request. `arg_types` maps input name -> the type of
    the forward() argument it binds to, as TorchScript prints it."""
    for tensor in spec.inputs:
        arg_type = arg_types.get(tensor.name)
        if arg_type is None:
            continue
        takes_strings = "List[str]" in arg_type
        if tensor.datatype == "BYTES" and not takes_strings:
            raise BackendError(
                f"input '{tensor.name}' is TYPE_STRING, so forward() gets it as List[str], but the argument it "
                f"binds to is {arg_type}"
            )
        if tensor.datatype != "BYTES" and takes_strings:
            raise BackendError(
                f"input '{tensor.name}' is {tensor.datatype}, but the forward() argument it binds to is {arg_type}; "
                "declare it TYPE_STRING to pass a List[str]"
            )


def strings_in(arr: np.ndarray) -> list[Any]:
    """A BYTES input (an object array of bytes, at most 1-D here) as forward()'s List[str]."""
    return arr.reshape(-1).tolist()


def strings_out(name: str, value: list[Any]) -> np.ndarray:
    """forward()'s List[str] as a BYTES output: a 1-D object array of UTF-8 bytes."""
    out = np.empty(len(value), dtype=object)
    try:
        out[:] = [item.encode("utf-8") for item in value]
    except AttributeError:
        kinds = sorted({type(item).__name__ for item in value})
        raise BackendError(f"output '{name}': forward() returned a list of {kinds}; a TYPE_STRING output must be "
                           "a List[str]") from None
    return out


def string_output_error(exc: UnicodeDecodeError) -> BackendInputError:
    """What to say when torch cannot hand back an output string (it is not valid UTF-8)."""
    return BackendInputError(
        f"forward() returned a string that is not valid UTF-8 ({exc.reason} at byte {exc.start}); torch can only "
        "return strings to Nereid as UTF-8, so such bytes cannot be sent back (Triton would pass them through)"
    )


def check_batch(name: str, count: int, batch: int) -> None:
    """A batching model returns one string per batch item."""
    if count != batch:
        raise BackendError(f"output '{name}': forward() returned {count} strings for a batch of {batch}; a batching "
                           "model returns one string per batch item")
