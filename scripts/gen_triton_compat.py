#!/usr/bin/env python3
"""Write Triton-style model repositories for libtorch string models and classification.

Each model is what a Triton user would put in a repository: `config.pbtxt`, `1/model.pt`
(TorchScript, scripted here) and, for classification, a labels file named by the output's
`label_filename`. The tests (tests/test_torchscript_strings.py, tests/test_classification.py)
generate them into temporary folders, so CI exercises the same repositories a user gets.

  strings          libtorch models with TYPE_STRING inputs and outputs (List[str] in TorchScript),
                   in each shape Triton's pytorch backend accepts, plus --invalid ones it refuses
  classification   an image-classifier-like model (FP32 [N, 1000] out, 1000 labels; batching and
                   not, as Triton's quick-start densenet), and identity models of every
                   classifiable datatype with a short labels file, for exact checks

Usage: scripts/gen_triton_compat.py OUT_DIR [--only strings|classification] [--invalid]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Tuple  # noqa: UP035 - TorchScript reads these annotations

import numpy as np
import torch

# The quick-start style classifier: CHW input this small keeps the model file tiny.
IMAGE_SHAPE = (3, 8, 8)
CLASSES = 1000
# The identity classification models: one output per datatype Triton classifies, plus two it refuses.
CLASSIFY_TYPES = ("FP32", "FP64", "INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64")
REFUSED_TYPES = ("FP16", "BYTES")
# Labels for the identity models: fewer lines than classes, and line 2 empty (no label for class 2).
SHORT_LABELS = "zero\none\n\nthree\nfour\n"


class UpperAndLength(torch.nn.Module):
    """Batching: each string upper-cased (ASCII), and its length in bytes."""

    def forward(self, text: List[str]) -> Tuple[List[str], torch.Tensor]:  # noqa: UP006
        return [s.upper() for s in text], torch.tensor([len(s) for s in text], dtype=torch.int64)


class Reverse(torch.nn.Module):
    """No batching: the whole list in reverse order."""

    def forward(self, text: List[str]) -> List[str]:  # noqa: UP006
        out: List[str] = []  # noqa: UP006
        for i in range(len(text)):
            out.append(text[len(text) - 1 - i])
        return out


class Repeat(torch.nn.Module):
    """A string input next to a tensor input, bound by argument name: each string `count` times."""

    def forward(self, text: List[str], count: torch.Tensor) -> List[str]:  # noqa: UP006
        n = int(count[0])
        return ["-".join([s for _ in range(n)]) for s in text]


class ByteLength(torch.nn.Module):
    """Strings in, a tensor out: the length of each string in bytes (what the model received)."""

    def forward(self, text: List[str]) -> torch.Tensor:  # noqa: UP006
        return torch.tensor([len(s) for s in text], dtype=torch.int64)


class Clone(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.clone()


class ImageClassifier(torch.nn.Module):
    """softmax(flatten(image) @ W + b), fixed seeded weights: [N, 3, 8, 8] -> [N, 1000]."""

    def __init__(self, unbatched: bool = False) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(1234)
        features = IMAGE_SHAPE[0] * IMAGE_SHAPE[1] * IMAGE_SHAPE[2]
        self.weight = torch.nn.Parameter(torch.randn(features, CLASSES, generator=generator), requires_grad=False)
        self.bias = torch.nn.Parameter(torch.randn(CLASSES, generator=generator), requires_grad=False)
        self.unbatched = unbatched
        self.classes = CLASSES

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        if self.unbatched:  # densenet_onnx style: one CHW image in, [1, 1000, 1, 1] out
            image = image.unsqueeze(0)
        probs = torch.softmax(image.flatten(1) @ self.weight + self.bias, dim=1)
        return probs.reshape(1, self.classes, 1, 1) if self.unbatched else probs


def _save(module: torch.nn.Module, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.jit.script(module).save(str(path))


def _write(repo: Path, name: str, config: str, module: torch.nn.Module | None = None,
           files: dict[str, str] | None = None) -> None:
    model_dir = repo / name
    (model_dir / "1").mkdir(parents=True, exist_ok=True)
    (model_dir / "config.pbtxt").write_text(f'name: "{name}"\n{config.strip()}\n', encoding="utf-8")
    if module is not None:
        _save(module, model_dir / "1" / "model.pt")
    for rel, text in (files or {}).items():
        (model_dir / rel).write_text(text, encoding="utf-8")


SCALAR = "dims: [ 1 ]\n    reshape: { shape: [ ] }"  # one string per batch item, as Triton wants it


def write_string_models(repo: Path) -> list[str]:
    """libtorch string models in the shapes Triton's pytorch backend accepts."""
    _write(repo, "libtorch_string_batch", f"""
platform: "pytorch_libtorch"
max_batch_size: 8
input [ {{ name: "INPUT__0" data_type: TYPE_STRING {SCALAR} }} ]
output [
  {{ name: "OUTPUT__0" data_type: TYPE_STRING {SCALAR} }},
  {{ name: "OUTPUT__1" data_type: TYPE_INT64 {SCALAR} }}
]
dynamic_batching {{ max_queue_delay_microseconds: 50000 }}
""", UpperAndLength())
    _write(repo, "libtorch_string_nobatch", """
platform: "pytorch_libtorch"
max_batch_size: 0
input [ { name: "INPUT__0" data_type: TYPE_STRING dims: [ -1 ] } ]
output [ { name: "OUTPUT__0" data_type: TYPE_STRING dims: [ -1 ] } ]
""", Reverse())
    _write(repo, "libtorch_string_scalar", f"""
platform: "pytorch_libtorch"
max_batch_size: 0
input [ {{ name: "INPUT__0" data_type: TYPE_STRING {SCALAR} }} ]
output [ {{ name: "OUTPUT__0" data_type: TYPE_STRING {SCALAR} }} ]
""", Reverse())
    _write(repo, "libtorch_string_mixed", """
backend: "pytorch"
max_batch_size: 0
input [
  { name: "count" data_type: TYPE_INT64 dims: [ 1 ] },
  { name: "text" data_type: TYPE_STRING dims: [ -1 ] }
]
output [ { name: "repeated" data_type: TYPE_STRING dims: [ -1 ] } ]
""", Repeat())
    _write(repo, "libtorch_string_length", """
platform: "pytorch_libtorch"
max_batch_size: 0
input [ { name: "INPUT__0" data_type: TYPE_STRING dims: [ -1 ] } ]
output [ { name: "OUTPUT__0" data_type: TYPE_INT64 dims: [ -1 ] } ]
""", ByteLength())
    return ["libtorch_string_batch", "libtorch_string_nobatch", "libtorch_string_scalar", "libtorch_string_mixed",
            "libtorch_string_length"]


