"""Triton's classification extension: a requested output comes back as its top-k classes.

A client asks for it per output (`InferRequestedOutput(name, class_count=k)`, the
`classification` int64 parameter of the requested output). The output is then sent as
BYTES, shape `[batch, min(k, n)]` for a batching model and `[min(k, n)]` otherwise, where n
is the number of elements of one batch item (all its dims flattened). Each element is
`"<value>:<index>"`, plus `":<label>"` when the output's `label_filename` has a non-empty
line `index`. This follows triton-inference-server/server src/classification.cc and the
gRPC response allocator (src/grpc/infer_handler.cc):

- values: floats as C's `std::to_string` writes them (`%f`: six decimals, `inf`, `nan`),
  integers in decimal; only UINT8..UINT64, INT8..INT64, FP32 and FP64 outputs can be
  classified (FP16, BF16, BOOL and BYTES are refused, as Triton refuses them);
- order: descending by value; equal values keep index order (Triton's sort leaves ties
  in no defined order; a stable order makes answers reproducible);
- labels: the file is read once at load, one label per line (`std::getline`: split on
  newlines, a trailing newline adds no label, a `\\r` stays part of the label); a class
  index past the last line, or an empty line, gets no label.

It runs in the core, after the model answered, so it works the same for every backend
and every transport.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tritonclient.grpc import model_config_pb2 as mc

from server.confine import confine
from server.core.signature import TensorInfo
from server.errors import InvalidInput

# The datatypes Triton can classify (server/src/classification.cc TopkClassifications).
CLASSIFIABLE = frozenset({"UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64", "FP32", "FP64"})

Labels = dict[str, list[bytes]]


class ClassifiedOutputs(dict):  # type: ignore[type-arg]
    """A response's outputs where those named in `classified` are now BYTES class strings
    (the encoder sends them with datatype BYTES whatever the config says)."""

    __slots__ = ("classified",)

    def __init__(self, outputs: dict[str, np.ndarray], classified: frozenset[str]) -> None:
        super().__init__(outputs)
        self.classified = classified


def class_count(param: object, info: TensorInfo, model: str) -> int:
    """The `classification` parameter of a requested output, checked as Triton checks it."""
    which = param.WhichOneof("parameter_choice")  # type: ignore[attr-defined]
    if which != "int64_param":
        raise InvalidInput(f"invalid value type for 'classification' parameter of output '{info.name}' for model "
                           f"'{model}', expected int64_param")
    count = int(param.int64_param)  # type: ignore[attr-defined]
    if count <= 0:
        raise InvalidInput(f"invalid value for 'classification' parameter of output '{info.name}' for model "
                           f"'{model}', expected a class count > 0, got {count}")
    if info.datatype not in CLASSIFIABLE:
        raise InvalidInput(f"class result not available for output '{info.name}' of model '{model}' due to "
                           f"unsupported type '{info.datatype}'")
    return count


def load_labels(config: mc.ModelConfig, model_dir: Path) -> Labels:
    """Each output's labels, from its `label_filename` in the model folder. A file that is
    named but cannot be read fails the load (Triton fails it too)."""
    labels: Labels = {}
    for output in config.output:
        if not output.label_filename:
            continue
        field = f"output '{output.name}' label_filename"
        path = confine(model_dir, output.label_filename, field)  # checked at normalisation; the disk may change
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise OSError(f"{field} '{output.label_filename}': cannot read it: {exc.strerror or exc}") from None
        lines = data.split(b"\n")
        if lines and lines[-1] == b"":
            lines.pop()  # getline: the newline ending the last line starts no new one
        labels[output.name] = lines
    return labels


def classify_outputs(
    outputs: dict[str, np.ndarray], counts: dict[str, int], labels: Labels, batching: bool
) -> ClassifiedOutputs:
    """Replace each output named in `counts` by its top-k class strings."""
    result = ClassifiedOutputs(outputs, frozenset(counts))
    for name, k in counts.items():
        arr = outputs.get(name)
        if arr is not None:
            result[name] = top_k(arr, k, labels.get(name, []), batching)
    return result


def top_k(arr: np.ndarray, k: int, labels: list[bytes], batching: bool) -> np.ndarray:
    """One output's `"value:index[:label]"` strings: [batch, min(k, n)] or [min(k, n)]."""
    if batching and arr.ndim > 0:
        rows = arr.reshape(arr.shape[0], -1)
    else:
        rows = arr.reshape(1, -1)
    n = rows.shape[1]
    take = min(k, n)
    is_float = rows.dtype.kind == "f"
    out = np.empty((rows.shape[0], take), dtype=object)
    if take == 0:
        return out if batching and arr.ndim > 0 else out.reshape(0)
    # The k-th largest value of each row, then only the values at or above it are sorted
    # (a full sort of 1000 classes costs ~25 us a row).
    thresholds = np.partition(rows, n - take, axis=1)[:, n - take]
    top = _top_indices(rows, thresholds, take)
    # Python numbers format several times faster than numpy scalars.
    values = np.take_along_axis(rows, np.asarray(top, dtype=np.intp), axis=1).tolist()
    pattern = b"%f:%d" if is_float else b"%d:%d"
    count = len(labels)
    for r, (indices, row_values) in enumerate(zip(top, values, strict=True)):
        for j, (index, value) in enumerate(zip(indices, row_values, strict=True)):
            text = pattern % (value, index)
            label = labels[index] if index < count else b""
            out[r, j] = text + b":" + label if label else text
    if batching and arr.ndim > 0:
        return out
    return out.reshape(take)


def _top_indices(rows: np.ndarray, thresholds: np.ndarray, take: int) -> list[list[int]]:
    """Per row, the indices of the `take` largest values, descending, equal values in index order."""
    mask = rows >= thresholds[:, None]
    if (mask.sum(axis=1) == take).all():  # the usual case: exactly `take` values reach the threshold
        candidates = np.nonzero(mask)[1].reshape(rows.shape[0], take)  # in index order
        values = np.take_along_axis(rows, candidates, axis=1)
        order = (take - 1) - np.argsort(values[:, ::-1], axis=1, kind="stable")[:, ::-1]
        return np.take_along_axis(candidates, order, axis=1).tolist()
    return [_row_top(row, threshold, take) for row, threshold in zip(rows, thresholds, strict=True)]


def _row_top(row: np.ndarray, threshold: np.generic, take: int) -> list[int]:
    """One row with ties at the threshold (more candidates than `take`), or NaN in it."""
    candidates = np.flatnonzero(row >= threshold)
    if len(candidates) < take:  # NaN in the row: comparisons fail, so sort the whole row
        candidates = np.arange(len(row))
    values = row[candidates]
    # A stable ascending sort of the reversed values, read backwards: descending, and equal
    # values keep increasing index (candidates are in index order).
    order = (len(values) - 1) - np.argsort(values[::-1], kind="stable")[::-1]
    return candidates[order[:take]].tolist()
