"""`--grpc-restricted-protocol`, as tritonserver defines it: a call to a restricted group
needs header `triton-grpc-protocol-<key>: <value>`; without it, or with a wrong value, it is
refused with UNAVAILABLE "This protocol is restricted, expecting header '<header>'" (Triton's
status and text, server/src/grpc/grpc_server.cc); other groups stay open; streams are
restricted too; the secret values never reach the log, a message or the metadata."""

from __future__ import annotations

import os
import queue
import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc
from tritonclient.utils import InferenceServerException
from util import PYTHON, ROOT, ServerProcess, expect_error, identity_config, raw_request, write_model

from server.protocol.access import interceptors, method_groups
from server.settings import RESTRICTED_PROTOCOL_GROUPS, parse_restricted_protocols

TIME_FACTOR = float(os.environ.get("NEREID_TEST_TIME_FACTOR", "1"))
TIMEOUT = 10.0 * TIME_FACTOR

INFER_SECRET = "s3cret-Infer-7f1c9a"
ADMIN_SECRET = "s3cret-Admin-b82e40"
INFER_HEADER = "triton-grpc-protocol-infer-key"
ADMIN_HEADER = "triton-grpc-protocol-admin-key"
INFER_OK = ((INFER_HEADER, INFER_SECRET),)
ADMIN_OK = ((ADMIN_HEADER, ADMIN_SECRET),)


def refused_message(header: str) -> str:
    return f"This protocol is restricted, expecting header '{header}'"


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("restricted_repo")
    write_model(path, "echo", identity_config("echo", [("INPUT0", "FP32", [4])]))
    return path


@pytest.fixture(scope="module")
def server(repo: Path) -> Iterator[ServerProcess]:
    """health and inference share one key, model-repository has another (Triton's own L0_grpc layout)."""
    srv = ServerProcess([repo], [
        "--log-verbose", "1",
        f"--grpc-restricted-protocol=health,inference:infer-key={INFER_SECRET}",
        f"--grpc-restricted-protocol=model-repository:admin-key={ADMIN_SECRET}",
    ])
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def stub(server: ServerProcess) -> Iterator[pb_grpc.GRPCInferenceServiceStub]:
    channel = server.channel()
    yield pb_grpc.GRPCInferenceServiceStub(channel)
    channel.close()


def _inputs() -> list[grpcclient.InferInput]:
    tensor = grpcclient.InferInput("INPUT0", [4], "FP32")
    tensor.set_data_from_numpy(np.arange(4, dtype=np.float32))
    return [tensor]


def _expect_refused(header: str, fn, *args, **kwargs) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        fn(*args, **kwargs)
    error = info.value
    assert error.code() == grpc.StatusCode.UNAVAILABLE, (error.code(), error.details())
    assert error.details() == refused_message(header)
    return error


# ---------------------------------------------------------------------------
# Inference (unary and streaming)


def test_infer_refused_without_header(server: ServerProcess) -> None:
    client = grpcclient.InferenceServerClient(server.url)
    error = expect_error("UNAVAILABLE", client.infer, "echo", _inputs())
    assert error.message() == refused_message(INFER_HEADER)
    error = expect_error("UNAVAILABLE", client.infer, "echo", _inputs(), headers={"test": "1"})
    assert error.message() == refused_message(INFER_HEADER)


def test_infer_refused_with_wrong_value_or_other_key(server: ServerProcess) -> None:
    client = grpcclient.InferenceServerClient(server.url)
    for headers in ({INFER_HEADER: INFER_SECRET + "x"}, {INFER_HEADER: INFER_SECRET[:-1]}, {INFER_HEADER: ""},
                    {ADMIN_HEADER: ADMIN_SECRET}, {INFER_HEADER + "x": INFER_SECRET}):
        error = expect_error("UNAVAILABLE", client.infer, "echo", _inputs(), headers=headers)
        assert error.message() == refused_message(INFER_HEADER)


