#!/usr/bin/env python3
"""Generate Nereid's example model repository (Triton layout) with the `onnx` helper API.

Every model is built deterministically (fixed seeds, fixed IR version and opset), so
running the script twice produces byte-identical files; files whose content is already
right are left untouched (their mtime does not change).

    scripts/gen_models                      # (re)generate model_repository/
    scripts/gen_models --out /tmp/repo      # somewhere else (the tests do this)
    scripts/gen_models --check              # ...then load and verify every model in onnxruntime
    scripts/gen_models --timings            # ...and print ORT per-batch timings of the MLPs

The ONNX files pin `ir_version` and the opset on purpose: the `onnx` package writes a
newer IR version than the onnxruntime we use can read.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

IR_VERSION = 10  # onnxruntime >= 1.16 reads IR 10; onnx 1.23 would write 11+
OPSET = 17  # default ("") domain
PRODUCER = "nereid-gen_models"
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "model_repository"

# StringNormalizer's default locale is en_US.UTF-8, which minimal images lack (onnxruntime
# then refuses to create the session). C.UTF-8 is built into glibc >= 2.35.
STRING_LOCALE = "C.UTF-8"

Dims = Sequence[int | str]  # ONNX shape: ints, or strings for symbolic dims


@dataclass(frozen=True)
class DType:
    """One datatype as the config, ONNX and numpy each name it."""

    protocol: str  # KServe v2 name, e.g. FP32 (BYTES for strings)
    config: str  # model config enum, e.g. TYPE_FP32
    onnx: int  # TensorProto element type
    numpy: np.dtype


def _dt(protocol: str, config: str, onnx_type: int, np_type: Any) -> DType:
    return DType(protocol, config, onnx_type, np.dtype(np_type))


DTYPES: dict[str, DType] = {
    d.protocol: d
    for d in (
        _dt("BOOL", "TYPE_BOOL", TensorProto.BOOL, np.bool_),
        _dt("UINT8", "TYPE_UINT8", TensorProto.UINT8, np.uint8),
        _dt("UINT16", "TYPE_UINT16", TensorProto.UINT16, np.uint16),
        _dt("UINT32", "TYPE_UINT32", TensorProto.UINT32, np.uint32),
        _dt("UINT64", "TYPE_UINT64", TensorProto.UINT64, np.uint64),
        _dt("INT8", "TYPE_INT8", TensorProto.INT8, np.int8),
        _dt("INT16", "TYPE_INT16", TensorProto.INT16, np.int16),
        _dt("INT32", "TYPE_INT32", TensorProto.INT32, np.int32),
        _dt("INT64", "TYPE_INT64", TensorProto.INT64, np.int64),
        _dt("FP16", "TYPE_FP16", TensorProto.FLOAT16, np.float16),
        _dt("FP32", "TYPE_FP32", TensorProto.FLOAT, np.float32),
        _dt("FP64", "TYPE_FP64", TensorProto.DOUBLE, np.float64),
        _dt("BYTES", "TYPE_STRING", TensorProto.STRING, np.object_),
    )
}


@dataclass(frozen=True)
class Tensor:
    """An input or output as the config declares it (dims exclude the batch dim)."""

    name: str
    dtype: DType
    dims: tuple[int, ...]
    optional: bool = False  # input only: may be omitted (the graph has an empty default)


# --------------------------------------------------------------------------- helpers


def value_info(t: Tensor, batched: bool) -> onnx.ValueInfoProto:
    """The ONNX graph input/output for a config tensor: -1 dims become symbolic."""
    shape: list[int | str] = ["batch"] if batched else []
    shape += [d if d >= 0 else f"{t.name}_dim{i}" for i, d in enumerate(t.dims)]
    return helper.make_tensor_value_info(t.name, t.dtype.onnx, shape)


def make_model(
    name: str,
    nodes: list[onnx.NodeProto],
    inputs: list[Tensor],
    outputs: list[Tensor],
    batched: bool,
    initializers: Sequence[onnx.TensorProto] = (),
) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        name,
        [value_info(t, batched) for t in inputs],
        [value_info(t, batched) for t in outputs],
        list(initializers),
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        ir_version=IR_VERSION,
        producer_name=PRODUCER,
    )
    onnx.checker.check_model(model, full_check=True)
    return model


def config_text(
    header: str,
    name: str,
    max_batch_size: int,
    inputs: list[Tensor],
    outputs: list[Tensor],
    runtime: str = 'platform: "onnxruntime_onnx"',
) -> str:
    """A config.pbtxt in Triton's protobuf text format, with `header` as a leading comment."""
    lines = [f"# {line}".rstrip() for line in header.strip().splitlines()]
    lines += [f'name: "{name}"', runtime, f"max_batch_size: {max_batch_size}"]
    for kind, tensors in (("input", inputs), ("output", outputs)):
        blocks = []
        for t in tensors:
            fields = [f'name: "{t.name}"', f"data_type: {t.dtype.config}"]
            fields.append("dims: [ " + ", ".join(str(d) for d in t.dims) + " ]")
            if t.optional:
                fields.append("optional: true")
            blocks.append("  {\n" + "".join(f"    {f}\n" for f in fields) + "  }")
        lines.append(f"{kind} [\n" + ",\n".join(blocks) + "\n]")
    return "\n".join(lines) + "\n"


