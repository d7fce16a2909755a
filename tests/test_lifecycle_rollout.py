"""Zero-downtime rollout in poll mode, under steady traffic.

A client sends requests at a steady rate while the test adds version 2, then a
corrupt version 3, then removes version 1, then changes the config. Each model
version is a distinct ONNX graph (OUTPUT0 = INPUT0 + version), so every answer
proves which version computed it; the config change adds OUTPUT1, so every
answer also proves which config served it. Every request must succeed, the
answers must move forward through the phases the version policy dictates and
never back, and RepositoryIndex must tell the same story.
"""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import numpy as np
from lifecycle_util import add_config, add_model_bytes, index_of, infer_fp32, wait_until, write_version_atomically
from util import ServerProcess, client, require, scaled

require("onnx")
require("onnxruntime")

POLL_SECS = "0.25"
RATE_HZ = 50
MAX_REQUESTS = 4000
MAX_SECONDS = scaled(60.0)


class SteadyClient:
    """Sends one request every 1/RATE_HZ s (bounded by count and time) and records each outcome."""

    def __init__(self, srv: ServerProcess, name: str) -> None:
        self.client = client(srv)
        self.name = name
        self.results: list[tuple[float, str, float, bool]] = []  # (t, version, addend, has OUTPUT1)
        self.errors: list[str] = []
        self.sent = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> SteadyClient:
        self._thread.start()
        return self

    def _run(self) -> None:
        data = np.arange(4, dtype=np.float32)
        started = time.monotonic()
        while not self._stop.is_set() and self.sent < MAX_REQUESTS and time.monotonic() - started < MAX_SECONDS:
            due = started + self.sent / RATE_HZ
            time.sleep(max(0.0, due - time.monotonic()))
            self.sent += 1
            try:
                result = infer_fp32(self.client, self.name, data)
            except Exception as exc:  # every failure is a test failure; keep counting
                self.errors.append(f"request {self.sent}: {exc}")
                continue
            out0 = result.as_numpy("OUTPUT0")
            addend = out0 - data
            if not np.all(addend == addend[0]):
                self.errors.append(f"request {self.sent}: inconsistent answer {out0}")
                continue
            self.results.append((time.monotonic(), result.get_response().model_version, float(addend[0]),
                                 result.as_numpy("OUTPUT1") is not None))

    def count(self) -> int:
        return len(self.results)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(scaled(30))
        self.client.close()


def _traffic_continues(steady: SteadyClient, n: int = 15) -> None:
    """Let at least n more requests through after a step, so each step happens under traffic."""
    target = steady.count() + n
    wait_until(lambda: steady.count() >= target or steady.errors, 10, what=f"{n} more answers")


def test_rollout_under_steady_traffic(tmp_path: Path, server_factory) -> None:
    repo = tmp_path / "repo"
    model = repo / "ver"
    model.mkdir(parents=True)
    (model / "config.pbtxt").write_text(add_config("ver"))  # version policy: latest 1 (the default)
    write_version_atomically(model, 1, {"model.onnx": add_model_bytes(1.0)})
    srv: ServerProcess = server_factory(repo, "--model-control-mode", "poll", "--repository-poll-secs", POLL_SECS)
    c = client(srv)
    story: dict[str, list[tuple[str, str, str]]] = {"start": index_of(c, "ver")}
    assert story["start"] == [("1", "READY", "")]

    steady = SteadyClient(srv, "ver").start()
    try:
        _traffic_continues(steady)

        # 1. Version 2 arrives: it loads in the background and takes over; 1 drains and unloads.
        write_version_atomically(model, 2, {"model.onnx": add_model_bytes(2.0)})
        story["v2 added"] = wait_until(lambda: (rows := index_of(c, "ver")) == [
            ("1", "UNAVAILABLE", "unloaded"), ("2", "READY", "")] and rows, what="version 2 to take over")
        _traffic_continues(steady)
        assert c.is_server_ready()

        # 2. A corrupt version 3: its load fails, version 2 keeps serving, the index says why.
        write_version_atomically(model, 3, {"model.onnx": b"this is not an onnx model"})
        # (the index shows version 3 LOADING while its load runs: wait for the load to end)
        rows = wait_until(lambda: (r := index_of(c, "ver")) and any(v == "3" and s != "LOADING" for v, s, _ in r)
                          and r, what="version 3 to be tried")
        story["v3 corrupt"] = rows
        _traffic_continues(steady)
        assert c.is_server_ready(), "a failed update while v2 serves must not make the server unready"

        # 3. Version 1's folder is removed: it leaves the index, nothing else changes.
        shutil.rmtree(model / "1")
        story["v1 removed"] = wait_until(lambda: (r := index_of(c, "ver")) and all(v != "1" for v, _, _ in r) and r,
                                         what="version 1 to leave the index")
        _traffic_continues(steady)

        # 4. The config changes (OUTPUT1 added): version 2 reloads with it, 3 is tried again and still fails.
        (model / "config.pbtxt").write_text(add_config("ver", with_output1=True))
        wait_until(lambda: steady.results and steady.results[-1][3], what="answers from the new config")
        story["config changed"] = wait_until(
            lambda: (r := index_of(c, "ver")) and all(s != "LOADING" for _, s, _ in r) and r,
            what="no version loading after the config change")
        _traffic_continues(steady)
        assert c.is_server_ready()
    finally:
        steady.stop()

    sent, failed = steady.sent, len(steady.errors)
    print(f"\nrollout: {sent} requests sent, {failed} failed, {steady.count()} answered")
    assert failed == 0, steady.errors[:5]
    assert sent == steady.count() >= 60

    # Every answer was computed by the version it claims.
    for _, version, addend, _ in steady.results:
        assert float(version) == addend, (version, addend)
    # Phases only move forward: (v1, old config) -> (v2, old config) -> (v2, new config). Never v3.
    phases = [(version, has_out1) for _, version, _, has_out1 in steady.results]
    order = [("1", False), ("2", False), ("2", True)]
    assert set(phases) == set(order), set(phases)
    ranks = [order.index(p) for p in phases]
    assert ranks == sorted(ranks), "an answer came from an older version or config after a newer one"

    # The index told the same story.
    v3_reason = story["v3 corrupt"][-1][2]
    assert story["v3 corrupt"][:2] == [("1", "UNAVAILABLE", "unloaded"), ("2", "READY", "")]
    assert story["v3 corrupt"][2][:2] == ("3", "UNAVAILABLE")
    assert "model.onnx" in v3_reason and "onnxruntime could not load" in v3_reason
    assert [r[:2] for r in story["v1 removed"]] == [("2", "READY"), ("3", "UNAVAILABLE")]
    assert [r[:2] for r in story["config changed"]] == [("2", "READY"), ("3", "UNAVAILABLE")]
    assert story["config changed"][0][2] == ""
    config = c.get_model_config("ver").config
    assert [o.name for o in config.output] == ["OUTPUT0", "OUTPUT1"]

    # The log says what happened, failure reason included.
    log = srv.log
    assert "loaded model 'ver' version 2" in log
    assert "unloading model 'ver' version 1" in log
    assert "model 'ver' version 3 failed to load" in log and "still serving version(s) 2" in log
    assert "replaced by a newly loaded copy" in log  # the config change reloaded version 2
    c.close()
