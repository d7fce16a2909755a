"""What a backend is told about a model version: its `ModelSpec`, built from a normalised config.

The repository normalises a config once (server/repository/config.py); from then on the core
only translates it. This translation lives in the core, beside the Model that uses it, so
that the core never reaches back into the repository: the repository hands the core a
config and a folder, and the core derives what its backends need.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from google.protobuf import json_format
from tritonclient.grpc import model_config_pb2 as mc

from backends.base import ModelSpec, TensorSpec
from backends.datatypes import config_to_protocol


def tensor_specs(tensors: Iterable[mc.ModelInput] | Iterable[mc.ModelOutput]) -> tuple[TensorSpec, ...]:
    """Config inputs or outputs as backend TensorSpecs."""
    return tuple(
        TensorSpec(
            name=t.name,
            datatype=config_to_protocol(mc.DataType.Name(t.data_type)),
            dims=tuple(int(d) for d in t.dims),
            reshape=tuple(int(d) for d in t.reshape.shape) if t.HasField("reshape") else None,
        )
        for t in tensors
    )


def config_to_json(config: mc.ModelConfig) -> str:
    """The config as JSON with the proto's field names (what Python models get as `model_config`)."""
    return json_format.MessageToJson(config, preserving_proto_field_name=True)


def build_spec(config: mc.ModelConfig, model_dir: Path, version: int) -> ModelSpec:
    """The backend's view of one version: files, tensors, parameters and instance count."""
    version_dir = model_dir / str(version)
    return ModelSpec(
        name=config.name,
        version=version,
        model_dir=model_dir,
        version_dir=version_dir,
        model_file=version_dir / config.default_model_filename,
        max_batch_size=config.max_batch_size,
        inputs=tensor_specs(config.input),
        outputs=tensor_specs(config.output),
        parameters={k: v.string_value for k, v in config.parameters.items()},
        config_json=config_to_json(config),
        instance_count=sum(g.count for g in config.instance_group),
    )