def dense_layers(
    rng: np.random.Generator, sizes: Sequence[int], x: str, y: str
) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto], list[tuple[np.ndarray, np.ndarray]]]:
    """MatMul+Add layers with Relu between them (none after the last), He-initialised."""
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []
    params: list[tuple[np.ndarray, np.ndarray]] = []
    cur = x
    n_layers = len(sizes) - 1
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        w = (rng.standard_normal((fan_in, fan_out)) * np.sqrt(2.0 / fan_in)).astype(np.float32)
        b = (rng.standard_normal(fan_out) * 0.1).astype(np.float32)
        params.append((w, b))
        inits += [numpy_helper.from_array(w, f"W{i}"), numpy_helper.from_array(b, f"B{i}")]
        last = i == n_layers - 1
        nodes.append(helper.make_node("MatMul", [cur, f"W{i}"], [f"mm{i}"], name=f"matmul{i}"))
        nodes.append(helper.make_node("Add", [f"mm{i}", f"B{i}"], [y if last else f"lin{i}"], name=f"add{i}"))
        if not last:
            nodes.append(helper.make_node("Relu", [f"lin{i}"], [f"act{i}"], name=f"relu{i}"))
            cur = f"act{i}"
    return nodes, inits, params


def mlp_reference(params: list[tuple[np.ndarray, np.ndarray]], x: np.ndarray) -> np.ndarray:
    h = x.astype(np.float64)
    for i, (w, b) in enumerate(params):
        h = h @ w.astype(np.float64) + b.astype(np.float64)
        if i < len(params) - 1:
            h = np.maximum(h, 0.0)
    return h


# --------------------------------------------------------------------------- models

Session = Any  # onnxruntime.InferenceSession (imported lazily: generating needs only onnx)
Checker = Callable[[Session], None]


@dataclass
class ModelSpec:
    name: str
    model: onnx.ModelProto
    config: str | None  # None: no config.pbtxt (the server auto-completes it)
    check: Checker
    timing_input: tuple[str, int] | None = None  # (input name, features) for --timings
    # with no config: the config the server should auto-complete (compared with the graph by --check)
    autocomplete: str | None = None


def _run(sess: Session, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, feeds), strict=True))


