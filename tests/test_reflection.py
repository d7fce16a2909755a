"""gRPC server reflection: grpcurl-style discovery of the services and their messages."""

from __future__ import annotations

import grpc
from google.protobuf import descriptor_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from tests.util import ServerProcess


def _ask(
    srv: ServerProcess, request: reflection_pb2.ServerReflectionRequest
) -> reflection_pb2.ServerReflectionResponse:
    with grpc.insecure_channel(srv.url) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        return next(iter(stub.ServerReflectionInfo(iter([request]), timeout=10)))


def test_reflection_lists_the_services(identity_server: ServerProcess) -> None:
    response = _ask(identity_server, reflection_pb2.ServerReflectionRequest(list_services=""))
    names = {s.name for s in response.list_services_response.service}
    assert {"inference.GRPCInferenceService", "grpc.health.v1.Health"} <= names


def test_reflection_describes_model_infer(identity_server: ServerProcess) -> None:
    response = _ask(
        identity_server,
        reflection_pb2.ServerReflectionRequest(file_containing_symbol="inference.GRPCInferenceService"),
    )
    files = [descriptor_pb2.FileDescriptorProto.FromString(raw)
             for raw in response.file_descriptor_response.file_descriptor_proto]
    service = next(s for f in files for s in f.service if s.name == "GRPCInferenceService")
    methods = {m.name: m for m in service.method}
    assert methods["ModelInfer"].input_type == ".inference.ModelInferRequest"
    assert methods["ModelStreamInfer"].client_streaming and methods["ModelStreamInfer"].server_streaming
