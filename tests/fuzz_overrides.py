"""Hypothesis strategies for hostile RepositoryModelLoad parameters (test_fuzz.py): config
overrides with paths to files planted outside the repository, numbers of the wrong size or type,
unknown fields, deep nesting or random ModelConfig content, and `file:` override keys that try to
leave the override directory or that no file system takes.

Fields whose number is work the server is asked to do (instance counts, warmup repetitions and
sizes) are kept small (BOUNDED): a config may legitimately ask for a lot of work, and where the
server should draw the line is a policy question, not something a fuzzer can decide.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from fuzz_strategies import PATH_LIKE, Draw, edge_ints, messages, names
from hypothesis import strategies as st
from tritonclient.grpc import model_config_pb2 as mc

# Fields whose number is work the server is asked to do: kept small (see the module docstring).
BOUNDED = {
    "inference.ModelInstanceGroup.count": st.integers(-2, 3),
    "inference.ModelWarmup.count": st.integers(0, 3),  # uint32
    "inference.ModelWarmup.batch_size": st.integers(0, 4),  # uint32
    "inference.ModelWarmup.Input.dims": st.integers(-3, 8),
    "inference.ModelInput.dims": st.one_of(st.integers(-3, 8), edge_ints(-(2**63), 2**63 - 1)),
}
PATH_FIELDS = ("default_model_filename", "cc_model_filenames", "label_filename", "EXECUTION_ENV_PATH",
               "input_data_file")
JSON_SCALARS = st.one_of(st.none(), st.booleans(), edge_ints(-(2**70), 2**70), st.floats(allow_nan=False),
                         st.text(max_size=10), st.sampled_from(["NaN", "Infinity", "1e999", "-0", "0x10", "TYPE_FP32"]))


def io_config(name: str, backend: str) -> dict[str, Any]:
    """A valid JSON config for the explicit server's load targets (all: INPUT0 -> OUTPUT0, FP32 [4])."""
    return {"name": name, "backend": backend, "max_batch_size": 0,
            "input": [{"name": "INPUT0", "data_type": "TYPE_FP32", "dims": [4]}],
            "output": [{"name": "OUTPUT0", "data_type": "TYPE_FP32", "dims": [4]}]}


def path_config(name: str, backend: str, where: str, path: str) -> str:
    """A valid config override for `name` whose path field `where` names `path`."""
    config = io_config(name, backend)
    if where == "default_model_filename":
        config["default_model_filename"] = path
    elif where == "cc_model_filenames":
        config["cc_model_filenames"] = {"7.5": path}
    elif where == "label_filename":
        config["output"][0]["label_filename"] = path
    elif where == "EXECUTION_ENV_PATH":
        config["parameters"] = {"EXECUTION_ENV_PATH": {"string_value": path}}
    else:
        config["model_warmup"] = [{"name": "w", "batch_size": 1, "inputs": {
            "INPUT0": {"data_type": "TYPE_FP32", "dims": [4], "input_data_file": path}}}]
    return json.dumps(config)


@dataclass(frozen=True)
class Override:
    """A `config` parameter: its text, and the JSON object it holds when it is one (None otherwise)."""

    text: str
    config: dict[str, Any] | None


def _nested(depth: int, leaf: str, kind: str) -> str:
    """JSON text nested `depth` deep (written by hand: json.dumps recurses)."""
    return ("[" * depth + leaf + "]" * depth) if kind == "list" else ('{"a":' * depth + leaf + "}" * depth)