def build_simple() -> ModelSpec:
    i32 = DTYPES["INT32"]
    inputs = [Tensor("INPUT0", i32, (16,)), Tensor("INPUT1", i32, (16,))]
    outputs = [Tensor("OUTPUT0", i32, (16,)), Tensor("OUTPUT1", i32, (16,))]
    nodes = [
        helper.make_node("Add", ["INPUT0", "INPUT1"], ["OUTPUT0"], name="add"),
        helper.make_node("Sub", ["INPUT0", "INPUT1"], ["OUTPUT1"], name="sub"),
    ]
    model = make_model("simple", nodes, inputs, outputs, batched=True)
    config = config_text(
        "simple: Triton's classic example model.\n"
        "OUTPUT0 = INPUT0 + INPUT1, OUTPUT1 = INPUT0 - INPUT1 (INT32, 16 elements, batchable to 8).",
        "simple",
        8,
        inputs,
        outputs,
    )

    def check(sess: Session) -> None:
        rng = np.random.default_rng(100)
        for batch in (1, 3, 8):
            a = rng.integers(-1000, 1000, (batch, 16), dtype=np.int32)
            b = rng.integers(-1000, 1000, (batch, 16), dtype=np.int32)
            out = _run(sess, {"INPUT0": a, "INPUT1": b})
            _expect_equal(out["OUTPUT0"], a + b, "OUTPUT0")
            _expect_equal(out["OUTPUT1"], a - b, "OUTPUT1")
        # Triton's client examples: INPUT0 = 0..15, INPUT1 = all ones
        a = np.arange(16, dtype=np.int32)[None]
        out = _run(sess, {"INPUT0": a, "INPUT1": np.ones_like(a)})
        _expect_equal(out["OUTPUT0"], a + 1, "OUTPUT0")
        _expect_equal(out["OUTPUT1"], a - 1, "OUTPUT1")

    return ModelSpec("simple", model, config, check)


def build_mlp(
    name: str, sizes: Sequence[int], seed: int, max_batch_size: int, header: str, runtime: str
) -> ModelSpec:
    fp32 = DTYPES["FP32"]
    inputs = [Tensor("INPUT0", fp32, (sizes[0],))]
    outputs = [Tensor("OUTPUT0", fp32, (sizes[-1],))]
    nodes, inits, params = dense_layers(np.random.default_rng(seed), sizes, "INPUT0", "OUTPUT0")
    model = make_model(name, nodes, inputs, outputs, batched=True, initializers=inits)
    config = config_text(header, name, max_batch_size, inputs, outputs, runtime)

    def check(sess: Session) -> None:
        rng = np.random.default_rng(seed + 1000)
        for batch in (1, 5, max_batch_size):
            x = rng.standard_normal((batch, sizes[0])).astype(np.float32)
            got = _run(sess, {"INPUT0": x})["OUTPUT0"]
            want = mlp_reference(params, x)
            if got.dtype != np.float32 or got.shape != want.shape:
                raise AssertionError(f"OUTPUT0: got {got.dtype}{got.shape}, want float32{want.shape}")
            err = float(np.max(np.abs(got - want)))
            scale = float(np.max(np.abs(want))) + 1.0
            if err > 1e-4 * scale:
                raise AssertionError(f"OUTPUT0 differs from the numpy reference by {err:g}")

    return ModelSpec(name, model, config, check, timing_input=("INPUT0", sizes[0]))


MLP_SIZES = (64, 256, 16)
MLP_COMPUTE_SIZES = (256, 1024, 1024, 256)


def build_mlp_benchmark() -> ModelSpec:
    return build_mlp(
        "mlp",
        MLP_SIZES,
        seed=1,
        max_batch_size=64,
        header=(
            "mlp: the benchmark model. A batchable FP32 MLP 64 -> 256 -> 16:\n"
            "OUTPUT0 = relu(INPUT0 @ W0 + B0) @ W1 + B1, random weights from a fixed seed.\n"
            "In-process onnxruntime 1.32, intra_op_num_threads=1, 2-core AMD EPYC, per batch:\n"
            "batch 1 ~11 us, batch 8 ~15 us, batch 64 ~42 us (quiet machine)."
        ),
        runtime='platform: "onnxruntime_onnx"',
    )


def build_mlp_compute() -> ModelSpec:
    return build_mlp(
        "mlp_compute",
        MLP_COMPUTE_SIZES,
        seed=2,
        max_batch_size=64,
        header=(
            "mlp_compute: a compute-heavier FP32 MLP 256 -> 1024 -> 1024 -> 256 (Relu between layers),\n"
            "random weights from a fixed seed; for measuring batching gains.\n"
            "In-process onnxruntime 1.32, intra_op_num_threads=1, 2-core AMD EPYC, per batch:\n"
            "batch 1 ~130-145 us, batch 8 ~340 us (~43 us/sample), batch 64 ~2.2 ms (~34 us/sample)\n"
            "on a quiet machine; ~1.6x that when other work shares the cores."
        ),
        runtime='backend: "onnxruntime"',
    )


