"""The wire contract in protos/ must be identical to the protos tritonclient ships.

protos/*.proto are compiled with grpc_tools.protoc into a descriptor set file
(never into this process's default descriptor pool, where tritonclient's
copy of "grpc_service.proto" already lives) and compared element by element
with tritonclient's and grpcio-health-checking's descriptors.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2
from tritonclient.grpc import model_config_pb2, service_pb2
from util import scaled

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
PROTO_FILES = ["grpc_service.proto", "model_config.proto", "health.proto"]

FDP = descriptor_pb2.FileDescriptorProto
FieldDP = descriptor_pb2.FieldDescriptorProto


def _to_proto(file_descriptor) -> FDP:
    fdp = FDP()
    file_descriptor.CopyToProto(fdp)
    return fdp


@pytest.fixture(scope="module")
def ours(tmp_path_factory) -> dict[str, FDP]:
    """protos/ compiled by protoc into a FileDescriptorSet, keyed by file name."""
    out = tmp_path_factory.mktemp("protos") / "protos.pb"
    cmd = [sys.executable, "-m", "grpc_tools.protoc", f"-I{PROTOS}", f"--descriptor_set_out={out}",
           "--include_imports", *(str(PROTOS / f) for f in PROTO_FILES)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, f"protoc failed on protos/:\n{proc.stderr}"
    fds = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
    return {f.name: f for f in fds.file}


# ---------------------------------------------------------------------------
# Descriptor comparison. Each function returns human-readable differences;
# `where` names the element (e.g. "inference.ModelInferRequest.id").


def _by_name(items) -> dict:
    return {i.name: i for i in items}


def _compare_names(where: str, kind: str, ours: dict, theirs: dict) -> list[str]:
    diffs = [f"{where}: missing {kind} {n!r}" for n in theirs if n not in ours]
    diffs += [f"{where}: extra {kind} {n!r}" for n in ours if n not in theirs]
    return diffs


def _compare_enum(where: str, ours, theirs) -> list[str]:
    o = {v.name: v.number for v in ours.value}
    t = {v.name: v.number for v in theirs.value}
    diffs = _compare_names(where, "enum value", o, t)
    diffs += [f"{where}.{n}: number {o[n]} != {t[n]} (reference)" for n in t if n in o and o[n] != t[n]]
    return diffs


FIELD_ATTRS = ("number", "type", "label", "type_name", "proto3_optional")


def _field_repr(attr: str, value) -> str:
    if attr == "type":
        return FieldDP.Type.Name(value)
    if attr == "label":
        return FieldDP.Label.Name(value)
    return repr(value)


def _compare_field(where: str, of, tf, o_msg, t_msg) -> list[str]:
    diffs = []
    for attr in FIELD_ATTRS:
        ov, tv = getattr(of, attr), getattr(tf, attr)
        if ov != tv:
            diffs.append(f"{where}: {attr} {_field_repr(attr, ov)} != {_field_repr(attr, tv)} (reference)")
    o_has, t_has = of.HasField("oneof_index"), tf.HasField("oneof_index")
    o_oneof = (of.oneof_index, o_msg.oneof_decl[of.oneof_index].name) if o_has else None
    t_oneof = (tf.oneof_index, t_msg.oneof_decl[tf.oneof_index].name) if t_has else None
    if o_oneof != t_oneof:
        diffs.append(f"{where}: oneof (index, name) {o_oneof} != {t_oneof} (reference)")
    return diffs


def _compare_message(where: str, ours, theirs) -> list[str]:
    diffs = []
    if ours.options.map_entry != theirs.options.map_entry:
        diffs.append(f"{where}: map_entry {ours.options.map_entry} != {theirs.options.map_entry}")
    o_oneofs = [o.name for o in ours.oneof_decl]
    t_oneofs = [o.name for o in theirs.oneof_decl]
    if o_oneofs != t_oneofs:
        diffs.append(f"{where}: oneofs {o_oneofs} != {t_oneofs} (reference)")
    o_fields, t_fields = _by_name(ours.field), _by_name(theirs.field)
    diffs += _compare_names(where, "field", o_fields, t_fields)
    for name, tf in t_fields.items():
        if name in o_fields:
            diffs += _compare_field(f"{where}.{name}", o_fields[name], tf, ours, theirs)
    diffs += _compare_enums(where, ours.enum_type, theirs.enum_type)
    diffs += _compare_messages(where, ours.nested_type, theirs.nested_type)
    return diffs


def _compare_each(where: str, kind: str, ours, theirs, compare) -> list[str]:
    """Names missing or extra on either side, then `compare(where.name, ours, theirs)` for each
    element both sides have (enums, messages, services, rpcs)."""
    o, t = _by_name(ours), _by_name(theirs)
    diffs = _compare_names(where, kind, o, t)
    for name in t:
        if name in o:
            diffs += compare(f"{where}.{name}", o[name], t[name])
    return diffs


def _compare_enums(where: str, ours, theirs) -> list[str]:
    return _compare_each(where, "enum", ours, theirs, _compare_enum)


def _compare_messages(where: str, ours, theirs) -> list[str]:
    return _compare_each(where, "message", ours, theirs, _compare_message)


def _compare_method(where: str, ours, theirs) -> list[str]:
    return [f"{where}: {attr} {getattr(ours, attr)!r} != {getattr(theirs, attr)!r} (reference)"
            for attr in ("input_type", "output_type", "client_streaming", "server_streaming")
            if getattr(ours, attr) != getattr(theirs, attr)]


def _compare_service(where: str, ours, theirs) -> list[str]:
    return _compare_each(where, "rpc", ours.method, theirs.method, _compare_method)


def _compare_services(where: str, ours, theirs) -> list[str]:
    return _compare_each(where, "service", ours, theirs, _compare_service)


def compare_files(ours: FDP, theirs: FDP) -> list[str]:
    """All differences between two file descriptors that matter on the wire."""
    where = theirs.package
    diffs = []
    if ours.package != theirs.package:
        diffs.append(f"{ours.name}: package {ours.package!r} != {theirs.package!r}")
    if ours.syntax != theirs.syntax:
        diffs.append(f"{ours.name}: syntax {ours.syntax!r} != {theirs.syntax!r}")
    diffs += _compare_enums(where, ours.enum_type, theirs.enum_type)
    diffs += _compare_messages(where, ours.message_type, theirs.message_type)
    diffs += _compare_services(where, ours.service, theirs.service)
    return diffs


def _assert_same(ours: FDP, theirs: FDP) -> None:
    diffs = compare_files(ours, theirs)
    assert not diffs, f"protos/{ours.name} differs from {theirs.name}:\n  " + "\n  ".join(diffs)


# ---------------------------------------------------------------------------


def test_grpc_service_matches_tritonclient(ours):
    theirs = _to_proto(service_pb2.DESCRIPTOR)
    mine = ours["grpc_service.proto"]
    assert list(mine.dependency) == list(theirs.dependency) == ["model_config.proto"]
    _assert_same(mine, theirs)


def test_model_config_matches_tritonclient(ours):
    _assert_same(ours["model_config.proto"], _to_proto(model_config_pb2.DESCRIPTOR))


def test_health_matches_grpcio_health_checking(ours):
    _assert_same(ours["health.proto"], _to_proto(health_pb2.DESCRIPTOR))


def test_protos_cover_every_rpc(ours):
    methods = [m.name for m in ours["grpc_service.proto"].service[0].method]
    assert len(methods) == 20 and "ModelStreamInfer" in methods
    assert [m.name for m in ours["health.proto"].service[0].method] == ["Check", "Watch"]


def test_comparison_reports_the_differing_element():
    """The comparator must catch (and name) changes that break the wire format."""
    theirs = _to_proto(service_pb2.DESCRIPTOR)
    mine = FDP()
    mine.CopyFrom(theirs)
    assert compare_files(mine, theirs) == []

    req = next(m for m in mine.message_type if m.name == "ModelInferRequest")
    next(f for f in req.field if f.name == "id").number = 33
    tensor = next(m for m in req.nested_type if m.name == "InferInputTensor")
    next(f for f in tensor.field if f.name == "shape").type = FieldDP.TYPE_INT32
    param = next(m for m in mine.message_type if m.name == "InferParameter")
    param.field.pop()  # uint64_param
    next(m for m in mine.service[0].method if m.name == "ModelStreamInfer").client_streaming = False
    diffs = "\n".join(compare_files(mine, theirs))
    assert "inference.ModelInferRequest.id: number 33 != 3" in diffs
    assert "inference.ModelInferRequest.InferInputTensor.shape: type TYPE_INT32 != TYPE_INT64" in diffs
    assert "inference.InferParameter: missing field 'uint64_param'" in diffs
    assert "inference.GRPCInferenceService.ModelStreamInfer: client_streaming False != True" in diffs


def test_gen_stubs_produces_importable_python_stubs(tmp_path):
    out = tmp_path / "stubs"
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gen_stubs"), str(out)],
                          capture_output=True, text=True, timeout=scaled(120))
    assert proc.returncode == 0, proc.stderr
    for stem in ("grpc_service", "model_config", "health"):
        for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py"):
            assert (out / f"{stem}{suffix}").is_file(), f"gen_stubs did not write {stem}{suffix}"

    # Import in a fresh interpreter (our generated copy and tritonclient's would clash in one
    # pool), build a request there, and check tritonclient parses its bytes identically.
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(out)!r})
        import grpc_service_pb2 as pb
        import grpc_service_pb2_grpc as pb_grpc
        import health_pb2_grpc
        assert hasattr(pb_grpc, "GRPCInferenceServiceStub")
        assert hasattr(pb_grpc, "GRPCInferenceServiceServicer")
        assert hasattr(health_pb2_grpc, "HealthStub")
        req = pb.ModelInferRequest(model_name="m", model_version="2", id="r1")
        req.parameters["priority"].uint64_param = 7
        t = req.inputs.add(name="x", datatype="FP32", shape=[1, 3])
        t.parameters["shared_memory_region"].string_param = "r"
        req.outputs.add(name="y")
        req.raw_input_contents.append(bytes(12))
        sys.stdout.write(req.SerializeToString().hex())
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=scaled(60))
    assert proc.returncode == 0, proc.stderr
    parsed = service_pb2.ModelInferRequest.FromString(bytes.fromhex(proc.stdout))
    assert (parsed.model_name, parsed.model_version, parsed.id) == ("m", "2", "r1")
    assert parsed.parameters["priority"].uint64_param == 7
    assert parsed.inputs[0].name == "x" and list(parsed.inputs[0].shape) == [1, 3]
    assert parsed.inputs[0].parameters["shared_memory_region"].string_param == "r"
    assert parsed.outputs[0].name == "y" and parsed.raw_input_contents == [bytes(12)]
