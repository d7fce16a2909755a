"""Poll mode: models and versions come and go with the repository on disk, half-copied
folders are never loaded, a failed load keeps the old copy serving and is retried only
when the files change, retired versions drain their in-flight requests first, and the
health service follows."""

from __future__ import annotations

import queue
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from grpc_health.v1 import health_pb2
from lifecycle_util import (
    add_config,
    add_model_bytes,
    index_of,
    infer_fp32,
    states,
    wait_until,
    write_version_atomically,
)
from util import client, expect_error, identity_config, scaled, write_model
from util import health_status as _health

POLL = ("--model-control-mode", "poll", "--repository-poll-secs", "0.2")
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def _id_config(name: str, **kwargs) -> str:
    return identity_config(name, [("INPUT0", "FP32", [4])], **kwargs)


def _x() -> np.ndarray:
    return np.arange(4, dtype=np.float32)


def _onnx_model_polled(tmp_path: Path, server_factory):
    """Model `m` (ONNX, version 1 answering INPUT0 + 1) in a polled repository:
    (its folder, the server, a client)."""
    pytest.importorskip("onnx")
    model = tmp_path / "repo" / "m"
    model.mkdir(parents=True)
    (model / "config.pbtxt").write_text(add_config("m"))
    write_version_atomically(model, 1, {"model.onnx": add_model_bytes(1.0)})
    srv = server_factory(tmp_path / "repo", *POLL)
    return model, srv, client(srv)


def test_models_added_and_removed_are_picked_up(tmp_path: Path, server_factory) -> None:
    repo = tmp_path / "repo"
    write_model(repo, "first", _id_config("first"))
    srv = server_factory(repo, *POLL)
    c = client(srv)
    write_model(repo, "late", _id_config("late"))
    wait_until(lambda: states(c, "late") == {"1": "READY"}, what="the new model to load")
    np.testing.assert_array_equal(infer_fp32(c, "late", _x()).as_numpy("OUTPUT0"), _x())
    wait_until(lambda: _health(srv, "late") == SERVING, timeout=5, what="health of the new model")
    assert c.is_server_ready()

    shutil.rmtree(repo / "late")
    wait_until(lambda: not index_of(c, "late"), what="the removed model to leave the index")
    expect_error("NOT_FOUND", infer_fp32, c, "late", _x())
    wait_until(lambda: _health(srv, "late") == NOT_SERVING, timeout=5, what="health of the removed model")
    assert c.is_server_ready() and states(c, "first") == {"1": "READY"}
    assert "model 'late' removed from the repository" in srv.log


def test_health_follows_a_model_whose_versions_are_retired(tmp_path: Path, server_factory) -> None:
    """A new version taking over keeps the model SERVING; once its only version folder is gone
    (the version retired, the model still listed) the model is NOT_SERVING; a version coming
    back makes it SERVING again. The other model is untouched throughout."""
    repo = tmp_path / "repo"
    write_model(repo, "m", _id_config("m"))
    write_model(repo, "keep", _id_config("keep"))
    srv = server_factory(repo, *POLL)
    c = client(srv)
    assert _health(srv, "m") == SERVING

    (repo / "m" / "2").mkdir()
    wait_until(lambda: states(c, "m") == {"1": "UNAVAILABLE", "2": "READY"}, what="version 2 to take over")
    assert _health(srv, "m") == SERVING, "the model went NOT_SERVING while one version replaced another"

    shutil.rmtree(repo / "m" / "1")  # already retired: a scan in between changes nothing
    shutil.rmtree(repo / "m" / "2")
    wait_until(lambda: "READY" not in states(c, "m").values() and index_of(c, "m"),
               what="the last version to be retired")
    wait_until(lambda: _health(srv, "m") == NOT_SERVING, timeout=5,
               what="health of a model with no version left to go NOT_SERVING")
    assert _health(srv, "keep") == SERVING

    (repo / "m" / "3").mkdir()
    wait_until(lambda: states(c, "m").get("3") == "READY", what="version 3")
    wait_until(lambda: _health(srv, "m") == SERVING, timeout=5, what="health to follow the new version")


