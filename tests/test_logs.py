"""Logging (issue 10): Triton's flags, the LogSettings RPC changing them at run time, the json
format with model, version and request id, and grpcio's chatter kept out unless asked for."""

from __future__ import annotations

import json
import re
import subprocess

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from lifecycle_util import wait_until
from tritonclient.grpc import service_pb2 as pb
from util import PYTHON, ROOT, ServerProcess, expect_rpc_error, identity_config, scaled, write_model


def _infer(client: grpcclient.InferenceServerClient, request_id: str) -> None:
    inp = grpcclient.InferInput("INPUT0", [1, 4], "FP32")
    inp.set_data_from_numpy(np.ones((1, 4), np.float32))
    client.infer("m", [inp], request_id=request_id)


def _settings(client: grpcclient.InferenceServerClient) -> dict:
    return client.get_log_settings(as_json=True)["settings"]


@pytest.fixture
def repo(tmp_path):
    write_model(tmp_path, "m", identity_config("m", [("INPUT0", "FP32", [4])], max_batch_size=4))
    return tmp_path


def test_log_settings_rpc_reads_and_changes_them(repo) -> None:
    srv = ServerProcess([repo])
    try:
        client = grpcclient.InferenceServerClient(srv.url)
        settings = _settings(client)
        assert settings["log_verbose_level"] == {"uint32_param": 0}
        assert settings["log_info"] == {"bool_param": True} and settings["log_format"] == {"string_param": "default"}
        _infer(client, "quiet-1")
        assert "quiet-1" not in srv.log  # verbose off: no per-request line
        client.update_log_settings({"log_verbose_level": 1})
        _infer(client, "loud-1")
        wait_until(lambda: "ModelInfer 'm' version 1 id 'loud-1': OK" in srv.log, timeout=scaled(5),
                   what="a per-request line at verbose 1")
        assert "executed 1 request(s)" in srv.log  # and one per batch
        assert "Loaded running loop" not in srv.log  # grpcio's chatter only from level 2
        client.update_log_settings({"log_verbose_level": 0, "log_format": "json"})
        _infer(client, "quiet-2")
        client.update_log_settings({"log_verbose_level": 1})
        _infer(client, "json-1")
        wait_until(lambda: '"request_id": "json-1"' in srv.log, timeout=scaled(5), what="a json request line")
        line = next(line for line in srv.lines if '"request_id": "json-1"' in line and "ModelInfer" in line)
        entry = json.loads(line)
        assert entry["model"] == "m" and entry["version"] == "1" and entry["level"] == "DEBUG"
        assert "quiet-2" not in srv.log
        assert _settings(client)["log_format"] == {"string_param": "json"}
        stub = ch = srv.channel()
        call = stub.unary_unary("/inference.GRPCInferenceService/LogSettings")
        for key, field, value in (("log_verbose_level", "string_param", "high"), ("log_info", "uint32_param", 3),
                                  ("log_format", "string_param", "xml"), ("no_such", "bool_param", True),
                                  ("log_file", "string_param", "/tmp/elsewhere.log")):
            request = pb.LogSettingsRequest()
            setattr(request.settings[key], field, value)
            err = expect_rpc_error(grpc.StatusCode.INVALID_ARGUMENT, call, request.SerializeToString(), timeout=10)
            assert "LogSettings" in err.details(), err.details()
        ch.close()
        client.update_log_settings({"log_info": False, "log_verbose_level": 0})
        client.update_log_settings({"log_info": True})
    finally:
        srv.stop()


def test_json_format_and_log_file_from_the_command_line(repo, tmp_path) -> None:
    """With --log-file nothing goes to stderr: the port is read from the file."""
    log_file = tmp_path / "nereid.log"
    proc = subprocess.Popen(
        [PYTHON, "-m", "server.cli", "serve", "--model-repository", str(repo), "--grpc-address", "127.0.0.1",
         "--grpc-port", "0", "--metrics-port", "0", "--http-port", "0", "--log-format", "json", "--log-verbose", "1",
         "--log-file", str(log_file)], cwd=ROOT, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: log_file.exists() and "models loaded" in log_file.read_text(), timeout=scaled(60),
                   what="the server to log its start to the file")
        started = next(json.loads(line) for line in log_file.read_text().splitlines()
                       if "Started GRPCInferenceService" in line)
        port = int(re.search(r":(\d+) ", started["message"]).group(1))
        _infer(grpcclient.InferenceServerClient(f"127.0.0.1:{port}"), "file-1")
        wait_until(lambda: '"file-1"' in log_file.read_text(), timeout=scaled(5), what="the request's line")
    finally:
        proc.terminate()
        _, stderr = proc.communicate(timeout=scaled(30))
    assert stderr.strip() == "", stderr
    entries = [json.loads(line) for line in log_file.read_text().splitlines() if line.strip()]  # all JSON
    assert any(e.get("request_id") == "file-1" and e.get("model") == "m" for e in entries)
    assert {"time", "level", "logger", "message"} <= set(entries[0])


def test_warning_and_error_switches(repo) -> None:
    srv = ServerProcess([repo], ["--log-warning", "false", "--log-verbose", "2"])
    try:
        client = grpcclient.InferenceServerClient(srv.url)
        _infer(client, "chatty")
        wait_until(lambda: "Loaded running loop" in srv.log, timeout=scaled(5), what="grpcio's lines at level 2")
        assert _settings(client)["log_warning"] == {"bool_param": False}
    finally:
        srv.stop()