def build_string_lower() -> ModelSpec:
    s = DTYPES["BYTES"]
    inputs = [Tensor("INPUT0", s, (-1,))]
    outputs = [Tensor("OUTPUT0", s, (-1,))]
    node = helper.make_node(
        "StringNormalizer",
        ["INPUT0"],
        ["OUTPUT0"],
        name="lower",
        case_change_action="LOWER",
        is_case_sensitive=1,
        locale=STRING_LOCALE,
    )
    model = make_model("string_lower", [node], inputs, outputs, batched=False)
    config = config_text(
        "string_lower: a BYTES model. OUTPUT0 = lowercase of each element of INPUT0\n"
        f'(ONNX StringNormalizer, case_change_action "LOWER", locale "{STRING_LOCALE}").\n'
        "StringNormalizer takes 1-D [C] or [1, C]; this model is 1-D, so no batching (max_batch_size 0).\n"
        "onnxruntime rejects an empty input (C = 0). Elements must be valid UTF-8.",
        "string_lower",
        0,
        inputs,
        outputs,
        runtime='backend: "onnxruntime"',
    )

    def check(sess: Session) -> None:
        words = ["Hello", "WORLD", "MiXeD Case 123", "ÄÖÜ ß", "already lower", ""]
        out = _run(sess, {"INPUT0": np.array(words, dtype=object)})["OUTPUT0"]
        want = ["hello", "world", "mixed case 123", "äöü ß", "already lower", ""]
        if out.shape != (len(words),) or list(out) != want:
            raise AssertionError(f"OUTPUT0: got {out!r}, want {want!r}")
        out = _run(sess, {"INPUT0": np.array(["ONE"], dtype=object)})["OUTPUT0"]
        if list(out) != ["one"]:
            raise AssertionError(f"OUTPUT0: got {out!r}")

    return ModelSpec("string_lower", model, config, check)


def build_add_sub_autocomplete() -> ModelSpec:
    fp32 = DTYPES["FP32"]
    inputs = [Tensor("INPUT0", fp32, (4,)), Tensor("INPUT1", fp32, (4,))]
    outputs = [Tensor("OUTPUT0", fp32, (4,)), Tensor("OUTPUT1", fp32, (4,))]
    nodes = [
        helper.make_node("Add", ["INPUT0", "INPUT1"], ["OUTPUT0"], name="add"),
        helper.make_node("Sub", ["INPUT0", "INPUT1"], ["OUTPUT1"], name="sub"),
    ]
    model = make_model("add_sub_autocomplete", nodes, inputs, outputs, batched=True)

    def check(sess: Session) -> None:
        rng = np.random.default_rng(200)
        for batch in (1, 7):
            a = rng.standard_normal((batch, 4)).astype(np.float32)
            b = rng.standard_normal((batch, 4)).astype(np.float32)
            out = _run(sess, {"INPUT0": a, "INPUT1": b})
            _expect_equal(out["OUTPUT0"], a + b, "OUTPUT0")
            _expect_equal(out["OUTPUT1"], a - b, "OUTPUT1")

    # No config.pbtxt. The server should auto-complete: batchable (symbolic dim 0), dims [4].
    # (Triton itself picks max_batch_size 4 for such ONNX models.)
    expected = config_text("", "add_sub_autocomplete", 4, inputs, outputs)
    return ModelSpec("add_sub_autocomplete", model, None, check, autocomplete=expected)