def write_invalid_string_models(repo: Path) -> list[str]:
    """String models Triton's pytorch backend refuses to load (each must fail with a reason)."""
    _write(repo, "libtorch_string_bad_batch_dims", """
platform: "pytorch_libtorch"
max_batch_size: 8
input [ { name: "INPUT__0" data_type: TYPE_STRING dims: [ -1 ] } ]
output [ { name: "OUTPUT__0" data_type: TYPE_STRING dims: [ -1 ] } ]
""", Reverse())
    _write(repo, "libtorch_string_bad_2d", """
platform: "pytorch_libtorch"
max_batch_size: 0
input [ { name: "INPUT__0" data_type: TYPE_STRING dims: [ 2, 2 ] } ]
output [ { name: "OUTPUT__0" data_type: TYPE_STRING dims: [ -1 ] } ]
""", Reverse())
    _write(repo, "libtorch_string_tensor_arg", """
platform: "pytorch_libtorch"
max_batch_size: 0
input [ { name: "INPUT__0" data_type: TYPE_STRING dims: [ -1 ] } ]
output [ { name: "OUTPUT__0" data_type: TYPE_STRING dims: [ -1 ] } ]
""", Clone())
    return ["libtorch_string_bad_batch_dims", "libtorch_string_bad_2d", "libtorch_string_tensor_arg"]


def image_labels() -> str:
    return "".join(f"class {i:04d}\n" for i in range(CLASSES))


def write_classification_models(repo: Path) -> list[str]:
    """Classification models: the quick-start style classifier and exact-check identity models."""
    dims = ", ".join(str(d) for d in IMAGE_SHAPE)
    _write(repo, "image_classifier", f"""
platform: "pytorch_libtorch"
max_batch_size: 8
input [ {{ name: "INPUT__0" data_type: TYPE_FP32 dims: [ {dims} ] }} ]
output [ {{ name: "OUTPUT__0" data_type: TYPE_FP32 dims: [ {CLASSES} ] label_filename: "labels.txt" }} ]
""", ImageClassifier(), {"labels.txt": image_labels()})
    _write(repo, "image_classifier_nobatch", f"""
platform: "pytorch_libtorch"
max_batch_size: 0
input [ {{ name: "INPUT__0" data_type: TYPE_FP32 dims: [ {dims} ] }} ]
output [
  {{
    name: "OUTPUT__0"
    data_type: TYPE_FP32
    dims: [ {CLASSES} ]
    reshape: {{ shape: [ 1, {CLASSES}, 1, 1 ] }}
    label_filename: "labels.txt"
  }}
]
""", ImageClassifier(unbatched=True), {"labels.txt": image_labels()})
    types = CLASSIFY_TYPES + REFUSED_TYPES
    for batch, name in ((4, "classify_identity"), (0, "classify_identity_nobatch")):
        # Optional inputs: a request sends the types it classifies and requests their outputs.
        inputs = ",\n".join(f'  {{ name: "IN_{t}" data_type: {_config_type(t)} dims: [ -1 ] optional: true }}'
                            for t in types)
        outputs = ",\n".join(
            f'  {{ name: "OUT_{t}" data_type: {_config_type(t)} dims: [ -1 ] label_filename: "labels.txt" }}'
            for t in types)
        _write(repo, name, f"""
backend: "identity"
max_batch_size: {batch}
input [
{inputs}
]
output [
{outputs}
]
""", files={"labels.txt": SHORT_LABELS})
    return ["image_classifier", "image_classifier_nobatch", "classify_identity", "classify_identity_nobatch"]


def _config_type(datatype: str) -> str:
    return "TYPE_STRING" if datatype == "BYTES" else f"TYPE_{datatype}"


def image_reference(image: np.ndarray) -> np.ndarray:
    """What image_classifier computes, in numpy (for checking without the server)."""
    model = ImageClassifier()
    with torch.inference_mode():
        return model(torch.from_numpy(image)).numpy()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="the repository folder to write (created if missing)")
    parser.add_argument("--only", choices=("strings", "classification"), help="write one group only")
    parser.add_argument("--invalid", action="store_true", help="also write the string models Triton refuses")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    written: list[str] = []
    if args.only in (None, "strings"):
        written += write_string_models(args.out)
        if args.invalid:
            written += write_invalid_string_models(args.out)
    if args.only in (None, "classification"):
        written += write_classification_models(args.out)
    for name in written:
        print(args.out / name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
