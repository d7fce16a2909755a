"""HTTP requests go through the same inference path as gRPC ones (`InferenceServicer.infer`):
per-client rate limits (429 with the gRPC path's message; one bucket per client whichever
transport it uses) and tracing (a sampled HTTP request is traced, its W3C `traceparent`
header is the root's parent, as gRPC metadata of that name is)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from lifecycle_util import wait_until
from test_tracing import PARENT_ID, TRACE_ID, Receiver
from tritonclient.utils import InferenceServerException
from util import ServerProcess, http_request, identity_config, scaled, write_model

BODY = json.dumps({"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}]}).encode()


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.server.shutdown()


def _http(srv: ServerProcess, model: str, headers: dict[str, str] | None = None) -> tuple[int, str]:
    status, _, body = http_request(srv.http_port, "POST", f"/v2/models/{model}/infer", BODY, headers)
    return status, "" if status == 200 else json.loads(body)["error"]


def test_rate_limit_per_client_over_http(tmp_path, server_factory) -> None:
    write_model(tmp_path, "m", identity_config("m", [("INPUT0", "FP32", [4])], max_batch_size=4))
    srv = server_factory(tmp_path, "--rate-limit-per-client", "0.2:3", "--rate-limit-client-header", "x-client")
    alice = {"x-client": "alice"}
    answers = [_http(srv, "m", alice) for _ in range(5)]
    assert [s for s, _ in answers] == [200, 200, 200, 429, 429], answers
    assert answers[3][1].startswith("rate limit exceeded: client 'x-client=alice' may send model 'm' at most "
                                    "0.2 requests/s (burst 3)"), answers
    # tritonclient.http sees Triton's error body with the status.
    c = httpclient.InferenceServerClient(srv.http_url, network_timeout=scaled(30))
    inp = httpclient.InferInput("INPUT0", [1, 4], "FP32")
    inp.set_data_from_numpy(np.ones((1, 4), np.float32))
    with pytest.raises(InferenceServerException) as info:
        c.infer("m", [inp], headers=dict(alice))
    assert info.value.status() == "429" and "rate limit exceeded" in info.value.message()
    c.close()
    # Another client has its own bucket; the same client over gRPC shares the HTTP one.
    assert _http(srv, "m", {"x-client": "bob"})[0] == 200
    g = grpcclient.InferenceServerClient(srv.url)
    ginp = grpcclient.InferInput("INPUT0", [1, 4], "FP32")
    ginp.set_data_from_numpy(np.ones((1, 4), np.float32))
    with pytest.raises(InferenceServerException) as ginfo:
        g.infer("m", [ginp], headers=dict(alice))
    assert ginfo.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
    g.close()
    # Without the header a client is known by its address: limited too.
    anonymous = [_http(srv, "m")[0] for _ in range(5)]
    assert anonymous[:3] == [200] * 3 and 429 in anonymous, anonymous
    # Refusals are counted by model and code, as over gRPC.
    metrics = http_request(srv.metrics_port, "GET", "/metrics")[2].decode()
    assert [line for line in metrics.splitlines()
            if line.startswith("nereid_rejected_requests") and 'model="m"' in line and "RESOURCE_EXHAUSTED" in line]


def test_http_requests_are_traced_with_the_callers_trace_context(tmp_path, receiver: Receiver,
                                                                 server_factory) -> None:
    write_model(tmp_path, "m", identity_config("m", [("INPUT0", "FP32", [4])], max_batch_size=4))
    srv = server_factory(tmp_path, "--trace-config", "mode=opentelemetry",
                         "--trace-config", f"opentelemetry,url={receiver.url}",
                         "--trace-config", "opentelemetry,bsp_schedule_delay=50",
                         "--trace-config", "level=TIMESTAMPS", "--trace-config", "rate=1")
    c = httpclient.InferenceServerClient(srv.http_url, network_timeout=scaled(30))
    inp = httpclient.InferInput("INPUT0", [1, 4], "FP32")
    inp.set_data_from_numpy(np.ones((1, 4), np.float32))
    c.infer("m", [inp], request_id="http-traced", headers={"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"})
    c.close()
    wait_until(lambda: TRACE_ID in receiver.by_trace() and len(receiver.by_trace()[TRACE_ID]) == 5,
               timeout=scaled(10), what="the HTTP request's five spans")
    spans = {span.name: span for span in receiver.by_trace()[TRACE_ID]}
    assert set(spans) == {"InferRequest", "receive", "queue", "compute", "send"}
    root = spans["InferRequest"]
    assert root.parent_span_id.hex() == PARENT_ID
    attributes = {a.key: a.value.string_value for a in root.attributes}
    assert attributes["triton.model_name"] == "m" and attributes["triton.request_id"] == "http-traced"