def _datatype_samples(dt: DType) -> np.ndarray:
    if dt.protocol == "BYTES":
        return np.array(["", "abc", "ünïcödé", "with space", "x" * 300], dtype=object)
    if dt.protocol == "BOOL":
        return np.array([True, False, True, True], dtype=np.bool_)
    if dt.numpy.kind in "iu":
        info = np.iinfo(dt.numpy)
        return np.array([info.min, 0, 1, 42, info.max], dtype=dt.numpy)
    info_f = np.finfo(dt.numpy)
    return np.array([-1.5, 0.0, -0.0, info_f.tiny, info_f.max, np.inf, -np.inf, np.nan], dtype=dt.numpy)


def build_datatypes_onnx() -> ModelSpec:
    inputs: list[Tensor] = []
    outputs: list[Tensor] = []
    nodes: list[onnx.NodeProto] = []
    for dt in DTYPES.values():
        suffix = "STRING" if dt.protocol == "BYTES" else dt.protocol
        inputs.append(Tensor(f"IN_{suffix}", dt, (-1,)))
        outputs.append(Tensor(f"OUT_{suffix}", dt, (-1,)))
        nodes.append(helper.make_node("Identity", [f"IN_{suffix}"], [f"OUT_{suffix}"], name=f"id_{suffix}"))
    model = make_model("datatypes_onnx", nodes, inputs, outputs, batched=False)
    config = config_text(
        "datatypes_onnx: one ONNX Identity per datatype onnxruntime supports: OUT_<DT> = IN_<DT>,\n"
        "each 1-D of any length. BF16 is left out (onnxruntime's Python API cannot feed it).\n"
        "Every input is required: a request sends all of them.",
        "datatypes_onnx",
        0,
        inputs,
        outputs,
    )

    def expect_round_trip(got: np.ndarray, sent: np.ndarray, t_out: Tensor) -> None:
        if t_out.dtype.protocol == "BYTES":  # onnxruntime returns str elements
            if got.shape != sent.shape or list(got) != list(sent):
                raise AssertionError(f"{t_out.name}: got {got!r}, sent {sent!r}")
        else:
            _expect_equal(got, sent, t_out.name)

    def check(sess: Session) -> None:
        # all inputs at once
        feeds = {t.name: _datatype_samples(t.dtype) for t in inputs}
        out = _run(sess, feeds)
        for t_in, t_out in zip(inputs, outputs, strict=True):
            expect_round_trip(out[t_out.name], feeds[t_in.name], t_out)

    return ModelSpec("datatypes_onnx", model, config, check)


def _expect_equal(got: np.ndarray, want: np.ndarray, what: str) -> None:
    if got.dtype != want.dtype or got.shape != want.shape:
        raise AssertionError(f"{what}: got {got.dtype}{got.shape}, want {want.dtype}{want.shape}")
    equal_nan = want.dtype.kind == "f"
    if not np.array_equal(got, want, equal_nan=equal_nan):
        raise AssertionError(f"{what}: got {got!r}, want {want!r}")
    if equal_nan and not np.array_equal(np.signbit(got), np.signbit(want)):
        raise AssertionError(f"{what}: signs of zero differ")


def all_models() -> list[ModelSpec]:
    return [
        build_simple(),
        build_mlp_benchmark(),
        build_mlp_compute(),
        build_string_lower(),
        build_add_sub_autocomplete(),
        build_datatypes_onnx(),
    ]


