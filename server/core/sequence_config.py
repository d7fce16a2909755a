"""A model's `sequence_batching` config, checked once and turned into what the sequence batcher needs.

Triton's sequence batcher (core `src/sequence_batch_scheduler/`) fills control inputs the
client never sends (START, END, READY, CORRID) and implicit-state inputs into every batch
slot. Those tensors are inputs of the *model* but not of the *request*: the config lists them
under `sequence_batching`, not under `input`. So the backend is told about them here (extra
TensorSpecs), while the request path keeps checking clients against `input`/`output` only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tritonclient.grpc import model_config_pb2 as mc

from backends.base import TensorSpec
from backends.datatypes import NUMPY_OF, config_to_protocol

SB = mc.ModelSequenceBatching
START, END, READY, CORRID = SB.Control.CONTROL_SEQUENCE_START, SB.Control.CONTROL_SEQUENCE_END, \
    SB.Control.CONTROL_SEQUENCE_READY, SB.Control.CONTROL_SEQUENCE_CORRID

# Triton's default when the config leaves max_sequence_idle_microseconds at 0 (1 s).
DEFAULT_IDLE_US = 1_000_000
INITIAL_STATE_DIR = "initial_state"
_CORRID_TYPES = ("TYPE_UINT64", "TYPE_INT64", "TYPE_UINT32", "TYPE_INT32", "TYPE_STRING")


@dataclass(frozen=True)
class Control:
    """One control input: its tensor name, kind, and the (false, true) values or CORRID dtype."""

    name: str
    kind: int
    datatype: str  # protocol name
    false_true: tuple[object, object] = (0, 1)


@dataclass(frozen=True)
class State:
    """One implicit state: read from `input_name`, written back from `output_name`."""

    input_name: str
    output_name: str
    datatype: str
    dims: tuple[int, ...]
    initial: np.ndarray  # the value at sequence START (no batch dim)


@dataclass(frozen=True)
class SequenceSettings:
    strategy: str  # "direct" | "oldest"
    max_batch_size: int
    idle_ns: int
    queue_delay_ns: int
    minimum_slot_utilization: float  # direct only
    slots_per_instance: int
    preferred_batch_sizes: tuple[int, ...]  # oldest only
    controls: tuple[Control, ...]
    states: tuple[State, ...]
    iterative: bool = False  # iterative_sequence: a request is a whole sequence (its model may reschedule it)

    def extra_inputs(self) -> tuple[TensorSpec, ...]:
        """The model inputs the scheduler fills (controls, state inputs), as the backend sees them."""
        specs = [TensorSpec(c.name, c.datatype, (1,)) for c in self.controls]
        specs += [TensorSpec(s.input_name, s.datatype, s.dims) for s in self.states]
        return tuple(specs)

    def extra_outputs(self) -> tuple[TensorSpec, ...]:
        return tuple(TensorSpec(s.output_name, s.datatype, s.dims) for s in self.states)


def normalize(config: mc.ModelConfig) -> None:
    """Fill Triton's sequence-batching defaults in place (config normalisation calls this once)."""
    if config.WhichOneof("scheduling_choice") != "sequence_batching":
        return
    sb = config.sequence_batching
    if sb.max_sequence_idle_microseconds == 0:
        sb.max_sequence_idle_microseconds = DEFAULT_IDLE_US


def sequence_settings(config: mc.ModelConfig, model_dir: Path | None = None) -> SequenceSettings | None:
    """The model's sequence batching, or None without one; ValueError says what is wrong."""
    if config.WhichOneof("scheduling_choice") != "sequence_batching":
        return None
    sb = config.sequence_batching
    mbs = config.max_batch_size
    strategy = sb.WhichOneof("strategy_choice") or "direct"
    slots = max(1, mbs)
    preferred: tuple[int, ...] = ()
    if strategy == "oldest":
        delay_us = sb.oldest.max_queue_delay_microseconds
        if sb.oldest.max_candidate_sequences > 0:
            slots = sb.oldest.max_candidate_sequences
        preferred = tuple(sorted(p for p in sb.oldest.preferred_batch_size if 0 < p <= max(1, mbs)))
        utilization = 0.0
    else:
        delay_us = sb.direct.max_queue_delay_microseconds
        utilization = sb.direct.minimum_slot_utilization
        if not 0.0 <= utilization <= 1.0:
            raise ValueError(f"sequence_batching direct minimum_slot_utilization must be in [0, 1], got {utilization}")
    names = {t.name for t in config.input} | {t.name for t in config.output}
    controls = tuple(_control(ci, names) for ci in sb.control_input)
    for c in controls:
        names.add(c.name)
    states = tuple(_state(s, names, model_dir) for s in sb.state)
    if len({c.kind for c in controls}) != len(controls):
        raise ValueError("sequence_batching: a control kind (START, END, READY, CORRID) is given more than once")
    return SequenceSettings(
        strategy=strategy, max_batch_size=mbs,
        idle_ns=int(sb.max_sequence_idle_microseconds or DEFAULT_IDLE_US) * 1000,
        queue_delay_ns=int(delay_us) * 1000, minimum_slot_utilization=float(utilization),
        slots_per_instance=slots, preferred_batch_sizes=preferred, controls=controls, states=states,
        iterative=sb.iterative_sequence,
    )