def test_infer_passes_with_header(server: ServerProcess) -> None:
    client = grpcclient.InferenceServerClient(server.url)
    result = client.infer("echo", _inputs(), headers={INFER_HEADER: INFER_SECRET})
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), np.arange(4, dtype=np.float32))


def test_first_header_decides(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    """Only the first occurrence counts (as Triton's multimap find): no several guesses per call."""
    request = raw_request("echo", [("INPUT0", "FP32", np.zeros(4, np.float32))])
    _expect_refused(INFER_HEADER, stub.ModelInfer, request,
                    metadata=((INFER_HEADER, "guess"), (INFER_HEADER, INFER_SECRET)), timeout=TIMEOUT)
    stub.ModelInfer(request, metadata=((INFER_HEADER, INFER_SECRET), (INFER_HEADER, "guess")), timeout=TIMEOUT)


def test_stream_refused_without_header(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    request = raw_request("echo", [("INPUT0", "FP32", np.zeros(4, np.float32))])
    for metadata in ((), ((INFER_HEADER, "wrong"),)):
        responses = stub.ModelStreamInfer(iter([request]), metadata=metadata, timeout=TIMEOUT)
        _expect_refused(INFER_HEADER, list, responses)


def test_stream_refused_before_any_request(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    """The stream is ended at once: a client that never sends gets the status, not a hang."""
    never: queue.Queue[pb.ModelInferRequest] = queue.Queue()
    responses = stub.ModelStreamInfer(iter(never.get, None), timeout=TIMEOUT)
    _expect_refused(INFER_HEADER, next, responses)


def test_stream_passes_with_header(server: ServerProcess) -> None:
    client = grpcclient.InferenceServerClient(server.url)
    results: queue.Queue = queue.Queue()
    client.start_stream(lambda result, error: results.put((result, error)), headers={INFER_HEADER: INFER_SECRET})
    try:
        for _ in range(3):
            client.async_stream_infer("echo", _inputs())
        for _ in range(3):
            result, error = results.get(timeout=TIMEOUT)
            assert error is None, error
            np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), np.arange(4, dtype=np.float32))
    finally:
        client.stop_stream()


def test_tritonclient_stream_without_header_reports_the_refusal(server: ServerProcess) -> None:
    client = grpcclient.InferenceServerClient(server.url)
    results: queue.Queue = queue.Queue()
    client.start_stream(lambda result, error: results.put((result, error)))
    try:
        try:
            client.async_stream_infer("echo", _inputs())
        except InferenceServerException:
            pass  # the refusal can end the stream before the request is even written
        result, error = results.get(timeout=TIMEOUT)
    finally:
        client.stop_stream()
    assert result is None and error is not None
    assert refused_message(INFER_HEADER) in str(error)


# ---------------------------------------------------------------------------
# Health (Triton's RPCs and grpc.health.v1), model repository, open groups


def test_health_rpcs_restricted(server: ServerProcess, stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    client = grpcclient.InferenceServerClient(server.url)
    assert expect_error("UNAVAILABLE", client.is_server_live).message() == refused_message(INFER_HEADER)
    assert expect_error("UNAVAILABLE", client.is_server_ready).message() == refused_message(INFER_HEADER)
    assert expect_error("UNAVAILABLE", client.is_model_ready, "echo").message() == refused_message(INFER_HEADER)
    assert client.is_server_live(headers={INFER_HEADER: INFER_SECRET})
    assert client.is_model_ready("echo", headers={INFER_HEADER: INFER_SECRET})
    assert stub.ServerReady(pb.ServerReadyRequest(), metadata=INFER_OK, timeout=TIMEOUT).ready


def test_grpc_health_check_and_watch_restricted(server: ServerProcess) -> None:
    with server.channel() as channel:
        health = health_pb2_grpc.HealthStub(channel)
        request = health_pb2.HealthCheckRequest(service="")
        _expect_refused(INFER_HEADER, health.Check, request, timeout=TIMEOUT)
        assert health.Check(request, metadata=INFER_OK, timeout=TIMEOUT).status == \
            health_pb2.HealthCheckResponse.SERVING
        _expect_refused(INFER_HEADER, next, health.Watch(request, timeout=TIMEOUT))
        watch = health.Watch(request, metadata=INFER_OK, timeout=TIMEOUT)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        watch.cancel()


def test_model_repository_restricted_with_its_own_key(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    request = pb.RepositoryIndexRequest()
    _expect_refused(ADMIN_HEADER, stub.RepositoryIndex, request, timeout=TIMEOUT)
    _expect_refused(ADMIN_HEADER, stub.RepositoryIndex, request, metadata=INFER_OK, timeout=TIMEOUT)
    index = stub.RepositoryIndex(request, metadata=ADMIN_OK, timeout=TIMEOUT)
    assert [m.name for m in index.models] == ["echo"]
    _expect_refused(ADMIN_HEADER, stub.RepositoryModelUnload, pb.RepositoryModelUnloadRequest(model_name="echo"),
                    metadata=INFER_OK, timeout=TIMEOUT)


def test_other_groups_stay_open(server: ServerProcess, stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    client = grpcclient.InferenceServerClient(server.url)
    assert client.get_server_metadata().name
    assert client.get_model_metadata("echo").name == "echo"
    assert client.get_model_config("echo").config.name == "echo"
    assert client.get_inference_statistics("echo").model_stats
    # Open groups also ignore a wrong header (Triton's L0_grpc test_sanity).
    assert client.get_inference_statistics("echo", headers={INFER_HEADER: "wrong"}).model_stats


def test_secrets_never_leave_the_server(server: ServerProcess, stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    """Refused and accepted calls, then: neither secret is in the log (verbose 1), in a
    refusal's details, or in its initial or trailing metadata."""
    request = raw_request("echo", [("INPUT0", "FP32", np.zeros(4, np.float32))])
    errors = [
        _expect_refused(INFER_HEADER, stub.ModelInfer, request, metadata=((INFER_HEADER, "bad"),), timeout=TIMEOUT),
        _expect_refused(ADMIN_HEADER, stub.RepositoryIndex, pb.RepositoryIndexRequest(), timeout=TIMEOUT),
    ]
    stub.ModelInfer(request, metadata=INFER_OK, timeout=TIMEOUT)
    stub.RepositoryIndex(pb.RepositoryIndexRequest(), metadata=ADMIN_OK, timeout=TIMEOUT)
    for error in errors:
        seen = repr((error.details(), error.initial_metadata(), error.trailing_metadata(), error.debug_error_string()))
        assert INFER_SECRET not in seen and ADMIN_SECRET not in seen
    log = server.log
    assert f"restricted protocols health,inference: calls need header '{INFER_HEADER}'" in log
    assert INFER_SECRET not in log and ADMIN_SECRET not in log
    assert "s3cret" not in log


# ---------------------------------------------------------------------------
# Every RPC of every group is covered


def test_every_rpc_is_refused_when_every_group_is_restricted(repo: Path, server_factory) -> None:
    groups = ",".join(RESTRICTED_PROTOCOL_GROUPS)
    srv = server_factory(repo, f"--grpc-restricted-protocol={groups}:k=v")
    header = "triton-grpc-protocol-k"
    with srv.channel() as channel:
        for method, (_group, client_streaming, server_streaming) in method_groups().items():
            for metadata, refused in (((), True), (((header, "v"),), False)):
                if client_streaming and server_streaming:
                    call = channel.stream_stream(method)(iter([]), metadata=metadata, timeout=TIMEOUT)
                elif server_streaming:
                    call = channel.unary_stream(method)(b"", metadata=metadata, timeout=TIMEOUT)
                else:
                    call = None
                try:
                    if call is None:
                        channel.unary_unary(method)(b"", metadata=metadata, timeout=TIMEOUT)
                    else:
                        next(call, None)
                        call.cancel()
                    details = None
                except grpc.RpcError as error:
                    details = error.details()
                if refused:
                    assert details == refused_message(header), (method, details)
                else:
                    assert details != refused_message(header), method


def test_reflection_is_in_the_metadata_group(repo: Path, server_factory) -> None:
    srv = server_factory(repo, "--grpc-restricted-protocol=metadata:meta=m")
    with srv.channel() as channel:
        info = channel.stream_stream("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo")
        with pytest.raises(grpc.RpcError) as error:
            list(info(iter([]), timeout=TIMEOUT))
        assert error.value.details() == refused_message("triton-grpc-protocol-meta")
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        assert stub.ServerLive(pb.ServerLiveRequest(), timeout=TIMEOUT).live  # health is not restricted here


# ---------------------------------------------------------------------------
# Flag parsing (Triton's formats and messages) and the open fast path


def test_every_rpc_has_a_group() -> None:
    groups = method_groups()
    assert len(groups) == 20 + 2 + 1 + 3  # + nereid.Rollout's Status, Promote, Abort
    assert groups["/nereid.Rollout/Promote"] == ("model-repository", False, False)
    assert {group for group, _, _ in groups.values()} == set(RESTRICTED_PROTOCOL_GROUPS)
    assert groups["/inference.GRPCInferenceService/ModelStreamInfer"] == ("inference", True, True)
    assert groups["/grpc.health.v1.Health/Check"][0] == "health"
    assert groups["/inference.GRPCInferenceService/ModelConfig"][0] == "model-config"


def test_no_interceptor_when_nothing_is_restricted() -> None:
    assert interceptors(()) == []


def test_parse_restricted_protocols() -> None:
    parsed = parse_restricted_protocols(["health,inference:Infer-Key=a:b=c", "model-repository:admin=x"])
    assert [(r.groups, r.header, r.value) for r in parsed] == [
        (("health", "inference"), "triton-grpc-protocol-infer-key", "a:b=c"),
        (("model-repository",), "triton-grpc-protocol-admin", "x"),
    ]
    assert "a:b=c" not in repr(parsed)


@pytest.mark.parametrize(("values", "message"), [
    (["health:k=v", "inference,health:k2=v2"],
     "restricted protocol 'health' can not be specified in multiple config groups"),
    (["health,health:k=v"], "restricted protocol 'health' can not be specified in multiple config groups"),
    (["inference,infer:k=v"], "unknown restricted protocol 'infer'; expected one of health, metadata, inference, "
                              "shared-memory, model-config, model-repository, statistics, trace, logging"),
    (["health:k"], "--grpc-restricted-protocol option format is '<protocol>[,<protocol>...]:<key>=<value>'. "
                   "Got 'health:...'"),
    (["health=secretvalue"], "--grpc-restricted-protocol option format is "
                             "'<protocol>[,<protocol>...]:<key>=<value>'."),
    (["health:k="], "--grpc-restricted-protocol option format is '<protocol>[,<protocol>...]:<key>=<value>'. "
                    "Got 'health:...'"),
    ([":k=v"], "--grpc-restricted-protocol option format is '<protocol>[,<protocol>...]:<key>=<value>'. "
               "Got ':...'"),
    (["health:a b=v"], "--grpc-restricted-protocol key 'a b' is not a usable gRPC header name "
                       "(letters, digits, '-', '_', '.'; not ending in '-bin')"),
    (["health:k=caf\u00e9"], "--grpc-restricted-protocol value for key 'k' must be printable ASCII "
                             "(the value is not shown)"),
])
def test_parse_errors(values: list[str], message: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_restricted_protocols(values)
    assert str(info.value) == message
    assert "secretvalue" not in str(info.value)


def test_bad_flag_stops_startup_with_one_line(repo: Path) -> None:
    cmd = [PYTHON, "-m", "server.cli", "serve", "--model-repository", str(repo), "--grpc-port", "0", "--http-port", "0",
           "--grpc-restricted-protocol=inference:k=topsecret", "--grpc-restricted-protocol=inference:k2=topsecret2"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60 * TIME_FACTOR)
    assert proc.returncode == 1
    assert proc.stderr.strip() == (
        "nereid: restricted protocol 'inference' can not be specified in multiple config groups"
    )