README = f"""\
# Example model repository

Generated by `scripts/gen_models` (`scripts/gen_models.py`) with the `onnx` helper API;
do not edit by hand. Weights come from fixed seeds, so regenerating gives byte-identical
files. Every `model.onnx` pins ONNX IR version {IR_VERSION} and opset {OPSET} (the `onnx`
package would otherwise write an IR version onnxruntime cannot read).

Regenerate, verifying every model in onnxruntime (`--timings` also times the MLPs):

    scripts/gen_models --check
    scripts/gen_models --out /tmp/model_repository   # somewhere else

Layout is Triton's: `<model>/config.pbtxt` and `<model>/1/model.onnx`. Each config.pbtxt
starts with a comment saying what the model does.

- `simple`: Triton's classic. INPUT0, INPUT1 INT32 [16] -> OUTPUT0 = INPUT0 + INPUT1,
  OUTPUT1 = INPUT0 - INPUT1; max_batch_size 8.
- `mlp`: the benchmark model. FP32 MLP 64 -> 256 -> 16 (MatMul+Add, Relu, MatMul+Add),
  seeded random weights; INPUT0 [64] -> OUTPUT0 [16]; max_batch_size 64.
- `mlp_compute`: a heavier FP32 MLP 256 -> 1024 -> 1024 -> 256 (~130-145 us at batch 1 on one
  thread, ~340 us at batch 8) for batching experiments; INPUT0 [256] -> OUTPUT0 [256];
  max_batch_size 64.
- `string_lower`: BYTES INPUT0 [-1] -> OUTPUT0 [-1], each string lowercased (ONNX
  StringNormalizer, locale {STRING_LOCALE}); max_batch_size 0. onnxruntime rejects an empty
  input (zero elements).
- `add_sub_autocomplete`: FP32 INPUT0, INPUT1 [batch, 4] -> OUTPUT0 = sum, OUTPUT1 =
  difference. It has **no config.pbtxt**: the server must auto-complete it from the graph
  (batchable, dims [4]).
- `datatypes_onnx`: one Identity per datatype, IN_<DT> -> OUT_<DT>, dims [-1],
  max_batch_size 0, for BOOL, UINT8/16/32/64, INT8/16/32/64, FP16, FP32, FP64 and STRING.
  Every input is required, so a request sends all of them.

Not generated by `scripts/gen_models` (and not ONNX):

- `mlp_torch`: the `mlp` network with the same weights as TorchScript (`platform:
  "pytorch_libtorch"`, INPUT__0 [64] -> OUTPUT__0 [16], max_batch_size 64, two instances),
  for comparing frameworks (`scripts/bench --targets nereid,nereid-torch`). Generated by
  `scripts/gen_torch_models.py --check` from `mlp/1/model.onnx` (needs torch and onnx).
- `text_features`: a Python model (Triton's python-backend API, `1/model.py`): TEXT BYTES
  [1] per item -> FEATURES FP32 [64], hashed character trigrams, L2-normalised; the input
  of `mlp`. Invalid UTF-8 fails only that request (INVALID_ARGUMENT). max_batch_size 64.

`simple`, `mlp` and `datatypes_onnx` say `platform: "onnxruntime_onnx"`; `mlp_compute` and
`string_lower` say `backend: "onnxruntime"`, so both spellings are exercised.
"""


# --------------------------------------------------------------------------- writing


def write_if_changed(path: Path, data: bytes) -> bool:
    if path.is_file() and path.read_bytes() == data:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)
    return True