def _control(ci: Any, taken: set[str]) -> Control:
    where = f"sequence_batching control_input '{ci.name}'"
    if not ci.name:
        raise ValueError("sequence_batching: a control_input has no name")
    if ci.name in taken:
        raise ValueError(f"{where}: the name is also a model input or output")
    if len(ci.control) != 1:
        raise ValueError(f"{where}: expected exactly one control, got {len(ci.control)}")
    c = ci.control[0]
    if c.kind == CORRID:
        type_name = mc.DataType.Name(c.data_type)
        if type_name not in _CORRID_TYPES:
            raise ValueError(f"{where}: CONTROL_SEQUENCE_CORRID needs data_type one of {', '.join(_CORRID_TYPES)}, "
                             f"got {type_name}")
        return Control(ci.name, c.kind, config_to_protocol(type_name))
    pairs = [("INT32", tuple(c.int32_false_true)), ("FP32", tuple(c.fp32_false_true)),
             ("BOOL", tuple(c.bool_false_true))]
    given = [(dtype, values) for dtype, values in pairs if values]
    if len(given) != 1 or len(given[0][1]) != 2:
        raise ValueError(f"{where}: {SB.Control.Kind.Name(c.kind)} needs exactly one of int32_false_true, "
                         "fp32_false_true or bool_false_true with two values [false, true]")
    dtype, values = given[0]
    return Control(ci.name, c.kind, dtype, (values[0], values[1]))


def _state(s: Any, taken: set[str], model_dir: Path | None) -> State:
    where = f"sequence_batching state '{s.input_name}'"
    if not s.input_name or not s.output_name:
        raise ValueError("sequence_batching: a state needs both input_name and output_name")
    for name in (s.input_name, s.output_name):
        if name in taken:
            raise ValueError(f"{where}: '{name}' is also a model input, output or control input")
        taken.add(name)
    datatype = config_to_protocol(mc.DataType.Name(s.data_type))
    if datatype not in NUMPY_OF or datatype == "BYTES":
        raise ValueError(f"{where}: data_type {mc.DataType.Name(s.data_type)} is not supported for implicit state")
    dims = tuple(int(d) for d in s.dims)
    if len(s.initial_state) > 1:
        raise ValueError(f"initial_state field for state input '{s.input_name}' must contain exactly one or zero "
                         f"element. Found '{len(s.initial_state)}' elements.")
    dtype = NUMPY_OF[datatype]
    if not len(s.initial_state):
        if any(d < 0 for d in dims):
            raise ValueError(f"{where}: dims {list(dims)} are variable; give an initial_state with concrete dims")
        return State(s.input_name, s.output_name, datatype, dims, np.zeros(dims, dtype))
    init = s.initial_state[0]
    if init.data_type != s.data_type:
        raise ValueError(f"The data type used for 'initial_state' field of state '{s.input_name}' does not match "
                         "the state data type.")
    shape = tuple(int(d) for d in init.dims)
    if len(shape) != len(dims) or any(d < 0 for d in shape) or \
            any(want not in (-1, got) for want, got in zip(dims, shape, strict=True)):
        raise ValueError(f"{where}: initial_state dims {list(shape)} do not match the state dims {list(dims)}")
    if init.WhichOneof("state_data") == "data_file":
        if model_dir is None:
            raise ValueError(f"{where}: initial_state data_file needs the model directory")
        raw = (model_dir / INITIAL_STATE_DIR / init.data_file).read_bytes()
        count = int(np.prod(shape))
        if len(raw) < count * dtype.itemsize:
            raise ValueError(f"initial_state setting expects {count * dtype.itemsize} bytes, but the data provided "
                             f"from {init.data_file} only has {len(raw)} bytes.")
        value = np.frombuffer(raw, dtype, count).reshape(shape).copy()
    else:
        value = np.zeros(shape, dtype)
    return State(s.input_name, s.output_name, datatype, dims, value)