def test_half_copied_version_is_never_loaded(tmp_path: Path, server_factory) -> None:
    model, srv, c = _onnx_model_polled(tmp_path, server_factory)
    data = add_model_bytes(2.0)
    (model / "2").mkdir()
    # A slow copy: a few bytes at a time, several chunks landing between two scans.
    chunk = max(1, len(data) // 24)
    for start in range(0, len(data), chunk):
        with open(model / "2" / "model.onnx", "ab") as f:
            f.write(data[start:start + chunk])
        time.sleep(0.05)
        assert set(states(c, "m")) == {"1"}, f"version 2 was touched mid-copy: {index_of(c, 'm')}"
    wait_until(lambda: states(c, "m").get("2") == "READY", what="version 2 once the copy finished")
    assert infer_fp32(c, "m", _x()).get_response().model_version == "2"
    assert "version 2 failed" not in srv.log, srv.log


def test_failed_load_keeps_serving_and_a_fix_is_picked_up(tmp_path: Path, server_factory) -> None:
    model, srv, c = _onnx_model_polled(tmp_path, server_factory)

    write_version_atomically(model, 2, {"model.onnx": b"\x08\x07corrupt"})
    # While version 2 loads the index shows it LOADING (seen once under --workers 2 and load):
    # wait for its load to end, then check how it ended.
    rows = wait_until(lambda: (r := index_of(c, "m")) and len(r) == 2 and r[1][1] != "LOADING" and r,
                      what="version 2 to fail")
    assert rows[0] == ("1", "READY", "")
    assert rows[1][:2] == ("2", "UNAVAILABLE") and "model.onnx" in rows[1][2]
    assert infer_fp32(c, "m", _x()).get_response().model_version == "1"
    assert c.is_server_ready() and _health(srv, "") == SERVING and _health(srv, "m") == SERVING
    time.sleep(1.0)  # five more scans of the same corrupt files: not retried
    assert srv.log.count("model 'm' version 2 failed to load") == 1, srv.log

    write_version_atomically(model, 2, {"model.onnx": add_model_bytes(2.0)})  # the fix
    wait_until(lambda: states(c, "m") == {"1": "UNAVAILABLE", "2": "READY"}, what="the fixed version 2")
    assert infer_fp32(c, "m", _x()).get_response().model_version == "2"


def test_new_model_that_fails_makes_server_unready_until_fixed(tmp_path: Path, server_factory) -> None:
    repo = tmp_path / "repo"
    write_model(repo, "good", _id_config("good"))
    srv = server_factory(repo, *POLL)
    c = client(srv)
    write_model(repo, "bad", _id_config("bad").replace("max_batch_size: 0", "max_batch_size: -3"))
    wait_until(lambda: index_of(c, "bad") and index_of(c, "bad")[0][1] == "UNAVAILABLE", what="bad to fail")
    assert "max_batch_size" in index_of(c, "bad")[0][2]
    wait_until(lambda: not c.is_server_ready(), what="strict readiness to drop")
    # Health follows readiness through the event loop, a moment after the index: wait for it too.
    wait_until(lambda: _health(srv, "") == NOT_SERVING and _health(srv, "bad") == NOT_SERVING, timeout=5,
               what="server and model health to go NOT_SERVING")
    assert "model 'bad' failed to load" in srv.log

    (repo / "bad" / "config.pbtxt").write_text(_id_config("bad"))
    wait_until(lambda: states(c, "bad") == {"1": "READY"}, what="the fixed config")
    wait_until(c.is_server_ready, what="readiness to return")
    wait_until(lambda: _health(srv, "") == SERVING and _health(srv, "bad") == SERVING, timeout=5,
               what="server and model health to return to SERVING")


def test_broken_config_keeps_serving_then_reload(tmp_path: Path, server_factory) -> None:
    repo = tmp_path / "repo"
    write_model(repo, "m", _id_config("m"))
    srv = server_factory(repo, *POLL)
    c = client(srv)
    (repo / "m" / "config.pbtxt").write_text('name: "m"\ninput [ { name: "INPUT0" ')
    wait_until(lambda: "config.pbtxt" in index_of(c, "m")[0][2], what="the config error in the index")
    assert index_of(c, "m")[0][:2] == ("1", "READY")
    np.testing.assert_array_equal(infer_fp32(c, "m", _x()).as_numpy("OUTPUT0"), _x())
    assert c.is_server_ready()

    (repo / "m" / "config.pbtxt").write_text(_id_config("m", outputs=["RENAMED"]))
    wait_until(lambda: index_of(c, "m") == [("1", "READY", "")], what="the fixed config")
    result = infer_fp32(c, "m", _x())
    np.testing.assert_array_equal(result.as_numpy("RENAMED"), _x())


def test_retired_version_finishes_in_flight_requests_first(tmp_path: Path, server_factory) -> None:
    repo = tmp_path / "repo"
    write_model(repo, "slow", _id_config("slow", execute_delay_ms=1000, instance_count=1))
    srv = server_factory(repo, *POLL, "--exit-timeout-secs", "20")
    c = client(srv)
    done: queue.Queue = queue.Queue()
    for index in range(3):  # one runs, two wait in v1's queue: about 3 s of work
        inp = grpcclient.InferInput("INPUT0", [4], "FP32")
        inp.set_data_from_numpy(_x() + index)
        c.async_infer("slow", [inp], request_id=str(index), client_timeout=30,
                      callback=lambda result, error: done.put((result, error)))
    time.sleep(0.2)
    (repo / "slow" / "2").mkdir()
    wait_until(lambda: states(c, "slow").get("2") == "READY", what="version 2")
    assert states(c, "slow")["1"] == "UNLOADING", index_of(c, "slow")  # still draining its queue
    # New requests already go to version 2 while version 1 drains.
    fresh = threading.Thread(target=lambda: done.put(("fresh", infer_fp32(client(srv), "slow", _x()))))
    fresh.start()
    answers = [done.get(timeout=scaled(30)) for _ in range(4)]
    fresh.join(scaled(10))
    old = [r for r, e in answers if r != "fresh"]
    assert all(e is None for r, e in answers if r != "fresh"), answers
    assert sorted(r.get_response().model_version for r in old) == ["1", "1", "1"]
    assert [e.get_response().model_version for r, e in answers if r == "fresh"] == ["2"]
    wait_until(lambda: states(c, "slow") == {"1": "UNAVAILABLE", "2": "READY"}, what="version 1 unloaded")
    assert index_of(c, "slow")[0][2] == "unloaded"


def test_load_and_unload_are_refused_in_poll_mode(tmp_path: Path, server_factory) -> None:
    repo = tmp_path / "repo"
    write_model(repo, "m", _id_config("m"))
    srv = server_factory(repo, *POLL)
    c = client(srv)
    message = "explicit model load / unload is not allowed if polling is enabled"
    assert message in expect_error("UNAVAILABLE", c.load_model, "m").message()
    assert message in expect_error("UNAVAILABLE", c.unload_model, "m").message()
    assert states(c, "m") == {"1": "READY"}


def test_sigterm_in_poll_mode_stops_polling_and_exits_0(tmp_path: Path, server_factory) -> None:
    repo = tmp_path / "repo"
    write_model(repo, "m", _id_config("m"))
    srv = server_factory(repo, *POLL)
    assert client(srv).is_server_ready()
    srv.terminate()
    assert srv.wait(20) == 0, srv.log
    assert "stopped" in srv.log