def generate(out: Path, specs: list[ModelSpec]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    changed = []
    for spec in specs:
        model_dir = out / spec.name
        if write_if_changed(model_dir / "1" / "model.onnx", spec.model.SerializeToString()):
            changed.append(f"{spec.name}/1/model.onnx")
        config_path = model_dir / "config.pbtxt"
        if spec.config is None:
            if config_path.exists():
                config_path.unlink()
                changed.append(f"{spec.name}/config.pbtxt (removed)")
        elif write_if_changed(config_path, spec.config.encode()):
            changed.append(f"{spec.name}/config.pbtxt")
    if write_if_changed(out / "README.md", README.encode()):
        changed.append("README.md")
    print(f"{out}: {len(specs)} models, " + (f"updated {', '.join(changed)}" if changed else "up to date"))


# --------------------------------------------------------------------------- checking


def _session(path: Path, threads: int | None = None) -> Session:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads is not None:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _graph_shape(vi: onnx.ValueInfoProto) -> list[int | str]:
    return [d.dim_param if d.HasField("dim_param") else d.dim_value for d in vi.type.tensor_type.shape.dim]


def _check_config_matches(spec: ModelSpec, model: onnx.ModelProto, config: str) -> None:
    """The config parses as a Triton ModelConfig and agrees with the graph's inputs/outputs."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    cfg = text_format.Parse(config, model_config_pb2.ModelConfig())
    if cfg.name not in ("", spec.name):
        raise AssertionError(f"config name {cfg.name!r} != directory name {spec.name!r}")
    if cfg.platform != "onnxruntime_onnx" and cfg.backend != "onnxruntime":
        raise AssertionError("config names neither the onnxruntime platform nor backend")
    by_type = {d.config: d for d in DTYPES.values()}
    for kind, declared, graph in (
        ("input", cfg.input, model.graph.input),
        ("output", cfg.output, model.graph.output),
    ):
        graph_by_name = {vi.name: vi for vi in graph}
        if sorted(graph_by_name) != sorted(t.name for t in declared):
            raise AssertionError(f"{kind}s {sorted(graph_by_name)} != config {[t.name for t in declared]}")
        for t in declared:
            vi = graph_by_name[t.name]
            dtype = by_type[model_config_pb2.DataType.Name(t.data_type)]
            if vi.type.tensor_type.elem_type != dtype.onnx:
                raise AssertionError(f"{t.name}: graph type differs from config {dtype.config}")
            shape = _graph_shape(vi)
            if cfg.max_batch_size > 0:
                if not shape or not isinstance(shape[0], str):
                    raise AssertionError(f"{t.name}: batchable config but graph dim 0 is {shape[:1]}")
                shape = shape[1:]
            want = [d for d in t.dims]
            got = [-1 if isinstance(d, str) else d for d in shape]
            if got != want:
                raise AssertionError(f"{t.name}: graph dims {got} != config dims {want}")


def check(out: Path, specs: list[ModelSpec]) -> bool:
    ok = True
    for spec in specs:
        model_dir = out / spec.name
        try:
            model = onnx.load(str(model_dir / "1" / "model.onnx"))
            if model.ir_version != IR_VERSION:
                raise AssertionError(f"ir_version {model.ir_version} != {IR_VERSION}")
            config_path = model_dir / "config.pbtxt"
            if spec.config is None:
                if config_path.exists():
                    raise AssertionError("has a config.pbtxt but must not")
                if spec.autocomplete is not None:
                    _check_config_matches(spec, model, spec.autocomplete)
            else:
                _check_config_matches(spec, model, config_path.read_text())
            spec.check(_session(model_dir / "1" / "model.onnx"))
        except Exception as exc:  # noqa: BLE001 - report every model, then fail
            ok = False
            print(f"  FAIL {spec.name}: {type(exc).__name__}: {exc}")
        else:
            print(f"  ok   {spec.name}")
    return ok


def timings(out: Path, specs: list[ModelSpec], batches: Sequence[int] = (1, 8, 64)) -> None:
    print("onnxruntime per-batch latency, in process, intra_op_num_threads=1 (median of 7 runs):")
    for spec in specs:
        if spec.timing_input is None:
            continue
        name, features = spec.timing_input
        sess = _session(out / spec.name / "1" / "model.onnx", threads=1)
        rng = np.random.default_rng(0)
        cells = []
        for batch in batches:
            x = {name: rng.standard_normal((batch, features)).astype(np.float32)}
            for _ in range(20):
                sess.run(None, x)
            t0 = time.perf_counter()
            sess.run(None, x)
            # enough iterations for ~50 ms per run
            iters = max(10, int(0.05 / max(time.perf_counter() - t0, 1e-6)))
            runs = []
            for _ in range(7):
                t0 = time.perf_counter()
                for _ in range(iters):
                    sess.run(None, x)
                runs.append((time.perf_counter() - t0) / iters)
            per_batch = statistics.median(runs) * 1e6
            cells.append(f"batch {batch:>2}: {per_batch:8.1f} us ({per_batch / batch:6.1f} us/sample)")
        print(f"  {spec.name:<12} " + " | ".join(cells))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help=f"repository dir (default {DEFAULT_OUT})"
    )
    parser.add_argument("--check", action="store_true", help="verify every model in onnxruntime")
    parser.add_argument("--timings", action="store_true", help="print ORT timings of mlp and mlp_compute")
    args = parser.parse_args(argv)

    specs = all_models()
    generate(args.out, specs)
    ok = True
    if args.check:
        ok = check(args.out, specs)
    if args.timings:
        timings(args.out, specs)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
