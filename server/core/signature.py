"""A model's tensors as the request path checks them: precomputed once per load."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from backends.base import TensorSpec
from backends.datatypes import NUMPY_OF, element_size
from server.errors import InvalidInput


def format_shape(dims: tuple[int, ...] | list[int]) -> str:
    return "[" + ",".join(str(d) for d in dims) + "]"


@dataclass(frozen=True, slots=True)
class TensorInfo:
    """One config input/output with everything the hot path needs precomputed."""

    name: str
    datatype: str
    dtype: np.dtype
    itemsize: int  # bytes per element on the wire; 0 for BYTES
    dims: tuple[int, ...]  # config dims (no batch dim)
    fixed: bool  # dims hold no -1, so a tuple compare is enough
    max_batch_size: int
    reshape: tuple[int, ...] | None
    optional: bool

    @classmethod
    def from_spec(cls, spec: TensorSpec, max_batch_size: int, optional: bool = False) -> TensorInfo:
        return cls(
            name=spec.name,
            datatype=spec.datatype,
            dtype=NUMPY_OF[spec.datatype],
            itemsize=element_size(spec.datatype),
            dims=spec.dims,
            fixed=-1 not in spec.dims,
            max_batch_size=max_batch_size,
            reshape=spec.reshape,
            optional=optional,
        )

    @property
    def api_shape(self) -> tuple[int, ...]:
        """The full shape clients see: a leading -1 when the model batches."""
        return ((-1,) + self.dims) if self.max_batch_size > 0 else self.dims

    def check_shape(self, shape: tuple[int, ...], model_name: str) -> int:
        """Validate a request shape against the config; return its batch size (1 if not batching)."""
        if shape and min(shape) < 0:
            raise InvalidInput(
                f"input '{self.name}' for model '{model_name}' has a negative dimension in shape "
                f"{format_shape(shape)}; request shapes must be concrete"
            )
        if self.max_batch_size > 0:
            if len(shape) != len(self.dims) + 1 or not self._dims_match(shape[1:]):
                raise self._shape_error(shape, model_name)
            batch = shape[0]
            if batch < 1 or batch > self.max_batch_size:
                raise InvalidInput(
                    f"inference request batch-size must be <= {self.max_batch_size} for '{model_name}' "
                    f"(and >= 1), got {batch} for input '{self.name}'"
                )
            return batch
        if len(shape) != len(self.dims) or not self._dims_match(shape):
            raise self._shape_error(shape, model_name)
        return 1

    def _dims_match(self, dims: tuple[int, ...]) -> bool:
        if self.fixed:
            return dims == self.dims
        return all(want == -1 or want == got for want, got in zip(self.dims, dims, strict=False))

    def _shape_error(self, shape: tuple[int, ...], model_name: str) -> InvalidInput:
        note = _BATCH_NOTE if self.max_batch_size > 0 else ""
        return InvalidInput(
            f"unexpected shape for input '{self.name}' for model '{model_name}'. Expected "
            f"{format_shape(self.api_shape)}, got {format_shape(shape)}. {note}".rstrip()
        )


# Triton's hint after a shape error of a batching model (core/src/infer_request.cc).
_BATCH_NOTE = (
    "NOTE: Setting a non-zero max_batch_size in the model config requires a batch dimension to be prepended "
    "to each input shape. If you want to specify the full shape including the batch dim in your input dims "
    "config, try setting max_batch_size to zero. See the model configuration docs for more info on "
    "max_batch_size."
)