@st.composite
def hostile_configs(draw: Draw, name: str, paths: Sequence[str]) -> Override:
    """A config override: valid-looking JSON with hostile paths, numbers of the wrong size or type,
    unknown fields and deep nesting; a random ModelConfig; or text that is not JSON at all."""
    kind = draw(st.sampled_from(["paths", "paths", "paths", "random", "wrong", "nested", "text"]))
    if kind == "text":
        return Override(draw(st.one_of(
            st.text(max_size=40), st.sampled_from(["{", "[]", "null", "1", '"x"', "{}" * 3, " "]),
            st.integers(1, 100_000).map(lambda n: _nested(n, "1", "list")))), None)
    backend = draw(st.sampled_from(["identity", "python", "python", "onnxruntime", "onnxruntime", "", "no_such",
                                    "../identity"]))
    config: dict[str, Any] = io_config(name, backend)
    if kind == "random":
        from google.protobuf import json_format

        message = draw(messages(mc.ModelConfig.DESCRIPTOR, BOUNDED))
        config = json_format.MessageToDict(message, preserving_proto_field_name=True) | {
            "name": draw(st.sampled_from([name, name, message.name]))}
        if draw(st.booleans()):  # a backend that loads, so that the rest is looked at
            config = {**io_config(name, backend), **{k: v for k, v in config.items() if k not in ("input", "output")}}
    # Mostly the planted files, and of the kind the backend would open (a .py for python).
    suffix = {"python": ".py", "onnxruntime": ".onnx"}.get(backend, "")
    fitting = [p for p in paths if suffix and p.endswith(suffix)] or list(paths)
    path = st.one_of(st.sampled_from(fitting), st.sampled_from(fitting), st.sampled_from(list(paths)),
                     st.sampled_from(PATH_LIKE), names())
    if kind == "paths" or draw(st.booleans()):
        where = draw(st.sampled_from(PATH_FIELDS + ("default_model_filename",) * 2))
        target = draw(path)
        if where == "default_model_filename":
            config["default_model_filename"] = target
        elif where == "cc_model_filenames":
            config["cc_model_filenames"] = {draw(st.sampled_from(["", "7.5", "../x"])): target}
        elif where == "label_filename" and config.get("output"):
            config["output"][0]["label_filename"] = target
        elif where == "EXECUTION_ENV_PATH":
            config["parameters"] = {"EXECUTION_ENV_PATH": {"string_value": target}}
        else:
            config["model_warmup"] = [{"name": "w", "batch_size": 1, "inputs": {
                "INPUT0": {"data_type": "TYPE_FP32", "dims": [4], "input_data_file": target}}}]
    if kind == "wrong":
        key = draw(st.sampled_from(["max_batch_size", "input", "output", "instance_group", "parameters",
                                    "dynamic_batching", "version_policy", "model_warmup", "name", "backend",
                                    "no_such_field", "optimization", "sequence_batching"]))
        config[key] = draw(st.one_of(JSON_SCALARS, st.lists(JSON_SCALARS, max_size=3),
                                     st.dictionaries(st.text(max_size=5), JSON_SCALARS, max_size=3)))
    text = json.dumps(config)
    if kind == "nested":
        depth = draw(st.sampled_from([10, 100, 1000, 5000, 50_000]))
        key = draw(st.sampled_from(["parameters", "input", "no_such_field", "version_policy"]))
        nested = _nested(depth, json.dumps(draw(JSON_SCALARS)), draw(st.sampled_from(["list", "dict"])))
        text = text[:-1] + f", {json.dumps(key)}: {nested}}}"
        return Override(text, None)
    return Override(text, config)


def override_keys(paths: Sequence[str]) -> st.SearchStrategy[str]:
    """`file:` override keys, mostly ones that try to leave the override directory, or that no
    file system takes (a component over 255 bytes, a path over 4096)."""
    fixed = st.sampled_from(["1/model.onnx", "1/model.py", "config.pbtxt", "1/../../x", "../x", "/abs", "1//x",
                             "1/./x", "1\\..\\x", "1/\x00", "", "1/" + "d/" * 200 + "x"])
    too_long = st.sampled_from(["1/" + "n" * 256, "n" * 300 + "/model.onnx", "1/" + "d/" * 2100 + "x"])
    rel = st.one_of(fixed, too_long, st.sampled_from(list(paths)), names())
    return rel.map(lambda r: "file:" + r)
