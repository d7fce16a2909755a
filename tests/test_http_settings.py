"""Trace and log settings over HTTP (`/v2/trace/setting`, `/v2/models/{m}/trace/setting`,
`/v2/logging`; server/http/settings.py): tritonclient.http reads and changes them with Triton's
JSON shapes, over the same servicer handlers (and state) as gRPC's TraceSetting/LogSettings."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from test_http import raw
from tritonclient.utils import InferenceServerException
from util import ServerProcess, identity_config, scaled, write_model


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    repo = tmp_path_factory.mktemp("http_settings_repo")
    write_model(repo, "m", identity_config("m", [("INPUT0", "FP32", [4])], max_batch_size=4))
    srv = ServerProcess([repo])
    yield srv
    srv.stop()


@pytest.fixture
def c(server: ServerProcess) -> Iterator[httpclient.InferenceServerClient]:
    cl = httpclient.InferenceServerClient(server.http_url, network_timeout=scaled(30))
    yield cl
    cl.close()


def test_trace_settings(c, server) -> None:
    start = c.get_trace_settings()
    assert start["trace_level"] == ["OFF"] and start["trace_mode"] == "opentelemetry"
    assert isinstance(start["trace_rate"], str) and isinstance(start["trace_count"], str)
    changed = c.update_trace_settings(settings={"trace_rate": "7", "trace_level": ["TIMESTAMPS"]})
    assert changed["trace_rate"] == "7" and changed["trace_level"] == ["TIMESTAMPS"]
    g = grpcclient.InferenceServerClient(server.url)
    try:  # one tracer behind both transports
        assert g.get_trace_settings(as_json=True)["settings"]["trace_rate"]["value"] == ["7"]
    finally:
        g.close()
    # a model's own setting, then cleared with null back to the global one
    model = c.update_trace_settings(model_name="m", settings={"trace_rate": "3"})
    assert model["trace_rate"] == "3" and c.get_trace_settings()["trace_rate"] == "7"
    assert c.get_trace_settings(model_name="m")["trace_rate"] == "3"
    assert c.update_trace_settings(model_name="m", settings={"trace_rate": None})["trace_rate"] == "7"
    # null on a global setting: back to the startup value
    back = c.update_trace_settings(settings={"trace_rate": None, "trace_level": None})
    assert back["trace_rate"] == start["trace_rate"] and back["trace_level"] == ["OFF"]
    for bad in ({"trace_level": ["LOUD"]}, {"trace_rate": "0"}, {"trace_rate": 5}, {"no_such": "1"}):
        with pytest.raises(InferenceServerException) as info:
            c.update_trace_settings(settings=bad)
        assert info.value.status() == "400", (bad, info.value)
    status, _, body = raw(server, "GET", "/v2/models/nope/trace/setting")
    assert status == 404 and "nope" in json.loads(body)["error"]
    assert raw(server, "PUT", "/v2/trace/setting")[0] == 405


def test_log_settings(c, server) -> None:
    start = c.get_log_settings()
    assert start == {"log_file": "", "log_info": True, "log_warning": True, "log_error": True,
                     "log_verbose_level": 0, "log_format": "default"}
    changed = c.update_log_settings({"log_verbose_level": 2, "log_warning": False, "log_info": None})
    assert changed["log_verbose_level"] == 2 and changed["log_warning"] is False and changed["log_info"] is True
    g = grpcclient.InferenceServerClient(server.url)
    try:  # one log state behind both transports
        assert g.get_log_settings(as_json=True)["settings"]["log_verbose_level"] == {"uint32_param": 2}
    finally:
        g.close()
    for bad in ({"log_info": 3}, {"log_verbose_level": -1}, {"log_format": "xml"}, {"log_file": "/tmp/x.log"},
                {"no_such": True}, {"log_info": [True]}):
        with pytest.raises(InferenceServerException) as info:
            c.update_log_settings(bad)
        assert info.value.status() == "400", (bad, info.value)
    assert c.update_log_settings({"log_verbose_level": 0, "log_warning": True}) == start
    status, _, body = raw(server, "POST", "/v2/logging", b"[1]")
    assert status == 400 and "JSON object" in json.loads(body)["error"]
