"""Tracing (issue 10): OpenTelemetry spans for receive, queue, compute and send, exported over
OTLP/HTTP to a receiver in this test process, W3C trace context from gRPC metadata, Triton's
rate and count, and the TraceSetting RPC."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from lifecycle_util import wait_until
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from util import ServerProcess, expect_error, identity_config, scaled, write_model

from server.tracing.config import parse_trace_config

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"


class Receiver:
    """An OTLP/HTTP trace receiver: collects every span posted to /v1/traces."""

    def __init__(self) -> None:
        self.spans: list = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers["Content-Length"]))
                request = trace_service_pb2.ExportTraceServiceRequest.FromString(body)
                for resource in request.resource_spans:
                    for scope in resource.scope_spans:
                        receiver.spans.extend(scope.spans)
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.end_headers()
                self.wfile.write(trace_service_pb2.ExportTraceServiceResponse().SerializeToString())

            def log_message(self, *args) -> None:
                return

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"127.0.0.1:{self.server.server_address[1]}/v1/traces"

    def by_trace(self) -> dict[str, list]:
        traces: dict[str, list] = {}
        for span in self.spans:
            traces.setdefault(span.trace_id.hex(), []).append(span)
        return traces


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.server.shutdown()


def _infer(client: grpcclient.InferenceServerClient, request_id: str, headers=None) -> None:
    inp = grpcclient.InferInput("INPUT0", [1, 4], "FP32")
    inp.set_data_from_numpy(np.ones((1, 4), np.float32))
    client.infer("m", [inp], request_id=request_id, headers=headers)


def _server(tmp_path, receiver: Receiver, *config: str) -> ServerProcess:
    write_model(tmp_path, "m", identity_config("m", [("INPUT0", "FP32", [4])], max_batch_size=4))
    args = ["--trace-config", "mode=opentelemetry", "--trace-config", f"opentelemetry,url={receiver.url}",
            "--trace-config", "opentelemetry,bsp_schedule_delay=50"]
    for item in config:
        args += ["--trace-config", item]
    return ServerProcess([tmp_path], args)


def test_spans_for_each_step_with_the_callers_trace_context(tmp_path, receiver: Receiver) -> None:
    srv = _server(tmp_path, receiver, "level=TIMESTAMPS", "rate=1")
    try:
        client = grpcclient.InferenceServerClient(srv.url)
        _infer(client, "traced-1", headers={"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"})
        wait_until(lambda: TRACE_ID in receiver.by_trace() and len(receiver.by_trace()[TRACE_ID]) == 5,
                   timeout=scaled(10), what="the request's five spans")
    finally:
        srv.stop()
    spans = {span.name: span for span in receiver.by_trace()[TRACE_ID]}
    assert set(spans) == {"InferRequest", "receive", "queue", "compute", "send"}
    root = spans["InferRequest"]
    assert root.parent_span_id.hex() == PARENT_ID  # the caller's span is the parent
    attributes = {a.key: a.value.string_value for a in root.attributes}
    assert attributes["triton.model_name"] == "m" and attributes["triton.request_id"] == "traced-1"
    assert attributes["triton.model_version"] == "1" and attributes["rpc.grpc.status_code"] == "OK"
    for name in ("receive", "queue", "compute", "send"):
        child = spans[name]
        assert child.parent_span_id == root.span_id
        assert root.start_time_unix_nano <= child.start_time_unix_nano <= child.end_time_unix_nano
        assert child.end_time_unix_nano <= root.end_time_unix_nano
    assert spans["receive"].end_time_unix_nano <= spans["compute"].start_time_unix_nano
    assert spans["compute"].end_time_unix_nano <= spans["send"].end_time_unix_nano
    assert [e.name for e in spans["compute"].events] == ["COMPUTE_INPUT_END", "COMPUTE_OUTPUT_START"]


def test_rate_count_and_trace_setting(tmp_path, receiver: Receiver) -> None:
    srv = _server(tmp_path, receiver, "level=TIMESTAMPS", "rate=2")
    try:
        client = grpcclient.InferenceServerClient(srv.url)
        settings = client.get_trace_settings(as_json=True)["settings"]
        assert settings["trace_level"]["value"] == ["TIMESTAMPS"] and settings["trace_rate"]["value"] == ["2"]
        for i in range(6):
            _infer(client, f"r{i}")
        wait_until(lambda: len(receiver.by_trace()) == 3, timeout=scaled(10), what="one trace in two")
        # The model's own level OFF: nothing more is traced for it.
        client.update_trace_settings(model_name="m", settings={"trace_level": ["OFF"]})
        assert client.get_trace_settings(model_name="m", as_json=True)["settings"]["trace_level"]["value"] == ["OFF"]
        for i in range(4):
            _infer(client, f"off{i}")
        # Cleared again, with a count of 1 and every request sampled: exactly one more trace.
        client.update_trace_settings(model_name="m", settings={"trace_level": [], "trace_rate": ["1"],
                                                               "trace_count": ["1"]})
        for i in range(4):
            _infer(client, f"once{i}")
        wait_until(lambda: len(receiver.by_trace()) == 4, timeout=scaled(10), what="the one counted trace")
        assert client.get_trace_settings(as_json=True)["settings"]["trace_rate"]["value"] == ["2"]  # global kept
        for bad in ({"trace_level": ["LOUD"]}, {"trace_rate": ["0"]}, {"trace_file": ["/tmp/t.json"]},
                    {"no_such": ["1"]}):
            assert "TraceSetting" in expect_error("INVALID_ARGUMENT", client.update_trace_settings,
                                                  settings=bad).message()
        expect_error("NOT_FOUND", client.update_trace_settings, model_name="nope", settings={"trace_rate": ["1"]})
    finally:
        srv.stop()
    ids = {a.value.string_value for s in receiver.spans if s.name == "InferRequest" for a in s.attributes
           if a.key == "triton.request_id"}
    assert not any(i.startswith("off") for i in ids), ids
    assert sum(i.startswith("once") for i in ids) == 1, ids


def test_trace_config_parsing() -> None:
    config = parse_trace_config(["level=TIMESTAMPS", "rate=10", "count=5", "mode=opentelemetry",
                                 "opentelemetry,url=collector:4318/v1/traces", "opentelemetry,resource=env=prod"])
    assert config.settings.level == ("TIMESTAMPS",) and config.settings.rate == 10 and config.settings.count == 5
    assert config.url == "collector:4318/v1/traces" and config.resource == (("env", "prod"),)
    assert not parse_trace_config([]).settings.on
    for bad in (["level=LOUD"], ["rate=0"], ["count=-2"], ["mode=triton"], ["triton,file=/tmp/t"], ["nokey"],
                ["opentelemetry,resource=novalue"], ["what=1"]):
        with pytest.raises(ValueError):
            parse_trace_config(bad)
